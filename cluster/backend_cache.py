"""The KFP backend's cache hits and DAG bookkeeping, as models that strict kfp.local and the IR simulator share.

Read from kubeflow/pipelines at 2.15.0, 2.16.0 and 2.17.0 (2.15.0 and 2.16.0 agree on everything here):

Cache (what a hit is):
- backend/src/v2/driver/container.go Container(): a task whose `opts.Task.GetCachingOptions().GetEnableCache()`
  is true and whose fingerprint has an entry ("Use cache and skip launcher if all conditions met") gets its
  outputs from the earlier execution (cache.go reuseCachedOutputs: the same output parameters, the same MLMD
  output artifacts) and is published `pb.Execution_CACHED`; the driver returns, no pod spec is made.
- backend/src/v2/compiler/argocompiler/container.go: the executor step has `When: {{inputs.parameters.cached-
  decision}} != true`, so on a hit Argo skips the pod: no launcher runs.
- backend/src/v2/driver/cache.go getFingerPrint + backend/src/v2/cacheutils/cache.go GenerateCacheKey: the key
  holds the resolved input parameter values, the input artifacts' *names* (the MLMD artifact id:
  metadata/converter.go toRuntimeArtifact `Name: strconv.FormatInt(artifact.GetId(), 10)`, not the URI), the
  output artifacts with the URI wiped (name, type, metadata), the output parameters' types, the container's
  command+args and image *as written in the IR* (placeholders unresolved) and the sorted PVC names; the
  fingerprint is sha256 of its JSON. Lookup is scoped to "pipeline/<pipeline name>" and the namespace
  (cacheutils GetExecutionCache); the launcher writes the entry after a successful run (launcher_v2.go Execute:
  "if fingerPrint is not empty ... CreateExecutionCache").
- Importers are never cached and reuse the MLMD artifact with the same URI, type and custom properties in the
  pipeline's context unless `reimport` (component/importer_launcher.go findOrNewArtifactToImport,
  metadata/client.go FindMatchedArtifact), so a consumer of an importer keeps its cache key across runs.

DAG bookkeeping (what makes a DAG COMPLETE):
- Every DAG execution starts RUNNING, or CANCELED when its trigger condition is false (driver/dag.go DAG():
  `ecfg.NotTriggered`; metadata/client.go CreateExecution: "in MLMD, CANCELED state means exactly as what we
  call not triggered"); it records `total_dag_tasks = len(component.dag.tasks)` and, for a ParallelFor head,
  `iteration_count`.
- Only a launcher changes a DAG's state: launcher_v2.go Execute() calls `UpdateDAGExecutionsState` for its
  parent DAG in a deferred function (after success or failure). The importer launcher does not (it publishes its
  own execution COMPLETE only); a cache hit has no launcher.
- metadata/client.go UpdateDAGExecutionsState: counts the DAG's child executions (`parent_dag_id` filter) in
  COMPLETE, CACHED or CANCELED; equal to the expected count -> COMPLETE, else any FAILED -> FAILED, else
  unchanged. 2.15.0/2.16.0: expected = total_dag_tasks, no propagation (a DAG whose tasks are all sub-DAGs is
  never set COMPLETE). 2.17.0: expected = iteration_count when present (else total_dag_tasks; a DAG with neither
  is skipped) and a DAG that reaches a terminal state propagates the update to its parent DAG.

What reads a DAG's state: only dsl.OneOf. driver/resolve.go GetProducerTask, for a DAG output `valueFromOneof`
(and, 2.17.0 only, an artifact output with more than one selector), takes the first selector whose sub-task
(the condition branch DAG) is CACHED or COMPLETE, else fails "processing OneOf: No successful task found"
(2.16.0; 2.17.0 adds ` for output key %q in parent task %q (dag ID %d)`). Not affected, by the code: a plain DAG
output (valueFromParameter / one artifact selector) and dsl.Collected (resolve.go CollectInputs walks the
iteration DAGs without reading any state), so a nested pipeline's outputs and a Collected over an all-cached
ParallelFor resolve on a re-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from cluster.backend_errors import CacheStoreError, OneOfResolutionError

BACKENDS = ("2.15.0", "2.16.0", "2.17.0")
_K = "kubeflow/pipelines "
CITE_CACHE_HIT = (_K + "backend/src/v2/driver/container.go Container() (\"Use cache and skip launcher\", published "
                  "CACHED) and backend/src/v2/compiler/argocompiler/container.go (When: cached-decision != true) "
                  "@ 2.15.0, 2.16.0, 2.17.0")
CITE_CACHE_KEY = (_K + "backend/src/v2/cacheutils/cache.go GenerateCacheKey, backend/src/v2/driver/cache.go "
                  "getFingerPrint @ 2.15.0, 2.16.0, 2.17.0")
CITE_DAG_STATE = (_K + "backend/src/v2/component/launcher_v2.go Execute (deferred UpdateDAGExecutionsState), "
                  "backend/src/v2/metadata/client.go UpdateDAGExecutionsState @ 2.15.0, 2.16.0, 2.17.0 (upward "
                  "propagation and iteration_count from 2.17.0)")
CITE_ONEOF = _K + "backend/src/v2/driver/resolve.go GetProducerTask (processing OneOf) @ {tag}; " + CITE_DAG_STATE
DONE_STATES = ("COMPLETE", "CACHED", "CANCELED")  # client.go UpdateDAGExecutionsState's completedTasks


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


# ------------------------------------------------------------------------------------------------ cache key
def _value(value: Any) -> Any:
    """A parameter value as the driver holds it (structpb.Value: every number is a double)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    raise TypeError(f"cache key: a parameter value must be JSON-like, got {type(value).__name__}")


def cache_key(*, input_parameters: dict, input_artifact_ids: dict, output_artifacts: dict, output_parameters: dict,
              command: list, image: str, pvc_names: list = ()) -> dict:
    """GenerateCacheKey (cacheutils/cache.go): the fields of the CacheKey proto, as JSON.

    input_artifact_ids: input name -> list of artifact ids (MLMD ids: an artifact keeps its id when a cache hit
    re-publishes it, and an importer reuses it). output_artifacts: name -> {"type": schema title, "metadata": {}}.
    output_parameters: name -> parameter type ("STRING", ...). command: container command + args as in the IR.
    """
    return {
        "inputArtifactNames": {k: {"artifactNames": [str(i) for i in v]} for k, v in input_artifact_ids.items()},
        "inputParameterValues": {k: _value(v) for k, v in input_parameters.items()},
        "outputArtifactsSpec": {k: {"name": k, "type": v.get("type"), "metadata": v.get("metadata") or {}}
                                for k, v in output_artifacts.items()},
        "outputParametersSpec": dict(output_parameters),
        "containerSpec": {"image": image, "cmdArgs": list(command), "pvcNames": sorted(set(pvc_names))},
    }


def fingerprint(key: dict) -> str:
    """GenerateFingerPrint: sha256 over the key's JSON (encoding/json sorts map keys)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ the store
def _atomic_write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CacheStore:
    """The KFP cache and the importer's artifact registry, kept in a directory so it outlives a run.

    `<path>/<pipeline>/<fingerprint>.json` holds one successful execution's outputs (what the KFP task table
    plus MLMD keep): {"task", "parameters": {name: value}, "artifacts": {name: {"uri", "id", "type",
    "metadata"}}}. `<path>/<pipeline>/artifacts.json` maps an importer's (uri, type, metadata) to the artifact
    id it got first. A hit re-publishes the record's artifact URIs: for local runs they point into the earlier
    run's pipeline_root, which must still exist (a record whose local file is gone raises CacheStoreError).
    `enabled=False` models a server with caching off (container.go: "Cache disabled globally").
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"CacheStore path: expected a directory path, got {path!r}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise CacheStoreError(f"CacheStore path: {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.enabled = bool(enabled)
        self._lock = threading.Lock()

    def _dir(self, pipeline: str) -> Path:
        if not pipeline:
            raise ValueError("CacheStore: the pipeline name is empty (the cache is scoped to pipeline/<name>)")
        return self.path / hashlib.sha256(pipeline.encode()).hexdigest()[:16]

    def lookup(self, pipeline: str, fp: str) -> dict | None:
        file = self._dir(pipeline) / f"{fp}.json"
        with self._lock:
            if not self.enabled or not file.exists():
                return None
            return json.loads(file.read_text())

    def put(self, pipeline: str, fp: str, record: dict) -> None:
        with self._lock:
            _atomic_write(self._dir(pipeline) / f"{fp}.json", record)

    def artifact_id(self, pipeline: str, uri: str, schema: str, metadata: dict, reimport: bool) -> str:
        """The MLMD id an importer publishes: the matched artifact's, unless reimport (a new one every run)."""
        new_id = f"a-{os.urandom(8).hex()}"
        if reimport:
            return new_id
        registry = self._dir(pipeline) / "artifacts.json"
        match = json.dumps([uri, schema, metadata], sort_keys=True)
        with self._lock:
            known = json.loads(registry.read_text()) if registry.exists() else {}
            if match not in known:
                known[match] = new_id
                _atomic_write(registry, known)
            return known[match]

    def records(self) -> int:
        return sum(1 for f in self.path.glob("*/*.json") if f.name != "artifacts.json")


# ------------------------------------------------------------------------------------------- DAG bookkeeping
_ids = itertools.count(1)
_dag_lock = threading.RLock()


@dataclasses.dataclass(eq=False)
class DagState:
    """One DAG execution: a condition branch, a ParallelFor head or iteration, a nested pipeline, the root.

    children: task name -> "COMPLETE" | "CACHED" | "CANCELED" | "FAILED" | "RUNNING" for container and importer
    executions, or the child's DagState for a sub-DAG (its state is read when counted).
    """

    name: str
    parent: DagState | None
    total_tasks: int
    iteration_count: int | None = None
    iteration_index: int | None = None
    state: str = "RUNNING"
    children: dict = dataclasses.field(default_factory=dict)
    id: int = dataclasses.field(default_factory=lambda: next(_ids))

    def child_state(self, name: str) -> str | None:
        child = self.children.get(name)
        return child.state if isinstance(child, DagState) else child

    def path(self) -> str:
        return self.name if self.parent is None or self.parent.parent is None else f"{self.parent.path()}/{self.name}"


def record(dag: DagState | None, task: str, state: str | DagState) -> None:
    if dag is not None:
        with _dag_lock:
            dag.children[task] = state


def launcher_update(dag: DagState | None, backend: str) -> None:
    """metadata/client.go UpdateDAGExecutionsState, as the launcher of a task in `dag` runs it."""
    with _dag_lock:
        while dag is not None and dag.parent is not None:  # the root DAG has no expected count
            expected = dag.iteration_count if backend == "2.17.0" and dag.iteration_count is not None \
                else dag.total_tasks
            states = [dag.child_state(n) for n in dag.children]
            done = sum(s in DONE_STATES for s in states)
            if done == expected:
                dag.state = "COMPLETE"
            elif "FAILED" in states:
                dag.state = "FAILED"
            else:
                return
            if backend != "2.17.0":
                return  # 2.15.0/2.16.0: no propagation to the parent DAG
            dag = dag.parent


def oneof_message(output_key: str, dag: DagState, backend: str) -> str:
    if backend == "2.17.0":
        return (f'processing OneOf: No successful task found for output key "{output_key}" in parent task '
                f'"{dag.name}" (dag ID {dag.id})')
    return "processing OneOf: No successful task found"


def oneof_choice(dag: DagState, selectors: list[tuple[str, str]], output_key: str, backend: str,
                 why: dict | None = None) -> tuple[str, str]:
    """GetProducerTask for a OneOf: the first selector whose branch is CACHED or COMPLETE, or the driver's error.

    Raises OneOfResolutionError with task "?" (the caller names the consuming task); `why` maps a branch name
    to a note (e.g. which of its tasks were cache hits) for the message.
    """
    with _dag_lock:
        for subtask, key in selectors:
            if dag.child_state(subtask) in ("CACHED", "COMPLETE"):
                return subtask, key
        states = ", ".join(f"{s}={dag.child_state(s) or 'absent'}" for s, _ in selectors)
    notes = "; ".join(f"{k}: {v}" for k, v in (why or {}).items())
    raise OneOfResolutionError(
        "?", output_key, f"{oneof_message(output_key, dag, backend)} (branch DAG states: {states}"
        + (f"; {notes}" if notes else "") + "). A branch DAG becomes COMPLETE only when a launcher inside it runs "
        "UpdateDAGExecutionsState after all its tasks are done; cache hits and importers run no such update",
        CITE_ONEOF.format(tag="2.17.0" if backend == "2.17.0" else "2.15.0, 2.16.0"))


def branch_notes(dag: DagState) -> dict:
    """For messages: each RUNNING child DAG and the states of its own children."""
    notes = {}
    for name, child in dag.children.items():
        if isinstance(child, DagState) and child.state == "RUNNING":
            inner = ", ".join(f"{n}={child.child_state(n)}" for n in child.children) or "no tasks ran"
            notes[name] = f"never set COMPLETE ({inner})"
    return notes
