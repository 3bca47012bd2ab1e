"""Every option of `python -m hpa train`, declared once: TrainConfig's fields carry the default, the help text and
the allowed values (hpa.options); `get_args_parser` is generated from them and `validate` checks a config in one
clear line per bad option."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

from hpa.evaluate import DEFAULT_SHRINK_STRENGTH, DEFAULT_THRESHOLD, THRESHOLD_MODES
from hpa.inputs import CHANNELS, COLOR_MODES
from hpa.models import MODEL_NAMES
from hpa.options import check_choices, from_args, opt, parser_for, require
from hpa.predict import TTA_CHOICES
from hpa.weights import weights_source

log = logging.getLogger("hpa.train")
PREDICT_TTA = (0, *TTA_CHOICES)  # 0: no predictions after training


@dataclass
class TrainConfig:
    """Every option of `python -m hpa train` (field name = option name with '-' for '_')."""

    data: str = opt("", "dataset root (Kaggle layout) or packed shards root; local or s3://")
    split: str = opt("", "split CSV (Id,Target,fold); local or s3://")
    out: str = opt("", "output dir; local or s3://")
    fold: int = opt(0, "validation fold; the other folds train")
    arch: str = opt("resnet18", f"model architecture, one of {', '.join(MODEL_NAMES)}")
    weights: str = opt("", "start from: imagenet (timm's pretrained weights; needs the model hub), or a 3-channel "
                           "state dict of the arch (local .pt/.pth/.safetensors file or s3:// URI); "
                           "default: random init")
    color_mode: str = opt("rgby", "input channels: rgby = 4 channels; rgb = the classic 3-channel mapping",
                          choices=COLOR_MODES)
    size: int = opt(512, "input side in pixels (a multiple of 32); every source reads the images at this size "
                         "(hpa.inputs.resize_image)")
    epochs: int = opt(10, "training epochs (the LR schedule spans them)")
    batch_size: int = opt(32, "training batch size per process")
    lr: float = opt(1e-3, "peak learning rate")
    optimizer: str = opt("adamw", "optimizer (no weight decay on norms and biases)", choices=("adamw", "sgd"))
    weight_decay: float = opt(1e-4, "weight decay of the weight matrices")
    momentum: float = opt(0.9, "SGD momentum (sgd only; Nesterov)")
    scheduler: str = opt("cosine", "LR schedule, stepped every optimizer step: cosine (linear warm-up, cosine decay) "
                                   "or onecycle", choices=("cosine", "onecycle"))
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs (a fraction allowed)")
    loss: str = opt("bce", "training loss: bce, or focal (sigmoid focal loss)", choices=("bce", "focal"))
    focal_gamma: float = opt(2.0, "gamma of the focal loss")
    pos_weight: str = opt("none", "per-class positive weight: none, or sqrt: sqrt(neg/pos) per class from the train "
                                  "fold, in [1, 10]", choices=("none", "sqrt"))
    drop_rate: float = opt(0.0, "dropout rate before the classifier")
    augment: bool = opt(True, "dihedral flips/rot90, random crop-scale, brightness/contrast, on the device")
    min_crop: float = opt(0.75, "smallest crop side (fraction of the image) for crop-scale")
    amp: bool = opt(True, "bf16 autocast on CUDA; CPU always runs fp32")
    channels_last: bool = opt(True, "NHWC on CUDA (tensor cores); ignored on CPU, where it is slower")
    compile: bool = opt(False, "torch.compile the model")
    threshold_mode: str = opt("fitted", "threshold policy the metric line scores (out-of-sample) and best.pt keeps",
                              choices=THRESHOLD_MODES)
    threshold: float = opt(DEFAULT_THRESHOLD, "global: the threshold; shrunk: the value rare classes are pulled toward")
    shrink_strength: float = opt(DEFAULT_SHRINK_STRENGTH, "k of --threshold-mode shrunk: a class with k validation "
                                                          "positives keeps half its fitted cut")
    patience: int = opt(0, "early stopping after this many epochs without improvement (0 = off)")
    seed: int = opt(0, "seed of the weights, the data order and the augmentation")
    workers: int = opt(4, "DataLoader workers per process")
    threads: int = opt(0, "torch.set_num_threads (0 = torch's default)")
    device: str = opt("auto", "where to train: auto (CUDA when available), cpu or cuda",
                      choices=("auto", "cpu", "cuda"))
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (exact resume tests)")
    metric_timestamps: bool = opt(False, "start each epoch line with an RFC3339 UTC time; Katib's StdOut collector "
                                         "stores it with the values, so epochs are ordered by time rather than by "
                                         "insertion")
    checkpoint_every_steps: int = opt(0, "also write last.pt every K optimizer steps (0 = per epoch only)")
    resume: bool = opt(False, "continue from <out>/last.pt when it exists and records this run's identity")
    val_batch_size: int = opt(0, "validation batch size per process (0 = 2 x --batch-size)")
    cache_dir: str | None = opt(None, "local copy of PNGs / shard cache for s3:// data (default: under the temp dir)")
    work_dir: str | None = opt(None, "local staging of outputs when --out is s3:// (default: a temp dir)")
    tensorboard: bool = opt(True, "TensorBoard event files (rank 0): train/loss, lr, images/s every "
                                  "--tensorboard-every-steps steps; every epoch the history.csv columns and "
                                  "val_f1_per_class/<class>")
    tensorboard_dir: str = opt("", "where the event files go, local or s3:// (default <out>/tensorboard); an s3:// "
                                   "target gets them during training: every epoch, at most every minute within one, "
                                   "and at the end")
    tensorboard_every_steps: int = opt(10, "per-step TensorBoard scalars every N optimizer steps")
    predict_tta: int = opt(0, "after training, rank 0 predicts the validation fold and the test set from best.pt "
                              "with this many dihedral TTA transforms (1, 2, 4 or 8) into <out>/"
                              "val_predictions_tta.npz and <out>/test_predictions_tta.npz; 0 = no predictions")
    predict_data: str = opt("", "dataset root (Kaggle layout with its CSVs) that --predict-tta reads; default "
                                "--data; required when --data is packed shards (the images then come from them)")

    def validate(self) -> "TrainConfig":
        """One clear ConfigError line for the first bad option."""
        require(bool(self.data), "data: required (dataset root or shards URI)")
        require(bool(self.split), "split: required (split CSV with Id,Target,fold)")
        require(bool(self.out), "out: required (output dir or s3:// URI)")
        require(self.arch in MODEL_NAMES,
                f"arch: unknown model {self.arch!r}, expected one of {', '.join(MODEL_NAMES)}")
        check_choices(self)
        require(self.size >= 32 and self.size % 32 == 0, f"size: {self.size} must be a positive multiple of 32")
        require(self.epochs >= 1, f"epochs: {self.epochs} must be >= 1")
        require(self.batch_size >= 2, f"batch_size: {self.batch_size} must be >= 2 (BatchNorm needs 2 samples)")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr: {self.lr} must be > 0")
        require(self.weight_decay >= 0, f"weight_decay: {self.weight_decay} must be >= 0")
        require(0 <= self.warmup_epochs <= self.epochs,
                f"warmup_epochs: {self.warmup_epochs} must be in [0, epochs={self.epochs}]")
        require(self.focal_gamma >= 0, f"focal_gamma: {self.focal_gamma} must be >= 0")
        require(0 <= self.drop_rate < 1, f"drop_rate: {self.drop_rate} must be in [0, 1)")
        require(0 < self.min_crop <= 1, f"min_crop: {self.min_crop} must be in (0, 1]")
        require(0 < self.threshold < 1, f"threshold: {self.threshold} must be in (0, 1)")
        require(math.isfinite(self.shrink_strength) and self.shrink_strength >= 0,
                f"shrink_strength: {self.shrink_strength} must be a finite number >= 0")
        for name in ("patience", "workers", "threads", "checkpoint_every_steps"):
            require(getattr(self, name) >= 0, f"{name}: {getattr(self, name)} must be >= 0")
        require(self.tensorboard_every_steps >= 1,
                f"tensorboard_every_steps: {self.tensorboard_every_steps} must be >= 1")
        require(self.val_batch_size >= 0, f"val_batch_size: {self.val_batch_size} must be >= 0")
        require(self.predict_tta in PREDICT_TTA,
                f"predict_tta: {self.predict_tta} must be one of {', '.join(map(str, PREDICT_TTA))} (0 = off)")
        # What checkpoints and logs record: never an s3:// URI's credentials or query string.
        clean = weights_source(self.weights)
        if clean != str(self.weights or "").strip():
            log.warning("weights: credentials/query string dropped from the s3:// URI (S3 keys come from HPA_S3_*)")
        self.weights = clean
        return self

    @property
    def in_chans(self) -> int:
        return CHANNELS[self.color_mode]


def get_args_parser() -> argparse.ArgumentParser:
    """`python -m hpa train`'s options: one per TrainConfig field (--data, --split and --out required)."""
    return parser_for(TrainConfig, "python -m hpa train", "Train one model on one fold.",
                      required=("data", "split", "out"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return from_args(TrainConfig, args)
