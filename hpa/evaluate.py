"""Metrics as Kaggle scored HPA, exact per-class threshold fitting, robust threshold policies, class reports and the
thresholds file (thresholds.json). Predictions files: hpa.predictions; ensembling: hpa.ensemble; out-of-sample
(cross-fitted) scores: hpa.crossfit."""

from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from hpa.errors import DataError
from hpa.labels import CLASS_NAMES, NUM_CLASSES
from hpa.store import read_bytes, write_bytes

if TYPE_CHECKING:
    import pandas as pd

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
    order = np.argsort(-probs)  # no stable sort needed: a tie group is only cut after its last member
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
        raise DataError(f"probs {probs.shape} and targets {targets.shape} must both be (N, C)")
    cuts = np.array([best_cut(probs[:, c], targets[:, c])[0] for c in range(probs.shape[1])])
    if np.isnan(cuts).any():
        fill = fit_global_threshold(probs, targets) if fallback is None else fallback
        cuts = np.where(np.isnan(cuts), fill, cuts)
    return np.clip(cuts, THRESHOLD_MIN, THRESHOLD_MAX)  # a cut below the lowest score of 0.0 stays a threshold


# ---------------------------------------------------------------------------------------------
# Robust threshold policies: rare classes must not get degenerate cuts
# ---------------------------------------------------------------------------------------------

# fitted: per-class F1-optimal cuts (fit_thresholds); global: one value for every class; shrunk: each
# fitted cut pulled toward the global one by its evidence; prior: each class predicted as often as it
# occurs in the training labels (the HPA top teams' trick).
THRESHOLD_MODES = ("fitted", "global", "shrunk", "prior")
DEFAULT_SHRINK_STRENGTH = 10.0
# Policies other than `fitted` keep every threshold strictly inside (0, 1): 0 would predict every
# image and 1 none (submit and ensemble treat both as a broken thresholds file).
THRESHOLD_MIN, THRESHOLD_MAX = 1e-4, 1.0 - 1e-6


def check_threshold_mode(mode: str, where: str = "threshold_mode") -> str:
    if mode not in THRESHOLD_MODES:
        raise DataError(f"{where} {mode!r}: expected one of {', '.join(THRESHOLD_MODES)}")
    return mode


def check_shrink_strength(strength, where: str = "shrink_strength") -> float:
    try:
        k = float(strength)
    except (TypeError, ValueError):
        raise DataError(f"{where} {strength!r}: expected a number >= 0") from None
    if not np.isfinite(k) or k < 0:
        raise DataError(f"{where} {strength!r}: expected a finite number >= 0 (0 = the fitted thresholds)")
    return k


def shrink_weights(n_pos, strength: float = DEFAULT_SHRINK_STRENGTH) -> np.ndarray:
    """w = n_pos / (n_pos + k) per class: how much of its own fitted cut a class keeps. A class with
    0 positives keeps none (w = 0); with k = 0 every class with a positive keeps all of it."""
    n = np.asarray(n_pos, dtype=np.float64)
    k = check_shrink_strength(strength)
    return np.divide(n, n + k, out=np.zeros_like(n), where=(n + k) > 0)


def shrunk_thresholds(probs: np.ndarray, targets: np.ndarray, strength: float = DEFAULT_SHRINK_STRENGTH,
                      threshold: float | None = None) -> np.ndarray:
    """Per-class thresholds shrunk toward a global one by the evidence:
    t_c = w_c * fitted_c + (1 - w_c) * global, with w_c = n_pos_c / (n_pos_c + strength).

    `global` is `threshold` when given, else the single threshold that maximises macro F1 on these
    predictions. A class with 0 positives gets exactly `global`; with 1-5 positives the F1-optimal cut
    (often ~0.05, just under the lone positive's score) moves most of the way back to `global`.
    """
    probs, targets = _check_pair(probs, targets)
    g = fit_global_threshold(probs, targets) if threshold is None else _check_global(threshold)
    w = shrink_weights(targets.sum(0), strength)
    fitted = fit_thresholds(probs, targets, fallback=g)
    out = w * fitted + (1.0 - w) * g
    return np.where(w == 0, g, np.clip(out, THRESHOLD_MIN, THRESHOLD_MAX))


def label_prior(labels, exclude_ids=None, where: str = "prior") -> np.ndarray:
    """(28,) frequency of each class in training labels: an (N, 28) 0/1 matrix, or a CSV (local path or
    s3:// URI) with Id,Target such as train.csv or the split CSV. With `exclude_ids`, rows with those
    ids (the validation images the thresholds are applied to) are left out, unless that leaves none
    (out-of-fold predictions cover every row: then every row is a training row of some fold)."""
    if isinstance(labels, (str, os.PathLike)):
        from hpa.data import read_labels, targets_matrix

        df = read_labels(io.BytesIO(read_bytes(labels)), where=str(labels))
        if exclude_ids is not None:
            keep = ~df["Id"].astype(str).isin(set(np.asarray(exclude_ids).astype(str).tolist()))
            df = df[keep] if keep.any() else df
        matrix = targets_matrix(df)
    else:
        matrix = np.asarray(labels)
        if matrix.ndim == 1 and matrix.shape == (NUM_CLASSES,):
            return check_prior(matrix, where)
    if matrix.ndim != 2 or matrix.shape[1] != NUM_CLASSES or len(matrix) == 0 or not np.isin(matrix, (0, 1)).all():
        raise DataError(f"{where}: expected training labels as a non-empty (N, {NUM_CLASSES}) 0/1 matrix, "
                        f"got shape {matrix.shape}")
    return matrix.astype(np.float64).mean(0)


def check_prior(prior, where: str = "prior") -> np.ndarray:
    try:
        arr = np.asarray(prior, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{where}: class frequencies must be numbers, got {prior!r:.80}") from None
    if arr.shape != (NUM_CLASSES,) or not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise DataError(f"{where}: expected {NUM_CLASSES} class frequencies in [0, 1], got {arr.size} values "
                        f"in [{np.nanmin(arr) if arr.size else 0:.4g}, {np.nanmax(arr) if arr.size else 0:.4g}]")
    return arr


def prior_thresholds(probs: np.ndarray, prior) -> np.ndarray:
    """Per-class thresholds under which each class is predicted on `probs` as often as its training
    frequency `prior` (28 values in [0, 1], e.g. from label_prior): the top k = round(prior * N) scores
    of a class, and at least 1 when prior > 0 (the macro F1 of a class never predicted is 0, so one
    guess never costs). Cuts lie midway between the k-th and the (k+1)-th score, so ties can add a few.

    A class with prior 0 gets a threshold just above its highest score (capped at THRESHOLD_MAX < 1),
    which predicts nothing on these probabilities; only a probability of exactly >= THRESHOLD_MAX on
    new images would still be predicted.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES or len(probs) == 0:
        raise DataError(f"probs {probs.shape}: expected a non-empty (N, {NUM_CLASSES}) array")
    prior = check_prior(prior)
    n = len(probs)
    out = np.empty(NUM_CLASSES)
    for c in range(NUM_CLASSES):
        p = np.sort(probs[:, c])[::-1]
        k = 0 if prior[c] == 0 else min(n, max(1, int(round(prior[c] * n))))
        if k == 0:
            out[c] = min(np.nextafter(p[0], np.inf) + 1e-9, THRESHOLD_MAX)
        elif k == n:
            out[c] = p[-1]
        else:
            out[c] = (p[k - 1] + p[k]) / 2.0
    return np.clip(out, THRESHOLD_MIN, THRESHOLD_MAX)


def thresholds_for_mode(mode: str, probs: np.ndarray, targets: np.ndarray | None = None, *,
                        threshold: float | None = None, strength: float = DEFAULT_SHRINK_STRENGTH,
                        prior=None) -> np.ndarray:
    """(28,) thresholds by policy (THRESHOLD_MODES). `threshold`: the global value for `global`
    (default: the macro-F1 optimum on these predictions) and the shrinkage target for `shrunk`.
    `prior`: training class frequencies (or labels, see label_prior) for `prior`, which needs no targets."""
    check_threshold_mode(mode)
    if mode == "prior":
        if prior is None:
            raise DataError("threshold_mode 'prior': needs the training labels' class frequencies (prior)")
        return prior_thresholds(probs, label_prior(prior))
    probs, targets = _check_pair(probs, targets)
    if mode == "fitted":
        return fit_thresholds(probs, targets)
    if mode == "global":
        g = fit_global_threshold(probs, targets) if threshold is None else _check_global(threshold)
        return np.full(probs.shape[1], g)
    return shrunk_thresholds(probs, targets, strength, threshold)


def label_cardinality(labels) -> float:
    """Mean number of labels per image of a binary (N, C) array."""
    labels = np.asarray(labels, dtype=bool)
    return float(labels.sum(1).mean()) if len(labels) else 0.0


def _check_pair(probs, targets) -> tuple[np.ndarray, np.ndarray]:
    if targets is None:
        raise DataError("fitting thresholds needs validation targets")
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    if probs.shape != targets.shape or probs.ndim != 2:
        raise DataError(f"probs {probs.shape} and targets {targets.shape} must both be (N, C)")
    return probs, targets


def _check_global(threshold) -> float:
    try:
        g = float(threshold)
    except (TypeError, ValueError):
        raise DataError(f"threshold {threshold!r}: expected a number in (0, 1)") from None
    if not 0.0 < g < 1.0:
        raise DataError(f"threshold {threshold!r}: expected a number in (0, 1)")
    return g


# ---------------------------------------------------------------------------------------------
# Reports and the thresholds file
# ---------------------------------------------------------------------------------------------

def binarize(probs: np.ndarray, thresholds) -> np.ndarray:
    """`probs >= threshold` per class (the convention `best_cut` fits for)."""
    return np.asarray(probs) >= np.asarray(thresholds, dtype=np.float64)


def class_report(targets: np.ndarray, probs: np.ndarray, thresholds) -> "pd.DataFrame":
    """Per-class precision / recall / F1 / support at the given thresholds (scalar or (C,)).

    One row per class (`class_id`, `class_name`, `threshold`, `precision`, `recall`, `f1`, `support`,
    `predicted`); zero divisions give 0 as in sklearn. `df.to_dict("records")` gives plain dicts.
    """
    report = class_report_of(targets, binarize(probs, thresholds))
    report.insert(2, "threshold", np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(report),)))
    return report


def class_report_of(targets: np.ndarray, preds: np.ndarray) -> "pd.DataFrame":
    """class_report of binary predictions (e.g. cross-fitted ones, which no single threshold gives)."""
    import pandas as pd

    targets = np.asarray(targets, dtype=bool)
    preds = np.asarray(preds, dtype=bool)
    tp = (targets & preds).sum(0)
    support, predicted = targets.sum(0), preds.sum(0)
    safe = lambda a, b: np.divide(a, b, out=np.zeros(len(a)), where=b > 0)  # noqa: E731
    return pd.DataFrame({
        "class_id": np.arange(targets.shape[1]),
        "class_name": list(CLASS_NAMES[: targets.shape[1]]),
        "precision": safe(tp, predicted),
        "recall": safe(tp, support),
        "f1": f1_per_class(targets, preds),
        "support": support.astype(int),
        "predicted": predicted.astype(int),
    })


# --- thresholds JSON ---------------------------------------------------------------------------

def thresholds_json(values, mode: str = "fitted") -> dict:
    values = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    check_thresholds(values, "thresholds")
    return {"thresholds": dict(zip(CLASS_NAMES, values)), "values": values, "mode": mode}


def check_thresholds(values, where: str) -> np.ndarray:
    """(28,) float array in (0, 1), or a one-line DataError naming `where`. 0 and 1 are refused as the pipeline
    refuses them (PipelineConfig.threshold): 0 predicts every class, 1 no class; fitted thresholds are kept
    inside [THRESHOLD_MIN, THRESHOLD_MAX]."""
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{where}: thresholds must be numbers, got {values!r:.80}") from None
    if arr.shape != (NUM_CLASSES,):
        raise DataError(f"{where}: expected {NUM_CLASSES} thresholds (one per class), got {arr.size}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0) | (arr >= 1))
    if bad.size:
        c = int(bad[0])
        raise DataError(f"{where}: threshold for class {c} ({CLASS_NAMES[c]}) is {arr[c]}, expected a value in (0, 1) "
                        "(0 predicts the class for every image, 1 for none)")
    return arr


def save_thresholds(path_or_uri, values, mode: str = "fitted") -> str:
    """Atomically write a thresholds JSON (hpa.store.write_bytes); returns where."""
    write_bytes(path_or_uri, json.dumps(thresholds_json(values, mode), indent=2).encode())
    return str(path_or_uri)


def load_thresholds(path_or_uri) -> np.ndarray:
    """Read a thresholds JSON (`values`, or the `thresholds` by class name, or a bare list of 28)."""
    where = str(path_or_uri)
    try:
        doc = json.loads(read_bytes(path_or_uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if isinstance(doc, dict) and "values" in doc:
        values = doc["values"]
    elif isinstance(doc, dict) and isinstance(doc.get("thresholds"), dict):
        by_name = doc["thresholds"]
        missing = [n for n in CLASS_NAMES if n not in by_name]
        if missing:
            raise DataError(f"{where}: 'thresholds' lacks class {missing[0]!r} ({len(missing)} classes missing)")
        values = [by_name[n] for n in CLASS_NAMES]
    elif isinstance(doc, list):
        values = doc
    else:
        raise DataError(f"{where}: expected an object with 'values' (28 floats) or 'thresholds' (by class name)")
    return check_thresholds(values, where)
