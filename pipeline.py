"""The HPA Kubeflow pipelines: wire the components in components/ (no ML code here).

    python pipeline.py compile          # compiled/hpa_pipeline{,_multinode}.yaml + every components/*/component.yaml
    python pipeline.py run --local [--store DIR] [--out DIR] [key=value ...]
    python pipeline.py submit [--host URL] [--namespace NS] [--token-file F | --cookie-file F | --in-cluster]
                              [--pipeline-name NAME] [--version-name V | --no-upload] [--experiment NAME] [key=value ...]
    python pipeline.py graph            # docs/pipeline.png + a mermaid block, from the compiled YAML

Graph: check-params -> download -> (montage, only when plot_samples), split, pack (shards at image_size)
       -> (katib-tune, when tune) -> ParallelFor over models x train_folds: train
       -> compare-plots, ensemble (dsl.Collected) -> submit.
The multi-node pipeline trains each (model, fold) as a DDP TrainJob (train-distributed) instead.

`run --local` runs the same pipeline for real with kfp.local (SubprocessRunner, no containers), resolving
inputs as the KFP backend driver does (cluster/backend_rules.py strict_local), through an embedded
SeaweedFS S3 server on a free loopback port, so the local run uses the cluster's S3 code path; `--store
DIR` uses a plain directory instead. Overrides are run parameters, `epochs=1 tta=1`. The images are
fixed at compile time: hpa.config.image() (HPA_IMAGE) for every task, hpa.config.cuda_image()
(HPA_CUDA_IMAGE) for the training pods, Katib trials and TrainJobs when gpus > 0.
"""

import argparse
import builtins
import contextlib
import dataclasses
import importlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import yaml
from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Dataset, Metrics

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from components.check_params.component import check_params  # noqa: E402
from components.compare_plots.component import compare_plots  # noqa: E402
from components.dataset_state.component import dataset_state  # noqa: E402
from components.download.component import download  # noqa: E402
from components.katib_tune.component import katib_defaults, katib_tune  # noqa: E402
from components.ensemble.component import ensemble  # noqa: E402
from components.montage.component import montage  # noqa: E402
from components.pack.component import pack  # noqa: E402
from components.split.component import split  # noqa: E402
from components.submit.component import submit  # noqa: E402
from components.train.component import train  # noqa: E402
from components.tensorboard.component import tensorboard as tensorboard_for_run  # noqa: E402
from components.train_distributed.component import train_distributed  # noqa: E402
from components.use_dataset.component import use_dataset  # noqa: E402
from hpa.config import (  # noqa: E402
    KAGGLE_SECRET_KEYS, KAGGLE_SECRET_NAME, S3_DEFAULT_ENDPOINT, S3_SECRET_KEYS, S3_SECRET_NAME, PipelineConfig,
    cuda_image, image,
)
from hpa.errors import ConfigError  # noqa: E402
from cluster import backend_rules  # noqa: E402

PIPELINE_NAME = "hpa-pipeline"
MULTINODE_NAME = "hpa-pipeline-multinode"
COMPILED = ROOT / "compiled" / "hpa_pipeline.yaml"
COMPILED_MULTINODE = ROOT / "compiled" / "hpa_pipeline_multinode.yaml"
COMPONENTS = ROOT / "components"
DEFAULTS = PipelineConfig()
# Run parameters that are not PipelineConfig fields (cluster plumbing), with their defaults.
EXTRA_PARAMS = {"s3_endpoint": S3_DEFAULT_ENDPOINT, "node_selector": {}, "tolerations": [], "tune": False,
                "tensorboard": True}
# PipelineConfig fields that the pipeline does not take.
NOT_PARAMS: set[str] = set()
# The multi-node pipeline's own defaults (compile-time `pipeline_parameters`).
MULTINODE_DEFAULTS = {"num_nodes": 2}
# The oldest KFP backend both pipelines run on with the default s3_endpoint: seaweedfs.kubeflow:9000 exists
# from 2.16.0 (docs/cluster.md, Supported versions). With an s3_endpoint of the user's it is the oldest the
# compiled YAML itself runs on (cluster.backend_rules.min_backend_version: 2.15.0). `submit` refuses older.
MIN_KFP_BACKEND = "2.16.0"
MIN_KFP_BACKEND_OWN_ENDPOINT = "2.15.0"

# Requests per kind of task (compile-time constants; the GPU limit and the image are runtime values).
LIGHT = {"cpu": "1", "memory": "2Gi"}
DOWNLOAD = {"cpu": "2", "memory": "4Gi"}
TRAIN = {"cpu": "4", "memory": "16Gi"}
SHM_SIZE = "8Gi"  # DataLoader workers share batches through /dev/shm (64 MiB by default in a pod).


def _with_requests(task: dsl.PipelineTask, requests: dict) -> dsl.PipelineTask:
    return task.set_cpu_request(requests["cpu"]).set_memory_request(requests["memory"])


def _with_s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """S3 keys from KFP's object store secret (keys accesskey/secretkey) as HPA_S3_ACCESS_KEY/SECRET_KEY."""
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET_NAME, secret_key_to_env=S3_SECRET_KEYS)


def _name_branches(display_name: str) -> None:
    """Give the If/Else group just closed a display name. kfp 2.17 wraps an If followed by Else in a
    ConditionBranches group it makes itself (kfp/dsl/tasks_group.py maybe_make_and_insert_conditional_branches_group)
    and names its task `display_name or name` (kfp/compiler/pipeline_spec_builder.py, task_info.name), but offers no
    argument for it: without this the UI shows "condition-branches-2"."""
    from kfp.dsl import pipeline_context, tasks_group

    group = pipeline_context.Pipeline.get_default_pipeline().groups[-1].groups[-1]
    if not isinstance(group, tasks_group.ConditionBranches):
        raise TypeError(f"_name_branches: the last group is {type(group).__name__}, not an If/Else's ConditionBranches")
    group.display_name = display_name


def _as_training(task: dsl.PipelineTask, pod: dsl.PipelineTask, accelerator_type, node_selector,
                 tolerations) -> dsl.PipelineTask:
    """GPU request and image from check-params' string outputs, memory-backed /dev/shm, placement, the S3 secret.

    The driver reads the accelerator count and the image of a task from that task's own inputs with
    GetStringValue() (kubeflow/pipelines 2.17.0 backend/src/v2/driver/driver.go initPodSpecPatch,
    resolve.go resolvePodSpecInputRuntimeParameter), so both come as string outputs of check-params.
    set_accelerator_type/limit do not register their channels as task inputs in kfp 2.17 (only
    set_container_image does); register_pipeline_channels makes the compiler pass them in, through every
    enclosing DAG, since the driver resolves a componentInputParameter only from the immediate parent
    DAG (resolve.go: "parent DAG does not have input parameter")."""
    gpu_limit, image = pod.outputs["gpu_limit"], pod.outputs["train_image"]
    _with_requests(task, TRAIN).set_accelerator_type(accelerator_type).set_accelerator_limit(gpu_limit)
    task.register_pipeline_channels([accelerator_type, gpu_limit])
    task.set_container_image(image)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return _with_s3(task).set_caching_options(True)


def make_pipeline(multi_node: bool):
    """The pipeline, single-pod or multi-node.

    Two compiled pipelines instead of one with a `num_nodes > 1` branch: joining the branches' model
    artifacts needs an artifact dsl.OneOf, which the KFP backend resolves only from 2.17.0
    (kubeflow/pipelines#13436; 2.16.0 backend/src/v2/driver/resolve.go GetProducerTask takes the last
    selector whichever branch ran), while kubeflow/manifests ships 2.16. Each variant runs on 2.16 and 2.17.
    """

    @dsl.pipeline(
        name=MULTINODE_NAME if multi_node else PIPELINE_NAME,
        description="Human Protein Atlas multi-label classification: download, split, train every model of the "
        "models run parameter on train_folds folds" + (" as multi-node DDP TrainJobs (Kubeflow Trainer)" if multi_node
                                                       else "") +
        ", compare, ensemble the out-of-fold predictions with robust thresholds, Kaggle submission.",
    )
    def hpa_pipeline(
        data_source: str = DEFAULTS.data_source,
        store_uri: str = DEFAULTS.store_uri,
        s3_endpoint: str = EXTRA_PARAMS["s3_endpoint"],
        n_train: int = DEFAULTS.n_train,
        n_test: int = DEFAULTS.n_test,
        image_size: int = DEFAULTS.image_size,
        color_mode: str = DEFAULTS.color_mode,
        folds: int = DEFAULTS.folds,
        val_fold: int = DEFAULTS.val_fold,
        epochs: int = DEFAULTS.epochs,
        batch_size: int = DEFAULTS.batch_size,
        models: dict = DEFAULTS.models,
        train_folds: int = DEFAULTS.train_folds,
        loss: str = DEFAULTS.loss,
        tta: int = DEFAULTS.tta,
        threshold_mode: str = DEFAULTS.threshold_mode,
        threshold: float = DEFAULTS.threshold,
        shrink_strength: float = DEFAULTS.shrink_strength,
        ensemble_method: str = DEFAULTS.ensemble_method,
        gpus: int = DEFAULTS.gpus,
        accelerator_type: str = DEFAULTS.accelerator_type,
        num_nodes: int = DEFAULTS.num_nodes,
        tune: bool = EXTRA_PARAMS["tune"],
        tensorboard: bool = EXTRA_PARAMS["tensorboard"],
        node_selector: dict = EXTRA_PARAMS["node_selector"],
        tolerations: list = EXTRA_PARAMS["tolerations"],
        kaggle_submit: bool = DEFAULTS.kaggle_submit,
        plot_samples: bool = DEFAULTS.plot_samples,
        seed: int = DEFAULTS.seed,
        weights: str = DEFAULTS.weights,
    ) -> NamedTuple("Outputs", [("submission", Dataset), ("report", HTML), ("metrics", Metrics),
                                ("test_metrics", Metrics)]):
        """Human Protein Atlas multi-label pipeline.

        Args:
            data_source: Where the images come from: synthetic (HPA-like generated data), a directory in Kaggle layout, an s3:// prefix, an https:// zip/tar archive, or kaggle:human-protein-atlas-image-classification.
            store_uri: Object store prefix that holds the datasets (s3://bucket/prefix, or a directory for local runs); {namespace} is replaced by the run's namespace (multi-user profiles may only write under mlpipeline/private/<namespace>/ and mlpipeline/shared/).
            s3_endpoint: S3 endpoint host:port of the store (KFP's SeaweedFS by default); keys come from the mlpipeline-minio-artifact secret.
            n_train: Training images: how many to generate for synthetic data; for other sources a seeded random subset of at most this many (0 = all).
            n_test: Test images, as n_train (the Kaggle test set has 11,702; 0 = all).
            image_size: Image side in pixels for training and inference; a positive multiple of 32 (512 = full resolution).
            color_mode: rgby (4 channels, red/green/blue/yellow) or rgb (3 channels: G, (R+Y)/2, (B+Y)/2).
            folds: Number of iterative-stratified folds (>= 2).
            val_fold: The first fold held out for validation (0 <= val_fold < folds); with train_folds = k, folds val_fold .. val_fold + k - 1 (mod folds) are each held out once.
            epochs: Training epochs per model (>= 1).
            batch_size: Batch size per training task (>= 2).
            models: The models to train as JSON, model name -> peak learning rate in (0, 1); any hpa.models create_model name, e.g. {"resnet18": 0.001, "se_resnet18": 0.001, "densenet121": 0.0003}.
            train_folds: Folds trained per model (1 = one model per entry of models, the laptop default; 5 = a full 5-fold cross-validation). Their out-of-fold predictions are what the thresholds are fitted on; test predictions are averaged over the folds, then over the models.
            loss: Training loss: bce or focal.
            tta: Dihedral test-time augmentations at prediction: 1, 2, 4 or 8.
            threshold_mode: fitted = per-class thresholds that maximise validation F1; global = the threshold value for every class; shrunk = fitted thresholds pulled toward the global one by the evidence (n_pos / (n_pos + shrink_strength)), so rare classes do not get degenerate cuts; prior = each class predicted as often as in the training labels. Every reported validation score is out-of-sample (each fold, or each of 5 parts of a single fold, scored with thresholds fitted on the others).
            threshold: Global decision threshold in (0, 1), used when threshold_mode is global (and the target of shrunk).
            shrink_strength: k of shrunk (>= 0): a class with k validation positives keeps half of its fitted threshold.
            ensemble_method: How the models are combined (after averaging each model's folds): mean, weighted (by out-of-sample val macro F1) or rank.
            gpus: GPUs per training pod (0 = CPU only: no accelerator limit and the CPU image; > 0: the CUDA image).
            accelerator_type: Kubernetes resource name of the accelerator, e.g. nvidia.com/gpu or amd.com/gpu.
            num_nodes: Training nodes per model. The single-pod pipeline (hpa-pipeline) takes 1 only; the multi-node pipeline (hpa-pipeline-multinode) trains each model as a DDP TrainJob (Kubeflow Trainer, torch-distributed runtime) on num_nodes pods with `gpus` GPUs each.
            tensorboard: Live training curves: a Kubeflow Tensorboard for this run (Central Dashboard > Tensorboards) reading the event files every training task streams to <store_uri>/tensorboard/<run id> (loss, lr, throughput every 10 steps; val loss, out-of-sample macro F1 and per-class F1 every epoch). A per-run logs prefix is a new input of every training task, so with true they are not cached across runs; false keeps the event files in each task's run artifact only.
            tune: Run Katib first (needs Katib in the cluster): one Experiment per model tunes its learning rate and the threshold policy (threshold_mode, threshold, shrink_strength), each trial scored out-of-sample; training and the ensemble then use the best values.
            node_selector: Node labels for the training pods as JSON, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}; {} = anywhere.
            tolerations: Tolerations for the training pods as a JSON list, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]; [] = none.
            kaggle_submit: Upload submission.csv to Kaggle (needs the kaggle-credentials secret).
            plot_samples: Render a montage of sample images with their labels after download.
            seed: Random seed for data generation, split and training.
            weights: Initial weights of every model: empty = random init; imagenet = timm's ImageNet weights (the pods need the model hub, e.g. huggingface.co); or a 3-channel state dict file / s3:// URI (readable with the run's store keys); the stem becomes 4 channels (yellow = mean of RGB).
        """
        checked = check_params(
            data_source=data_source, store_uri=store_uri, n_train=n_train, n_test=n_test, image_size=image_size,
            color_mode=color_mode, folds=folds, val_fold=val_fold, epochs=epochs, batch_size=batch_size,
            models=models, train_folds=train_folds, loss=loss, tta=tta, threshold_mode=threshold_mode,
            threshold=threshold, shrink_strength=shrink_strength, ensemble_method=ensemble_method, gpus=gpus,
            accelerator_type=accelerator_type,
            seed=seed, num_nodes=num_nodes, weights=weights, multi_node=multi_node, cpu_image=image(),
            cuda_image=cuda_image(),
        )
        _with_requests(checked, LIGHT).set_caching_options(True).set_display_name("check parameters")
        store = checked.outputs["store_uri"]  # {namespace} resolved

        # What the store holds now (never cached): its hashes are inputs of download, split and pack, so the
        # backend's cache key (input values: backend/src/v2/cacheutils/cache.go GenerateCacheKey) changes when
        # the dataset or its shards are deleted or changed, and those tasks run again instead of being reused.
        state = dataset_state(source=data_source, store_uri=store, n_train=n_train, n_test=n_test,
                              image_size=image_size, seed=seed, s3_endpoint=s3_endpoint)
        _with_s3(_with_requests(state, LIGHT)).set_caching_options(False).set_display_name("dataset in store")

        # A committed s3:// dataset is imported (dsl.importer: a Dataset node in the lineage graph), not copied.
        # The importer's URI is a pipeline parameter, which the backend resolves from the enclosing DAG's inputs
        # (2.16.0 backend/src/v2/component/importer_launcher.go: GetRuntimeParameter -> GetComponentInputParameter).
        with dsl.If(state.outputs["existing"] == True, name="existing dataset"):  # noqa: E712 - a pipeline condition
            imported = dsl.importer(artifact_uri=data_source, artifact_class=Dataset, reimport=False,
                                    metadata={"source": "data_source run parameter"})
            imported.set_display_name("import dataset")
            used = use_dataset(dataset=imported.output, expected_manifest=state.outputs["manifest_sha256"],
                               s3_endpoint=s3_endpoint)
            _with_s3(_with_requests(used, LIGHT)).set_caching_options(True).set_display_name("check dataset")
        with dsl.Else(name="download dataset"):
            data = download(
                source=data_source, store_uri=store, n_train=n_train, n_test=n_test, image_size=image_size,
                seed=seed, s3_endpoint=s3_endpoint, expected_manifest=state.outputs["manifest_sha256"],
            )
            _with_s3(_with_requests(data, DOWNLOAD)).set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2)
            data.set_caching_options(True).set_display_name("fetch and commit")
        _name_branches("dataset source")
        data_uri = dsl.OneOf(used.outputs["data_uri"], data.outputs["data_uri"])
        data_manifest = dsl.OneOf(used.outputs["manifest_sha256"], data.outputs["manifest_sha256"])

        with dsl.If(plot_samples == True, name="plot samples"):  # noqa: E712 - a pipeline condition, not Python
            samples = montage(data_uri=data_uri, seed=seed, s3_endpoint=s3_endpoint)
            _with_s3(_with_requests(samples, LIGHT)).set_caching_options(True).set_display_name("sample montage")

        folds_task = split(data_uri=data_uri, folds=folds, seed=seed, s3_endpoint=s3_endpoint,
                           data_manifest=data_manifest)
        _with_s3(_with_requests(folds_task, LIGHT)).set_caching_options(True).set_display_name("stratified folds")

        shards = pack(data_uri=data_uri, image_size=image_size, s3_endpoint=s3_endpoint, data_manifest=data_manifest,
                      expected_shards=state.outputs["shards_sha256"])
        _with_s3(_with_requests(shards, DOWNLOAD)).set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2)
        shards.set_caching_options(True).set_display_name("pack shards")

        # Live curves: the Tensorboard reads <store>/tensorboard/<run id>, which the training tasks write during training.
        # The run id placeholder is passed as a whole value, the only form the driver substitutes (2.16.0
        # backend/src/v2/driver/resolve.go).
        board = tensorboard_for_run(store_uri=store, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, enabled=tensorboard)
        _with_requests(board, LIGHT).set_caching_options(False).set_display_name("TensorBoard for the run")

        common = dict(
            data_uri=data_uri, shards_uri=shards.outputs["shards_uri"], split_csv=folds_task.outputs["split_csv"],
            image_size=image_size, color_mode=color_mode, epochs=epochs, batch_size=batch_size, loss=loss,
            threshold_mode=threshold_mode, threshold=threshold, shrink_strength=shrink_strength, tta=tta, seed=seed,
            s3_endpoint=s3_endpoint, weights=weights, tensorboard_uri=board.outputs["logs_uri"],
        )
        # Optional Katib tuning: its best lr per model and threshold policy, or the run parameters unchanged
        # (katib_defaults). Parameter dsl.OneOf resolves on the backend since before 2.16 (2.16.0
        # backend/src/v2/driver/resolve.go GetProducerTask, ValueFromOneof: the first successful branch).
        with dsl.If(tune == True, name="tune with Katib"):  # noqa: E712 - a pipeline condition, not Python
            tuned = katib_tune(store_uri=store, models=models, val_fold=val_fold, gpus=gpus,
                               accelerator_type=accelerator_type, trial_image=checked.outputs["train_image"],
                               node_selector=node_selector, tolerations=tolerations,
                               **{k: v for k, v in common.items() if k in katib_tune.component_spec.inputs})
            _with_s3(_with_requests(tuned, LIGHT)).set_caching_options(False).set_display_name("Katib: tune lr and thresholds")
        with dsl.Else(name="no tuning"):
            fixed = katib_defaults(models=models, threshold=threshold, threshold_mode=threshold_mode,
                                   shrink_strength=shrink_strength)
            _with_requests(fixed, LIGHT).set_caching_options(True).set_display_name("fixed hyperparameters")
        _name_branches("tune or fixed hyperparameters")
        hp = {k: dsl.OneOf(tuned.outputs[k], fixed.outputs[k])
              for k in ("models", "threshold", "threshold_mode", "shrink_strength")}
        common.update(threshold_mode=hp["threshold_mode"], threshold=hp["threshold"],
                      shrink_strength=hp["shrink_strength"])

        # One training task per (model, fold) of check-params' plan. The loop's items come from a task output,
        # which the loop DAG receives as its own input (R7: the driver resolves the iterator from the DAG's
        # inputs, backend/src/v2/driver/dag.go); dsl.Collected fans the results in (resolve.go CollectInputs,
        # in every backend from 2.5.0 on: kubeflow/pipelines#11725).
        with dsl.ParallelFor(checked.outputs["train_plan"], name="models-x-folds") as item:
            if multi_node:
                trained = train_distributed(
                    arch=item.arch, fold=item.fold, models=hp["models"], store_uri=store, num_nodes=num_nodes,
                    gpus_per_node=gpus, accelerator_type=accelerator_type, image=checked.outputs["train_image"],
                    node_selector=node_selector, tolerations=tolerations,
                    **{k: v for k, v in common.items() if k in train_distributed.component_spec.inputs})
                # this task only launches and waits; the TrainJob's pods get the GPUs
                _with_s3(_with_requests(trained, LIGHT)).set_caching_options(True)
                trained.set_display_name("train-distributed (model x fold)")
            else:
                trained = train(arch=item.arch, fold=item.fold, models=hp["models"], **common)
                _as_training(trained, checked, accelerator_type, node_selector, tolerations)
                trained.set_display_name("train (model x fold)")

        compare = compare_plots(runs=dsl.Collected(trained.outputs["run"]))
        _with_requests(compare, LIGHT).set_caching_options(True).set_display_name("compare models")

        combined = ensemble(
            val_predictions=dsl.Collected(trained.outputs["val_predictions"]),
            test_predictions=dsl.Collected(trained.outputs["test_predictions"]),
            method=ensemble_method, threshold_mode=hp["threshold_mode"], threshold=hp["threshold"],
            shrink_strength=hp["shrink_strength"],
            prior_labels=folds_task.outputs["split_csv"],  # the training folds' label frequencies, for prior
        )
        _with_requests(combined, LIGHT).set_caching_options(True).set_display_name("ensemble and thresholds")

        submission = submit(
            data_uri=data_uri, predictions=combined.outputs["ensemble_test"], thresholds=combined.outputs["thresholds"],
            kaggle_submit=kaggle_submit, s3_endpoint=s3_endpoint,
        )
        _with_s3(_with_requests(submission, LIGHT)).set_caching_options(False)  # an upload is a side effect
        submission.set_display_name("submission")
        kubernetes.use_secret_as_env(submission, secret_name=KAGGLE_SECRET_NAME, secret_key_to_env=KAGGLE_SECRET_KEYS,
                                     optional=True)  # only needed with kaggle_submit; absent secret = no upload

        Outputs = NamedTuple("Outputs", [("submission", Dataset), ("report", HTML), ("metrics", Metrics),
                                         ("test_metrics", Metrics)])
        return Outputs(submission=submission.outputs["submission"], report=compare.outputs["report"],
                       metrics=combined.outputs["metrics"], test_metrics=submission.outputs["metrics"])

    return hpa_pipeline


hpa_pipeline = make_pipeline(multi_node=False)
hpa_pipeline_multinode = make_pipeline(multi_node=True)


def pipeline_for(arguments: dict):
    """The compiled pipeline that runs `arguments`: multi-node when num_nodes > 1."""
    return hpa_pipeline_multinode if arguments.get("num_nodes", DEFAULTS.num_nodes) > 1 else hpa_pipeline


# ---------------------------------------------------------------------------------------------- compile
def compile_all(out_dir: Path | None = None) -> list[Path]:
    """Compile the pipeline and every component (YAML + README) into `out_dir` (same layout) or in place.

    A component is the object named like its folder in components/<stage>/component.py, the same one
    that `python components/<stage>/component.py` compiles, so both give byte-identical YAML.
    """
    from cluster import submit as cluster_submit

    out_dir = Path(out_dir) if out_dir else ROOT
    written = []
    for func, path, defaults in ((hpa_pipeline, COMPILED, None),
                                 (hpa_pipeline_multinode, COMPILED_MULTINODE, MULTINODE_DEFAULTS)):
        target = out_dir / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        cluster_submit.compile_pipeline(func, target, pipeline_parameters=defaults)  # the same bytes every time
        written.append(target)
    for script in sorted(COMPONENTS.glob("*/component.py")):
        stage = script.parent.name
        module = importlib.import_module(f"components.{stage}.component")
        dest = out_dir / script.parent.relative_to(ROOT) / "component.yaml"
        dest.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(getattr(module, stage), str(dest))
        written.append(dest)
        if hasattr(module, "CLI_EXAMPLE"):  # opt-in: a component without examples keeps its own README
            readme = dest.with_name("README.md")
            readme.write_text(component_readme(stage, module))
            written.append(readme)
    return written


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def component_readme(stage: str, module) -> str:
    """components/<stage>/README.md from the component itself: docstrings, typed inputs and outputs."""
    import docstring_parser

    component = getattr(module, stage)
    spec = component.component_spec
    parsed = docstring_parser.parse(component.python_func.__doc__)
    described = {p.arg_name: " ".join(p.description.split()) for p in parsed.params}
    for r in parsed.many_returns:  # Returns: (output parameters); Google style puts the name in type_name
        name = r.return_name or r.type_name
        if name and name not in described:
            described[name] = " ".join((r.description or "").split())
    kind = {"String": "str", "Integer": "int", "Float": "float", "Boolean": "bool", "Dict": "dict", "List": "list"}

    def type_name(t: str) -> str:
        return kind.get(t, t.split("@")[0].replace("system.", ""))

    lines = [f"# `{spec.name}`", "", _sentence(module.__doc__.split("\n\n")[0].split(": ", 1)[-1]), "",
             " ".join(module.__doc__.split("\n\n")[1].split()), "", "## Inputs", "",
             "| name | type | default | description |", "|---|---|---|---|"]
    for name, inp in spec.inputs.items():
        default = "required" if not inp.optional else f"`{inp.default!r}`"
        lines.append(f"| `{name}` | {type_name(inp.type)} | {default} | {described.get(name, '')} |")
    lines += ["", "## Outputs", "", "| name | type | description |", "|---|---|---|"]
    for name, out in (spec.outputs or {}).items():
        lines.append(f"| `{name}` | {type_name(out.type)} | {described.get(name, '')} |")
    lines += ["", "## Example", "", "The same stage without Kubeflow:", "", "```bash", module.CLI_EXAMPLE.strip(), "```",
              "", "In a pipeline (see `pipeline.py` for the wiring, resources and secrets):", "", "```python",
              f"from components.{stage}.component import {stage}", "", module.PIPELINE_EXAMPLE.strip(), "```", "",
              f"`python components/{stage}/component.py` rewrites `component.yaml` (image: `HPA_IMAGE`, default "
              "`hpa.config.DEFAULT_IMAGE`); `python pipeline.py compile` rewrites it together with this README.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- graph
GPU_NOTE = "gpus x accelerator_type"


def condition_text(condition: str) -> str:
    """A compiled trigger condition in run-parameter terms: "!(int(...['pipelinechannel--num_nodes']) > 1)"
    -> "not num_nodes > 1"."""
    def name(match: re.Match) -> str:  # a run parameter, or a task's output (<task>-<output>: "dataset-state.existing")
        task, _, output = match.group(1).rpartition("-")
        return f"{task}.{output}" if task else output

    text = re.sub(r"(?:int\()?inputs\.parameter_values\['pipelinechannel--([\w-]+)'\]\)?", name, condition)
    text = text.replace(" == true", "")
    return re.sub(r"^!\((.*)\)$", r"not \1", text)


def pipeline_graph(compiled: Path = COMPILED) -> tuple[dict, dict]:
    """(task -> upstream tasks, task -> notes) from a compiled pipeline. Condition groups (dsl.If/Else,
    nested) and ParallelFor loops are expanded to the tasks inside them; a task's notes are its condition
    ("if ..."), its loop ("for each of models x folds") and whether it requests the accelerator."""
    spec = next(yaml.safe_load_all(Path(compiled).read_text()))
    deps, notes = {}, {}

    def leaves(name: str, task: dict) -> list[str]:
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" not in component:
            return [name]
        return [leaf for n, t in component["dag"]["tasks"].items() for leaf in leaves(n, t)]

    def walk(tasks: dict, outer: list[str], condition: str | None, loop: str | None) -> None:
        for name, task in tasks.items():
            upstream = outer + [leaf for u in task.get("dependentTasks", []) for leaf in leaves(u, tasks[u])]
            trigger = task.get("triggerPolicy", {}).get("condition")
            where = condition_text(trigger) if trigger else condition
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                each = task["taskInfo"]["name"].replace("-x-", " x ") if "parameterIterator" in task else loop
                walk(component["dag"]["tasks"], upstream, where, each)
                continue
            deps[name] = upstream
            executor = spec["deploymentSpec"]["executors"][task["componentRef"]["name"].replace("comp-", "exec-", 1)]
            task_notes = ([f"if {where}"] if where else []) + ([f"for each of {loop}"] if loop else [])
            if "accelerator" in executor.get("container", {}).get("resources", {}):  # an importer has no container
                task_notes.append(GPU_NOTE)
            if task_notes:
                notes[name] = task_notes

    walk(spec["root"]["dag"]["tasks"], [], None, None)
    return deps, notes


def is_conditional(task_notes: list[str]) -> bool:
    return any(note.startswith("if ") for note in task_notes)


def mermaid(compiled: Path = COMPILED) -> str:
    deps, notes = pipeline_graph(compiled)
    lines = ["flowchart LR"]
    for name in deps:
        label = name + "".join(f"<br/><i>{note}</i>" for note in notes.get(name, []))
        lines.append(f'    {name.replace("-", "_")}["{label}"]')
    for name, upstream in transitive_reduction(deps).items():
        arrow = "-.->" if is_conditional(notes.get(name, [])) else "-->"
        lines += [f'    {u.replace("-", "_")} {arrow} {name.replace("-", "_")}' for u in upstream]
    return "\n".join(lines)


def transitive_reduction(deps: dict) -> dict:
    """Drop an edge u -> v when v is reached from u through another task (the picture shows order)."""
    def reaches(src: str, dst: str, skip_direct: bool) -> bool:
        todo = [v for v, ups in deps.items() if src in ups and not (skip_direct and v == dst)]
        seen = set()
        while todo:
            v = todo.pop()
            if v == dst:
                return True
            if v not in seen:
                seen.add(v)
                todo += [w for w, ups in deps.items() if v in ups]
        return False

    return {v: [u for u in ups if not reaches(u, v, skip_direct=True)] for v, ups in deps.items()}


def render_graph(png: Path, compiled: Path = COMPILED) -> Path:
    """Draw the compiled DAG left to right, one column per dependency depth (matplotlib, no graphviz)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deps, notes = pipeline_graph(compiled)
    depth = {}
    while len(depth) < len(deps):
        for name, upstream in deps.items():
            if name not in depth and all(u in depth for u in upstream):
                depth[name] = 1 + max((depth[u] for u in upstream), default=-1)
    columns = {}
    for name in sorted(deps, key=lambda n: (not is_conditional(notes.get(n, [])), n)):  # conditional on top
        columns.setdefault(depth[name], []).append(name)
    pos = {n: (d * 2.4, (len(col) - 1) / 2 - i * 1.2) for d, col in columns.items() for i, n in enumerate(col)}
    fig, ax = plt.subplots(figsize=(2.1 * len(columns) + 0.4, 1.2 * max(map(len, columns.values())) + 1.4))
    boxes = {}
    for name, (x, y) in pos.items():
        task_notes = notes.get(name, [])
        color = "#d5e8f7" if GPU_NOTE in task_notes else "#fde7c8" if is_conditional(task_notes) else "#e6f2e1"
        boxes[name] = ax.text(x, y, "\n".join([name, *task_notes]), ha="center", va="center", fontsize=10,
                              bbox=dict(boxstyle="round,pad=0.5", fc=color, ec="#333", lw=1.0,
                                        linestyle="--" if is_conditional(task_notes) else "-"))
    fig.canvas.draw()  # box patches get their size at draw time; arrows are clipped to them
    for name, upstream in transitive_reduction(deps).items():
        for u in upstream:
            ax.annotate("", xy=pos[name], xytext=pos[u], arrowprops=dict(
                arrowstyle="-|>", color="#444", lw=1.3, shrinkA=3, shrinkB=3,
                linestyle="--" if is_conditional(notes.get(name, [])) else "-",
                patchA=boxes[u].get_bbox_patch(), patchB=boxes[name].get_bbox_patch()))
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    ax.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.axis("off")
    ax.set_title(f"{PIPELINE_NAME}: blue = GPU task (run parameters gpus, accelerator_type), "
                 "dashed = runs only when its condition holds", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------- params
def parameter_names() -> list[str]:
    return [f.name for f in dataclasses.fields(PipelineConfig) if f.name not in NOT_PARAMS] + list(EXTRA_PARAMS)


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings -> typed run parameters (types from PipelineConfig / EXTRA_PARAMS)."""
    types = {f.name: type(getattr(DEFAULTS, f.name)) for f in dataclasses.fields(PipelineConfig)}
    types.update({k: type(v) for k, v in EXTRA_PARAMS.items()})
    allowed = set(parameter_names())
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in allowed:
            raise ConfigError(f"override {item!r}: expected key=value with key one of {', '.join(sorted(allowed))}")
        kind = types[key]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            elif kind in (dict, list):
                value = json.loads(text)
                if not isinstance(value, kind):
                    raise ValueError
            else:
                value = kind(text)
        except ValueError:
            raise ConfigError(f"override {item!r}: {key} expects a {kind.__name__}") from None
        out[key] = value
    return out


def check_arguments(overrides: dict) -> dict:
    """Validate overrides on top of the defaults (the same check as the pipeline's first task)."""
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    PipelineConfig(**{**dataclasses.asdict(DEFAULTS), **{k: v for k, v in overrides.items() if k in names}}).validate()
    return overrides


# ---------------------------------------------------------------------------------------------- run --local
@contextlib.contextmanager
def print_restored():
    """builtins.print as it was before, whatever kfp.local left behind.

    kfp.local 2.17 runs the ready tasks of a DAG in a ThreadPoolExecutor (kfp/local/orchestrator/
    enhanced_dag_orchestrator.py) and indents each task's output by swapping builtins.print
    (logging_utils.indented_print, used by task_dispatcher.py). Two overlapping tasks that finish in the
    order they started leave the second one's saved value, an indenting print, installed for the rest of
    the process: every later print starts with four spaces."""
    saved = builtins.print
    try:
        yield
    finally:
        builtins.print = saved


LOCAL_PARALLEL_TASKS = 2  # kfp.local's ParallelFor concurrency (see run_local)


def run_local(overrides: dict, out_dir: Path, store_dir: Path | None = None) -> dict:
    """Run the whole pipeline with kfp.local; returns {"submission", "report", "metrics", "elapsed_s", ...}.

    SIGTERM, SIGINT or SIGHUP stops every process the run started (the tasks with their children, then the
    embedded S3 server), by pid, removes the run's temporary files and keys, and raises
    hpa.s3server.Interrupted (`stopped`: how many processes)."""
    import subprocess
    import tempfile

    import kfp.local
    from kfp.local import subprocess_task_handler

    from hpa.s3server import Interrupted, LocalS3Server, RunProcesses, signals_interrupt

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    arguments = dict(overrides)  # the embedded default is PipelineConfig's small synthetic run
    server = None
    saved_env = dict(os.environ)
    start = time.monotonic()
    processes = RunProcesses()  # every process this run starts, found by pid (descendants, the tasks' sessions)
    run_local_subprocess = subprocess_task_handler.run_local_subprocess
    run_tmp = tempfile.mkdtemp(prefix="hpa-run-")

    def run_task(full_command: list[str], env_vars: dict | None = None) -> int:
        # kfp.local's own run_local_subprocess (kfp 2.17 subprocess_task_handler.py), except that the task gets a
        # session of its own (its children are found even after it died) and that none starts once the run is
        # stopping: kfp's ParallelFor executor would otherwise start the queued iterations while it unwinds.
        proc = processes.popen(full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env={**os.environ, **env_vars} if env_vars else None)
        if proc is None:
            return 1
        with proc:
            for line in iter(proc.stdout.readline, ""):
                print(line, end="")
            print("\n")
            return proc.wait()

    def weed() -> set[int]:
        return {server.proc.pid} if server is not None and server.proc is not None else set()

    def shut_down() -> int:
        """The tasks first (they may still write to the store), then the server, then anything left; how many
        processes were stopped. Safe to call twice; no signal cuts it short."""
        guard.shield()
        subprocess_task_handler.run_local_subprocess = run_local_subprocess
        stopped = processes.stop(spare=weed())
        if server is not None:
            stopped += int(server.running)
            server.close()
        stopped += processes.stop()
        shutil.rmtree(run_tmp, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved_env)
        return stopped

    # The signal handler stops the tasks at once: kfp.local's executor waits for its running tasks while the
    # exception unwinds it (measured: SIGINT left the main process waiting ~40 s for a training task).
    with signals_interrupt(lambda signum: processes.stop(spare=weed())) as guard:
        try:
            # The tasks' temporary files (kfp's `mktemp -d` per task, multiprocessing's) go to the run's own
            # directory, removed with it; kfp.local leaves one directory per task behind otherwise.
            os.environ["TMPDIR"] = run_tmp
            subprocess_task_handler.run_local_subprocess = run_task
            if store_dir is not None:
                arguments.setdefault("store_uri", str(Path(store_dir).resolve()))
                arguments.setdefault("s3_endpoint", "")
            else:
                server = LocalS3Server()
                server.start()
                # The tasks are subprocesses of this one: they inherit the keys from the environment,
                # exactly as pods get them from the secret; no key is ever a run parameter.
                os.environ.update(server.env())
                arguments.setdefault("store_uri", "s3://hpa-local/hpa-kfp")
                arguments.setdefault("s3_endpoint", server.endpoint)
            # No Tensorboard server here: the curves stay in each training task's run artifact under pipeline_root
            # (main prints the `tensorboard --logdir` command), not in the embedded store removed after the run.
            arguments.setdefault("tensorboard", False)
            check_arguments(arguments)
            # kfp.local runs up to 2 ParallelFor iterations at once (kfp 2.17 kfp/local/orchestrator/
            # enhanced_dag_orchestrator.py ParallelExecutor.conservative_max), so two training tasks share the
            # cores: give each half of them. Left to torch's default, each task's OpenMP pool takes every core and
            # the two spin against each other (measured: 8x slower per epoch on 2 cores).
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // LOCAL_PARALLEL_TASKS)))
            kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                           pipeline_root=str(out_dir / "pipeline_root"), raise_on_error=True)
            with backend_rules.strict_local() as strict, print_restored():  # resolve inputs as the driver does
                task = pipeline_for(arguments)(**arguments)
            result = {
                "submission": _keep(task.outputs["submission"].path, out_dir / "submission.csv"),
                "report": _keep(task.outputs["report"].path, out_dir / "report.html"),
                "plots": str(shutil.copytree(Path(task.outputs["report"].path).parent / "plots", out_dir / "plots",
                                             dirs_exist_ok=True)),
                "metrics": _keep_metrics({"ensemble_val": task.outputs["metrics"].metadata,
                                          "submission": task.outputs["test_metrics"].metadata},
                                         out_dir / "metrics.json"),
                "pipeline_root": str(out_dir / "pipeline_root"),
                # what the backend driver would put in each pod (image, limits, requests), resolved strictly
                "pods": {pod.task: {"image": pod.image, "limits": pod.limits, "requests": pod.requests}
                         for pod in strict.pods},
                "store_uri": arguments["store_uri"] + ("" if server is None else f" (embedded S3 at {server.endpoint}"
                                                                                 ", removed after the run)"),
            }
        except Interrupted as exc:
            exc.stopped += shut_down()
            raise
        finally:
            shut_down()
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    return result


def run_lines(result: dict, models) -> list[str]:
    """What `run --local` prints when it ends: where everything is, what it scored, how to see the curves."""
    return [f"submission:    {result['submission']}", f"report:        {result['report']}",
            f"plots:         {result['plots']}", f"metrics:       {result['metrics']}",
            *score_lines(json.loads(Path(result["metrics"]).read_text()), models),
            f"all artifacts: {result['pipeline_root']}",
            f"curves:        tensorboard --logdir {result['pipeline_root']}   (every training task's event files)",
            f"store:         {result['store_uri']}", f"elapsed:       {result['elapsed_s']:.1f} s"]


def score_lines(scores: dict, models) -> list[str]:
    """What a local run scored: the ensemble's out-of-sample val macro F1 (with the in-sample figure and each
    model's), and on a labelled test set the submission's test macro F1 beside the all-classes baseline and the
    best single model, and the predicted labels per image beside the true ones."""
    val, test = scores["ensemble_val"], scores["submission"]
    members = [m for m in models if f"{m}_val_macro_f1" in val]
    lines = [f"val macro F1:  {val['val_macro_f1']:.4f} ensemble, out-of-sample ({val['val_macro_f1_in_sample']:.4f} "
             f"in-sample); single models: " + ", ".join(f"{m} {val[m + '_val_macro_f1']:.4f}" for m in members)]
    if "test_macro_f1" in test:
        lines.append(f"test macro F1: {test['test_macro_f1']:.4f} submission; predicting all 28 classes: "
                     f"{test['test_macro_f1_all_classes']:.4f}; single models: "
                     + ", ".join(f"{m} {val[m + '_test_macro_f1']:.4f}" for m in members if m + "_test_macro_f1" in val))
        lines.append(f"labels/image:  {test['labels_per_image']:.2f} predicted, {test['true_labels_per_image']:.2f} "
                     "true (test)")
    else:
        lines.append(f"labels/image:  {test['labels_per_image']:.2f} predicted (test), "
                     f"{val['val_true_labels_per_image']:.2f} true on val")
    return lines


def _keep(src: str, dest: Path) -> str:
    shutil.copyfile(src, dest)
    return str(dest)


def _keep_metrics(metrics: dict, dest: Path) -> str:
    dest.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return str(dest)


# ---------------------------------------------------------------------------------------------- submit
def submit_run(host: str | None, overrides: dict, experiment: str | None = None, run_name: str | None = None,
               namespace: str | None = None, *, token_file: str | None = None, cookie_file: str | None = None,
               in_cluster: bool = False, pipeline_name: str | None = None, version_name: str | None = None,
               upload: bool = True, pipeline_func=None, pipeline_parameters: dict | None = None,
               min_backend: str | None = None):
    """Compile `pipeline_func` (default hpa_pipeline) here, with this machine's HPA_IMAGE / HPA_CUDA_IMAGE, and
    run it on a KFP API: authentication, upload as a versioned pipeline, run (cluster/submit.py). Returns a
    cluster.submit.SubmitResult; raises ConfigError before any request, cluster.submit.SubmitError after."""
    from cluster import submit as cluster_submit

    check_arguments(overrides)
    request = cluster_submit.make_request(
        host=host, namespace=namespace, token_file=token_file, cookie_file=cookie_file, in_cluster=in_cluster,
        experiment=experiment, run_name=run_name, pipeline_name=pipeline_name, version_name=version_name,
        upload=upload, min_backend=min_backend)
    return cluster_submit.submit(request, pipeline_func or hpa_pipeline, overrides, pipeline_parameters)


def main(argv: list[str] | None = None) -> int:
    from hpa.s3server import Interrupted

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run parameters: " + ", ".join(parameter_names()))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("compile", help="write compiled/hpa_pipeline.yaml and every components/*/component.yaml")
    graph = sub.add_parser("graph", help="draw the compiled DAG (docs/pipeline.png) and print it as mermaid")
    graph.add_argument("--png", type=Path, default=ROOT / "docs" / "pipeline.png")
    run = sub.add_parser("run", help="run the whole pipeline (kfp.local)")
    run.add_argument("--local", action="store_true", required=True, help="run here with kfp.local (required)")
    run.add_argument("--store", type=Path, help="use this directory as the store instead of an embedded S3 server")
    run.add_argument("--out", type=Path, help="where to put the run (default local_runs/<time>)")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    from cluster import submit as cluster_submit

    subm = sub.add_parser("submit", help="upload the pipeline (versioned) to a Kubeflow cluster and create a run",
                          description=cluster_submit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cluster_submit.add_arguments(subm)  # --host --namespace, --token-file/--cookie-file/--in-cluster, upload options
    subm.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        if args.command == "compile":
            for path in compile_all():
                print(path.relative_to(ROOT))
        elif args.command == "graph":
            print(render_graph(args.png).relative_to(ROOT) if args.png.resolve().is_relative_to(ROOT) else args.png)
            print(mermaid())
        elif args.command == "run":
            overrides = check_arguments(parse_overrides(args.overrides))
            out = args.out or ROOT / "local_runs" / time.strftime("%Y%m%d-%H%M%S")
            result = run_local(overrides, out, args.store)
            for line in run_lines(result, overrides.get("models", DEFAULTS.models)):
                print(line)
        else:
            overrides = check_arguments(parse_overrides(args.overrides))
            try:
                result = submit_run(args.host, overrides, args.experiment, args.run_name, args.namespace,
                                    token_file=args.token_file, cookie_file=args.cookie_file,
                                    in_cluster=args.in_cluster, pipeline_name=args.pipeline_name,
                                    version_name=args.version_name, upload=not args.no_upload,
                                    pipeline_func=pipeline_for(overrides),
                                    min_backend=MIN_KFP_BACKEND_OWN_ENDPOINT if "s3_endpoint" in overrides
                                    else MIN_KFP_BACKEND,
                                    pipeline_parameters=MULTINODE_DEFAULTS if pipeline_for(overrides) is
                                    hpa_pipeline_multinode else None)
            except cluster_submit.SubmitError as exc:  # the server refused or failed (ConfigError: exit 2 below)
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(cluster_submit.describe_result(result))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # run_local stopped its processes and removed its temporary files
        print(f"error: interrupted by {exc.name}; stopped {exc.stopped} processes", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
