"""Ensembling: fold models -> out-of-fold predictions per model -> one ensemble, scored out-of-sample.

`python -m hpa ensemble --val V1.npz V2.npz ... --test T1.npz T2.npz ... --out DIR`

Inputs are the training tasks' prediction files, any number of models and folds: `val[i]` and
`test[i]` come from the same task (one model trained on one fold; `dsl.Collected` keeps both lists in
iteration order). Files are grouped by their model name:

- a model's validation files, one per trained fold, are concatenated into its out-of-fold (OOF)
  predictions; its test probabilities are averaged over its folds;
- the models are combined (mean, weighted by honest F1, or rank), the threshold policy is fitted on
  the combined OOF predictions, and the test set is binarized with those thresholds;
- every score is cross-fitted (hpa.crossfit): with 2+ folds per model each fold is scored with
  thresholds (and weights) fitted on the other folds; with one fold, on stratified parts of it.

Outputs under --out (local or s3://): ensemble_val.npz, ensemble_test.npz, thresholds.json and, last,
metrics.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpa import config
from hpa.crossfit import CROSSFIT_PARTS, crossfit_groups, crossfit_predict, policy_fitter, score_policy
from hpa.errors import DataError
from hpa.evaluate import (
    DEFAULT_SHRINK_STRENGTH, DEFAULT_THRESHOLD, THRESHOLD_MODES, binarize, check_shrink_strength, check_threshold_mode,
    check_thresholds, class_report_of, label_cardinality, label_prior, load_thresholds, macro_f1, save_thresholds,
)
from hpa.predictions import Predictions, load_predictions, save_predictions
from hpa.store import join_uri, write_bytes

log = logging.getLogger(__name__)

METHODS = ("mean", "weighted", "rank")
# One default policy everywhere: the pipeline's run parameter (the CLI used to default to fitted, which floods
# small runs with labels; issue 22, item 12).
DEFAULT_THRESHOLD_MODE = config.PipelineConfig().threshold_mode


@dataclass
class Member:
    """One model of the ensemble: its out-of-fold validation predictions and fold-averaged test ones."""

    name: str
    val: Predictions    # OOF: the folds' validation predictions, concatenated (ids disjoint)
    test: Predictions   # test probabilities averaged over the folds
    fold_of_row: np.ndarray  # (N,) which of the model's validation files each OOF row came from
    files: list[str]

    @property
    def folds(self) -> int:
        return len(self.files)


def align(preds: list[Predictions]) -> list[Predictions]:
    """Reorder every model's predictions to the first one's id order; ids must be the same set."""
    ref = preds[0]
    ref_set = set(ref.ids.tolist())
    out = [ref]
    for p in preds[1:]:
        other = set(p.ids.tolist())
        if other != ref_set:
            only_ref, only_other = sorted(ref_set - other), sorted(other - ref_set)
            example = (f"{only_ref[0]!r} is in {ref.source} but not in {p.source}" if only_ref
                       else f"{only_other[0]!r} is in {p.source} but not in {ref.source}")
            raise DataError(f"ids differ between {ref.source} ({len(ref_set)} ids) and {p.source} ({len(other)} ids): "
                            f"{len(only_ref) + len(only_other)} mismatched, e.g. {example}")
        out.append(p if np.array_equal(p.ids, ref.ids) else p.reindex(ref.ids))
    return out


def out_of_fold(name: str, parts: list[Predictions]) -> tuple[Predictions, np.ndarray]:
    """One model's validation folds concatenated, and the fold (file index) of each row."""
    seen: dict[str, str] = {}
    for p in parts:
        if p.targets is None:
            raise DataError(f"{p.source}: validation predictions have no 'targets'")
        for i in p.ids.tolist():
            if i in seen:
                raise DataError(f"{p.source}: id {i!r} is also in {seen[i]}: validation folds of model {name!r} "
                                "must be disjoint (was the same fold trained twice?)")
            seen[i] = p.source
    oof = Predictions(np.concatenate([p.ids for p in parts]), np.concatenate([p.probs for p in parts]),
                      np.concatenate([p.targets for p in parts]), name, ", ".join(p.source for p in parts))
    return oof, np.concatenate([np.full(len(p.ids), k) for k, p in enumerate(parts)])


def fold_average(name: str, parts: list[Predictions]) -> Predictions:
    """One model's test predictions, the mean over its folds' models."""
    parts = align(parts)
    probs = np.mean(np.stack([p.probs for p in parts]).astype(np.float64), axis=0).astype(np.float32)
    return Predictions(parts[0].ids, probs, parts[0].targets, name, ", ".join(p.source for p in parts))


def load_members(val_files, test_files) -> list[Member]:
    """Group prediction files by model name (first appearance order); val_files[i] pairs with test_files[i]."""
    if not val_files or len(val_files) != len(test_files):
        raise DataError(f"need one test file per val file, got {len(val_files)} val and {len(test_files)} test")
    grouped: dict[str, list[tuple[Predictions, Predictions]]] = {}
    for vf, tf in zip(val_files, test_files):
        v, t = load_predictions(vf), load_predictions(tf)
        check_same_tta(v, t)
        if v.model and t.model and v.model != t.model:
            raise DataError(f"{tf}: model {t.model!r} does not match {vf} ({v.model!r}); "
                            "give --val and --test in the same order")
        grouped.setdefault(v.model or t.model or Path(str(vf)).stem, []).append((v, t))  # unnamed: one model each
    members = []
    for name, pairs in grouped.items():
        oof, fold_of_row = out_of_fold(name, [v for v, _ in pairs])
        members.append(Member(name, oof, fold_average(name, [t for _, t in pairs]), fold_of_row,
                              [v.source for v, _ in pairs]))
    vals = align([m.val for m in members])
    tests = align([m.test for m in members])
    first = members[0]
    for m, v, t in zip(members, vals, tests):
        pos = {i: k for k, i in enumerate(m.val.ids)}
        m.fold_of_row = m.fold_of_row[[pos[i] for i in v.ids]]
        m.val, m.test = v, t
        if not np.array_equal(m.val.targets, first.val.targets):
            raise DataError(f"{m.val.source}: 'targets' differ from {first.val.source} for the same ids")
        if not same_partition(m.fold_of_row, first.fold_of_row):
            raise DataError(f"model {m.name!r} was trained on other folds than {first.name!r}: "
                            "every model must train the same folds")
    return members


def check_same_tta(val: Predictions, test: Predictions) -> None:
    """Thresholds are fitted on the validation predictions and applied to the test ones: both must average the same
    number of dihedral transforms (TTA shrinks probabilities toward their mean, so cuts fitted without it flood or
    starve the test labels). A file that records none (hpa train's own val_predictions.npz is made without TTA; files
    older than the field) may pair only with another that records none."""
    if val.tta == test.tta:
        return
    shown = {id(p): "no tta recorded" if p.tta is None else f"tta={p.tta}" for p in (val, test)}
    raise DataError(f"{val.source} ({shown[id(val)]}) and {test.source} ({shown[id(test)]}): validation and test "
                    f"predictions must use the same TTA; predict the validation fold like the test set (python -m hpa "
                    f"predict --ids val --split SPLIT --fold F --tta {test.tta or 'N'})")


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def ecdf_ranks(reference: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Map each class's probabilities through the empirical CDF of `reference` (that class's val
    probabilities), so val and test of one model land on the same [0, 1] rank scale."""
    out = np.empty(probs.shape, dtype=np.float64)
    for c in range(probs.shape[1]):
        ref = np.sort(reference[:, c])
        out[:, c] = np.searchsorted(ref, probs[:, c], side="right") / len(ref)
    return out


def member_scores(members: list[Member], method: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each member's (val, test) scores on the scale the method averages: probabilities, or for rank
    their ranks on the member's own OOF distribution (no labels involved)."""
    if method == "rank":
        return ([ecdf_ranks(m.val.probs, m.val.probs) for m in members],
                [ecdf_ranks(m.val.probs, m.test.probs) for m in members])
    return [m.val.probs.astype(np.float64) for m in members], [m.test.probs.astype(np.float64) for m in members]


def weighted_mean(arrays: list[np.ndarray], weights) -> np.ndarray:
    """Float32, as the .npz files store it: what is scored here is what submit reads back."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.stack(arrays), axes=1).astype(np.float32)


def f1_weights(f1: list[float]) -> np.ndarray:
    """`weighted`: weights proportional to each model's macro F1 (no search: with a handful of models a
    search only overfits the validation rows)."""
    f1 = np.asarray(f1, dtype=np.float64)
    return f1 / f1.sum() if f1.sum() > 0 else np.full(len(f1), 1.0 / len(f1))


def resolve_policy(thresholds=None, threshold=None, threshold_mode: str | None = None) -> str:
    """The threshold policy: a thresholds file is "given"; without `threshold_mode` a `threshold` means
    "global" and nothing means the pipeline's default (DEFAULT_THRESHOLD_MODE)."""
    if thresholds is not None and threshold is not None:
        raise DataError("give either a thresholds file or a global threshold, not both")
    if thresholds is not None and threshold_mode is not None:
        raise DataError(f"give either a thresholds file or threshold_mode {threshold_mode!r}, not both")
    if threshold is not None and not 0 < threshold < 1:
        raise DataError(f"--threshold {threshold}: expected a decision threshold in (0, 1) "
                        "(0 predicts every class, 1 none)")
    if thresholds is not None:
        return "given"
    if threshold_mode is None:
        return DEFAULT_THRESHOLD_MODE if threshold is None else "global"
    return check_threshold_mode(threshold_mode)


def decided(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Test labels as the submission decides them (hpa.submit.decide: an image with no label above its
    threshold gets its top class)."""
    from hpa.submit import decide

    return decide(probs, thresholds)[0]


def ensemble(val_files, test_files, method: str = "mean", out_dir=".", thresholds=None, threshold=None,
             threshold_mode: str | None = None, shrink_strength: float = DEFAULT_SHRINK_STRENGTH, prior=None) -> dict:
    """Combine the models' fold predictions, fit (or take) thresholds on the combined out-of-fold
    predictions, score everything out-of-sample, and write `ensemble_val.npz`, `ensemble_test.npz`,
    `thresholds.json` and, last, `metrics.json` under `out_dir` (local or s3://). Returns the metrics.

    `threshold_mode` (THRESHOLD_MODES; default the pipeline's, or global when `threshold` is given) picks the
    policy; `shrink_strength` is k of `shrunk`; `prior` the training labels of `prior` (a matrix, 28
    frequencies, or an Id,Target CSV whose rows of the validation ids are left out).
    `val_macro_f1` is cross-fitted: each fold (or stratified part of a single fold) is scored with
    weights and thresholds fitted on the others; `val_macro_f1_in_sample` is the optimistic figure.
    """
    if method not in METHODS:
        raise DataError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    mode = resolve_policy(thresholds, threshold, threshold_mode)
    shrink_strength = check_shrink_strength(shrink_strength)
    members = load_members(val_files, test_files)  # a bad file is named first, whatever the policy
    if mode == "prior" and prior is None:
        raise DataError("threshold_mode 'prior': needs the training labels (--prior: an Id,Target CSV such as the "
                        "split CSV, or 28 frequencies); prior is the default policy, as in the pipeline")
    first = members[0]
    targets = first.val.targets
    if first.folds > 1:
        groups, crossfit = first.fold_of_row, f"{first.folds} trained folds (out-of-fold predictions)"
    else:
        groups = crossfit_groups(first.val.ids, targets)
        crossfit = f"{CROSSFIT_PARTS} stratified parts of the validation fold"
    if mode == "prior" and isinstance(prior, (str, os.PathLike)):
        prior = label_prior(prior, exclude_ids=first.val.ids, where=str(prior))
    if mode == "given":
        given = load_thresholds(thresholds)
        fit = lambda _probs, _targets: given  # noqa: E731 - fitted elsewhere: nothing is fitted here
    else:
        fit = policy_fitter(mode, threshold if mode in ("global", "shrunk") else None, shrink_strength, prior)

    val_scores, test_scale = member_scores(members, method)
    models = []
    for m, val_s, test_s in zip(members, val_scores, test_scale):
        s = score_policy(val_s, targets, groups, fit)
        row = {"model": m.name, "folds": m.folds, "files": m.files, "val_macro_f1": s["macro_f1"],
               "val_macro_f1_in_sample": s["macro_f1_in_sample"]}
        if m.test.targets is not None:  # labelled test data (synthetic): each member as if submitted alone
            row["test_macro_f1"] = macro_f1(m.test.targets, decided(test_s, s["thresholds"]))
        models.append(row)

    def weights_on(rows: np.ndarray) -> np.ndarray:
        """`weighted`: each member's macro F1 on `rows` with thresholds fitted on `rows`."""
        return f1_weights([macro_f1(targets[rows], binarize(v[rows], fit(v[rows], targets[rows]))) for v in val_scores])

    def fit_and_apply(rows: np.ndarray, held: np.ndarray) -> np.ndarray:  # weights and thresholds from rows only
        combined = weighted_mean(val_scores, weights_on(rows)) if method == "weighted" else val_probs
        return binarize(combined[held], fit(combined[rows], targets[rows]))

    equal = np.full(len(members), 1.0 / len(members))
    weights = f1_weights([s["val_macro_f1"] for s in models]) if method == "weighted" else equal
    val_probs, test_probs = weighted_mean(val_scores, weights), weighted_mean(test_scale, weights)
    values = check_thresholds(fit(val_probs, targets), "thresholds")
    honest = crossfit_predict(groups, fit_and_apply, val_probs.shape)
    test_labels = decided(test_probs, values)
    metrics = {
        "method": method, "threshold_mode": mode, "n_models": len(members), "folds_per_model": first.folds,
        "crossfit": crossfit, "n_val": int(len(targets)), "n_test": int(len(first.test.ids)),
        "weights": [float(w) for w in weights],
        "models": models,
        "val_macro_f1": macro_f1(targets, honest),
        "val_macro_f1_in_sample": macro_f1(targets, binarize(val_probs, values)),
        "val_macro_f1_at_05": macro_f1(targets, val_probs >= DEFAULT_THRESHOLD),
        "best_single_val_macro_f1": max(s["val_macro_f1"] for s in models),
        "val_labels_per_image": label_cardinality(honest),
        "val_true_labels_per_image": label_cardinality(targets),
        "test_labels_per_image": label_cardinality(test_labels),  # as submitted
        "per_class": class_report_of(targets, honest).to_dict("records"),
    }
    test_targets = first.test.targets
    if test_targets is not None:
        metrics["test_macro_f1"] = macro_f1(test_targets, test_labels)
        metrics["best_single_test_macro_f1"] = max(s["test_macro_f1"] for s in models)
        metrics["test_macro_f1_all_classes"] = macro_f1(test_targets, np.ones_like(test_targets, dtype=bool))
        metrics["test_true_labels_per_image"] = label_cardinality(test_targets)
    if mode == "shrunk":
        metrics["shrink_strength"] = shrink_strength
    outputs = {name: join_uri(out_dir, name) for name in
               ("ensemble_val.npz", "ensemble_test.npz", "thresholds.json", "metrics.json")}
    name = f"ensemble-{method}"
    save_predictions(outputs["ensemble_val.npz"], first.val.ids, val_probs, targets, name)
    save_predictions(outputs["ensemble_test.npz"], first.test.ids, test_probs, test_targets, name)
    save_thresholds(outputs["thresholds.json"], values, mode)
    write_bytes(outputs["metrics.json"], json.dumps(metrics, indent=2).encode())  # last: marks completion
    metrics["outputs"] = outputs  # not in the file: the same inputs give the same bytes wherever written
    log.info("ensemble (%s, %d models x %d folds, %s thresholds): val macro F1 %.4f out-of-sample (%.4f in-sample; "
             "best single %.4f), labels per image %.2f predicted vs %.2f true on val, %.2f predicted on test",
             method, len(members), first.folds, mode, metrics["val_macro_f1"], metrics["val_macro_f1_in_sample"],
             metrics["best_single_val_macro_f1"], metrics["val_labels_per_image"],
             metrics["val_true_labels_per_image"], metrics["test_labels_per_image"])
    return metrics


def ensemble_task(val_files, test_files, ensemble_test_out, thresholds_out, method: str = "mean",
                  threshold_mode: str = DEFAULT_THRESHOLD_MODE, threshold: float = DEFAULT_THRESHOLD,
                  shrink_strength: float = DEFAULT_SHRINK_STRENGTH, prior=None) -> dict:
    """The ensemble pipeline task: `ensemble` with ensemble_test.npz and thresholds.json copied to the given paths.
    `threshold` counts for global and shrunk only; `prior` (the training labels' CSV) is needed by prior. Returns
    "metrics" (every number, each model's as <model>_<key>, as floats), "roc" (fpr, tpr, thresholds of the pooled
    out-of-fold ROC, thinned to <= 200 points so that the metadata stays small) and the metadata of the two files
    ("ensemble_test", "thresholds")."""
    import shutil
    import tempfile

    from sklearn.metrics import roc_curve

    check_threshold_mode(threshold_mode)
    if threshold_mode == "prior" and prior is None:
        raise DataError("threshold_mode 'prior': connect prior_labels (the training labels, e.g. the split CSV)")
    with tempfile.TemporaryDirectory() as out:
        result = ensemble(val_files, test_files, method=method, out_dir=out,
                          threshold=threshold if threshold_mode in ("global", "shrunk") else None,
                          threshold_mode=threshold_mode, shrink_strength=shrink_strength,
                          prior=prior if threshold_mode == "prior" else None)
        shutil.copyfile(os.path.join(out, "ensemble_test.npz"), ensemble_test_out)
        shutil.copyfile(os.path.join(out, "thresholds.json"), thresholds_out)
        with np.load(os.path.join(out, "ensemble_val.npz")) as val:
            targets, probs = val["targets"], val["probs"]
    # the numbers; test_*: only when the test predictions carry targets
    metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for scores, weight in zip(result["models"], result["weights"]):  # e.g. resnet18_val_macro_f1
        for key in ("val_macro_f1", "val_macro_f1_in_sample", "test_macro_f1"):
            if key in scores:
                metrics[f"{scores['model']}_{key}"] = float(scores[key])
        metrics[f"{scores['model']}_weight"] = float(weight)
    fpr, tpr, cuts = roc_curve(targets.ravel(), probs.ravel())
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
    thresholds = {"mode": result["threshold_mode"]}
    if result["threshold_mode"] == "shrunk":
        thresholds.update({"shrink_strength": float(shrink_strength), "shrink_toward": float(threshold)})
    return {"metrics": metrics,
            "roc": (fpr[keep].tolist(), tpr[keep].tolist(), np.clip(cuts[keep], 0.0, 1.0).tolist()),
            "ensemble_test": {"models": [s["model"] for s in result["models"]],
                              "folds_per_model": result["folds_per_model"], "crossfit": result["crossfit"],
                              "method": method, "threshold_mode": result["threshold_mode"]},
            "thresholds": thresholds}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa ensemble", description=ensemble.__doc__.split("\n")[0])
    p.add_argument("--val", nargs="+", required=True,
                   help="validation predictions .npz per trained model and fold (with targets)")
    p.add_argument("--test", nargs="+", required=True, help="test predictions .npz of the same tasks, same order")
    p.add_argument("--method", choices=METHODS, default="mean")
    p.add_argument("--out", required=True, help="output dir or s3:// prefix")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--thresholds", help="thresholds JSON to use instead of fitting (e.g. from Katib)")
    g.add_argument("--threshold", type=float, help="one global threshold for every class (the target of shrunk)")
    p.add_argument("--threshold-mode", choices=THRESHOLD_MODES,
                   help=f"fitted, global, shrunk (fitted cuts pulled toward the global one by n_pos / (n_pos + k)), "
                        f"prior (predict each class as often as in --prior); default {DEFAULT_THRESHOLD_MODE}, the "
                        "pipeline's (global with --threshold)")
    p.add_argument("--shrink-strength", type=float, default=DEFAULT_SHRINK_STRENGTH,
                   help="k of --threshold-mode shrunk: a class with k validation positives keeps half its fitted cut")
    p.add_argument("--prior", help="training labels (Id,Target CSV, e.g. the split CSV) for --threshold-mode prior")
    return p


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    metrics = ensemble(args.val, args.test, args.method, args.out, args.thresholds, args.threshold,
                       threshold_mode=args.threshold_mode, shrink_strength=args.shrink_strength, prior=args.prior)
    print(f"ensemble val macro F1: {metrics['val_macro_f1']:.4f} out-of-sample ({metrics['crossfit']}; "
          f"{metrics['val_macro_f1_in_sample']:.4f} in-sample), {metrics['threshold_mode']} thresholds; labels per "
          f"image: {metrics['val_labels_per_image']:.2f} predicted vs {metrics['val_true_labels_per_image']:.2f} true "
          f"on val, {metrics['test_labels_per_image']:.2f} predicted on test")
    if "test_macro_f1" in metrics:
        print(f"test macro F1: {metrics['test_macro_f1']:.4f} "
              f"(best single model {metrics['best_single_test_macro_f1']:.4f}, "
              f"all 28 classes {metrics['test_macro_f1_all_classes']:.4f})")
    for path in metrics["outputs"].values():
        print(path)
    return 0
