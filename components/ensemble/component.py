"""KFP component `ensemble`: combine two models' predictions and fit the decision thresholds (fitted, global, shrunk or prior).

`python components/ensemble/component.py` rewrites component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa ensemble --val a_val.npz b_val.npz --test a_test.npz b_test.npz --method mean --out ensemble/
"""
PIPELINE_EXAMPLE = r"""
combined = ensemble(val_a=resnet.outputs["val_predictions"], val_b=se_resnet.outputs["val_predictions"],
                    test_a=resnet.outputs["test_predictions"], test_b=se_resnet.outputs["test_predictions"])
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def ensemble(
    val_a: Input[Dataset],
    val_b: Input[Dataset],
    test_a: Input[Dataset],
    test_b: Input[Dataset],
    ensemble_test: Output[Dataset],
    thresholds: Output[Dataset],
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    method: str = "mean",
    threshold_mode: str = "fitted",
    threshold: float = 0.3,
    shrink_strength: float = 10.0,
    prior_labels: Input[Dataset] = None,
):
    """Average (or rank/weight) the models' probabilities and fit thresholds on the validation fold.

    Args:
        val_a: Validation predictions of the first model (.npz).
        val_b: Validation predictions of the second model (.npz).
        test_a: Test predictions of the first model (.npz).
        test_b: Test predictions of the second model (.npz).
        ensemble_test: Combined test probabilities (.npz: ids, probs, model).
        thresholds: Thresholds JSON ({"thresholds": {class: value}, "values": [...], "mode": ...}).
        metrics: Validation macro F1 of the ensemble and of each model (model0 = val_a), the weights, and the
            predicted labels per image beside the true ones (val_labels_per_image, val_true_labels_per_image,
            test_labels_per_image).
        roc: Micro-averaged ROC curve of the ensemble on the validation fold.
        method: mean, weighted or rank.
        threshold_mode: fitted (per-class thresholds maximising validation F1), global (threshold for every class),
            shrunk (each fitted threshold pulled toward threshold by n_pos / (n_pos + shrink_strength); a class
            without validation positives gets threshold) or prior (each class predicted on the validation fold
            as often as in prior_labels; a class absent from them is never predicted).
        threshold: The global threshold of global, and the value that shrunk pulls rare classes toward.
        shrink_strength: k of shrunk (>= 0): a class with k validation positives keeps half of its fitted threshold.
        prior_labels: Training labels (Id,Target CSV, e.g. the split CSV; rows of validation ids are left out), needed by prior.
    """
    import os
    import shutil
    import tempfile

    import numpy as np
    from sklearn.metrics import roc_curve

    from hpa.errors import DataError
    from hpa.evaluate import check_threshold_mode
    from hpa.evaluate import ensemble as combine

    check_threshold_mode(threshold_mode)
    # An unconnected optional artifact input arrives as None: the backend driver resolves only the
    # artifacts a task wires (kubeflow/pipelines 2.16.0 backend/src/v2/driver/resolve.go, "Handle
    # artifacts": task.GetInputs().GetArtifacts()) and kfp's executor returns None for a missing one
    # (kfp 2.17.0 sdk/python/kfp/dsl/executor.py, get_input_artifact).
    if threshold_mode == "prior" and prior_labels is None:
        raise DataError("threshold_mode 'prior': connect prior_labels (the training labels, e.g. the split CSV)")
    with tempfile.TemporaryDirectory() as out:
        result = combine(
            [val_a.path, val_b.path], [test_a.path, test_b.path], method=method, out_dir=out,
            threshold=threshold if threshold_mode in ("global", "shrunk") else None, threshold_mode=threshold_mode,
            shrink_strength=shrink_strength, prior=prior_labels.path if threshold_mode == "prior" else None,
        )
        shutil.copyfile(os.path.join(out, "ensemble_test.npz"), ensemble_test.path)
        shutil.copyfile(os.path.join(out, "thresholds.json"), thresholds.path)
        with np.load(os.path.join(out, "ensemble_val.npz")) as val:
            targets, probs = val["targets"], val["probs"]

    for key in ("val_macro_f1", "val_macro_f1_at_05", "best_single_val_macro_f1_fitted", "n_val", "n_test",
                "val_labels_per_image", "val_true_labels_per_image", "test_labels_per_image", "test_true_labels_per_image"):
        if key in result:  # test_true_labels_per_image: only when the test predictions carry targets
            metrics.log_metric(key, float(result[key]))
    for i, (scores, weight) in enumerate(zip(result["models"], result["weights"])):
        metrics.log_metric(f"model{i}_val_macro_f1_fitted", float(scores["val_macro_f1_fitted"]))
        metrics.log_metric(f"model{i}_weight", float(weight))
    # The UI's ROC view (all classes pooled); thinned to <= 200 points so the metadata stays small.
    fpr, tpr, cuts = roc_curve(targets.ravel(), probs.ravel())
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
    roc.log_roc_curve(fpr[keep].tolist(), tpr[keep].tolist(), np.clip(cuts[keep], 0.0, 1.0).tolist())
    ensemble_test.metadata.update({"method": method, "threshold_mode": result["threshold_mode"]})
    thresholds.metadata.update({"mode": result["threshold_mode"]})
    if result["threshold_mode"] == "shrunk":
        thresholds.metadata.update({"shrink_strength": float(shrink_strength), "shrink_toward": float(threshold)})


if __name__ == "__main__":
    compiler.Compiler().compile(ensemble, str(Path(__file__).with_name("component.yaml")))
