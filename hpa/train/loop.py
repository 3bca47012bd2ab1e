"""One epoch of training and one validation pass, torchvision-references style: `train_one_epoch` and `evaluate`
take what they use as arguments and return what they compute (the epoch's train loss; the validation scores).
Also what stops a run between steps: StopFlag (SIGTERM) and Preempted."""

from __future__ import annotations

import math
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from hpa import ddp
from hpa.crossfit import policy_fitter, score_policy
from hpa.errors import HPAError
from hpa.evaluate import macro_f1
from hpa.inputs import prepare
from hpa.labels import NUM_CLASSES
from hpa.train.checkpoint import LoopState
from hpa.train.config import TrainConfig
from hpa.train.data import FoldData
from hpa.train.optim import augment

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what Kubernetes and shells expect after a graceful stop


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


@dataclass(frozen=True)
class Forward:
    """How a loader batch becomes logits on the device, the same in training and validation: the model input
    (hpa.inputs.prepare), augmentation when training, NHWC and bf16 autocast where they apply."""

    in_chans: int
    size: int
    channels_last: bool
    autocast: bool

    def inputs(self, x: torch.Tensor, device: torch.device, aug_gen: torch.Generator | None = None,
               min_crop: float = 1.0) -> torch.Tensor:
        x = prepare(x.to(device, non_blocking=True), self.in_chans, self.size)
        if aug_gen is not None:
            x = augment(x, aug_gen, min_crop)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def logits(self, model, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(x)


def train_one_epoch(model, criterion, optimizer, scheduler, batches: Iterable, device: torch.device,
                    state: LoopState, cfg: TrainConfig, *, forward: Forward, aug_gen: torch.Generator,
                    steps_per_epoch: int, save_last: Callable[[], None], stop_requested: Callable[[], bool],
                    tb=None, progress: bool = False) -> float:
    """Train on `batches` (the rest of epoch `state.epoch`, from step `state.step_in_epoch` on); returns the
    epoch's train loss over every rank's samples.

    `state` counts the steps and holds the epoch's running loss whenever `save_last()` (last.pt from `state`)
    runs: every --checkpoint-every-steps steps, and when `stop_requested()` (SIGTERM on any rank), after which
    Preempted is raised. Also when the loop ends otherwise (a data read failing), so that the caller can
    checkpoint at that step boundary."""
    model.train()
    # The running loss stays on the device (no sync per step); it reaches `state` before each checkpoint.
    running = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)

    def checkpoint() -> None:
        state.loss_sum = float(running)
        save_last()

    def stop_if_requested() -> None:
        if stop_requested():
            checkpoint()
            raise Preempted()

    bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()), leave=False)
    try:
        stop_if_requested()
        if tb is not None:
            tb.start_window()
        for x, y in batches:
            x = forward.inputs(x, device, aug_gen if cfg.augment else None, cfg.min_crop)
            y = y.to(device, non_blocking=True).float()
            loss = criterion(forward.logits(model, x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.detach().double() * len(x)
            state.loss_count += len(x)
            state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
            if tb is not None:
                tb.train_step(state.step, loss, len(x), optimizer.param_groups[0]["lr"])
            bar.update(1)
            # A step checkpoint on the epoch's last step would be overwritten right after validation.
            if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0 \
                    and state.step_in_epoch < steps_per_epoch:
                checkpoint()
            stop_if_requested()
    finally:
        state.loss_sum = float(running)
    bar.close()
    totals = ddp.all_gather_objects((state.loss_sum, state.loss_count))
    train_loss = sum(a for a, _ in totals) / max(1, sum(n for _, n in totals))
    if not math.isfinite(train_loss):
        raise HPAError(f"training diverged: train loss is {train_loss} in epoch {state.epoch + 1}; "
                       f"lower --lr (now {cfg.lr})")
    return train_loss


@torch.no_grad()
def evaluate(model, criterion, batches: Iterable, device: torch.device, fold: FoldData, val_groups,
             cfg: TrainConfig, *, forward: Forward) -> dict:
    """Validation over all ranks: each predicts its part of `batches` ((index into fold.val_ids, x, y)),
    predictions are gathered and put back in val_ids order, so loss and macro F1 are exact (not an average of
    per-rank scores). Returns loss, the --threshold-mode policy's out-of-sample macro F1 (`f1`, with
    `f1_in_sample`, `f1_per_class` and its `thresholds`), macro F1 at 0.5 and the probabilities."""
    ddp.broadcast_buffers(model)
    model.eval()
    parts = []
    for index, x, _ in batches:
        logits = forward.logits(model, forward.inputs(x, device))
        parts.append((index.numpy(), logits.float().cpu().numpy()))
    gathered = [p for rank_parts in ddp.all_gather_objects(parts) for p in rank_parts]
    index = np.concatenate([i for i, _ in gathered])
    logits = np.empty((len(fold.val_ids), NUM_CLASSES), dtype=np.float32)
    logits[index] = np.concatenate([lg for _, lg in gathered])
    if len(np.unique(index)) != len(fold.val_ids):
        raise HPAError(f"validation covered {len(np.unique(index))} of {len(fold.val_ids)} images")
    targets = fold.val_targets
    loss = float(criterion(torch.from_numpy(logits).to(device), torch.from_numpy(targets).float().to(device)))
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    # The policy's thresholds (global: exactly --threshold, 0 and 1 included; prior: the training folds'
    # class frequencies), scored out-of-sample: each part of the fold with thresholds fitted on the others.
    fit = policy_fitter(cfg.threshold_mode, cfg.threshold if cfg.threshold_mode in ("global", "shrunk") else None,
                        cfg.shrink_strength, prior=fold.train_targets)
    policy = score_policy(probs.astype(np.float32), targets, val_groups, fit)
    return {"loss": loss, "f1_at_05": macro_f1(targets, probs >= 0.5), "f1": policy["macro_f1"],
            "f1_in_sample": policy["macro_f1_in_sample"], "probs": probs.astype(np.float32),
            "thresholds": policy["thresholds"], "f1_per_class": policy["f1_per_class"]}
