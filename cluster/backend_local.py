"""Cache hits, DAG bookkeeping and launcher downloads inside strict kfp.local (hooked in by backend_rules).

`cluster.backend_rules.strict_local(cache=..., pipeline_root=..., backend=...)` opens a `Session` here and
installs the patches below on top of its own; the rules are those of `cluster.backend_cache` (cache key, DAG
states, dsl.OneOf) and `cluster.backend_launcher` (downloads), each citing its upstream file and tag.

- Every container task: with a cache, a task whose IR `cachingOptions.enableCache` is true and whose fingerprint
  has a record is not executed: the record's outputs are returned, the task is CACHED, and nothing updates its
  DAG. Otherwise the launcher model plans its downloads (and may fail as the launcher would), the task runs, its
  DAG is updated as `UpdateDAGExecutionsState` does, and a successful cacheable run is recorded.
- Every DAG kfp.local runs (root, condition branch, nested pipeline, loop iteration) has a `DagState`; a branch
  whose condition is false is CANCELED; importers are COMPLETE without updating their DAG.
- A dsl.OneOf DAG output is chosen by the branches' states; when none is CACHED or COMPLETE the value becomes a
  marker and the first task (or DAG, condition, loop) that resolves it raises `OneOfResolutionError`, naming that
  task and input, as the driver of the consuming task fails.

Without a cache and a pipeline_root, only the DAG bookkeeping and the OneOf rule apply (they hold on every run).
kfp.local's own cache (`kfp.local.init(enable_caching=True)`) must be off when a cache is given.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from typing import Any, Callable

from cluster.backend_cache import (
    CITE_CACHE_HIT,
    CacheStore,
    DagState,
    branch_notes,
    cache_key,
    check_backend,
    fingerprint,
    launcher_update,
    oneof_choice,
    record,
)
from cluster.backend_errors import CacheStoreError, OneOfResolutionError
from cluster.backend_launcher import Download, LauncherModel, local_size

_ITERATION = re.compile(r"^(.+)-iteration-(\d+)$")
_TIMESTAMP = re.compile(r"-\d{4}(?:-\d{2}){5}-\d+$")  # executor_input_utils.get_local_pipeline_resource_name


@dataclasses.dataclass
class TaskRecord:
    """One container or importer task of a strict run: state COMPLETE, CACHED, FAILED or IMPORTED."""

    task: str
    dag: str
    state: str
    fingerprint: str = ""
    downloads: list[Download] = dataclasses.field(default_factory=list)

    @property
    def downloaded_bytes(self) -> int:
        return sum(d.nbytes or 0 for d in self.downloads if d.how != "skipped")


@dataclasses.dataclass
class Session:
    cache: CacheStore | None
    launcher: LauncherModel | None
    backend: str
    tasks: list[TaskRecord] = dataclasses.field(default_factory=list)


class _Unresolved:
    """A dsl.OneOf value the driver cannot resolve; raised at the first task that reads it."""

    def __init__(self, error: OneOfResolutionError):
        self.error = error

    def __repr__(self) -> str:
        return "<unresolvable dsl.OneOf>"


_lock = threading.RLock()
_sessions: list[Session] = []
_tls = threading.local()  # .stack: DagStates this thread runs, innermost last; .pending: the next DAG's place
_by_store: dict[int, DagState] = {}  # id(IOStore) -> the DagState whose tasks read it (for loop worker threads)


def open_session(cache: Any = None, pipeline_root: str | None = None, backend: str = "2.16.0") -> Session:
    if cache is not None and not isinstance(cache, CacheStore):
        raise ValueError(f"cache: expected a cluster.backend_cache.CacheStore or None, got {type(cache).__name__}")
    launcher = LauncherModel(pipeline_root) if pipeline_root is not None else None
    session = Session(cache, launcher, check_backend(backend))
    with _lock:
        _sessions.append(session)
    return session


def close_session(session: Session) -> None:
    with _lock:
        _sessions.remove(session)
        if not _sessions:
            _by_store.clear()


def _option(name: str) -> Any:
    with _lock:
        return next((getattr(s, name) for s in reversed(_sessions) if getattr(s, name) is not None), None)


def _backend() -> str:
    with _lock:
        return _sessions[-1].backend if _sessions else "2.16.0"


def _stack() -> list:
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    return _tls.stack


def _current(io_store=None) -> DagState | None:
    stack = _stack()
    if stack:
        return stack[-1]
    return _by_store.get(id(io_store)) if io_store is not None else None


# -------------------------------------------------------------------------------------- hooks from backend_rules
def check_arguments(task_name: str, args: dict) -> None:
    """Raise the driver's OneOf error for the first input of `task_name` that holds an unresolvable OneOf."""
    for name, value in args.items():
        if isinstance(value, _Unresolved):
            err = value.error
            raise OneOfResolutionError(task_name, name, f"input {name!r} reads a dsl.OneOf output: "
                                       + str(err).split(": ", 1)[1].rsplit(" [backend-strict", 1)[0], err.citation)


def not_triggered(task_names) -> None:
    """Condition tasks whose condition is false: CANCELED executions of the current DAG (dag.go NotTriggered)."""
    for name in task_names:
        record(_current(), name, "CANCELED")


def loop_started(task_name: str, io_store, count: int) -> None:
    """A ParallelFor head DAG with its iteration_count (dag.go), child of the DAG running the loop task."""
    parent = _current(io_store)
    if parent is None:
        return
    _by_store[id(io_store)] = parent
    head = DagState(task_name, parent, total_tasks=1, iteration_count=count)
    record(parent, task_name, head)


def _pipeline_name(resource_name: str) -> str:
    return _TIMESTAMP.sub("", resource_name.split("/", 1)[0])


def _value_of(proto_value) -> Any:
    from google.protobuf import json_format

    return json_format.MessageToDict(proto_value)


def _artifacts_in(value) -> list:
    from kfp import dsl

    items = value if isinstance(value, list) else [value]
    return [a for a in items if isinstance(a, dsl.Artifact)]


def _key(task_spec, component, container, args: dict) -> dict:
    from kfp.pipeline_spec import pipeline_spec_pb2

    params = {n: v for n, v in args.items() if n in component.input_definitions.parameters}
    for name, spec in component.input_definitions.parameters.items():
        if name not in params and spec.HasField("default_value"):
            params[name] = _value_of(spec.default_value)  # resolveInputs fills the component's defaults
    ptype = pipeline_spec_pb2.ParameterType.ParameterTypeEnum.Name
    return cache_key(
        input_parameters=params,
        input_artifact_ids={n: [a.uri for a in _artifacts_in(v)] for n, v in args.items()
                            if n in component.input_definitions.artifacts},
        output_artifacts={n: {"type": s.artifact_type.schema_title, "metadata": {}}
                          for n, s in component.output_definitions.artifacts.items()},
        output_parameters={n: ptype(s.parameter_type) for n, s in component.output_definitions.parameters.items()},
        command=list(container.command) + list(container.args), image=container.image)


def _from_record(task_name: str, rec: dict) -> dict:
    from kfp.dsl import executor

    outputs = dict(rec["parameters"])
    for name, art in rec["artifacts"].items():
        if art.get("written", True) and "://" not in art["uri"] and not Path(art["uri"]).exists():
            raise CacheStoreError(f"task {task_name!r}: the cache record (written by task {rec['task']!r}) points at "
                                  f"{art['uri']}, which is gone; the backend would publish it anyway and the consumer "
                                  "would download nothing. Keep the earlier run's pipeline_root or clear the cache")
        outputs[name] = executor.create_artifact_instance(
            {"name": name, "uri": art["uri"], "metadata": art["metadata"], "type": {"schemaTitle": art["type"]}})
    return outputs


def _to_record(task_name: str, component, outputs: dict) -> dict:
    arts = component.output_definitions.artifacts
    return {"task": task_name,
            "parameters": {k: v for k, v in outputs.items() if k not in arts},
            # written: whether the task wrote a file (a Metrics artifact is metadata only, no file, in kfp.local)
            "artifacts": {k: {"uri": v.uri, "id": v.uri, "type": arts[k].artifact_type.schema_title,
                              "metadata": dict(v.metadata or {}), "written": "://" in v.uri or Path(v.uri).exists()}
                          for k, v in outputs.items() if k in arts}}


def execute(task_name: str, task_spec, component, executor, args: dict, pipeline_root: str,
            pipeline_resource_name: str, run: Callable[[], tuple]) -> tuple:
    """One container/importer task under strict mode: cache hit, or launcher downloads, run and DAG update."""
    from kfp.local import cache as local_cache
    from kfp.local import status

    dag = _current()
    where = dag.path() if dag is not None else "root"
    with _lock:
        sessions = list(_sessions)
    kind = executor.WhichOneof("spec") if executor is not None else None
    if kind != "container":
        outputs, st = run()
        record(dag, task_name, "COMPLETE" if st == status.Status.SUCCESS else "FAILED")  # no DAG update
        for s in sessions:
            s.tasks.append(TaskRecord(task_name, where, "IMPORTED" if st == status.Status.SUCCESS else "FAILED"))
        return outputs, st

    cache: CacheStore | None = _option("cache")
    launcher: LauncherModel | None = _option("launcher")
    backend = _backend()
    fp = ""
    pipeline = _pipeline_name(pipeline_resource_name)
    if cache is not None and task_spec.caching_options.enable_cache and cache.enabled:
        if local_cache.get_local_cache() is not None:
            raise CacheStoreError("strict_local(cache=...) models the KFP backend cache: turn kfp.local's own cache "
                                  "off (kfp.local.init(enable_caching=False))")
        fp = fingerprint(_key(task_spec, component, executor.container, args))
        rec = cache.lookup(pipeline, fp)
        if rec is not None:  # container.go: published CACHED, no launcher, no DAG update
            outputs = _from_record(task_name, rec)
            record(dag, task_name, "CACHED")
            for s in sessions:
                s.tasks.append(TaskRecord(task_name, where, "CACHED", fp))
            return outputs, status.Status.SUCCESS
    downloads: list[Download] = []
    if launcher is not None:
        launcher.add_local_root(pipeline_root)
        inputs = {n: [(a.uri, local_size(a.uri) if "://" not in a.uri else None, dict(a.metadata or {}))
                      for a in _artifacts_in(v)] for n, v in args.items()
                  if n in component.input_definitions.artifacts}
        run_dir = str(Path(pipeline_root) / pipeline_resource_name.split("/", 1)[0])  # kfp.local: root/<run>/...
        downloads = launcher.plan(task_name, inputs, run_prefix=launcher.cluster_uri(run_dir))
    outputs, st = run()
    ok = st == status.Status.SUCCESS
    record(dag, task_name, "COMPLETE" if ok else "FAILED")
    launcher_update(dag, backend)  # launcher_v2.go Execute: deferred, after success or failure
    if ok and fp:
        cache.put(pipeline, fp, _to_record(task_name, component, outputs))
    for s in sessions:
        s.tasks.append(TaskRecord(task_name, where, "COMPLETE" if ok else "FAILED", fp, downloads))
    return outputs, st


# -------------------------------------------------------------------------------------------------- patches
def _wrap_execute_task(original, components_of: Callable):
    def execute_task(**kwargs):
        task_name, io_store = kwargs["task_name"], kwargs["io_store"]
        parent = _current(io_store)
        if parent is not None:
            _by_store[id(io_store)] = parent
        component = components_of(kwargs)[kwargs["task_spec"].component_ref.name]
        if component.WhichOneof("implementation") == "dag":
            match = _ITERATION.match(task_name)
            if match and parent is not None and isinstance(parent.children.get(match.group(1)), DagState):
                _tls.pending = (task_name, parent.children[match.group(1)], int(match.group(2)))
            else:
                _tls.pending = (task_name, parent, None)
        try:
            return original(**kwargs)
        finally:
            _tls.pending = None  # consumed by run_enhanced_dag; never left for a later run

    return execute_task


def _wrap_run_enhanced_dag(original):
    def run_enhanced_dag(*args, **kwargs):
        spec = kwargs.get("dag_component_spec", args[1] if len(args) > 1 else None)
        pending = getattr(_tls, "pending", None)
        _tls.pending = None
        if pending is None or pending[1] is None:
            dag = DagState(pending[0] if pending else "root", None, total_tasks=len(spec.dag.tasks))
        else:
            name, parent, index = pending
            dag = DagState(name, parent, total_tasks=len(spec.dag.tasks), iteration_index=index)
            record(parent, name, dag)
        stack = _stack()
        stack.append(dag)
        try:
            return original(*args, **kwargs)
        finally:
            stack.pop()

    return run_enhanced_dag


def _wrap_get_dag_output_parameters(original):
    def get_dag_output_parameters(cls, dag_outputs_spec, io_store):
        from kfp.pipeline_spec import pipeline_spec_pb2

        plain = pipeline_spec_pb2.DagOutputsSpec()
        plain.CopyFrom(dag_outputs_spec)
        oneofs = {k: v for k, v in dag_outputs_spec.parameters.items() if v.WhichOneof("kind") == "value_from_oneof"}
        for key in oneofs:
            del plain.parameters[key]
        outputs = original(dag_outputs_spec=plain, io_store=io_store)
        dag = _current(io_store)
        for key, spec in oneofs.items():
            selectors = [(s.producer_subtask, s.output_parameter_key)
                         for s in spec.value_from_oneof.parameter_selectors]
            if dag is None:
                raise OneOfResolutionError("?", key, "strict_local: a dsl.OneOf outside any tracked DAG",
                                           CITE_CACHE_HIT)
            try:
                subtask, subkey = oneof_choice(dag, selectors, key, _backend(), branch_notes(dag))
            except OneOfResolutionError as err:
                outputs[key] = _Unresolved(err)
                continue
            outputs[key] = io_store.get_task_output(subtask, subkey)
        return outputs

    return classmethod(get_dag_output_parameters)


def patches() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement) for backend_rules._install, made from what is installed now."""
    from kfp.local.orchestrator import enhanced_dag_orchestrator as edo
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    def components_of(kwargs):
        return kwargs["components"]

    return [
        (edo, "execute_task", _wrap_execute_task(edo.execute_task, components_of)),
        (edo, "run_enhanced_dag", _wrap_run_enhanced_dag(edo.run_enhanced_dag)),
        (OrchestratorUtils, "get_dag_output_parameters",
         _wrap_get_dag_output_parameters(OrchestratorUtils.get_dag_output_parameters)),
    ]
