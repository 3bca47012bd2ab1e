"""One training run from start to end: `train(cfg)` sets up the process (devices, seeds, DDP), the data, model,
loss and optimizer (Trainer.setup, resuming from last.pt with --resume), runs `train_one_epoch` and `evaluate`
each epoch, prints the metric line and writes the outputs; `main(argv)` is `python -m hpa train`."""

from __future__ import annotations

import io
import json
import logging
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hpa import ddp
from hpa.crossfit import crossfit_groups
from hpa.errors import ConfigError, DataError, HPAError, StoreError
from hpa.evaluate import thresholds_json
from hpa.labels import NUM_CLASSES
from hpa.models import create_model
from hpa.predict import predict
from hpa.predictions import predictions_bytes
from hpa.store import read_bytes
from hpa.train.checkpoint import (LoopState, inference_checkpoint, load_resumable, restore, run_identity,
                                  training_checkpoint)
from hpa.train.config import TrainConfig, config_from_args, get_args_parser
from hpa.train.data import DataSource, read_split
from hpa.train.loop import EXIT_PREEMPTED, Forward, Preempted, StopFlag, evaluate, train_one_epoch
from hpa.train.optim import MultiLabelLoss, make_optimizer, make_scheduler, sqrt_pos_weight
from hpa.train.outputs import PREDICTION_FILES, Outputs, history_csv, metric_line

log = logging.getLogger("hpa.train")


class Trainer:
    """What one run holds between epochs: the process's device and rank, the fold's data, the model (bare, and
    as trained and evaluated: DDP, compiled), loss, optimizer, schedule, the loop state and its outputs."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stop = StopFlag()
        device_kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        if device_kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no CUDA device is available")
        self.dist = ddp.init_distributed(device_kind)
        self.device = torch.device(device_kind, self.dist.local_rank) if device_kind == "cuda" else torch.device("cpu")
        self.out = Outputs(cfg, enabled=self.dist.is_main)

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights
        self.aug_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1 + self.dist.rank)

        split_bytes = read_bytes(cfg.split)
        self.fold = read_split(cfg.split, cfg.fold, split_bytes)
        # Fixed parts of the validation fold for out-of-sample scores (hpa.crossfit), the same every epoch.
        self.val_groups = crossfit_groups(self.fold.val_ids, self.fold.val_targets)
        self.data = DataSource(cfg, self.fold, self.dist)
        if cfg.predict_tta and self.data.shards and not cfg.predict_data:  # refused before training, not after
            raise ConfigError(f"predict_data: required with --predict-tta when --data is packed shards ({cfg.data}): "
                              "expected the dataset root whose CSVs (sample_submission.csv) the predictions read")
        self.identity = run_identity(cfg, self.data.shards, split_bytes, self.dist.world_size,
                                     self.data.steps_per_epoch)
        self.model = create_model(cfg.arch, cfg.in_chans, NUM_CLASSES, weights=cfg.weights, drop_rate=cfg.drop_rate)
        self.model.to(self.device)
        channels_last = cfg.channels_last and self.device.type == "cuda"
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = Forward(cfg.in_chans, cfg.size, channels_last, self.device.type == "cuda" and cfg.amp)
        pos_weight = sqrt_pos_weight(self.fold.train_targets) if cfg.pos_weight == "sqrt" else None
        self.criterion = MultiLabelLoss(cfg.loss, cfg.focal_gamma, pos_weight).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.data.steps_per_epoch)
        # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one format.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.state = LoopState()
        ddp_model = self.model
        if self.dist.distributed:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # Evaluation runs on the bare model: ranks see different numbers of val batches, so it must not
        # enter DDP's collectives.
        self.train_model = torch.compile(ddp_model) if cfg.compile else ddp_model
        self.eval_model = torch.compile(self.model) if cfg.compile else self.model
        if cfg.resume:
            self.load_last()
        self.tb = self._tensorboard()

    def _tensorboard(self):
        """Rank 0's EventLog (hpa.tensorboard): written locally (<out>/tensorboard, or the s3:// staging dir),
        uploaded as it grows when the target is s3://. After --resume a new event file continues the curves."""
        cfg = self.cfg
        if not (cfg.tensorboard and self.dist.is_main):
            return None
        try:
            from hpa.tensorboard import EventLog
            import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
        except ImportError:
            log.warning("tensorboard is not installed; --tensorboard ignored")
            return None
        target = cfg.tensorboard_dir or f"{cfg.out.rstrip('/')}/tensorboard"
        remote = target.startswith("s3://")
        local = self.out.dir / "tensorboard" if remote else Path(target)
        log.info("tensorboard: event files in %s%s", target, " (uploaded during training)" if remote else "")
        resumed = self.state.step + 1 if self.state.step else None  # hide what the interrupted run logged after it
        return EventLog(local, target if remote else None, every_steps=cfg.tensorboard_every_steps,
                        world_size=self.dist.world_size, purge_step=resumed)

    # --- checkpoints
    def checkpoint(self) -> dict:
        return training_checkpoint(self.cfg, self.model, self.optimizer, self.scheduler, self.scaler, self.state,
                                   self.aug_gen, self.dist.world_size, self.identity)

    def save(self, name: str, ckpt: dict) -> None:
        if not self.dist.is_main:
            return
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        log.info("checkpoint write begins: %s epoch %d step %d", name, ckpt["epoch"], ckpt["step"])
        self.out.write(name, buf.getvalue())
        log.info("checkpoint saved: %s epoch %d step %d", name, ckpt["epoch"], ckpt["step"])

    def save_last(self) -> None:
        self.save("last.pt", self.checkpoint())

    def load_last(self) -> None:
        path = self.out.fetch("last.pt") if self.dist.is_main else None
        # Non-zero ranks read rank 0's local file when --out is local; for s3 each rank fetches its own copy into
        # its own staging dir (self.out: kept for the run, so the copy is there when it is read).
        if not self.dist.is_main:
            path = self.out.fetch("last.pt") if self.out.remote else Path(self.cfg.out) / "last.pt"
            path = path if path and path.exists() else None
        if path is None:
            log.warning("--resume: no last.pt under %s, starting from scratch", self.cfg.out)
            return
        name = f"{self.cfg.out.rstrip('/')}/last.pt"
        ckpt = load_resumable(path, name, self.identity, self.cfg)
        self.state = restore(ckpt, name, self.model, self.optimizer, self.scheduler, self.scaler, self.aug_gen,
                             self.dist.rank)
        log.info("resumed from %s: epoch %d, step %d (%d into the epoch)", path, self.state.epoch,
                 self.state.step, self.state.step_in_epoch)

    def stop_requested(self) -> bool:
        """SIGTERM seen by any rank (a collective)."""
        return ddp.any_rank(self.stop.set, self.device)

    # --- run
    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        self.out.write("config.json", json.dumps(asdict(cfg), indent=2).encode())
        try:
            while s.epoch < cfg.epochs and not s.stopped_early:
                t0 = time.time()
                try:
                    train_loss = train_one_epoch(
                        self.train_model, self.criterion, self.optimizer, self.scheduler,
                        self.data.train_batches(s.epoch, s.step_in_epoch, self.device), self.device, s, cfg,
                        forward=self.forward, aug_gen=self.aug_gen, steps_per_epoch=self.data.steps_per_epoch,
                        save_last=self.save_last, stop_requested=self.stop_requested, tb=self.tb,
                        progress=self.dist.is_main)
                    val = evaluate(self.eval_model, self.criterion, self.data.val_batches(self.device), self.device,
                                   self.fold, self.val_groups, cfg, forward=self.forward)
                except (StoreError, DataError):
                    self.save_on_data_failure()
                    raise
                self.end_epoch(train_loss, val, time.time() - t0)
        finally:  # also after SIGTERM or a failure: what was logged reaches the store
            if self.tb is not None:
                self.tb.close()
        return self.metrics()

    def save_on_data_failure(self) -> None:
        """The store or a shard failed while reading (after the store's own bounded retries). The loop
        is at a step boundary, so last.pt written now resumes exactly. Single process only: in DDP the
        other ranks would not join the checkpoint's collective."""
        if self.dist.distributed:
            return
        try:
            self.save_last()
            log.error("reading data failed at step %d; last.pt written, rerun with --resume", self.state.step)
        except HPAError as exc:  # the output store may be down too: keep the original error
            log.error("reading data failed, and writing last.pt failed as well: %s", exc)

    def end_epoch(self, train_loss: float, val: dict, seconds: float) -> None:
        cfg, s = self.cfg, self.state
        epoch = s.epoch + 1  # 1-based in the metric line and history
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_macro_f1": val["f1"],
               "val_macro_f1_in_sample": val["f1_in_sample"], "val_macro_f1_at_05": val["f1_at_05"],
               "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}
        if self.dist.is_main:
            # The only stdout line: Katib's StdOut collector reads it.
            print(metric_line(epoch, train_loss, val["loss"], val["f1"], cfg.metric_timestamps), flush=True)
            if self.tb is not None:  # at the global step that ends the epoch, as the per-step scalars
                self.tb.epoch_end(s.step, row, val["f1_per_class"])
        s.history.append(row)
        if val["f1"] > s.best_f1:
            s.best_f1, s.best_epoch, s.bad_epochs = val["f1"], epoch, 0
            self.write_best(val)
        else:
            s.bad_epochs += 1
        s.epoch, s.step_in_epoch, s.loss_sum, s.loss_count = epoch, 0, 0.0, 0
        s.stopped_early = bool(cfg.patience and s.bad_epochs >= cfg.patience and s.epoch < cfg.epochs)
        if s.stopped_early:
            log.info("early stopping: no improvement in %d epochs (best %.4f at epoch %d)", s.bad_epochs,
                     s.best_f1, s.best_epoch)
        self.out.write("history.csv", history_csv(s.history))
        self.out.write("metrics.json", json.dumps(self.metrics(), indent=2).encode())
        self.save_last()

    def write_best(self, val: dict) -> None:
        self.save("best.pt", inference_checkpoint(self.checkpoint(), val["thresholds"]))
        self.out.write("val_predictions.npz", predictions_bytes(np.array(self.fold.val_ids), val["probs"],
                                                                self.fold.val_targets, model=self.cfg.arch,
                                                                tta=1))  # made without TTA
        self.out.write("thresholds.json", json.dumps(thresholds_json(val["thresholds"], self.cfg.threshold_mode),
                                                     indent=2).encode())

    def metrics(self) -> dict:
        s = self.state
        best = next((r for r in s.history if r["epoch"] == s.best_epoch), {})
        return {"best_val_macro_f1": s.best_f1, "best_epoch": s.best_epoch, "val_loss": best.get("val_loss"),
                "val_macro_f1_in_sample": best.get("val_macro_f1_in_sample"),
                "val_macro_f1_at_05": best.get("val_macro_f1_at_05"),
                "threshold_mode": self.cfg.threshold_mode, "epochs_run": s.epoch, "steps": s.step,
                "stopped_early": s.stopped_early, "out": self.cfg.out}


def train(cfg: TrainConfig) -> dict:
    """Run training; returns metrics.json's content. Raises Preempted after a SIGTERM checkpoint."""
    cfg.validate()
    trainer = Trainer(cfg)
    try:
        trainer.stop.install()
        if trainer.dist.is_main:
            log.info("train config: %s", json.dumps(asdict(cfg), sort_keys=True))
        trainer.setup()
        log.info("%s on %s, world size %d, %d train / %d val images, %d steps per epoch, data: %s",
                 cfg.arch, trainer.device, trainer.dist.world_size, len(trainer.fold.train_ids),
                 len(trainer.fold.val_ids), trainer.data.steps_per_epoch, "shards" if trainer.data.shards else "png")
        metrics = trainer.run()
    finally:
        trainer.stop.restore()
        if cfg.deterministic:  # do not leak the global switch into an in-process caller
            torch.use_deterministic_algorithms(False)
        ddp.cleanup()
    if cfg.predict_tta and trainer.dist.is_main:
        predict_best(cfg, trainer.out, trainer.data.shards, trainer.device)
    return metrics


def predict_best(cfg: TrainConfig, out: Outputs, shards: str | None, device: torch.device) -> None:
    """--predict-tta: TTA predictions of the validation fold and the test set from best.pt, written to --out
    (PREDICTION_FILES), so that a multi-node job delivers them and its launcher only fetches two small files.
    Rank 0 alone, after the process group is gone: the other ranks have nothing left to do and exit; their
    torchrun agents wait for this node in the exit barrier (torch/distributed/elastic/agent/server/api.py
    `_exit_barrier`, whose timeout is logged, not raised), and the job completes when this pod does."""
    best = out.fetch("best.pt")
    if best is None:
        raise DataError(f"predict_tta: no best.pt under {cfg.out} to predict with")
    data = cfg.predict_data or cfg.data
    with tempfile.TemporaryDirectory(prefix="hpa-predict-") as tmp:
        for ids, name in PREDICTION_FILES.items():
            local = Path(tmp) / name
            predict(best, data, ids, cfg.split, cfg.fold, tta=cfg.predict_tta, out=local, batch_size=cfg.batch_size,
                    device=str(device), workers=cfg.workers, cache_dir=cfg.cache_dir, shards=shards)
            out.write(name, local.read_bytes())
    log.info("predictions with tta=%d written: %s", cfg.predict_tta,
             ", ".join(f"{cfg.out.rstrip('/')}/{name}" for name in PREDICTION_FILES.values()))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        train(config_from_args(args))
    except Preempted:
        log.warning("SIGTERM: checkpoint written to %s, exiting %d", args.out, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0
