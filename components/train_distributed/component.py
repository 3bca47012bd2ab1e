"""KFP component `train-distributed`: train one model with multi-node DDP as a TrainJob (or PyTorchJob).

Used by the multi-node pipeline (compiled/hpa_pipeline_multinode.yaml) instead of the single-pod training
tasks. It copies the split into the store, creates a Kubeflow Trainer v2 TrainJob on the `torch-distributed` runtime
(`kind=pytorchjob`: a Training Operator v1 PyTorchJob) running `python3 -m torch.distributed.run -m hpa train
--predict-tta <tta>` (train, then predict val and test with TTA on the job's GPU), waits for it, then fetches
the run's outputs and predictions from the store, so that its outputs are the same as `train`'s. The pipeline's service account needs create/get/delete on the job kind in
`namespace` (and, for trainer_api=auto, get on customresourcedefinitions; without it the task tries the
Trainer 2.1 field first). `python components/train_distributed/component.py` rewrites component.yaml.

The pods' image is an input (`image`), fixed when the pipeline is compiled: nothing inside the pod picks
an image. The TrainJob is owned by this task's Pod (KFP_POD_NAME/KFP_POD_UID) and deleted when the wait
fails, times out or the task is cancelled (SIGTERM): see hpa.k8s.create_and_wait.
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

import hpa.config

CLI_EXAMPLE = r"""
python -m hpa train-distributed render --kind trainjob --trainer-api podTemplateOverrides --num-nodes 4 --gpus-per-node 8 \
    --arch resnet18 --namespace team-a --image ghcr.io/me/hpa-kfp:0.2.0-cuda \
    --data s3://mlpipeline/private/team-a/hpa-kfp/datasets/synthetic-600x200-64px-seed0 \
    --split s3://mlpipeline/private/team-a/hpa-kfp/split.csv --out s3://mlpipeline/private/team-a/hpa-kfp/runs/ddp \
    --manifest-out trainjob.yaml
python -m hpa train-distributed launch --file trainjob.yaml --timeout 86400
"""
PIPELINE_EXAMPLE = r"""
ddp = train_distributed(data_uri=data.outputs["data_uri"], split_csv=folds.outputs["split_csv"],
                        store_uri=checked.outputs["store_uri"], num_nodes=num_nodes, gpus_per_node=gpus, arch="resnet18",
                        fold=0, models={"resnet18": 1e-3},
                        image=checked.outputs["train_image"],  # the CUDA or CPU image, fixed at compile time
                        node_selector=node_selector, tolerations=tolerations)
"""


@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def train_distributed(
    data_uri: str,
    split_csv: Input[Dataset],
    store_uri: str,
    arch: str,
    fold: int,
    models: dict,
    model: Output[Model],
    run: Output[Artifact],
    val_predictions: Output[Dataset],
    test_predictions: Output[Dataset],
    metrics: Output[Metrics],
    image: str,
    shards_uri: str = "",
    num_nodes: int = 2,
    gpus_per_node: int = 1,
    kind: str = "trainjob",
    namespace: str = "",
    accelerator_type: str = "nvidia.com/gpu",
    node_selector: dict = {},
    tolerations: list = [],
    trainer_api: str = "auto",
    image_size: int = 64,
    color_mode: str = "rgby",
    epochs: int = 2,
    batch_size: int = 32,
    loss: str = "bce",
    threshold_mode: str = "fitted",
    threshold: float = 0.3,
    shrink_strength: float = 10.0,
    tta: int = 2,
    seed: int = 0,
    weights: str = "",
    s3_endpoint: str = "",
    timeout_s: float = 86400.0,
    tensorboard_uri: str = "",
    train_options: dict = {},
):
    """Train with DDP on num_nodes pods x gpus_per_node GPUs, then predict val and test in the job.

    Args:
        data_uri: URI of a committed dataset (the download task's data_uri).
        split_csv: Fold assignment (Id,Target,fold) from the split task; copied into the store for the training pods.
        store_uri: Store prefix; the job writes under <store_uri>/runs/<job name>/.
        arch: Architecture (hpa.models create_model name), an item of the training plan.
        fold: Fold held out for validation (the other folds train), an item of the training plan.
        models: Model name -> peak learning rate (the models run parameter, or Katib's best); this task uses models[arch].
        model: Best checkpoint (by validation macro F1), loadable with hpa.models.load_checkpoint.
        run: Training run directory: history.csv, metrics.json, config.json, val_predictions.npz.
        val_predictions: Validation-fold predictions with TTA (.npz: ids, probs, targets, model).
        test_predictions: Test-set predictions with TTA (.npz: ids, probs, model).
        metrics: Best validation macro F1, its epoch and the losses, plus the job's shape.
        image: Image of the training pods, fixed when the pipeline is compiled (the CUDA image when they get GPUs, else the CPU image); required, an empty value is refused.
        shards_uri: Packed shards of the dataset (the pack task's shards_uri); when set, the job trains from them (each rank reads its own shards) and predictions read them too.
        num_nodes: Training pods (TrainJob numNodes; PyTorchJob 1 Master + num_nodes-1 Workers).
        gpus_per_node: GPUs per pod; torch.distributed.run starts one process per GPU.
        kind: trainjob (Kubeflow Trainer v2) or pytorchjob (Training Operator v1).
        namespace: Namespace of the job; empty = the namespace this task runs in.
        accelerator_type: Kubernetes resource name of the accelerator.
        node_selector: Node labels for the training pods, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}; {} = anywhere.
        tolerations: Tolerations for the training pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]; [] = none.
        trainer_api: How the TrainJob patches its pods: podTemplateOverrides (Trainer 2.1, Kubeflow 1.11), runtimePatches (Trainer >= 2.2), or auto (read the installed TrainJob CRD; if this task may not, try 2.1 then 2.2+).
        image_size: Training and inference size in pixels (multiple of 32).
        color_mode: rgby (4 channels) or rgb (3 channels).
        epochs: Training epochs.
        batch_size: Batch size per process.
        loss: bce or focal.
        threshold_mode: fitted, global, shrunk or prior: the threshold policy whose out-of-sample val macro F1 picks the best epoch.
        threshold: The global threshold of global, and the value shrunk pulls rare classes toward.
        shrink_strength: k of shrunk (>= 0).
        tta: Dihedral test-time augmentations for the predictions, made by the job after training: 1, 2, 4 or 8.
        seed: Random seed.
        weights: Start from imagenet (timm's pretrained weights; needs the model hub), a 3-channel state dict file or s3:// URI; empty = random init.
        s3_endpoint: S3 endpoint host:port for this task and the training pods; empty = hpa.config.S3_DEFAULT_ENDPOINT (KFP's SeaweedFS).
        timeout_s: Seconds to wait for the job before failing.
        tensorboard_uri: The run's TensorBoard logs prefix (the tensorboard task's logs_uri): when the job ends, its event files are copied to <tensorboard_uri>/<arch>-fold<fold>-<digest of this task's inputs>/; while it runs they are live under <store_uri>/runs/<job name>/out/tensorboard/ (this task logs the path).
        train_options: Further options of python -m hpa train by name (check-params' train_options: the run parameters declared train_option=True in hpa.config), applied on top of the inputs above.
    """
    params = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool, dict, list))}
    from hpa import store, train_task

    store.use_endpoint(s3_endpoint)
    outputs = {"model": model, "run": run, "val_predictions": val_predictions, "test_predictions": test_predictions}
    train_task.train_distributed_task(params, split_csv.path, outputs).record(outputs, metrics)


if __name__ == "__main__":
    compiler.Compiler().compile(train_distributed, str(Path(__file__).with_name("component.yaml")))
