"""Train one model on one fold: `python -m hpa train --data URI --split split.csv --fold 0 --out URI`.

torchvision references/classification style, one module per concern:
- config: TrainConfig, every option with its default and help (the CLI parser is generated from it)
- data: the split CSV's fold (read_split) and the train/val loaders over PNGs or packed shards (DataSource)
- optim: augmentation, loss, optimizer and LR schedule
- loop: `train_one_epoch` and `evaluate` (explicit arguments, return what they compute), SIGTERM handling
- checkpoint: what last.pt/best.pt hold, the run identity and what --resume accepts
- outputs: the metric line, history.csv and the files under --out
- run: one run from setup to metrics.json (`train`; with --predict-tta, rank 0 then predicts val and test), `main`
- launch: the in-pod launcher, `nproc` DDP processes of this interpreter (`train_processes`, `run_training`)
DDP helpers are in hpa.ddp. The same entry point runs single-process, under `torchrun`, in a KFP component and
as a Katib trial (what the pipeline's train task runs around it is hpa.train_task's).

Contracts kept here:
- stdout carries exactly one line per epoch, `epoch=3 train_loss=0.1234 val_loss=0.1345 val_macro_f1=0.4567`
  (Katib's StdOut collector parses every `name=number` on stdout), led by an RFC3339 UTC time with
  --metric-timestamps (Katib trials use it); everything else goes to stderr.
- Outputs under --out (local dir or s3://), written by rank 0 only, each atomically: last.pt, best.pt,
  history.csv, val_predictions.npz, thresholds.json, config.json, metrics.json, and TensorBoard event files
  under tensorboard/ (or --tensorboard-dir; on by default, uploaded during training when it is s3://); with
  --predict-tta N, val_predictions_tta.npz and test_predictions_tta.npz (TTA, from best.pt, after training).
- `last.pt` is written each epoch and every --checkpoint-every-steps steps, with everything needed to
  continue mid-epoch exactly (model, optimizer, scheduler, scaler, loop counters, every rank's RNG
  states); `--resume` continues from it, only when the run identity it records (data, split, fold, arch and
  every option that changes results: IDENTITY_FIELDS) is this run's. SIGTERM saves it and exits 143.
"""

from hpa.train.checkpoint import IDENTITY_FIELDS, RESUME_KEYS, LoopState
from hpa.train.config import TrainConfig, config_from_args, get_args_parser
from hpa.train.data import DataSource, FoldData, read_split, split_folds
from hpa.train.loop import EXIT_PREEMPTED, Preempted, evaluate, train_one_epoch
from hpa.train.optim import MultiLabelLoss, augment, make_optimizer, make_scheduler, sqrt_pos_weight
from hpa.train.outputs import HISTORY_FIELDS, metric_line
from hpa.train.run import Trainer, main, train

__all__ = ["EXIT_PREEMPTED", "HISTORY_FIELDS", "IDENTITY_FIELDS", "RESUME_KEYS", "DataSource", "FoldData",
           "LoopState", "MultiLabelLoss", "Preempted", "TrainConfig", "Trainer", "augment", "config_from_args",
           "evaluate", "get_args_parser", "main", "make_optimizer", "make_scheduler", "metric_line", "read_split",
           "split_folds", "sqrt_pos_weight", "train", "train_one_epoch"]
