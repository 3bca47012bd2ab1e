"""The HPA Kubeflow pipelines: wire the components in components/ (no ML code here).

    python pipeline.py compile          # compiled/hpa_pipeline{,_multinode}.yaml + every components/*/component.yaml
    python pipeline.py run --local [--store DIR] [--out DIR] [key=value ...]
    python pipeline.py submit [--host URL] [--namespace NS] [--token-file F | --cookie-file F | --in-cluster]
                              [--pipeline-name NAME] [--version-name V | --no-upload] [--experiment NAME]
                              [key=value ...]
    python tools/docs.py                # after compile: the components' READMEs and the pipeline graph in docs/

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
import inspect
import os
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Dataset, Metrics

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from components.check_params.component import check_params  # noqa: E402
from components.compare_plots.component import compare_plots  # noqa: E402
from components.dataset_state.component import dataset_state  # noqa: E402
from components.download.component import download  # noqa: E402
from components.katib_tune.component import katib_tune  # noqa: E402
from components.ensemble.component import ensemble  # noqa: E402
from components.montage.component import montage  # noqa: E402
from components.pack.component import pack  # noqa: E402
from components.split.component import split  # noqa: E402
from components.submit.component import submit  # noqa: E402
from components.train.component import train  # noqa: E402
from components.tensorboard.component import tensorboard as tensorboard_for_run  # noqa: E402
from components.train_distributed.component import train_distributed  # noqa: E402
from hpa.config import (  # noqa: E402
    KAGGLE_SECRET_KEYS, KAGGLE_SECRET_NAME, S3_SECRET_KEYS, S3_SECRET_NAME, ClusterParameters, PipelineConfig,
    cuda_image, image,
)
from hpa.options import default_of, help_of  # noqa: E402
from hpa.errors import ConfigError  # noqa: E402
from cluster import backend_rules  # noqa: E402
from cluster.backend_cache import CacheStore  # noqa: E402

PIPELINE_NAME = "hpa-pipeline"
MULTINODE_NAME = "hpa-pipeline-multinode"
COMPILED = ROOT / "compiled" / "hpa_pipeline.yaml"
COMPILED_MULTINODE = ROOT / "compiled" / "hpa_pipeline_multinode.yaml"
COMPONENTS = ROOT / "components"
DEFAULTS = PipelineConfig()
# The run parameters: every field of PipelineConfig and ClusterParameters (hpa/config.py), where each is declared
# once with its type, default and UI description; the pipeline's signature and docstring are built from them.
RUN_PARAMETER_CLASSES = (PipelineConfig, ClusterParameters)
# The multi-node pipeline's own defaults (compile-time `pipeline_parameters`).
MULTINODE_DEFAULTS = {"num_nodes": 2}
# run --local's own defaults: no Tensorboard server here; the curves stay in each training task's run artifact
# under pipeline_root (main prints the `tensorboard --logdir` command), not in the embedded store removed after.
# Nor checkpoints in the store: a local run neither retries nor is preempted (resume_from_store).
LOCAL_DEFAULTS = {"tensorboard": False, "resume_from_store": False}
# The oldest KFP backend both pipelines run on with the default s3_endpoint: seaweedfs.kubeflow:9000 exists
# from 2.16.0 (docs/cluster.md, Supported versions). With an s3_endpoint of the user's it is the oldest the
# compiled YAML itself runs on (cluster.backend_rules.min_backend_version: 2.15.0). `submit` refuses older.
MIN_KFP_BACKEND = "2.16.0"
MIN_KFP_BACKEND_OWN_ENDPOINT = "2.15.0"

# Requests per kind of task (compile-time constants; the GPU limit and the image are runtime values).
LIGHT = {"cpu": "1", "memory": "2Gi"}
DOWNLOAD = {"cpu": "2", "memory": "4Gi"}
TRAIN = {"cpu": "4", "memory": "16Gi"}
TRAIN_RETRIES = 3  # a training pod lost to preemption or eviction, retried from its last checkpoint in the store
SHM_SIZE = "8Gi"  # DataLoader workers share batches through /dev/shm (64 MiB by default in a pod).


def _with_requests(task: dsl.PipelineTask, requests: dict) -> dsl.PipelineTask:
    return task.set_cpu_request(requests["cpu"]).set_memory_request(requests["memory"])


def _with_s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """S3 keys from KFP's object store secret (keys accesskey/secretkey) as HPA_S3_ACCESS_KEY/SECRET_KEY."""
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET_NAME, secret_key_to_env=S3_SECRET_KEYS)


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
    # A preempted or evicted pod is retried and resumes from the checkpoint the task keeps in the store
    # (hpa.train_task: <store_uri>/checkpoints/<training key>/); Argo's retryStrategy, kfp PipelineTask.set_retry.
    task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2)
    return _with_s3(task).set_caching_options(True)


def run_parameters() -> list[inspect.Parameter]:
    """The pipeline's run parameters as function parameters: name, type and default from their declaration."""
    out = []
    for cls in RUN_PARAMETER_CLASSES:
        hints = typing.get_type_hints(cls)
        out += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default_of(cls, f.name),
                                  annotation=hints[f.name]) for f in dataclasses.fields(cls)]
    return out


# Run parameters one pipeline does not take: the single-pod pipeline trains on one pod, so its run form shows no
# num_nodes (pipeline_for picks the multi-node pipeline for num_nodes > 1).
NOT_IN_SINGLE_POD = ("num_nodes",)


def _with_run_parameters(body, summary: str, exclude: tuple[str, ...] = ()):
    """A pipeline function for `body(p)` whose signature is the run parameters (less `exclude`) and whose
    docstring's Args are their descriptions (kfp reads both: kfp/dsl/component_factory.py
    extract_component_interface takes inspect.signature and the docstring's Args; kfp/dsl/graph_component.py calls
    the function with one channel per signature parameter, in order)."""
    params = [param for param in run_parameters() if param.name not in exclude]
    names = [param.name for param in params]

    def hpa_pipeline(*channels):
        return body(types.SimpleNamespace(**dict(zip(names, channels))))

    described = {f.name: help_of(cls, f.name) for cls in RUN_PARAMETER_CLASSES for f in dataclasses.fields(cls)}
    hpa_pipeline.__signature__ = inspect.Signature(params, return_annotation=PIPELINE_OUTPUTS)
    hpa_pipeline.__doc__ = "\n".join([summary, "", "Args:"] + [f"    {n}: {described[n]}" for n in names])
    return hpa_pipeline


def _inputs_of(component, p) -> dict:
    """The run parameters `component` takes, by name: {input: p.<input>}."""
    return {name: getattr(p, name) for name in component.component_spec.inputs if hasattr(p, name)}


PIPELINE_OUTPUTS = NamedTuple("Outputs", [("submission", Dataset), ("report", HTML), ("metrics", Metrics),
                                          ("test_metrics", Metrics)])


def make_pipeline(multi_node: bool):
    """The pipeline, single-pod or multi-node.

    Two compiled pipelines instead of one with a `num_nodes > 1` branch: joining the branches' model
    artifacts needs an artifact dsl.OneOf, which the KFP backend resolves only from 2.17.0
    (kubeflow/pipelines#13436; 2.16.0 backend/src/v2/driver/resolve.go GetProducerTask takes the last
    selector whichever branch ran), while kubeflow/manifests ships 2.16. Each variant runs on 2.16 and 2.17.
    """

    def body(p):
        """The graph; p.<name> is the channel of run parameter <name> (hpa.config PipelineConfig and
        ClusterParameters)."""
        checked = check_params(**_inputs_of(check_params, p), multi_node=multi_node, cpu_image=image(),
                               cuda_image=cuda_image())
        _with_s3(_with_requests(checked, LIGHT)).set_caching_options(True).set_display_name("check parameters")
        store = checked.outputs["store_uri"]  # {namespace} resolved

        # What the store holds now (never cached): its hashes are inputs of download, split and pack, so the
        # backend's cache key (input values: backend/src/v2/cacheutils/cache.go GenerateCacheKey) changes when
        # the dataset or its shards are deleted or changed, and those tasks run again instead of being reused.
        state = dataset_state(source=p.data_source, merge_with=p.merge_with, store_uri=store, n_train=p.n_train,
                              n_test=p.n_test, image_size=p.image_size, seed=p.seed, s3_endpoint=p.s3_endpoint)
        _with_s3(_with_requests(state, LIGHT)).set_caching_options(False).set_display_name("dataset in store")

        # One download task, in every run, whatever the source: a committed s3:// dataset is checked and handed on by
        # its URI (a string), anything else is fetched and committed. No condition branch and no dsl.OneOf here: a
        # branch whose only task is a cache hit is never COMPLETE on the backend (a cache hit is published CACHED by
        # the driver, 2.16.0/2.17.0 backend/src/v2/driver/container.go Container(), and Argo skips its launcher,
        # argocompiler/container.go; only the launcher updates the parent DAG, component/launcher_v2.go
        # UpdateDAGExecutionsState), so a OneOf over it fails in resolve.go GetProducerTask on the second identical
        # run. And no input artifact for the dataset: the launcher downloads every input artifact before the task
        # runs (launcher_v2.go downloadArtifacts), an s3:// URI outside the pipeline root through
        # fetchNonDefaultBuckets with AWS default credentials, and the whole dataset at that.
        data = download(
            source=p.data_source, merge_with=p.merge_with, store_uri=store, n_train=p.n_train, n_test=p.n_test,
            image_size=p.image_size, seed=p.seed, s3_endpoint=p.s3_endpoint,
            expected_manifest=state.outputs["manifest_sha256"],
        )
        _with_s3(_with_requests(data, DOWNLOAD)).set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2)
        data.set_caching_options(True).set_display_name("dataset: fetch and commit, or check a committed one")
        data_uri, data_manifest = data.outputs["data_uri"], data.outputs["manifest_sha256"]

        with dsl.If(p.plot_samples == True, name="plot samples"):  # noqa: E712 - a pipeline condition, not Python
            samples = montage(data_uri=data_uri, seed=p.seed, s3_endpoint=p.s3_endpoint)
            _with_s3(_with_requests(samples, LIGHT)).set_caching_options(True).set_display_name("sample montage")

        folds_task = split(data_uri=data_uri, folds=p.folds, seed=p.seed, s3_endpoint=p.s3_endpoint,
                           data_manifest=data_manifest)
        _with_s3(_with_requests(folds_task, LIGHT)).set_caching_options(True).set_display_name("stratified folds")

        shards = pack(data_uri=data_uri, image_size=p.image_size, s3_endpoint=p.s3_endpoint,
                      data_manifest=data_manifest,
                      expected_shards=state.outputs["shards_sha256"])
        _with_s3(_with_requests(shards, DOWNLOAD)).set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2)
        shards.set_caching_options(True).set_display_name("pack shards")

        # Live curves: the run's Tensorboard reads <store>/tensorboard, where every training writes its event files
        # under a prefix of its own while it trains (hpa.tensorboard). The prefix is the same in every run, so it keeps
        # the training tasks' cache keys (issue 22 item 8); the task makes cluster objects and is never cached.
        board = tensorboard_for_run(store_uri=store, enabled=p.tensorboard, s3_endpoint=p.s3_endpoint)
        _with_requests(board, LIGHT).set_caching_options(False).set_display_name("TensorBoard for the run")

        common = dict(
            data_uri=data_uri, shards_uri=shards.outputs["shards_uri"], split_csv=folds_task.outputs["split_csv"],
            image_size=p.image_size, color_mode=p.color_mode, epochs=p.epochs, batch_size=p.batch_size, loss=p.loss,
            threshold_mode=p.threshold_mode, threshold=p.threshold, shrink_strength=p.shrink_strength, tta=p.tta,
            seed=p.seed,
            s3_endpoint=p.s3_endpoint, tensorboard_uri=board.outputs["logs_uri"],
            train_options=checked.outputs["train_options"],  # the run parameters declared train_option=True
        )
        # Katib tuning when `tune`, else the run parameters unchanged: one task in every run, not an If/Else joined by
        # dsl.OneOf (the cache-hit branch above: the no-tuning branch's only task would be a cache hit on the second
        # identical run, and GetProducerTask would find "no successful task" in it).
        tuned = katib_tune(tune=p.tune, store_uri=store, models=p.models, val_fold=p.val_fold, gpus=p.gpus,
                           accelerator_type=p.accelerator_type, trial_image=checked.outputs["train_image"],
                           node_selector=p.node_selector, tolerations=p.tolerations, weights=p.weights,
                           threshold=p.threshold, threshold_mode=p.threshold_mode, shrink_strength=p.shrink_strength,
                           **{k: v for k, v in common.items() if k in katib_tune.component_spec.inputs
                              and k not in ("threshold", "threshold_mode", "shrink_strength")})
        _with_s3(_with_requests(tuned, LIGHT)).set_caching_options(True)
        tuned.set_display_name("Katib: tune lr and thresholds (when tune)")
        hp = {k: tuned.outputs[k] for k in ("models", "threshold", "threshold_mode", "shrink_strength")}
        common.update(threshold_mode=hp["threshold_mode"], threshold=hp["threshold"],
                      shrink_strength=hp["shrink_strength"])

        # One training task per (model, fold) of check-params' plan. The loop's items come from a task output,
        # which the loop DAG receives as its own input (R7: the driver resolves the iterator from the DAG's
        # inputs, backend/src/v2/driver/dag.go); dsl.Collected fans the results in (resolve.go CollectInputs,
        # in every backend from 2.5.0 on: kubeflow/pipelines#11725).
        with dsl.ParallelFor(checked.outputs["train_plan"], name="models-x-folds") as item:
            if multi_node:
                trained = train_distributed(
                    arch=item.arch, fold=item.fold, weights=item.weights, models=hp["models"], store_uri=store,
                    num_nodes=p.num_nodes,
                    gpus_per_node=p.gpus, accelerator_type=p.accelerator_type, image=checked.outputs["train_image"],
                    node_selector=p.node_selector, tolerations=p.tolerations,
                    **{k: v for k, v in common.items() if k in train_distributed.component_spec.inputs})
                # this task only launches and waits; the TrainJob's pods get the GPUs
                _with_s3(_with_requests(trained, LIGHT)).set_caching_options(True)
                trained.set_display_name("train-distributed (model x fold)")
            else:
                # every GPU of the pod trains (one process each) and the checkpoints live in the store, so a retried
                # (preempted, evicted) pod resumes where the last one stopped (issue 22 items 5 and 7)
                trained = train(arch=item.arch, fold=item.fold, weights=item.weights, models=hp["models"],
                                gpus=p.gpus, store_uri=checked.outputs["checkpoint_uri"], **common)
                _as_training(trained, checked, p.accelerator_type, p.node_selector, p.tolerations)
                trained.set_display_name("train (model x fold)")

        compare = compare_plots(runs=dsl.Collected(trained.outputs["run"]))
        _with_requests(compare, LIGHT).set_caching_options(True).set_display_name("compare models")

        combined = ensemble(
            val_predictions=dsl.Collected(trained.outputs["val_predictions"]),
            test_predictions=dsl.Collected(trained.outputs["test_predictions"]),
            method=p.ensemble_method, threshold_mode=hp["threshold_mode"], threshold=hp["threshold"],
            shrink_strength=hp["shrink_strength"],
            prior_labels=folds_task.outputs["split_csv"],  # the training folds' label frequencies, for prior
        )
        _with_requests(combined, LIGHT).set_caching_options(True).set_display_name("ensemble and thresholds")

        submission = submit(
            data_uri=data_uri, predictions=combined.outputs["ensemble_test"], thresholds=combined.outputs["thresholds"],
            kaggle_submit=p.kaggle_submit, s3_endpoint=p.s3_endpoint,
        )
        _with_s3(_with_requests(submission, LIGHT)).set_caching_options(False)  # an upload is a side effect
        submission.set_display_name("submission")
        kubernetes.use_secret_as_env(submission, secret_name=KAGGLE_SECRET_NAME, secret_key_to_env=KAGGLE_SECRET_KEYS,
                                     optional=True)  # only needed with kaggle_submit; absent secret = no upload

        return PIPELINE_OUTPUTS(submission=submission.outputs["submission"], report=compare.outputs["report"],
                       metrics=combined.outputs["metrics"], test_metrics=submission.outputs["metrics"])


    description = ("Human Protein Atlas multi-label classification: download, split, train every model of the models "
                   "run parameter on train_folds folds" + (" as multi-node DDP TrainJobs (Kubeflow Trainer)"
                                                           if multi_node else "") +
                   ", compare, ensemble the out-of-fold predictions with robust thresholds, Kaggle submission.")
    return dsl.pipeline(name=MULTINODE_NAME if multi_node else PIPELINE_NAME, description=description)(
        _with_run_parameters(body, "Human Protein Atlas multi-label pipeline.",
                             exclude=() if multi_node else NOT_IN_SINGLE_POD))


hpa_pipeline = make_pipeline(multi_node=False)
hpa_pipeline_multinode = make_pipeline(multi_node=True)


def pipeline_for(arguments: dict):
    """The compiled pipeline that runs `arguments`: multi-node when num_nodes > 1."""
    return hpa_pipeline_multinode if arguments.get("num_nodes", DEFAULTS.num_nodes) > 1 else hpa_pipeline


def arguments_for(pipeline_func, arguments: dict) -> dict:
    """`arguments` as run parameters of `pipeline_func`: the single-pod pipeline takes no num_nodes (it is 1
    there, pipeline_for's choice)."""
    return {k: v for k, v in arguments.items() if pipeline_func is hpa_pipeline_multinode or k not in NOT_IN_SINGLE_POD}


# ---------------------------------------------------------------------------------------------- compile
def compile_all(out_dir: Path | None = None) -> list[Path]:
    """Compile the pipeline and every component (component.yaml) into `out_dir` (same layout) or in place.

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
    return written


# ---------------------------------------------------------------------------------------------- params
def parameter_names() -> list[str]:
    return [param.name for param in run_parameters()]


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings -> typed run parameters (types from their declaration in hpa.config)."""
    kinds = {param.name: param.annotation for param in run_parameters()}
    allowed = set(kinds)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in allowed:
            raise ConfigError(f"override {item!r}: expected key=value with key one of {', '.join(sorted(allowed))}")
        kind = kinds[key]
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


@contextlib.contextmanager
def without_retries():
    """kfp.local without the tasks' retry policies, as docs/cluster.md says of run --local (retries are checked, not
    applied). kfp.local 2.17 applies set_retry itself (kfp/local/orchestrator/task_executor.py execute_single_task:
    "Retrying in {delay}s", sleeping backoff_duration * factor**attempt): a failed or interrupted training task would
    keep a local run waiting minutes, also after a signal stopped it. A pod's retry and its resume from the store are
    tested on the task itself (tests/test_train_resume_store.py)."""
    from kfp.local.orchestrator import task_executor

    retried = task_executor.execute_single_task

    def execute_single_task(task_name, task_spec, *args, **kwargs):
        if task_spec.HasField("retry_policy"):
            task_spec = type(task_spec).FromString(task_spec.SerializeToString())
            task_spec.ClearField("retry_policy")
        return retried(task_name, task_spec, *args, **kwargs)

    task_executor.execute_single_task = execute_single_task
    try:
        yield
    finally:
        task_executor.execute_single_task = retried


# The cluster's pipeline root that run --local is modelled against (KFP's default: the launcher's default bucket,
# backend/src/v2/config/env.go): every task's input artifacts are "downloaded" as the launcher would, so a task that
# reads an artifact outside it fails here as it would on the cluster (cluster/backend_launcher.py).
CLUSTER_PIPELINE_ROOT = "minio://mlpipeline/v2/artifacts"


def run_local(overrides: dict, out_dir: Path, store_dir: Path | None = None, cache_dir: Path | None = None) -> dict:
    """Run the whole pipeline with kfp.local; returns {"submission", "report", "metrics", "elapsed_s", ...}.

    The store: `store_dir` (a plain directory), else the S3 endpoint of an `s3_endpoint` override (keys from the
    environment, HPA_S3_ACCESS_KEY / HPA_S3_SECRET_KEY, as the pods get them from the secret), else an embedded S3
    server removed after the run. `cache_dir`: KFP's cache across runs, as the backend keeps it
    (cluster/backend_cache.py: a cacheable task whose inputs are unchanged is a cache hit, not run again); a second
    run with the same `out_dir`, store and cache_dir is the cluster's second identical run.

    SIGTERM, SIGINT or SIGHUP stops every process the run started (the tasks with their children, then the
    embedded S3 server), by pid, removes the run's temporary files and keys, and raises
    hpa.processes.Interrupted (`stopped`: how many processes)."""
    import subprocess
    import tempfile

    import kfp.local
    from kfp.local import subprocess_task_handler

    from hpa.processes import Interrupted, RunProcesses, signals_interrupt
    from hpa.s3server import LocalS3Server

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
            elif arguments.get("s3_endpoint"):  # the user's own S3 server: store_uri must name a bucket on it
                if not str(arguments.get("store_uri", "")).startswith("s3://"):
                    raise ConfigError("run --local with s3_endpoint: expected store_uri=s3://bucket/prefix too")
            else:
                server = LocalS3Server()
                server.start()
                # The tasks are subprocesses of this one: they inherit the keys from the environment,
                # exactly as pods get them from the secret; no key is ever a run parameter.
                os.environ.update(server.env())
                arguments.setdefault("store_uri", "s3://hpa-local/hpa-kfp")
                arguments.setdefault("s3_endpoint", server.endpoint)
            arguments = {**LOCAL_DEFAULTS, **arguments}
            check_arguments(arguments)
            # kfp.local runs up to 2 ParallelFor iterations at once (kfp 2.17 kfp/local/orchestrator/
            # enhanced_dag_orchestrator.py ParallelExecutor.conservative_max), so two training tasks share the
            # cores: give each half of them. Left to torch's default, each task's OpenMP pool takes every core and
            # the two spin against each other (measured: 8x slower per epoch on 2 cores).
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // LOCAL_PARALLEL_TASKS)))
            kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                           pipeline_root=str(out_dir / "pipeline_root"), raise_on_error=True)
            cache = CacheStore(Path(cache_dir)) if cache_dir is not None else None
            # resolve inputs as the driver does, download artifacts as the launcher does, cache hits with a cache
            with backend_rules.strict_local(cache=cache, pipeline_root=CLUSTER_PIPELINE_ROOT) as strict, \
                    without_retries(), print_restored():
                chosen = pipeline_for(arguments)
                task = chosen(**arguments_for(chosen, arguments))
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
                "cache_hits": sorted(strict.cache_hits()),
                "downloaded_bytes": {record.task: strict.downloaded_bytes(record.task) for record in strict.tasks},
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
                     + ", ".join(f"{m} {val[m + '_test_macro_f1']:.4f}" for m in members
                                 if m + "_test_macro_f1" in val))
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
    pipeline_func = pipeline_func or hpa_pipeline
    return cluster_submit.submit(request, pipeline_func, arguments_for(pipeline_func, overrides), pipeline_parameters)


def main(argv: list[str] | None = None) -> int:
    from hpa.processes import Interrupted

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run parameters: " + ", ".join(parameter_names()))
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="write compiled/hpa_pipeline{,_multinode}.yaml and every "
                          "components/*/component.yaml (in place, or under --out)")
    comp.add_argument("--out", type=Path, help="write the same layout under this directory instead of the "
                      "repository (compile with your own HPA_IMAGE / HPA_CUDA_IMAGE without touching the committed "
                      "files)")
    run = sub.add_parser("run", help="run the whole pipeline (kfp.local)")
    run.add_argument("--local", action="store_true", required=True, help="run here with kfp.local (required)")
    run.add_argument("--store", type=Path, help="use this directory as the store instead of an embedded S3 server")
    run.add_argument("--out", type=Path, help="where to put the run (default local_runs/<time>)")
    run.add_argument("--cache", type=Path, help="keep KFP's cache here across runs, as the backend does (with the "
                     "same --store and --out, a second identical run reuses every unchanged task)")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    from cluster import submit as cluster_submit

    subm = sub.add_parser("submit", help="upload the pipeline (versioned) to a Kubeflow cluster and create a run",
                          description=cluster_submit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cluster_submit.add_arguments(subm)  # --host --namespace, --token-file/--cookie-file/--in-cluster, upload options
    subm.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        if args.command == "compile":
            for path in compile_all(args.out):
                print(path if args.out else path.relative_to(ROOT))
        elif args.command == "run":
            overrides = check_arguments(parse_overrides(args.overrides))
            out = args.out or ROOT / "local_runs" / time.strftime("%Y%m%d-%H%M%S")
            result = run_local(overrides, out, args.store, args.cache)
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
