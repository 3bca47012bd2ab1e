"""KFP component `ensemble`: combine every model and fold, fit the decision thresholds (fitted, global, shrunk or prior), score out-of-sample.

The training tasks' predictions arrive as lists (`dsl.Collected` over the ParallelFor of models x folds).
Each model's validation folds form its out-of-fold predictions, its test predictions are averaged over
its folds, then the models are combined; every reported score is cross-fitted (hpa.crossfit).

`python components/ensemble/component.py` rewrites component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from typing import List

from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa ensemble --val resnet18_f0_val.npz resnet18_f1_val.npz se_f0_val.npz se_f1_val.npz \
    --test resnet18_f0_test.npz resnet18_f1_test.npz se_f0_test.npz se_f1_test.npz \
    --method mean --threshold-mode shrunk --threshold 0.3 --out ensemble/
"""
PIPELINE_EXAMPLE = r"""
combined = ensemble(val_predictions=dsl.Collected(trained.outputs["val_predictions"]),
                    test_predictions=dsl.Collected(trained.outputs["test_predictions"]),
                    threshold_mode="shrunk", threshold=0.3)
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def ensemble(
    val_predictions: Input[List[Dataset]],
    test_predictions: Input[List[Dataset]],
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
    """Average (or rank/weight) the models' out-of-fold probabilities and fit thresholds on them.

    Args:
        val_predictions: Validation predictions (.npz), one per trained model and fold, grouped by their model name.
        test_predictions: Test predictions (.npz) of the same tasks, in the same order.
        ensemble_test: Combined test probabilities (.npz: ids, probs, model).
        thresholds: Thresholds JSON ({"thresholds": {class: value}, "values": [...], "mode": ...}).
        metrics: Out-of-sample validation macro F1 of the ensemble and of each model (<model>_val_macro_f1), the
            in-sample figure beside it, the weights, the predicted labels per image beside
            the true ones, and on a labelled test set (synthetic data) the test macro F1 of the ensemble, of each
            model and of predicting all 28 classes.
        roc: Micro-averaged ROC curve of the ensemble on the out-of-fold validation predictions.
        method: mean, weighted or rank.
        threshold_mode: fitted (per-class thresholds maximising validation F1), global (threshold for every class),
            shrunk (each fitted threshold pulled toward threshold by n_pos / (n_pos + shrink_strength); a class
            without validation positives gets threshold) or prior (each class predicted on the validation fold
            as often as in prior_labels; a class absent from them is never predicted).
        threshold: The global threshold of global, and the value that shrunk pulls rare classes toward.
        shrink_strength: k of shrunk (>= 0): a class with k validation positives keeps half of its fitted threshold.
        prior_labels: Training labels (Id,Target CSV, e.g. the split CSV; rows of validation ids are left out), needed by prior.
    """
    from hpa.ensemble import ensemble_task

    # An unconnected optional artifact input arrives as None: the backend driver resolves only the
    # artifacts a task wires (kubeflow/pipelines 2.16.0 backend/src/v2/driver/resolve.go, "Handle
    # artifacts": task.GetInputs().GetArtifacts()) and kfp's executor returns None for a missing one
    # (kfp 2.17.0 sdk/python/kfp/dsl/executor.py, get_input_artifact).
    prior = prior_labels.path if prior_labels is not None else None
    result = ensemble_task([v.path for v in val_predictions], [t.path for t in test_predictions], ensemble_test.path,
                           thresholds.path, method=method, threshold_mode=threshold_mode, threshold=threshold,
                           shrink_strength=shrink_strength, prior=prior)
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)
    roc.log_roc_curve(*result["roc"])  # the UI's ROC view, all classes pooled
    ensemble_test.metadata.update(result["ensemble_test"])
    thresholds.metadata.update(result["thresholds"])


if __name__ == "__main__":
    compiler.Compiler().compile(ensemble, str(Path(__file__).with_name("component.yaml")))
