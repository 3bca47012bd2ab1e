"""What the optimizer step is made of: augmentation on the device, the multi-label loss (BCE or focal, optional
per-class pos_weight), the optimizer and the per-step LR schedule."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpa.train.config import TrainConfig


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
