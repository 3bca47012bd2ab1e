"""KFP component `katib-tune`: run a Katib Experiment over lr, threshold and threshold_mode, return the best.

An optional stage (`tune` run parameter): it renders the same Experiment as `python -m hpa katib render`
for this run's dataset and split, creates it through the Kubernetes API (the pipeline's service account
needs create/get/delete on experiments.kubeflow.org in `namespace`), waits, and returns the best trial's values
as outputs for the training and ensemble tasks. `katib_defaults` is its pass-through for runs without
tuning, so that `dsl.OneOf` has a value on both branches. `python components/katib_tune/component.py`
rewrites component.yaml.

The trials' image is an input (`trial_image`), fixed when the pipeline is compiled: nothing inside the
pod picks an image. The Experiment is owned by this task's Pod (KFP_POD_NAME/KFP_POD_UID) and deleted
when the wait fails, times out or the task is cancelled (SIGTERM): see hpa.k8s.create_and_wait.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Output

import hpa.config

CLI_EXAMPLE = r"""
python -m hpa katib render --namespace team-a --image ghcr.io/me/hpa-kfp:0.1.0-cuda \
    --data s3://mlpipeline/private/team-a/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --split s3://mlpipeline/private/team-a/hpa-kfp/split.csv \
    --algorithm tpe --max-trials 12 --parallel-trials 3 --out experiment.yaml
python -m hpa katib launch --file experiment.yaml --namespace team-a --timeout 21600
python -m hpa sweep experiment.yaml --trials 4 --parallel 2 --set data=./data --set split=split.csv   # the same search, locally
"""
PIPELINE_EXAMPLE = r"""
with dsl.If(tune == True):
    tuned = katib_tune(data_uri=data.outputs["data_uri"], split_csv=folds.outputs["split_csv"],
                       store_uri=checked.outputs["store_uri"],
                       trial_image=checked.outputs["train_image"],  # the CUDA or CPU image, fixed at compile time
                       node_selector=node_selector, tolerations=tolerations)
with dsl.Else():
    fixed = katib_defaults(lr=lr_resnet18, threshold=threshold, threshold_mode=threshold_mode)
lr = dsl.OneOf(tuned.outputs["lr"], fixed.outputs["lr"])
"""


@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def katib_tune(
    data_uri: str,
    split_csv: Input[Dataset],
    store_uri: str,
    experiment: Output[Artifact],
    trial_image: str,
    shards_uri: str = "",
    namespace: str = "",
    algorithm: str = "tpe",
    max_trials: int = 12,
    parallel_trials: int = 3,
    max_failed_trials: int = 3,
    lr_min: float = 1e-5,
    lr_max: float = 3e-3,
    threshold_min: float = 0.05,
    threshold_max: float = 0.6,
    val_fold: int = 0,
    image_size: int = 64,
    color_mode: str = "rgby",
    epochs: int = 2,
    batch_size: int = 32,
    loss: str = "bce",
    seed: int = 0,
    weights: str = "",
    gpus: int = 1,
    accelerator_type: str = "nvidia.com/gpu",
    node_selector: dict = {},
    tolerations: list = [],
    s3_endpoint: str = "",
    timeout_s: float = 21600.0,
    poll_s: float = 30.0,
) -> NamedTuple("Outputs", [("lr", float), ("threshold", float), ("threshold_mode", str), ("val_macro_f1", float)]):
    """Create the Katib Experiment for this run, wait for it, return the best trial's hyperparameters.

    Args:
        data_uri: URI of a committed dataset (the download task's data_uri); the trials read it from the store.
        split_csv: Fold assignment from the split task; copied into the store so that trial pods can read it.
        store_uri: Store prefix; the split copy and every trial's outputs go under <store_uri>/katib/<experiment>/.
        experiment: The Experiment YAML that was created; its metadata holds the best trial.
        trial_image: Image of the trial pods, fixed when the pipeline is compiled (the CUDA image when trials get GPUs, else the CPU image); required, an empty value is refused.
        shards_uri: Packed shards of the dataset (the pack task's shards_uri); when set, the trials train from them.
        namespace: Kubernetes namespace of the Experiment; empty = the namespace this task runs in (Katib must be installed; the namespace needs the label katib.kubeflow.org/metrics-collector-injection=enabled).
        algorithm: tpe, random, grid, bayesianoptimization, cmaes or sobol.
        max_trials: maxTrialCount.
        parallel_trials: parallelTrialCount.
        max_failed_trials: maxFailedTrialCount.
        lr_min: Lower bound of the log-uniform learning-rate range (> 0).
        lr_max: Upper bound of the learning-rate range.
        threshold_min: Lower bound of the global threshold range, in (0, 1).
        threshold_max: Upper bound of the global threshold range, in (0, 1).
        val_fold: Fold held out for validation in every trial.
        image_size: Training size in pixels (multiple of 32).
        color_mode: rgby or rgb.
        epochs: Epochs per trial (medianstop compares trials epoch by epoch).
        batch_size: Batch size per trial.
        loss: bce or focal.
        seed: Random seed of the trials and of the search algorithm's settings.
        weights: Every trial starts from imagenet (timm's pretrained weights; needs the model hub), a 3-channel state dict file or s3:// URI; empty = random init.
        gpus: GPUs per trial pod.
        accelerator_type: Kubernetes resource name of the accelerator.
        node_selector: Node labels for the trial pods, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}; {} = anywhere.
        tolerations: Tolerations for the trial pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]; [] = none.
        s3_endpoint: S3 endpoint host:port for this task and the trial pods; empty = hpa.config.S3_DEFAULT_ENDPOINT (KFP's SeaweedFS).
        timeout_s: Seconds to wait for the Experiment before failing.
        poll_s: Seconds between status reads.

    Returns:
        lr: Best trial's learning rate.
        threshold: Best trial's global threshold.
        threshold_mode: Best trial's threshold mode (fitted or global).
        val_macro_f1: Best trial's objective (max over its epochs).
    """
    import os
    import uuid
    from collections import namedtuple

    if s3_endpoint:
        os.environ["HPA_S3_ENDPOINT"] = s3_endpoint
    from hpa import config, k8s, katib, store
    from hpa.errors import ConfigError

    if not trial_image.strip():
        raise ConfigError(f"katib-tune trial_image={trial_image!r}: expected the trial image fixed at compile time "
                          "(pipeline.py passes the CUDA image when gpus > 0, else the CPU image)")
    namespace = namespace or k8s.current_namespace()
    name = f"hpa-tune-{uuid.uuid4().hex[:8]}"
    prefix = f"{config.expand_store_uri(store_uri, namespace).rstrip('/')}/katib/{name}"
    split_uri = f"{prefix}/split.csv"
    store.publish(split_csv.path, split_uri)
    cfg = katib.KatibConfig(
        name=name, namespace=namespace, data=shards_uri or data_uri, split=split_uri, out_prefix=prefix, fold=val_fold,
        size=image_size, color_mode=color_mode, epochs=epochs, batch_size=batch_size, loss=loss, seed=seed, weights=weights,
        algorithm=algorithm, max_trials=max_trials, parallel_trials=parallel_trials, max_failed_trials=max_failed_trials,
        lr_min=lr_min, lr_max=lr_max, threshold_min=threshold_min, threshold_max=threshold_max, gpus=gpus,
        accelerator_type=accelerator_type, image=trial_image, node_selector=node_selector, tolerations=tolerations,
        s3_endpoint=s3_endpoint or config.S3_DEFAULT_ENDPOINT,
    )
    exp = katib.render_experiment(cfg)
    with open(experiment.path, "w") as f:
        f.write(k8s.dump_yaml(exp))
    best = katib.launch(exp, namespace=namespace, timeout=timeout_s, poll=poll_s)
    experiment.metadata.update({"name": name, "namespace": namespace, **best})
    return namedtuple("Outputs", ["lr", "threshold", "threshold_mode", "val_macro_f1"])(
        best["lr"], best["threshold"], best["threshold_mode"], best["val_macro_f1"])


@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def katib_defaults(
    lr: float, threshold: float, threshold_mode: str,
) -> NamedTuple("Outputs", [("lr", float), ("threshold", float), ("threshold_mode", str), ("val_macro_f1", float)]):
    """The run parameters unchanged, in katib_tune's output shape (the branch without tuning).

    Args:
        lr: Learning rate run parameter.
        threshold: Threshold run parameter.
        threshold_mode: Threshold mode run parameter.
    """
    from collections import namedtuple

    return namedtuple("Outputs", ["lr", "threshold", "threshold_mode", "val_macro_f1"])(lr, threshold, threshold_mode, -1.0)


if __name__ == "__main__":
    compiler.Compiler().compile(katib_tune, str(Path(__file__).with_name("component.yaml")))
