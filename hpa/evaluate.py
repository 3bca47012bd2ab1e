"""Metrics as Kaggle scored HPA, exact per-class threshold fitting, and ensembling."""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5


def f1_per_class(targets: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Per-class F1 of binary (N, C) arrays; a class with no true and no predicted positives scores 0
    (sklearn's `zero_division=0`)."""
    targets = np.asarray(targets, dtype=bool)
    preds = np.asarray(preds, dtype=bool)
    tp = (targets & preds).sum(0)
    denom = targets.sum(0) + preds.sum(0)
    return np.divide(2.0 * tp, denom, out=np.zeros(targets.shape[1]), where=denom > 0)


def macro_f1(targets: np.ndarray, preds: np.ndarray) -> float:
    """Macro F1 over all columns, equal to `sklearn.metrics.f1_score(average="macro", zero_division=0)`."""
    return float(f1_per_class(targets, preds).mean())


def best_cut(probs: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Exact F1-maximising threshold for one class: (threshold, f1).

    Sort once (O(n log n)); predicting the top-k scores gives F1 = 2*TP_k / (k + P). Only cut points
    between distinct scores are reachable, so ties are collapsed to their last index. The threshold
    returned is the midpoint between the last kept and the first dropped score, so `probs >= t`
    selects exactly the top k. Returns (nan, 0.0) when the class has no positives.
    """
    positives = int(target.sum())
    if positives == 0:
        return float("nan"), 0.0
    order = np.argsort(-probs, kind="stable")
    p = probs[order]
    tp = np.cumsum(target[order], dtype=np.int64)
    k = np.arange(1, len(p) + 1)
    last_of_tie = np.append(p[1:] != p[:-1], True)
    f1 = np.where(last_of_tie, 2.0 * tp / (k + positives), -1.0)
    i = int(np.argmax(f1))
    threshold = (p[i] + p[i + 1]) / 2.0 if i + 1 < len(p) else p[i]
    return float(threshold), float(f1[i])


def fit_global_threshold(probs: np.ndarray, targets: np.ndarray, grid: np.ndarray | None = None) -> float:
    """One threshold for every class that maximises macro F1 (grid search; macro F1 is not separable)."""
    grid = np.linspace(0.01, 0.99, 99) if grid is None else grid
    scores = [macro_f1(targets, probs >= t) for t in grid]
    return float(grid[int(np.argmax(scores))])


def fit_thresholds(probs: np.ndarray, targets: np.ndarray, fallback: float | None = None) -> np.ndarray:
    """Per-class thresholds maximising each class's F1 on validation predictions.

    Classes with no positives in validation get `fallback` (default: the fitted global threshold),
    since no cut point can be learned for them.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    if probs.shape != targets.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be (N, C)")
    cuts = np.array([best_cut(probs[:, c], targets[:, c])[0] for c in range(probs.shape[1])])
    if np.isnan(cuts).any():
        fill = fit_global_threshold(probs, targets) if fallback is None else fallback
        cuts = np.where(np.isnan(cuts), fill, cuts)
    return cuts
