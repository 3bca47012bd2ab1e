"""What the pipeline's training tasks run around `hpa.train.train`.

`train_task` is the single-pod `train` component's one call: train into the run artifact's directory, keep the
best checkpoint as the model artifact, write TTA predictions of the validation fold and the test set, and return
the artifacts' metadata and the KFP Metrics (a TaskResult, which `record`s itself on the task's outputs).
`hpa.train_distributed.train_distributed_task` does the same through a multi-node job and shares the rest here:
the training plan item (`plan_item`), the run parameters -> TrainConfig mapping (`train_config`) and TaskResult.

A component passes its parameter inputs as one dict (`params`, input name -> value) and its output artifacts by
name (objects with `.path` and `.metadata`, and a Metrics with `log_metric`): the library never imports kfp.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hpa.options import require
from hpa.store import open_store, read_bytes
from hpa.train import TrainConfig
from hpa.train.checkpoint import training_key
from hpa.train.data import shards_uri
from hpa.train.launch import run_training

# Component inputs that are TrainConfig options under another name; the others keep their names (SHARED).
RENAMED = {"image_size": "size"}
SHARED = ("color_mode", "epochs", "batch_size", "loss", "threshold_mode", "threshold", "shrink_strength", "seed",
          "weights")
OUTPUTS = ("model", "run", "val_predictions", "test_predictions")
# The TrainConfig fields a training task sets itself (from its plan item, its artifacts and its other inputs), which
# train_options may not name: one value per option, whichever training component runs.
TASK_FIELDS = ("data", "split", "out", "fold", "arch", "lr", "cache_dir", "work_dir", "workers", "tensorboard_dir",
               "resume", "predict_tta", "predict_data", *RENAMED.values(), *SHARED)


@dataclass
class TaskResult:
    """What a training task reports: metadata of the model artifact, of every output artifact, of the run
    artifact, and the numbers logged as KFP Metrics."""

    model: dict
    artifacts: dict
    metrics: dict
    run: dict = field(default_factory=dict)

    def record(self, outputs: dict, metrics) -> None:
        """Put the metadata on `outputs` (name -> artifact, OUTPUTS) and log the metrics on `metrics`."""
        outputs["model"].metadata.update(self.model)
        for name in OUTPUTS[1:]:
            outputs[name].metadata.update(self.artifacts)
        outputs["run"].metadata.update(self.run)
        for key, value in self.metrics.items():
            metrics.log_metric(key, value)


def numeric_metrics(run_dir) -> dict[str, float]:
    """The numbers of a run's metrics.json (what the pipeline logs as KFP Metrics)."""
    with open(Path(run_dir) / "metrics.json") as f:
        summary = json.load(f)
    return {k: float(v) for k, v in sorted(summary.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)}


def plan_item(params: dict, task: str) -> tuple[str, int, float]:
    """(arch, fold, lr) of a training plan item: `models` maps each arch to its peak learning rate."""
    arch, models = params["arch"], params["models"]
    require(arch in models, f"{task} arch={arch!r}: not in models {sorted(models)} (the learning rates by model)")
    return arch, int(params["fold"]), float(models[arch])  # a loop item's fold may arrive as 0.0


def train_options(params: dict) -> dict:
    """The TrainConfig options among a task's inputs: the shared run parameters, and `train_options` (check-params'
    output: the run parameters declared train_option=True in hpa.config), each checked to be a TrainConfig field."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = dict(params.get("train_options") or {})
    unknown = sorted(set(extra) - names)
    require(not unknown, f"train_options: {unknown} are not options of python -m hpa train")
    taken = sorted(set(extra) & set(TASK_FIELDS))
    require(not taken, f"train_options: {taken} are set by the training task itself (its inputs and plan item)")
    options = {RENAMED.get(k, k): v for k, v in params.items() if k in RENAMED or k in SHARED}
    return {**options, **extra}


def train_config(params: dict, **fixed) -> TrainConfig:
    """The TrainConfig of a training task: its run parameters (train_options) plus `fixed` (data, split, out...)."""
    return TrainConfig(**{**train_options(params), **fixed})


def checkpoint_prefix(store_uri: str, cfg: TrainConfig, nproc: int) -> str:
    """Where a single-pod training keeps its outputs and last.pt in the store: <store_uri>/checkpoints/<key>/,
    with hpa.train.checkpoint.training_key (a digest of what defines the training: options, data, split, number
    of processes). A retry of the task (a new pod, the same inputs) resumes from it; another training never sees
    it. `cfg` must be validated."""
    key = training_key(cfg, shards_uri(cfg.data), read_bytes(cfg.split), nproc)
    return f"{store_uri.rstrip('/')}/checkpoints/{key}"


def collect_run(out: str, run_dir, model_out) -> None:
    """The run's files into the task's artifacts: best.pt to `model_out`, the others but last.pt (history,
    metrics, config, thresholds, val_predictions.npz, tensorboard/) to `run_dir`. `out` is the run's --out:
    `run_dir` itself (nothing to copy), or a store prefix (local or s3://) holding what every attempt wrote."""
    if not out.startswith("s3://") and Path(out).resolve() == Path(run_dir).resolve():
        shutil.move(Path(run_dir) / "best.pt", model_out)  # the artifact may live on another filesystem
        (Path(run_dir) / "last.pt").unlink(missing_ok=True)  # only resuming needs it
        return
    store = open_store(out)
    for key in store.list():
        if key != "last.pt":
            store.get_file(key, model_out if key == "best.pt" else os.path.join(run_dir, key))


def train_and_predict(cfg: TrainConfig, model_out, val_out, test_out, run_dir, tta: int = 1, shards=None,
                      predict_data=None, nproc: int = 1) -> dict[str, float]:
    """Train `cfg` as `nproc` processes (hpa.train.launch.run_training), put the best checkpoint in `model_out`
    and the run's files in `run_dir` (collect_run), then write TTA predictions of the validation fold and the
    test set, once, in this process. Returns the run's numeric metrics."""
    from hpa.predict import predict_val_and_test

    run_training(cfg, nproc)
    collect_run(cfg.out, run_dir, model_out)
    predict_val_and_test(model_out, predict_data or cfg.data, cfg.split, cfg.fold, val_out, test_out, tta=tta,
                         shards=shards, batch_size=cfg.batch_size, cache_dir=cfg.cache_dir, workers=cfg.workers)
    return numeric_metrics(run_dir)


def model_metadata(params: dict, arch: str, fold: int, lr: float) -> dict:
    return {"arch": arch, "fold": fold, "lr": lr, "image_size": params["image_size"],
            "color_mode": params["color_mode"], "framework": "pytorch"}


def train_task(params: dict, split: str, outputs: dict) -> TaskResult:
    """The `train` component: one model on one fold in this pod, streaming the images from the store (packed
    shards when `shards_uri` is set), then TTA predictions. `gpus` > 1: one DDP process per GPU
    (hpa.train.launch; gloo CPU processes where there is no CUDA). `store_uri`: the run's files and last.pt live
    under <store_uri>/checkpoints/<key>/ (checkpoint_prefix) and the training resumes from there, so a retried
    task (a preempted or evicted pod) continues where the last one stopped, and an identical training that
    already finished is reused; empty: they live in the run artifact only. TensorBoard event files go to the
    run's tensorboard/ and, with `tensorboard_uri`, to <tensorboard_uri>/<arch>-fold<fold>/ during training."""
    from hpa.tensorboard import run_logs_uri

    arch, fold, lr = plan_item(params, "train")
    gpus = params.get("gpus", 1)
    gpus = int(gpus) if isinstance(gpus, float) and gpus.is_integer() else gpus  # a JSON number may arrive as 2.0
    require(isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 0,
            f"train gpus={gpus!r}: expected an integer >= 0 (the GPUs of this pod; 0 or 1 trains in this process)")
    nproc = max(1, gpus)
    run_dir = outputs["run"].path
    os.makedirs(run_dir, exist_ok=True)
    # DataLoader workers per process: up to 4, leaving a core for the training loops (a pod sees its node's cores).
    workers = min(4, max(0, (len(os.sched_getaffinity(0)) - nproc) // nproc))
    logs = run_logs_uri(params["tensorboard_uri"], arch, fold, inputs=params, split=split) \
        if params.get("tensorboard_uri") else ""
    data, shards = params["data_uri"], params.get("shards_uri") or None
    store_uri = (params.get("store_uri") or "").strip()
    with tempfile.TemporaryDirectory(prefix="hpa-cache-") as cache:  # image/shard cache: outside the run artifact
        cfg = train_config(params, data=shards or data, split=split, fold=fold, arch=arch, lr=lr, out=run_dir,
                           cache_dir=cache, workers=workers, tensorboard_dir=logs).validate()
        if store_uri:
            cfg.out, cfg.resume = checkpoint_prefix(store_uri, cfg, nproc), True
            print(f"checkpoints: {cfg.out}/ (a retry of this task resumes from its last.pt)", flush=True)
        summary = train_and_predict(cfg, outputs["model"].path, outputs["val_predictions"].path,
                                    outputs["test_predictions"].path, run_dir, tta=params["tta"], shards=shards,
                                    predict_data=data, nproc=nproc)
    run = {"tensorboard": logs or "tensorboard/ in this artifact", "processes": nproc}
    if store_uri:
        run["checkpoints"] = cfg.out
    return TaskResult(model=model_metadata(params, arch, fold, lr), artifacts={"arch": arch, "fold": fold},
                      metrics={**summary, "fold": fold, "lr": lr}, run=run)


def train_distributed_task(params: dict, split: str, outputs: dict) -> TaskResult:
    """The `train-distributed` component: the same training as `train_task`, as a multi-node DDP job (a Trainer
    TrainJob or a PyTorchJob, hpa.train_distributed) whose pods read and write the store: the split is copied to
    <store_uri>/runs/<job>/, the job trains into .../out/ and, on its GPUs, predicts the validation fold and the
    test set with TTA there (`hpa train --predict-tta`); this task (a 1-CPU pod) only fetches the outputs, so that
    they are `train`'s."""
    import uuid

    from hpa import config, k8s, store
    from hpa.predict import TTA_CHOICES
    from hpa.tensorboard import copy_event_files, run_logs_uri
    from hpa.train.outputs import PREDICTION_FILES
    from hpa.train_distributed import DistributedConfig, launch_config

    image = params["image"]
    require(bool(image.strip()), f"train-distributed image={image!r}: expected the training image fixed at compile "
                                 "time (pipeline.py passes the CUDA image when gpus > 0, else the CPU image)")
    arch, fold, lr = plan_item(params, "train-distributed")
    options = train_options(params)  # refused here, before anything is written
    require(params["tta"] in TTA_CHOICES, f"train-distributed tta={params['tta']!r}: expected one of "
                                          f"{', '.join(map(str, TTA_CHOICES))}")
    # The job predicts after training (rank 0, on its GPU); with packed shards the CSVs come from the dataset.
    options.update(predict_tta=params["tta"], **({"predict_data": params["data_uri"]} if params.get("shards_uri")
                                                 else {}))
    namespace = params["namespace"] or k8s.current_namespace()
    name = f"hpa-{arch.replace('_', '-')}-ddp-{uuid.uuid4().hex[:6]}"
    prefix = f"{config.expand_store_uri(params['store_uri'], namespace).rstrip('/')}/runs/{name}"
    store.publish(split, f"{prefix}/split.csv")
    own = {f.name for f in dataclasses.fields(DistributedConfig)}
    cfg = DistributedConfig(
        name=name, namespace=namespace, data=params.get("shards_uri") or params["data_uri"],
        split=f"{prefix}/split.csv", out=f"{prefix}/out", fold=fold, arch=arch, lr=lr, image=image,
        s3_endpoint=params["s3_endpoint"] or config.S3_DEFAULT_ENDPOINT,
        **{k: params[k] for k in ("kind", "num_nodes", "gpus_per_node", "accelerator_type", "node_selector",
                                  "tolerations", "trainer_api")},
        **{k: v for k, v in options.items() if k in own},
        train_options={k: v for k, v in options.items() if k not in own},
    )
    # The pods write TensorBoard event files to <out>/tensorboard during training (hpa.train's default).
    print(f"TensorBoard event files (live): {prefix}/out/tensorboard/", flush=True)
    result = launch_config(cfg, timeout=params["timeout_s"])
    events = f"{result['out'].rstrip('/')}/tensorboard"
    if params.get("tensorboard_uri"):
        logs = run_logs_uri(params["tensorboard_uri"], arch, fold, inputs=params, split=split)
        print(f"TensorBoard: {copy_event_files(events, logs)} event file(s) copied to {logs}", flush=True)

    out, run_dir = store.open_store(result["out"]), outputs["run"].path
    os.makedirs(run_dir, exist_ok=True)
    for key in ("history.csv", "metrics.json", "config.json", "val_predictions.npz"):
        if out.exists(key):
            out.get_file(key, os.path.join(run_dir, key))
    out.get_file("best.pt", outputs["model"].path)
    for ids, name in PREDICTION_FILES.items():
        out.get_file(name, outputs[f"{ids}_predictions"].path)
    shape = {"num_nodes": float(params["num_nodes"]), "gpus_per_node": float(params["gpus_per_node"])}
    return TaskResult(model={**model_metadata(params, arch, fold, lr),
                             "job": f"{result['kind']} {namespace}/{result['name']}", "outputs": result["out"],
                             "tensorboard": events},
                      artifacts={"arch": arch, "fold": fold},
                      metrics={**numeric_metrics(run_dir), **shape, "fold": float(fold), "lr": lr})
