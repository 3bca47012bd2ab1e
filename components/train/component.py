"""KFP component `train`: train one model on one fold, then predict its validation fold and the test set.

The pipeline runs it once per item of its training plan (a `dsl.ParallelFor` over every model of the
`models` run parameter x each of `train_folds` folds); `ensemble` and `compare-plots` take the results
with `dsl.Collected`. Each task's inputs `arch` and `fold` and its artifacts' metadata say what it
trained. The images are streamed from the store (packed shards, or the PNGs; never copied in as an
artifact); the checkpoint, the run directory (history, metrics, config) and the TTA predictions on the
validation fold and on the test set come out as small artifacts. With `gpus` > 1 the task trains with
one DDP process per GPU (hpa.train.launch); with `store_uri` it checkpoints to the store and a retry resumes. TensorBoard event files (per-step loss,
lr, images/s; per-epoch metrics and per-class F1) are in the run artifact's tensorboard/ and, with
`tensorboard_uri`, reach the store during training. The GPU request, /dev/shm and the S3
secret are set on the task in pipeline.py. `python components/train/component.py` rewrites component.yaml.
"""

from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

import hpa.config


CLI_EXAMPLE = r"""
python -m hpa train --data s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --split split.csv --fold 0 --arch resnet18 \
    --size 64 --epochs 2 --batch-size 32 --lr 1e-3 --out runs/resnet18
python -m hpa predict --checkpoint runs/resnet18/best.pt --data s3://mlpipeline/hpa-kfp/datasets/synthetic-600x200-64px-seed0 --ids test --tta 2 --out test.npz
"""
PIPELINE_EXAMPLE = r"""
with dsl.ParallelFor(checked.outputs["train_plan"], name="models-x-folds") as item:
    trained = train(data_uri=data.outputs["data_uri"], split_csv=folds.outputs["split_csv"], arch=item.arch,
                    fold=item.fold, models={"resnet18": 1e-3, "se_resnet18": 1e-3})
    trained.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit("1")
ensemble(val_predictions=dsl.Collected(trained.outputs["val_predictions"]),
         test_predictions=dsl.Collected(trained.outputs["test_predictions"]))
"""

@dsl.component(base_image=hpa.config.image(), install_kfp_package=False)
def train(
    data_uri: str,
    split_csv: Input[Dataset],
    arch: str,
    fold: int,
    models: dict,
    model: Output[Model],
    run: Output[Artifact],
    val_predictions: Output[Dataset],
    test_predictions: Output[Dataset],
    metrics: Output[Metrics],
    shards_uri: str = "",
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
    tensorboard_uri: str = "",
    train_options: dict = {},
    gpus: int = 1,
    store_uri: str = "",
):
    """Train one model with one fold held out, keep the best epoch, predict that fold and the test set with TTA.

    Args:
        data_uri: URI of a committed dataset (the download task's data_uri).
        split_csv: Fold assignment (Id,Target,fold) from the split task.
        arch: Architecture (hpa.models create_model name), an item of the training plan.
        fold: Fold held out for validation (the other folds train), an item of the training plan.
        models: Model name -> peak learning rate (the models run parameter, or Katib's best); this task uses models[arch].
        model: Best checkpoint (by validation macro F1), loadable with hpa.models.load_checkpoint.
        run: Training run directory: history.csv, metrics.json, config.json, val_predictions.npz.
        val_predictions: Validation-fold predictions with TTA (.npz: ids, probs, targets, model).
        test_predictions: Test-set predictions with TTA (.npz: ids, probs, model).
        metrics: Best validation macro F1 (out-of-sample), its epoch, the in-sample figure, the losses, fold and lr.
        shards_uri: Packed shards of the dataset (the pack task's shards_uri); empty = read the PNGs.
        image_size: Training and inference size in pixels (multiple of 32).
        color_mode: rgby (4 channels) or rgb (3 channels).
        epochs: Training epochs.
        batch_size: Batch size.
        loss: bce or focal.
        threshold_mode: fitted, global, shrunk or prior: the threshold policy whose out-of-sample val macro F1 picks the best epoch.
        threshold: The global threshold of global, and the value shrunk pulls rare classes toward.
        shrink_strength: k of shrunk (>= 0).
        tta: Dihedral test-time augmentations for the predictions: 1, 2, 4 or 8.
        seed: Random seed.
        weights: Start from imagenet (timm's pretrained weights; needs the model hub), a 3-channel state dict file or s3:// URI; empty = random init.
        s3_endpoint: S3 endpoint host:port; empty keeps HPA_S3_ENDPOINT from the environment.
        tensorboard_uri: The run's TensorBoard logs prefix (the tensorboard task's logs_uri): the event files also go to <tensorboard_uri>/<arch>-fold<fold>-<digest of this task's inputs>/ while training runs; empty = only in the run artifact (run/tensorboard/).
        train_options: Further options of python -m hpa train by name (check-params' train_options: the run parameters declared train_option=True in hpa.config), applied on top of the inputs above.
        gpus: GPUs of this pod (the gpus run parameter, also the task's GPU limit): > 1 trains with one DDP process per GPU (python -m torch.distributed.run --standalone, this task's interpreter); 0 or 1 trains in this process. Without CUDA (a local run) > 1 starts that many gloo CPU processes.
        store_uri: The run's store prefix ({namespace} resolved, check-params' store_uri): the training's outputs and last.pt live under <store_uri>/checkpoints/<key>/ (key: a digest of the options, data, split, fold, arch, lr and process count), so a retried task resumes from the last checkpoint and an identical finished training is reused; empty = in this pod only, no resume.
    """
    params = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool, dict, list))}
    from hpa import store, train_task

    store.use_endpoint(s3_endpoint)
    outputs = {"model": model, "run": run, "val_predictions": val_predictions, "test_predictions": test_predictions}
    train_task.train_task(params, split_csv.path, outputs).record(outputs, metrics)


if __name__ == "__main__":
    compiler.Compiler().compile(train, str(Path(__file__).with_name("component.yaml")))
