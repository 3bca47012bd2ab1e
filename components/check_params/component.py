"""KFP component `check-params`: validate the run parameters before any work is done.

A run started from the Central Dashboard never passes through `pipeline.py`'s client-side check, so
the pipeline's first task does the same check (`hpa.config.PipelineConfig.validate`) and fails with
one line naming the parameter. It also turns the run parameters into the training pods' settings
(`hpa.config.pod_settings`): the store prefix with `{namespace}` resolved, the accelerator limit as the
string the KFP driver reads, and the image (CUDA when gpus > 0). `python components/check_params/component.py` rewrites component.yaml.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

import hpa.config


CLI_EXAMPLE = r"""
# the same check runs client side before a local run or a cluster submission:
python pipeline.py run --local epochs=-1      # error: pipeline parameter epochs=-1: expected an integer >= 1
"""
PIPELINE_EXAMPLE = r"""
checked = check_params(data_source="synthetic", store_uri="s3://mlpipeline/private/{namespace}/hpa-kfp", n_train=600, n_test=200,
                       image_size=64, color_mode="rgby", folds=5, val_fold=0, epochs=2, batch_size=32,
                       models={"resnet18": 1e-3, "se_resnet18": 1e-3}, train_folds=1, loss="bce", tta=2,
                       threshold_mode="shrunk", threshold=0.3, shrink_strength=10.0, ensemble_method="mean", gpus=0,
                       accelerator_type="nvidia.com/gpu", seed=0)
with dsl.ParallelFor(checked.outputs["train_plan"]) as item:   # {"arch", "fold"} per training task
    ...
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def check_params(
    data_source: str,
    store_uri: str,
    n_train: int,
    n_test: int,
    image_size: int,
    color_mode: str,
    folds: int,
    val_fold: int,
    epochs: int,
    batch_size: int,
    models: dict,
    train_folds: int,
    loss: str,
    tta: int,
    threshold_mode: str,
    threshold: float,
    shrink_strength: float,
    ensemble_method: str,
    gpus: int,
    accelerator_type: str,
    seed: int,
    num_nodes: int = 1,
    weights: str = "",
    pos_weight: str = "none",
    merge_with: str = "",
    s3_endpoint: str = "",
    resume_from_store: bool = True,
    multi_node: bool = False,
    cpu_image: str = "",
    cuda_image: str = "",
) -> NamedTuple("Outputs", [("params", str), ("store_uri", str), ("gpu_limit", str), ("train_image", str),
                            ("train_plan", list), ("train_options", dict), ("checkpoint_uri", str)]):
    """Validate the pipeline's run parameters; fail with one clear line on the first bad one.

    Args:
        data_source: Dataset source (synthetic, a directory, s3://..., https://..., kaggle:<competition>).
        store_uri: Object store prefix for datasets (s3://bucket/prefix or a directory); {namespace} becomes the namespace this task runs in.
        n_train: Training images (synthetic: generated; other sources: subset, 0 = all).
        n_test: Test images (as n_train).
        image_size: Training and inference size in pixels, a positive multiple of 32.
        color_mode: rgby (4 channels) or rgb (3 channels).
        folds: Number of stratified folds, >= 2.
        val_fold: Validation fold, 0 <= val_fold < folds.
        epochs: Training epochs, >= 1.
        batch_size: Batch size per training task, >= 2.
        models: Model name (hpa.models create_model name) -> peak learning rate in (0, 1).
        train_folds: Folds trained per model, 1 <= train_folds <= folds.
        loss: bce or focal.
        pos_weight: none or sqrt (per-class positive weights of the loss, from the training folds).
        tta: Dihedral test-time augmentations: 1, 2, 4 or 8.
        threshold_mode: fitted, global, shrunk or prior (see the pipeline's description).
        threshold: Global decision threshold in (0, 1).
        shrink_strength: k of the shrunk policy, >= 0.
        ensemble_method: mean, weighted or rank.
        gpus: GPUs per training task, >= 0.
        accelerator_type: Kubernetes resource name of the accelerator.
        seed: Random seed, >= 0.
        num_nodes: Training nodes per model; above 1 only in the multi-node pipeline.
        weights: Initial weights per model: JSON model name -> imagenet, a file or an s3:// URI (each file is checked against its model here); empty = random init.
        merge_with: The Kaggle-layout dataset that data_source=hpav18:<csv> is merged into (required there, refused elsewhere).
        s3_endpoint: S3 endpoint host:port (to read s3:// weights files); empty keeps HPA_S3_ENDPOINT from the environment.
        resume_from_store: Training tasks keep their checkpoints in the store (checkpoint_uri) and a retry resumes from them.
        multi_node: Whether this is the multi-node pipeline (a compile-time constant).
        cpu_image: The CPU image fixed at compile time (HPA_IMAGE).
        cuda_image: The CUDA image fixed at compile time (HPA_CUDA_IMAGE).

    Returns:
        params: The validated parameters as JSON (shown in the task's outputs).
        store_uri: The store prefix with {namespace} resolved.
        gpu_limit: The accelerator limit of the training pods as a string ("" = no accelerator).
        train_image: The image of the training pods, Katib trials and TrainJobs (CUDA when gpus > 0).
        train_plan: The training tasks, one {"arch", "fold", "weights"} per model and trained fold (the ParallelFor's items).
        train_options: The run parameters that are options of every training run (hpa train), by option name.
        checkpoint_uri: The training tasks' store prefix for their checkpoints (store_uri), or "" with resume_from_store false.
    """
    params = dict(locals())
    from collections import namedtuple

    from hpa import config, k8s, store

    store.use_endpoint(s3_endpoint)
    out = config.check_params_task(params, multi_node, cpu_image, cuda_image, k8s.current_namespace())
    return namedtuple("Outputs", list(out))(**out)

if __name__ == "__main__":
    compiler.Compiler().compile(check_params, str(Path(__file__).with_name("component.yaml")))
