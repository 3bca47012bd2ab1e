"""Train one model on one fold: `python -m hpa train --data URI --split split.csv --fold 0 --out URI`.

torchvision references/classification style: `get_args_parser()`, `train_one_epoch`, `evaluate`, DDP
helpers in `hpa.distributed_utils`. The same entry point runs single-process, under `torchrun`, in a
KFP component and as a Katib trial.

Contracts kept here:
- stdout carries exactly one line per epoch, `epoch=3 train_loss=0.1234 val_loss=0.1345 val_macro_f1=0.4567`
  (Katib's StdOut collector parses every `name=number` on stdout), led by an RFC3339 UTC time with
  --metric-timestamps (Katib trials use it); everything else goes to stderr.
- Outputs under --out (local dir or s3://), written by rank 0 only, each atomically: last.pt, best.pt,
  history.csv, val_predictions.npz, thresholds.json, config.json, metrics.json, and TensorBoard event files
  under tensorboard/ (or --tensorboard-dir; on by default, uploaded during training when it is s3://).
- `last.pt` is written each epoch and every --checkpoint-every-steps steps, with everything needed to
  continue mid-epoch exactly (model, optimizer, scheduler, scaler, loop counters, every rank's RNG
  states); `--resume` continues from it, only when the run identity it records (data, split, fold, arch and
  every option that changes results: IDENTITY_FIELDS) is this run's. SIGTERM saves it and exits 143.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from hpa import distributed_utils as du
from hpa.config import env_float
from hpa.errors import ConfigError, DataError, HPAError, StoreError, first_line
from hpa.crossfit import crossfit_groups, policy_fitter, score_policy
from hpa.evaluate import (
    DEFAULT_SHRINK_STRENGTH, THRESHOLD_MODES, macro_f1, predictions_bytes, thresholds_json,
)
from hpa.inputs import prepare
from hpa.labels import COLORS, NUM_CLASSES, parse_target, to_matrix
from hpa.models import (CHECKPOINT_KEYS, MODEL_NAMES, create_model, load_model_state, read_checkpoint,
                        weights_source)

log = logging.getLogger("hpa.train")

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what Kubernetes and shells expect after a graceful stop
# val_macro_f1: the threshold policy's out-of-sample (cross-fitted) score, what the metric line, the best
# epoch and Katib use; val_macro_f1_in_sample: the same thresholds fitted and scored on the whole fold
# (optimistic; shown beside it so the gap is visible).
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_macro_f1", "val_macro_f1_in_sample", "val_macro_f1_at_05",
                  "lr", "seconds")


@dataclass
class TrainConfig:
    """Every option of `python -m hpa train` (field name = option name with '-' for '_')."""

    data: str = ""                  # dataset root (Kaggle layout, local or s3://) or packed shards root
    split: str = ""                 # split CSV (Id,Target,fold), local or s3://
    out: str = ""                   # output dir, local or s3://
    fold: int = 0                   # validation fold; the others train
    arch: str = "resnet18"
    weights: str = ""               # "" = random init | imagenet (timm, needs the hub) | local file | s3:// URI
    color_mode: str = "rgby"        # rgby = 4 channels; rgb = classic 3-channel mapping
    size: int = 512
    epochs: int = 10
    batch_size: int = 32            # per process
    lr: float = 1e-3
    optimizer: str = "adamw"        # adamw | sgd
    weight_decay: float = 1e-4
    momentum: float = 0.9           # sgd only
    scheduler: str = "cosine"       # cosine (linear warm-up, cosine decay) | onecycle
    warmup_epochs: float = 1.0
    loss: str = "bce"               # bce | focal
    focal_gamma: float = 2.0
    pos_weight: str = "none"        # none | sqrt: sqrt(neg/pos) per class from the train fold, in [1, 10]
    drop_rate: float = 0.0
    augment: bool = True            # dihedral flips/rot90, random crop-scale, brightness/contrast, on device
    min_crop: float = 0.75          # smallest crop side (fraction of the image) for crop-scale
    amp: bool = True                # bf16 autocast on CUDA; CPU always runs fp32
    channels_last: bool = True      # NHWC on CUDA (tensor cores); ignored on CPU, where it is slower
    compile: bool = False
    threshold_mode: str = "fitted"  # policy scored (out-of-sample) by the metric line: fitted|global|shrunk|prior
    threshold: float = 0.5          # global: the threshold; shrunk: the value rare classes are pulled toward
    shrink_strength: float = DEFAULT_SHRINK_STRENGTH  # shrunk: k in n_pos / (n_pos + k)
    patience: int = 0               # early stopping after this many epochs without improvement (0 = off)
    seed: int = 0
    workers: int = 4                # DataLoader workers per process
    threads: int = 0                # torch.set_num_threads (0 = torch's default)
    device: str = "auto"            # auto | cpu | cuda
    deterministic: bool = False     # torch.use_deterministic_algorithms (exact resume tests)
    metric_timestamps: bool = False  # prefix the metric line with an RFC3339 UTC time (Katib orders by it)
    checkpoint_every_steps: int = 0  # also write last.pt every K optimizer steps (0 = per epoch only)
    resume: bool = False            # continue from <out>/last.pt when it exists
    val_batch_size: int = 0         # 0 = 2 x batch_size
    cache_dir: str | None = None    # local copy of PNGs / shard cache for s3:// data (default: under the temp dir)
    work_dir: str | None = None     # local staging of outputs when --out is s3:// (default: a temp dir)
    tensorboard: bool = True        # TensorBoard event files (rank 0): per-step loss/lr/throughput, per-epoch metrics
    tensorboard_dir: str = ""       # local or s3:// (default <out>/tensorboard); s3:// gets them during training
    tensorboard_every_steps: int = 10  # per-step scalars every N optimizer steps

    def validate(self) -> "TrainConfig":
        """One clear ConfigError line for the first bad option."""
        checks = [
            (bool(self.data), "data: required (dataset root or shards URI)"),
            (bool(self.split), "split: required (split CSV with Id,Target,fold)"),
            (bool(self.out), "out: required (output dir or s3:// URI)"),
            (self.arch in MODEL_NAMES, f"arch: unknown model {self.arch!r}, expected one of {', '.join(MODEL_NAMES)}"),
            (self.color_mode in ("rgby", "rgb"), f"color_mode: {self.color_mode!r}, expected rgby or rgb"),
            (self.size >= 32 and self.size % 32 == 0, f"size: {self.size} must be a positive multiple of 32"),
            (self.epochs >= 1, f"epochs: {self.epochs} must be >= 1"),
            (self.batch_size >= 2, f"batch_size: {self.batch_size} must be >= 2 (BatchNorm needs 2 samples)"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr: {self.lr} must be > 0"),
            (self.optimizer in ("adamw", "sgd"), f"optimizer: {self.optimizer!r}, expected adamw or sgd"),
            (self.weight_decay >= 0, f"weight_decay: {self.weight_decay} must be >= 0"),
            (self.scheduler in ("cosine", "onecycle"), f"scheduler: {self.scheduler!r}, expected cosine or onecycle"),
            (0 <= self.warmup_epochs <= self.epochs, f"warmup_epochs: {self.warmup_epochs} must be in [0, epochs={self.epochs}]"),
            (self.loss in ("bce", "focal"), f"loss: {self.loss!r}, expected bce or focal"),
            (self.focal_gamma >= 0, f"focal_gamma: {self.focal_gamma} must be >= 0"),
            (self.pos_weight in ("none", "sqrt"), f"pos_weight: {self.pos_weight!r}, expected none or sqrt"),
            (0 <= self.drop_rate < 1, f"drop_rate: {self.drop_rate} must be in [0, 1)"),
            (0 < self.min_crop <= 1, f"min_crop: {self.min_crop} must be in (0, 1]"),
            (self.threshold_mode in THRESHOLD_MODES, f"threshold_mode: {self.threshold_mode!r}, expected one of {', '.join(THRESHOLD_MODES)}"),
            (0 < self.threshold < 1, f"threshold: {self.threshold} must be in (0, 1)"),
            (math.isfinite(self.shrink_strength) and self.shrink_strength >= 0,
             f"shrink_strength: {self.shrink_strength} must be a finite number >= 0"),
            (self.patience >= 0, f"patience: {self.patience} must be >= 0"),
            (self.workers >= 0, f"workers: {self.workers} must be >= 0"),
            (self.threads >= 0, f"threads: {self.threads} must be >= 0"),
            (self.device in ("auto", "cpu", "cuda"), f"device: {self.device!r}, expected auto, cpu or cuda"),
            (self.checkpoint_every_steps >= 0, f"checkpoint_every_steps: {self.checkpoint_every_steps} must be >= 0"),
            (self.tensorboard_every_steps >= 1, f"tensorboard_every_steps: {self.tensorboard_every_steps} must be >= 1"),
            (self.val_batch_size >= 0, f"val_batch_size: {self.val_batch_size} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        # What checkpoints and logs record: never an s3:// URI's credentials or query string.
        clean = weights_source(self.weights)
        if clean != str(self.weights or "").strip():
            log.warning("weights: credentials/query string dropped from the s3:// URI (S3 keys come from HPA_S3_*)")
        self.weights = clean
        return self

    @property
    def in_chans(self) -> int:
        return 4 if self.color_mode == "rgby" else 3


def metric_line(epoch: int, train_loss: float, val_loss: float, val_macro_f1: float, timestamp: bool = False) -> str:
    """The epoch line in Katib's StdOut format; with `timestamp`, led by an RFC3339 UTC time, which Katib's
    collector takes as the observation time (without one, every value gets the zero time)."""
    line = f"epoch={epoch} train_loss={train_loss:.4f} val_loss={val_loss:.4f} val_macro_f1={val_macro_f1:.4f}"
    if timestamp:
        from datetime import datetime, timezone

        line = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ ") + line
    return line


def numeric_metrics(run_dir) -> dict[str, float]:
    """The numbers of a run's metrics.json (what the pipeline logs as KFP Metrics)."""
    with open(Path(run_dir) / "metrics.json") as f:
        summary = json.load(f)
    return {k: float(v) for k, v in sorted(summary.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_and_predict(cfg: TrainConfig, model_out, val_out, test_out, tta: int = 1, shards=None,
                      predict_data=None) -> dict[str, float]:
    """The pipeline's training stage: train into `cfg.out` (a local run directory), move the best
    checkpoint to `model_out`, drop `last.pt` (only resuming needs it), then write TTA predictions of the
    validation fold and the test set. Returns the run's numeric metrics."""
    from hpa.predict import predict_val_and_test

    train(cfg)
    run_dir = Path(cfg.out)
    shutil.move(run_dir / "best.pt", model_out)  # the artifact may live on another filesystem
    (run_dir / "last.pt").unlink(missing_ok=True)
    predict_val_and_test(model_out, predict_data or cfg.data, cfg.split, cfg.fold, val_out, test_out, tta=tta,
                         shards=shards, batch_size=cfg.batch_size, cache_dir=cfg.cache_dir, workers=cfg.workers)
    return numeric_metrics(run_dir)


def get_args_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m hpa train", description="Train one model on one fold.")
    p.add_argument("--data", required=True, help="dataset root (Kaggle layout) or packed shards root; local or s3://")
    p.add_argument("--split", required=True, help="split CSV (Id,Target,fold); local or s3://")
    p.add_argument("--out", required=True, help="output dir; local or s3://")
    p.add_argument("--fold", type=int, default=defaults.fold)
    p.add_argument("--arch", default=defaults.arch, help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--weights", default=defaults.weights,
                   help="start from: imagenet (timm's pretrained weights; needs the model hub), or a 3-channel "
                        "state dict of the arch (local .pt/.pth/.safetensors file or s3:// URI); default: random init")
    p.add_argument("--color-mode", default=defaults.color_mode, choices=("rgby", "rgb"))
    p.add_argument("--size", type=int, default=defaults.size)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--optimizer", default=defaults.optimizer, choices=("adamw", "sgd"))
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--momentum", type=float, default=defaults.momentum)
    p.add_argument("--scheduler", default=defaults.scheduler, choices=("cosine", "onecycle"))
    p.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    p.add_argument("--loss", default=defaults.loss, choices=("bce", "focal"))
    p.add_argument("--focal-gamma", type=float, default=defaults.focal_gamma)
    p.add_argument("--pos-weight", default=defaults.pos_weight, choices=("none", "sqrt"))
    p.add_argument("--drop-rate", type=float, default=defaults.drop_rate)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment)
    p.add_argument("--min-crop", type=float, default=defaults.min_crop)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=defaults.amp)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=defaults.channels_last)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults.compile)
    p.add_argument("--threshold-mode", default=defaults.threshold_mode, choices=THRESHOLD_MODES)
    p.add_argument("--threshold", type=float, default=defaults.threshold)
    p.add_argument("--shrink-strength", type=float, default=defaults.shrink_strength,
                   help="k of --threshold-mode shrunk: a class with k validation positives keeps half its fitted cut")
    p.add_argument("--patience", type=int, default=defaults.patience)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--workers", type=int, default=defaults.workers)
    p.add_argument("--threads", type=int, default=defaults.threads)
    p.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=defaults.deterministic)
    p.add_argument("--metric-timestamps", action=argparse.BooleanOptionalAction, default=defaults.metric_timestamps,
                   help="start each epoch line with an RFC3339 UTC time; Katib's StdOut collector stores it "
                        "with the values, so epochs are ordered by time rather than by insertion")
    p.add_argument("--checkpoint-every-steps", type=int, default=defaults.checkpoint_every_steps)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=defaults.resume)
    p.add_argument("--val-batch-size", type=int, default=defaults.val_batch_size)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=defaults.tensorboard,
                   help="TensorBoard event files (rank 0): train/loss, lr, images/s every --tensorboard-every-steps "
                        "steps; every epoch the history.csv columns and val_f1_per_class/<class>")
    p.add_argument("--tensorboard-dir", default=defaults.tensorboard_dir,
                   help="where the event files go, local or s3:// (default <out>/tensorboard); an s3:// target gets "
                        "them during training: every epoch, at most every minute within one, and at the end")
    p.add_argument("--tensorboard-every-steps", type=int, default=defaults.tensorboard_every_steps)
    return p


# --- data ----------------------------------------------------------------------------------------

@dataclass
class FoldData:
    train_ids: list[str]
    train_targets: np.ndarray  # (N, 28) uint8
    val_ids: list[str]
    val_targets: np.ndarray


def read_split(uri: str, fold: int, raw: bytes | None = None) -> FoldData:
    """Fold `fold` of the split CSV at `uri` (`raw`: its bytes, when already read) as train/val ids and targets."""
    import pandas as pd

    from hpa.evaluate import read_uri

    try:
        df = pd.read_csv(io.BytesIO(read_uri(uri) if raw is None else raw), dtype={"Id": str, "Target": str, "fold": str},
                         encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{uri}: not a readable split CSV ({type(exc).__name__})") from None
    missing = [c for c in ("Id", "Target", "fold") if c not in df.columns]
    if missing:
        raise DataError(f"{uri}: missing column {missing[0]!r}, expected Id,Target,fold")
    fold_of = split_folds(df["fold"], uri)
    folds = sorted(set(fold_of.tolist()))
    if fold not in folds:
        raise ConfigError(f"fold: {fold} is not in {uri} (folds present: {folds})")
    targets = to_matrix([parse_target(t, f"{uri} row {i + 2}") for i, t in enumerate(df["Target"])])
    is_val = fold_of == fold
    if is_val.all():
        raise ConfigError(f"fold: {fold} is the only fold in {uri}; nothing is left to train on")
    ids = df["Id"].astype(str).to_numpy()
    return FoldData(list(ids[~is_val]), targets[~is_val], list(ids[is_val]), targets[is_val])


def split_folds(values, uri: str) -> np.ndarray:
    """A split CSV's fold column (read as strings) as ints. A value that is not a non-negative integer is one
    DataError line naming the file, row (header = row 1) and value; "2.0" is read as 2 (a tool that wrote the
    column as floats meant an integer), "1.5", "-1", "x" and "" are errors."""
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        text = "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()
        if not re.fullmatch(r"\d+(\.0*)?", text):
            raise DataError(f"{uri} row {i + 2}: fold {text!r} is not a non-negative integer")
        out[i] = int(text.split(".")[0])
    return out


def shards_uri(data: str) -> str | None:
    """The packed-shards root for --data, or None when --data is the PNG Kaggle layout."""
    from hpa.store import open_store

    store = open_store(data)
    return data if store.exists("train/shards.json") or store.exists("shards.json") else None


def local_png_root(cfg: TrainConfig, ids: list[str], dist: du.DistInfo):
    """A DatasetView (hpa.committed) holding train/<id>_<color>.<ext> for `ids`: --data itself when local
    (verified in place when committed); for s3:// a verified copy fetched by one process per node into a
    private directory (content cache: --cache-dir), which the other ranks of the node read."""
    from hpa.committed import DatasetView, image_view

    view = image_view(cfg.data, "train", ids, cfg.cache_dir) if dist.local_rank == 0 else None
    # every rank learns its node's directory: ranks of a node are numbered consecutively (torchrun)
    roots = du.all_gather_objects(view.root if view is not None else None)
    du.barrier()
    return view if view is not None else DatasetView(roots[dist.rank - dist.local_rank], owned=False)


class ResumableSampler(Sampler[int]):
    """DistributedSampler's order for one epoch with the first `skip` indices dropped: a mid-epoch
    resume reproduces the remaining batches exactly without storing the permutation."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class DataSource:
    """Train/val loaders over the PNG layout (HPADataset) or packed shards (ShardDataset)."""

    def __init__(self, cfg: TrainConfig, fold: FoldData, dist: du.DistInfo):
        self.cfg, self.fold, self.dist = cfg, fold, dist
        self.shards = shards_uri(cfg.data)
        if self.shards is None:
            from hpa.data import HPADataset

            self.view = local_png_root(cfg, fold.train_ids + fold.val_ids, dist)  # kept: owns the local copy
            root = self.view.root
            self.train_ds = HPADataset(root, fold.train_ids, fold.train_targets.astype(np.float32), split="train",
                                       size=cfg.size, color_mode=cfg.color_mode)
            self.val_ds = HPADataset(root, fold.val_ids, fold.val_targets.astype(np.float32), split="train",
                                     size=cfg.size, color_mode=cfg.color_mode)
            # DistributedSampler also serves the single process (1 replica): one code path for both.
            self.sampler = DistributedSampler(self.train_ds, num_replicas=dist.world_size, rank=dist.rank,
                                              shuffle=True, seed=cfg.seed, drop_last=False)
            self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        else:
            from hpa.shards import ShardDataset

            # even=True: every rank streams ceil(N / world) samples, so all run the same number of
            # steps (DDP collectives); each DataLoader worker batches its own part, drop_last per part.
            self.train_ds = ShardDataset(self.shards, ids=fold.train_ids, shuffle=True, seed=cfg.seed,
                                         cache_dir=cfg.cache_dir, rank=dist.rank, world_size=dist.world_size, even=True)
            self.val_ds = ShardDataset(self.shards, ids=fold.val_ids, shuffle=False, seed=cfg.seed,
                                       cache_dir=cfg.cache_dir, rank=dist.rank, world_size=dist.world_size)
            m, w = len(self.train_ds), max(1, cfg.workers)
            self.steps_per_epoch = sum(((k + 1) * m // w - k * m // w) // cfg.batch_size for k in range(w))
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size: {cfg.batch_size} x {dist.world_size} process(es) is larger than the "
                              f"{len(fold.train_ids)} training images of fold {cfg.fold}")

    def _loader_kwargs(self, device: torch.device) -> dict:
        # A private generator: creating a loader iterator must not draw from the global torch RNG, or
        # a resumed run (which creates its iterator at a different point) would diverge.
        return dict(num_workers=self.cfg.workers, pin_memory=device.type == "cuda",
                    generator=torch.Generator().manual_seed(self.cfg.seed),
                    persistent_workers=False)

    def train_batches(self, epoch: int, skip_steps: int, device: torch.device):
        """Batches (x, y) of `epoch` from step `skip_steps` on, `steps_per_epoch` in all."""
        cfg = self.cfg
        if self.shards is None:
            self.sampler.set_epoch(epoch)
            sampler = ResumableSampler(self.sampler, skip_steps * cfg.batch_size)
            loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                **self._loader_kwargs(device))
            return itertools.islice(((b[0], b[1]) for b in loader), self.steps_per_epoch - skip_steps)
        self.train_ds.set_epoch(epoch)
        loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, drop_last=True, **self._loader_kwargs(device))
        # A stream cannot seek: a mid-epoch resume reads and drops the batches already trained on.
        return itertools.islice(((b[0], b[1]) for b in loader), skip_steps, self.steps_per_epoch)

    def val_batches(self, device: torch.device):
        """Yields (index into fold.val_ids, x, y); each rank gets a disjoint part, no padding."""
        cfg = self.cfg
        bs = cfg.val_batch_size or 2 * cfg.batch_size
        if self.shards is None:
            mine = list(range(self.dist.rank, len(self.val_ds), self.dist.world_size))
            loader = DataLoader(self.val_ds, batch_size=bs, sampler=mine, **self._loader_kwargs(device))
            start = 0
            for x, y in loader:
                yield torch.as_tensor(mine[start:start + len(x)]), x, y
                start += len(x)
            return
        position = {i: k for k, i in enumerate(self.fold.val_ids)}
        for x, y, ids in DataLoader(self.val_ds, batch_size=bs, **self._loader_kwargs(device)):
            yield torch.as_tensor([position[i] for i in ids]), x, y


# --- augmentation and input preparation, on the training device ----------------------------------

def augment(x: torch.Tensor, gen: torch.Generator, min_crop: float) -> torch.Tensor:
    """Per-sample random dihedral transform (flips + transpose = the 8 rotations/flips of a square),
    random crop-and-rescale, brightness/contrast. Microscopy has no canonical orientation, so all 8
    dihedral transforms are label-preserving; crops stay large so small patterns are kept."""
    n = x.shape[0]
    u = torch.rand(n, 8, generator=gen, device=x.device)
    x = torch.where((u[:, 0] < 0.5).view(n, 1, 1, 1), x.flip(-1), x)
    x = torch.where((u[:, 1] < 0.5).view(n, 1, 1, 1), x.flip(-2), x)
    x = torch.where((u[:, 2] < 0.5).view(n, 1, 1, 1), x.transpose(-1, -2), x)
    # Crop-scale as one affine resample: side s in [min_crop, 1], centre anywhere that keeps it inside.
    s = min_crop + (1 - min_crop) * u[:, 3]
    tx, ty = (1 - s) * (2 * u[:, 4] - 1), (1 - s) * (2 * u[:, 5] - 1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    contrast = (0.8 + 0.4 * u[:, 6]).view(n, 1, 1, 1)
    brightness = (0.8 + 0.4 * u[:, 7]).view(n, 1, 1, 1)
    mean = x.mean(dim=(-1, -2), keepdim=True)
    return (((x - mean) * contrast + mean) * brightness).clamp_(0, 1)


# --- loss, optimizer, schedule -------------------------------------------------------------------

class MultiLabelLoss(nn.Module):
    """BCE with logits, or sigmoid focal loss (Lin et al.) built on it; optional per-class pos_weight."""

    def __init__(self, kind: str = "bce", gamma: float = 2.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.kind, self.gamma = kind, gamma
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
        if self.kind == "focal":
            p = torch.sigmoid(logits)
            p_t = p * targets + (1 - p) * (1 - targets)
            loss = loss * (1 - p_t).pow(self.gamma)
        return loss.mean()


def sqrt_pos_weight(targets: np.ndarray) -> torch.Tensor:
    """sqrt(neg/pos) per class, clipped to [1, 10]: lifts rare classes without letting a class with
    a handful of positives dominate the gradient."""
    pos = targets.sum(0).astype(np.float64)
    neg = len(targets) - pos
    w = np.sqrt(np.divide(neg, pos, out=np.ones_like(pos), where=pos > 0))
    return torch.tensor(np.clip(w, 1.0, 10.0), dtype=torch.float32)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-d tensors), as in timm / torchvision references.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Stepped every optimizer step, so the schedule is the same whatever the dataset size."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=max(warmup, 1) / total, anneal_strategy="cos")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- RNG state (for exact resume) ----------------------------------------------------------------

def rng_state(aug_gen: torch.Generator) -> dict:
    """Every RNG this process draws from, as tensors and plain Python types (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- outputs -------------------------------------------------------------------------------------

class Outputs:
    """Files under --out. Everything is written atomically to a local dir (tmp + os.replace), then,
    when --out is s3://, published with the store's atomic put. Only rank 0 writes."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.uri, self.enabled = cfg.out, enabled
        self.remote = cfg.out.startswith("s3://")
        if self.remote:
            self.dir = Path(cfg.work_dir or tempfile.mkdtemp(prefix="hpa-train-"))
            if not cfg.work_dir:  # a private staging copy of what is published: gone with this object
                from hpa.committed import remove_if_creator

                weakref.finalize(self, remove_if_creator, str(self.dir), os.getpid())
        else:
            self.dir = Path(cfg.out)
        if enabled and self.dir.is_dir():
            for stale in self.dir.glob(".*.tmp"):  # left by a process killed mid-write; never a final name
                stale.unlink(missing_ok=True)

    def write(self, name: str, data: bytes, slow_write: float = 0.0) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if slow_write:  # fault-test hook: widen the window in which a kill lands mid-write
                f.flush()
                time.sleep(slow_write)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.remote:
            from hpa.store import open_store

            open_store(self.uri).put_file(name, str(path))

    def fetch(self, name: str) -> Path | None:
        """Local path of an existing output (downloaded from s3:// first), or None."""
        path = self.dir / name
        if self.remote:
            from hpa.store import open_store

            store = open_store(self.uri)
            if not store.exists(name):
                return None
            self.dir.mkdir(parents=True, exist_ok=True)
            store.get_file(name, str(path))
        return path if path.exists() else None


def history_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


# --- run identity (what --resume checks) ---------------------------------------------------------

# The options that decide what a run computes; with its data, split and world size they are the run's
# identity, recorded in every checkpoint, and --resume continues only a checkpoint of the same identity.
# Left out on purpose, as how a run executes rather than what it computes: out, device, amp, channels_last,
# compile, deterministic, workers, threads, val_batch_size, checkpoint_every_steps, metric_timestamps,
# cache_dir, work_dir, tensorboard* (and resume). The threshold options are in: they choose the best epoch and
# the reported score. epochs is in: the LR schedule is a function of it (cosine decay over epochs x steps;
# OneCycle even saves its total_steps), so a run resumed with more epochs would be neither the old run nor a
# fresh run of that length, while config.json and metrics.json would describe the latter. Train longer with
# a new run.
IDENTITY_FIELDS = ("fold", "arch", "weights", "color_mode", "size", "epochs", "batch_size", "lr", "optimizer",
                   "weight_decay", "momentum", "scheduler", "warmup_epochs", "loss", "focal_gamma", "pos_weight",
                   "drop_rate", "augment", "min_crop", "threshold_mode", "threshold", "shrink_strength", "patience",
                   "seed")
# What last.pt must hold for a resume (best.pt, an inference checkpoint, has no optimizer state).
RESUME_KEYS = CHECKPOINT_KEYS + ("optimizer", "scheduler", "scaler", "epoch", "step", "rng", "rank_loss", "loop",
                                 "world_size", "config")
RESUME_HINT = "start without --resume or use a fresh --out"


def data_identity(data: str, shards: str | None) -> str:
    """What the run reads: the sha256 of a packed-shards manifest, or of a committed dataset's object list
    (key, size, sha256 of each object in manifest.json, without its commit time: the same images recommitted or
    at another URI are the same data); a dataset without a manifest is known only by its URI (absolute path)."""
    from hpa.store import MANIFEST, StoreNotFoundError, open_store

    store = open_store(data)
    for key in (["train/shards.json", "shards.json"] if shards else []) + [MANIFEST]:
        try:
            raw = store.get_bytes(key)
        except StoreNotFoundError:
            continue
        if key == MANIFEST:
            try:
                raw = json.dumps(json.loads(raw)["objects"], sort_keys=True).encode()
            except (ValueError, KeyError, TypeError):
                pass  # not a manifest this version reads: its bytes, then
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    return data if data.startswith("s3://") else str(Path(data).resolve())


def run_identity(cfg: TrainConfig, shards: str | None, split_bytes: bytes, world_size: int,
                 steps_per_epoch: int) -> dict:
    """The identity recorded in checkpoints. steps_per_epoch covers what shapes the loop beyond the options
    (dataset size, and for shards the per-worker batching)."""
    return {"data": data_identity(cfg.data, shards), "split": "sha256:" + hashlib.sha256(split_bytes).hexdigest(),
            **{k: getattr(cfg, k) for k in IDENTITY_FIELDS}, "world_size": world_size,
            "steps_per_epoch": steps_per_epoch}


def identity_mismatch(name: str, recorded: dict, current: dict, recorded_cfg: dict, cfg: TrainConfig) -> str | None:
    """None when `recorded` (a checkpoint's identity) is `current`'s, else the one-line refusal naming the
    checkpoint and every differing field with both values."""
    def shown(key: str, value, uri) -> str:
        if key in ("data", "split") and str(value).startswith("sha256:"):
            return f"{uri} ({str(value)[:19]})"  # the URI to recognise, the content hash that differs
        return str(value)

    differ = [k for k in current if k not in recorded or recorded[k] != current[k]]
    if not differ:
        return None
    was = ", ".join(f"{k}={shown(k, recorded[k], recorded_cfg.get(k)) if k in recorded else '(not recorded)'}"
                    for k in differ)
    now = ", ".join(f"{k}={shown(k, current[k], getattr(cfg, k, None))}" for k in differ)
    return f"resume: {name}: was trained with {was}; this run has {now}; {RESUME_HINT}"


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """Loop counters saved in every checkpoint; with the RNG states they pin down the rest of the run."""

    epoch: int = 0           # epochs completed
    step: int = 0            # optimizer steps completed (global)
    step_in_epoch: int = 0   # steps of the current (unfinished) epoch completed
    loss_sum: float = 0.0    # train loss summed over this rank's samples of the current epoch
    loss_count: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint has been written."""


class StopFlag:
    """SIGTERM (what Kubernetes sends before killing a pod) only sets a flag; the loop checkpoints at
    the next step boundary, where the state is consistent, then exits 143."""

    def __init__(self):
        self.set = False
        self.previous = None

    def install(self) -> None:
        # Only the main thread may set handlers; an in-process caller on another thread keeps its own.
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame) -> None:
        self.set = True


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stop = StopFlag()
        device_kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        if device_kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no CUDA device is available")
        self.dist = du.init_distributed(device_kind)
        self.device = torch.device(device_kind, self.dist.local_rank) if device_kind == "cuda" else torch.device("cpu")
        self.out = Outputs(cfg, enabled=self.dist.is_main)
        self.work = self.out.dir
        self.fault_write_delay = env_float("HPA_TRAIN_FAULT_CKPT_DELAY", 0.0, minimum=0.0)

    # --- setup
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

        from hpa.evaluate import read_uri

        split_bytes = read_uri(cfg.split)
        self.fold = read_split(cfg.split, cfg.fold, split_bytes)
        # Fixed parts of the validation fold for out-of-sample scores (hpa.crossfit), the same every epoch.
        self.val_groups = crossfit_groups(self.fold.val_ids, self.fold.val_targets)
        self.data = DataSource(cfg, self.fold, self.dist)
        self.identity = run_identity(cfg, self.data.shards, split_bytes, self.dist.world_size, self.data.steps_per_epoch)
        self.model = create_model(cfg.arch, cfg.in_chans, NUM_CLASSES, weights=cfg.weights, drop_rate=cfg.drop_rate)
        self.model.to(self.device)
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        pos_weight = sqrt_pos_weight(self.fold.train_targets) if cfg.pos_weight == "sqrt" else None
        self.criterion = MultiLabelLoss(cfg.loss, cfg.focal_gamma, pos_weight).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.data.steps_per_epoch)
        # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one format.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.autocast = self.device.type == "cuda" and cfg.amp
        self.state = LoopState()
        self.ddp_model = self.model
        if self.dist.distributed:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # Evaluation runs on the bare model: ranks see different numbers of val batches, so it must not
        # enter DDP's collectives.
        self.train_model = torch.compile(self.ddp_model) if cfg.compile else self.ddp_model
        self.eval_model = torch.compile(self.model) if cfg.compile else self.model
        self.epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
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
        local = self.work / "tensorboard" if remote else Path(target)
        log.info("tensorboard: event files in %s%s", target, " (uploaded during training)" if remote else "")
        resumed = self.state.step + 1 if self.state.step else None  # hide what the interrupted run logged after it
        return EventLog(local, target if remote else None, every_steps=cfg.tensorboard_every_steps,
                        world_size=self.dist.world_size, purge_step=resumed)

    # --- checkpoints
    def checkpoint(self) -> dict:
        cfg, s = self.cfg, self.state
        if s.step_in_epoch:  # mid-epoch: keep the epoch's running loss so its train_loss comes out exact
            s.loss_sum = float(self.epoch_loss)
        # Every rank's RNG states and running loss, so that a DDP run resumes exactly too.
        per_rank = du.all_gather_objects({"rng": rng_state(self.aug_gen), "loss": (s.loss_sum, s.loss_count)})
        return {"model": self.model.state_dict(), "arch": cfg.arch, "in_chans": cfg.in_chans,
                "num_classes": NUM_CLASSES, "color_mode": cfg.color_mode, "size": cfg.size,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": s.epoch, "step": s.step,
                "rng": [r["rng"] for r in per_rank], "rank_loss": [list(r["loss"]) for r in per_rank],
                "loop": asdict(s), "world_size": self.dist.world_size, "config": asdict(cfg),
                "identity": self.identity}

    def save(self, name: str, ckpt: dict) -> None:
        if not self.dist.is_main:
            return
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        log.info("checkpoint write begins: %s epoch %d step %d", name, ckpt["epoch"], ckpt["step"])
        self.out.write(name, buf.getvalue(), slow_write=self.fault_write_delay if name == "last.pt" else 0.0)
        log.info("checkpoint saved: %s epoch %d step %d", name, ckpt["epoch"], ckpt["step"])

    def save_last(self) -> None:
        self.save("last.pt", self.checkpoint())

    def load_last(self) -> None:
        path = self.out.fetch("last.pt") if self.dist.is_main else None
        # Non-zero ranks read rank 0's local file when --out is local; for s3 each rank fetches its own.
        if not self.dist.is_main:
            path = Outputs(self.cfg, enabled=False).fetch("last.pt") if self.out.remote else Path(self.cfg.out) / "last.pt"
            path = path if path and path.exists() else None
        if path is None:
            log.warning("--resume: no last.pt under %s, starting from scratch", self.cfg.out)
            return
        name = f"{self.cfg.out.rstrip('/')}/last.pt"
        try:
            ckpt = read_checkpoint(path, "cpu", name=name, required=RESUME_KEYS)
        except ConfigError as exc:
            raise ConfigError(f"resume: {exc}; {RESUME_HINT}") from None
        # A last.pt without a recorded identity (hpa before issue 13) is refused, not trusted: resuming
        # serves a restart within one run, which runs one version, so such a file means a reused --out;
        # whether it holds this fold and this data cannot be told, and reporting its score as this run's
        # is the failure the identity prevents.
        if not isinstance(ckpt.get("identity"), dict):
            raise ConfigError(f"resume: {name}: records no run identity (written by an older hpa), so it cannot "
                              f"be matched to this run; {RESUME_HINT}")
        config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
        mismatch = identity_mismatch(name, ckpt["identity"], self.identity, config, self.cfg)
        if mismatch:
            raise ConfigError(mismatch)
        try:
            load_model_state(self.model, ckpt["model"], name)
        except ConfigError as exc:
            raise ConfigError(f"resume: {exc}; {RESUME_HINT}") from None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            state = LoopState(**ckpt["loop"])
            state.loss_sum, state.loss_count = ckpt["rank_loss"][self.dist.rank]
            set_rng_state(ckpt["rng"][self.dist.rank], self.aug_gen)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise ConfigError(f"resume: checkpoint {name}: its training state does not fit this run "
                              f"({type(exc).__name__}: {first_line(exc)}); {RESUME_HINT}") from None
        self.state = state
        log.info("resumed from %s: epoch %d, step %d (%d into the epoch)", path, self.state.epoch,
                 self.state.step, self.state.step_in_epoch)

    def check_stop(self) -> None:
        if du.any_rank(self.stop.set, self.device):
            self.save_last()
            raise Preempted()

    # --- run
    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        self.out.write("config.json", json.dumps(asdict(cfg), indent=2).encode())
        try:
            while s.epoch < cfg.epochs and not s.stopped_early:
                t0 = time.time()
                try:
                    train_loss = train_one_epoch(self)
                    val = evaluate(self)
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
            print(metric_line(epoch, train_loss, val["loss"], val["f1"], self.cfg.metric_timestamps), flush=True)
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
            log.info("early stopping: no improvement in %d epochs (best %.4f at epoch %d)", s.bad_epochs, s.best_f1, s.best_epoch)
        self.out.write("history.csv", history_csv(s.history))
        self.out.write("metrics.json", json.dumps(self.metrics(), indent=2).encode())
        self.save_last()

    def write_best(self, val: dict) -> None:
        ckpt = self.checkpoint()
        for key in ("optimizer", "scheduler", "scaler", "rng", "rank_loss"):  # best.pt is for inference
            ckpt.pop(key)
        ckpt["thresholds"] = torch.tensor(val["thresholds"], dtype=torch.float32)  # the policy's, fitted on the fold
        self.save("best.pt", ckpt)
        self.out.write("val_predictions.npz", predictions_bytes(np.array(self.fold.val_ids), val["probs"],
                                                                self.fold.val_targets, model=self.cfg.arch))
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


def train_one_epoch(t: Trainer) -> float:
    cfg, s, device = t.cfg, t.state, t.device
    t.model.train()
    # The running loss stays on the device (no sync per step); checkpoint() reads it when it saves.
    t.epoch_loss = torch.tensor(s.loss_sum, dtype=torch.float64, device=device)
    batches = t.data.train_batches(s.epoch, s.step_in_epoch, device)
    bar = tqdm(total=t.data.steps_per_epoch, initial=s.step_in_epoch, desc=f"epoch {s.epoch + 1}", file=sys.stderr,
               disable=not (t.dist.is_main and sys.stderr.isatty()), leave=False)
    t.check_stop()
    if t.tb is not None:
        t.tb.start_window()
    for x, y in batches:
        x = prepare(x.to(device, non_blocking=True), cfg.in_chans, cfg.size)
        y = y.to(device, non_blocking=True).float()
        if cfg.augment:
            x = augment(x, t.aug_gen, cfg.min_crop)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.autocast):
            logits = t.train_model(x)
        loss = t.criterion(logits.float(), y)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        t.scheduler.step()
        t.epoch_loss += loss.detach().double() * len(x)
        s.loss_count += len(x)
        s.step, s.step_in_epoch = s.step + 1, s.step_in_epoch + 1
        if t.tb is not None:
            t.tb.train_step(s.step, loss, len(x), t.optimizer.param_groups[0]["lr"])
        bar.update(1)
        # A step checkpoint on the epoch's last step would be overwritten right after validation.
        if cfg.checkpoint_every_steps and s.step % cfg.checkpoint_every_steps == 0 \
                and s.step_in_epoch < t.data.steps_per_epoch:
            t.save_last()
        t.check_stop()
    bar.close()
    totals = du.all_gather_objects((float(t.epoch_loss), s.loss_count))
    train_loss = sum(a for a, _ in totals) / max(1, sum(n for _, n in totals))
    if not math.isfinite(train_loss):
        raise HPAError(f"training diverged: train loss is {train_loss} in epoch {s.epoch + 1}; lower --lr (now {cfg.lr})")
    return train_loss


@torch.no_grad()
def evaluate(t: Trainer) -> dict:
    """Validation over all ranks: each predicts its part, predictions are gathered and put back in
    val_ids order, so loss and macro F1 are exact (not an average of per-rank scores)."""
    cfg, device = t.cfg, t.device
    du.broadcast_buffers(t.model)
    t.model.eval()
    parts = []
    for index, x, y in t.data.val_batches(device):
        x = prepare(x.to(device, non_blocking=True), cfg.in_chans, cfg.size)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.autocast):
            logits = t.eval_model(x)
        parts.append((index.numpy(), logits.float().cpu().numpy()))
    gathered = [p for rank_parts in du.all_gather_objects(parts) for p in rank_parts]
    index = np.concatenate([i for i, _ in gathered])
    logits = np.empty((len(t.fold.val_ids), NUM_CLASSES), dtype=np.float32)
    logits[index] = np.concatenate([lg for _, lg in gathered])
    if len(np.unique(index)) != len(t.fold.val_ids):
        raise HPAError(f"validation covered {len(np.unique(index))} of {len(t.fold.val_ids)} images")
    targets = t.fold.val_targets
    loss = float(t.criterion(torch.from_numpy(logits).to(device), torch.from_numpy(targets).float().to(device)))
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    # The policy's thresholds (global: exactly --threshold, 0 and 1 included; prior: the training folds'
    # class frequencies), scored out-of-sample: each part of the fold with thresholds fitted on the others.
    fit = policy_fitter(cfg.threshold_mode, cfg.threshold if cfg.threshold_mode in ("global", "shrunk") else None,
                        cfg.shrink_strength, prior=t.fold.train_targets)
    policy = score_policy(probs.astype(np.float32), targets, t.val_groups, fit)
    return {"loss": loss, "f1_at_05": macro_f1(targets, probs >= 0.5), "f1": policy["macro_f1"],
            "f1_in_sample": policy["macro_f1_in_sample"], "probs": probs.astype(np.float32),
            "thresholds": policy["thresholds"], "f1_per_class": policy["f1_per_class"]}


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
        return trainer.run()
    finally:
        trainer.stop.restore()
        if cfg.deterministic:  # do not leak the global switch into an in-process caller
            torch.use_deterministic_algorithms(False)
        du.cleanup()


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        train(config_from_args(args))
    except Preempted:
        log.warning("SIGTERM: checkpoint written to %s, exiting %d", args.out, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0
