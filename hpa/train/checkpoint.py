"""What a training checkpoint holds and what --resume accepts.

last.pt holds everything needed to continue mid-epoch exactly: model, optimizer, scheduler, scaler, the loop
counters (LoopState), every rank's RNG states and running loss, and the run identity (IDENTITY_FIELDS with the
data, split and world size). best.pt is the same without the training state, plus the fitted thresholds.
`load_resumable` refuses, in one line, a last.pt of another run or one that cannot be read; `restore` puts its
state back into this run's objects.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpa import ddp
from hpa.errors import ConfigError, first_line
from hpa.labels import NUM_CLASSES
from hpa.models import CHECKPOINT_KEYS, load_model_state, read_checkpoint
from hpa.store import sha256_bytes
from hpa.train.config import TrainConfig


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


# --- RNG state (for exact resume) ----------------------------------------------------------------

def rng_state(aug_gen: torch.Generator) -> dict:
    """Every RNG this process draws from, as tensors and plain Python types (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
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
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "rank_loss")  # what best.pt (for inference) drops


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
        return "sha256:" + sha256_bytes(raw)
    return data if data.startswith("s3://") else str(Path(data).resolve())


def run_identity(cfg: TrainConfig, shards: str | None, split_bytes: bytes, world_size: int,
                 steps_per_epoch: int) -> dict:
    """The identity recorded in checkpoints. steps_per_epoch covers what shapes the loop beyond the options
    (dataset size, and for shards the per-worker batching)."""
    return {"data": data_identity(cfg.data, shards), "split": "sha256:" + sha256_bytes(split_bytes),
            **{k: getattr(cfg, k) for k in IDENTITY_FIELDS}, "world_size": world_size,
            "steps_per_epoch": steps_per_epoch}


# TrainConfig fields that say where a run reads and writes or how it uses the machine, not what it computes:
# left out of `training_key`, so that a retried task on another node (other cores, another cache or staging
# dir, a per-run TensorBoard URI) finds its checkpoints. data and split enter the key by content instead.
KEY_EXCLUDED = ("data", "split", "out", "resume", "cache_dir", "work_dir", "workers", "threads", "tensorboard_dir",
                "predict_tta", "predict_data")
KEY_VERSION = "hpa-train-key/1"  # bump when what a key covers changes


def training_key(cfg: TrainConfig, shards: str | None, split_bytes: bytes, world_size: int) -> str:
    """The name of a training's checkpoint prefix in the store (`<store>/checkpoints/<key>/`):
    "<arch>-fold<fold>-" and 20 hex digits of the sha256 of every TrainConfig field but KEY_EXCLUDED, the data's
    identity (`data_identity`: a manifest's content, else the URI), the split CSV's sha256 and the number of
    processes. The same training (a retry of a task with the same inputs) gets the same key and resumes from its
    last.pt; any other training gets another. `cfg` must be validated (weights cleaned)."""
    described = {k: v for k, v in sorted(asdict(cfg).items()) if k not in KEY_EXCLUDED}
    described.update(version=KEY_VERSION, data=data_identity(cfg.data, shards),
                     split="sha256:" + sha256_bytes(split_bytes), world_size=world_size)
    digest = sha256_bytes(json.dumps(described, sort_keys=True, default=str).encode())[:20]
    return f"{cfg.arch.replace('_', '-')}-fold{cfg.fold}-{digest}"


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


# --- writing and reading checkpoints ------------------------------------------------------------------

def training_checkpoint(cfg: TrainConfig, model, optimizer, scheduler, scaler, state: LoopState,
                        aug_gen: torch.Generator, world_size: int, identity: dict) -> dict:
    """last.pt's content. A collective: every rank's RNG states and running loss are gathered, so that a DDP run
    resumes exactly too (`state.loss_sum` must hold the epoch's running loss)."""
    per_rank = ddp.all_gather_objects({"rng": rng_state(aug_gen), "loss": (state.loss_sum, state.loss_count)})
    return {"model": model.state_dict(), "arch": cfg.arch, "in_chans": cfg.in_chans,
            "num_classes": NUM_CLASSES, "color_mode": cfg.color_mode, "size": cfg.size,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": state.epoch, "step": state.step,
            "rng": [r["rng"] for r in per_rank], "rank_loss": [list(r["loss"]) for r in per_rank],
            "loop": asdict(state), "world_size": world_size, "config": asdict(cfg),
            "identity": identity}


def inference_checkpoint(ckpt: dict, thresholds) -> dict:
    """best.pt from a training checkpoint: no training state, plus the policy's thresholds fitted on the fold."""
    best = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    best["thresholds"] = torch.tensor(thresholds, dtype=torch.float32)
    return best


def load_resumable(path: Path, name: str, identity: dict, cfg: TrainConfig) -> dict:
    """last.pt at `path` (shown as `name`) when it is a checkpoint of this run (`identity`), else one ConfigError
    line naming it and what differs."""
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
    mismatch = identity_mismatch(name, ckpt["identity"], identity, config, cfg)
    if mismatch:
        raise ConfigError(mismatch)
    return ckpt


def restore(ckpt: dict, name: str, model, optimizer, scheduler, scaler, aug_gen: torch.Generator,
            rank: int) -> LoopState:
    """Put a resumable checkpoint's state into this run's objects (rank `rank`'s RNG states and running loss);
    returns the loop state to continue from."""
    try:
        load_model_state(model, ckpt["model"], name)
    except ConfigError as exc:
        raise ConfigError(f"resume: {exc}; {RESUME_HINT}") from None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = LoopState(**ckpt["loop"])
        state.loss_sum, state.loss_count = ckpt["rank_loss"][rank]
        set_rng_state(ckpt["rng"][rank], aug_gen)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ConfigError(f"resume: checkpoint {name}: its training state does not fit this run "
                          f"({type(exc).__name__}: {first_line(exc)}); {RESUME_HINT}") from None
    return state
