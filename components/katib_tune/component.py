"""KFP component `katib-tune`: Katib Experiments over each model's lr and the threshold policy, return the best.

An optional stage (`tune` run parameter): for every model of `models` it renders the same Experiment as
`python -m hpa katib render --arch <model>` for this run's dataset and split (lr, threshold_mode over the
chosen policies, threshold, shrink_strength; each trial scored out-of-sample by cross-fitting its
thresholds on the validation fold), creates them all through the Kubernetes API (the pipeline's service
account needs create/get/delete on experiments.kubeflow.org in `namespace`), waits for all, and returns
each model's best lr with the threshold policy of the Experiment whose best objective is highest (the
ensemble applies one policy to every model). With `tune` false it creates nothing and returns the run
parameters unchanged: the pipeline runs this task in every run instead of an If/Else joined by `dsl.OneOf`,
whose no-tuning branch would be a lone cache hit on the second identical run, which the KFP backend never marks
COMPLETE (docs/cluster.md, "Run it again"). `python components/katib_tune/component.py` rewrites component.yaml.

The trials' image is an input (`trial_image`), fixed when the pipeline is compiled: nothing inside the
pod picks an image. The Experiment is owned by this task's Pod (KFP_POD_NAME/KFP_POD_UID) and deleted
when the wait fails, times out or the task is cancelled (SIGTERM); one Experiment failing deletes the
others that have not finished: see hpa.k8s.create_all_and_wait.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Output

import hpa.config

CLI_EXAMPLE = r"""
python -m hpa katib tune --models '{"resnet18": 0.001, "se_resnet18": 0.001}' --namespace team-a \
    --image ghcr.io/me/hpa-kfp:0.2.0-cuda --unique-name --timeout 21600 --save experiments.yaml \
    --data s3://mlpipeline/private/team-a/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --split s3://mlpipeline/private/team-a/hpa-kfp/split.csv \
    --algorithm tpe --max-trials 12 --parallel-trials 3 --threshold-modes fitted global shrunk prior
python -m hpa katib render --arch se_resnet18 --out experiment.yaml   # one model's Experiment, to read or to launch alone
python -m hpa sweep experiment.yaml --trials 4 --parallel 2 --set data=./data --set split=split.csv   # the same search, locally
"""
PIPELINE_EXAMPLE = r"""
tuned = katib_tune(tune=tune, data_uri=data.outputs["data_uri"], split_csv=folds.outputs["split_csv"],
                   store_uri=checked.outputs["store_uri"], models=models, threshold=threshold,
                   threshold_mode=threshold_mode, shrink_strength=shrink_strength,
                   trial_image=checked.outputs["train_image"],  # the CUDA or CPU image, fixed at compile time
                   node_selector=node_selector, tolerations=tolerations)
tuned_models = tuned.outputs["models"]  # {arch: lr}: Katib's best, or models unchanged when tune is false
threshold_mode = tuned.outputs["threshold_mode"]  # likewise threshold, shrink_strength
"""


@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def katib_tune(
    tune: bool,
    data_uri: str,
    split_csv: Input[Dataset],
    store_uri: str,
    experiment: Output[Artifact],
    trial_image: str,
    models: dict,
    threshold: float,
    threshold_mode: str,
    shrink_strength: float,
    shards_uri: str = "",
    namespace: str = "",
    algorithm: str = "tpe",
    max_trials: int = 12,
    parallel_trials: int = 3,
    max_failed_trials: int = 3,
    lr_min: float = 1e-5,
    lr_max: float = 3e-3,
    threshold_modes: list = ["fitted", "global", "shrunk", "prior"],
    threshold_min: float = 0.05,
    threshold_max: float = 0.6,
    shrink_strength_min: float = 1.0,
    shrink_strength_max: float = 50.0,
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
    train_options: dict = {},
) -> NamedTuple("Outputs", [("models", dict), ("threshold", float), ("threshold_mode", str),
                             ("shrink_strength", float), ("val_macro_f1", float)]):
    """Create one Katib Experiment per model for this run, wait for all, return each model's best lr and the best threshold policy.

    Args:
        tune: Run the Experiments; false = create nothing and return models, threshold, threshold_mode and
            shrink_strength unchanged (val_macro_f1 -1.0).
        data_uri: URI of a committed dataset (the download task's data_uri); the trials read it from the store.
        split_csv: Fold assignment from the split task; copied into the store so that trial pods can read it.
        store_uri: Store prefix; the split copy and every trial's outputs go under <store_uri>/katib/<name>/.
        experiment: The Experiments that were created (one YAML document per model); its metadata holds each model's best trial.
        trial_image: Image of the trial pods, fixed when the pipeline is compiled (the CUDA image when trials get GPUs, else the CPU image); required, an empty value is refused.
        models: The models to tune, create_model name -> learning rate, e.g. {"resnet18": 0.001, "se_resnet18": 0.001}; one Experiment per model searches [lr_min, lr_max] (the given rates are returned when tune is false).
        threshold: The threshold run parameter, returned unchanged when tune is false.
        threshold_mode: The threshold_mode run parameter, returned unchanged when tune is false.
        shrink_strength: The shrink_strength run parameter, returned unchanged when tune is false.
        shards_uri: Packed shards of the dataset (the pack task's shards_uri); when set, the trials train from them.
        namespace: Kubernetes namespace of the Experiments; empty = the namespace this task runs in (Katib must be installed; the namespace needs the label katib.kubeflow.org/metrics-collector-injection=enabled).
        algorithm: tpe, random, grid, bayesianoptimization, cmaes or sobol.
        max_trials: maxTrialCount of each model's Experiment (the run costs up to this many trials per model).
        parallel_trials: parallelTrialCount of each model's Experiment (all models' Experiments run at once).
        max_failed_trials: maxFailedTrialCount of each model's Experiment.
        lr_min: Lower bound of the log-uniform learning-rate range (> 0).
        lr_max: Upper bound of the learning-rate range (< 1).
        threshold_modes: Threshold policies searched (categorical), one or more of fitted, global, shrunk, prior; every trial scores its policy out-of-sample (thresholds cross-fitted on the validation fold).
        threshold_min: Lower bound of the uniform threshold range, in (0, 1): the global cut of global, the target shrunk pulls rare classes toward; searched only when global or shrunk is among threshold_modes.
        threshold_max: Upper bound of the threshold range, in (0, 1).
        shrink_strength_min: Lower bound of the log-uniform shrink_strength range (k of shrunk: a class keeps n_pos/(n_pos+k) of its fitted cut), > 0; searched only when shrunk is among threshold_modes.
        shrink_strength_max: Upper bound of the shrink_strength range.
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
        timeout_s: Seconds to wait for the Experiments before failing.
        poll_s: Seconds between status reads.
        train_options: Further options of python -m hpa train by name (check-params' train_options: the run parameters declared train_option=True in hpa.config), applied on top of the inputs above.

    Returns:
        models: Each model's best learning rate, create_model name -> lr (the same models as the input).
        threshold: The best policy's global threshold (the cut of global, the target of shrunk; the pipeline default when no searched policy reads it).
        threshold_mode: The threshold policy of the Experiment with the highest best objective: fitted, global, shrunk or prior.
        shrink_strength: The best policy's shrink strength k (used by shrunk; the default when shrunk was not searched).
        val_macro_f1: The highest best objective over the models' Experiments (out-of-sample macro F1, max over its epochs).
    """
    params = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool, dict, list))}
    from collections import namedtuple

    from hpa import katib_tune as tuning, store

    store.use_endpoint(s3_endpoint)
    if tune:
        result = tuning.katib_tune_task(tuning.katib_tune_inputs(params), models, split_csv.path, store_uri,
                                        experiment.path, timeout=timeout_s, poll=poll_s)
    else:
        result = tuning.untuned(models=models, threshold=threshold, threshold_mode=threshold_mode,
                                shrink_strength=shrink_strength, experiments_out=experiment.path)
    experiment.metadata.update(result)
    return namedtuple("Outputs", ["models", "threshold", "threshold_mode", "shrink_strength", "val_macro_f1"])(
        result["models"], result["threshold"], result["threshold_mode"], result["shrink_strength"], result["val_macro_f1"])


if __name__ == "__main__":
    compiler.Compiler().compile(katib_tune, str(Path(__file__).with_name("component.yaml")))
