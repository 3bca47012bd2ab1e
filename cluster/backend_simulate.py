"""Run a compiled pipeline YAML through the KFP backend's driver, cache and launcher rules, with stub executors.

`simulate_run(spec, arguments, stubs=..., cache=CacheStore(dir), pipeline_root=..., backend=...)` walks the IR as
the backend does one run: the driver resolves each task's inputs (componentInputParameter from the immediate
parent DAG only, task outputs from siblings, through DAG outputs, dsl.OneOf by branch DAG state, dsl.Collected
over iterations), evaluates trigger conditions, fans out ParallelFor; a cacheable container task whose key is in
the cache is CACHED (cluster.backend_cache), any other container task has its input artifacts downloaded by the
launcher model (cluster.backend_launcher), "runs" its stub and updates its DAG's state; importers publish an
artifact (re-used by URI unless reimport) and update nothing. No component code runs, so a pipeline whose
components import a library under change can be checked. Each call is one run; the CacheStore carries the cache
from run to run. Failures raise the same errors as strict kfp.local (`OneOfResolutionError`,
`LauncherDownloadError`, `BackendResolutionError`), naming the task path and the input.

stubs: task name (the IR key, e.g. "download") -> callable(inputs) -> outputs; "*" -> callable(task name, inputs)
is the fallback. `inputs`
maps each input to its resolved value (artifacts as `SimArtifact`); outputs maps every output parameter of the
component to a value and may give an output artifact as `StubArtifact(size=..., metadata=...)` (default: 0 bytes).
Not modelled: exit handlers and ignore_upstream_failure (rejected), artifact iterators (R8), the platform spec's
PVC names in the cache key, retries.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import uuid
from typing import Any, Callable, Mapping

from cluster.backend_cache import (
    CITE_CACHE_KEY,
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
from cluster.backend_errors import BackendResolutionError, OneOfResolutionError
from cluster.backend_launcher import DEFAULT_ROOT, Download, LauncherModel
from cluster.backend_rules import RULES, _eval_condition, load_pipeline_spec

_FIELD = re.compile(r'^parseJson\(string_value\)\["(.+)"\]$')


@dataclasses.dataclass(frozen=True)
class StubArtifact:
    size: int = 0
    metadata: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SimArtifact:
    uri: str
    id: str
    schema: str
    size: int | None
    metadata: dict


@dataclasses.dataclass
class SimTask:
    path: str
    state: str  # COMPLETE, CACHED, IMPORTED, CANCELED
    inputs: dict
    fingerprint: str = ""
    downloads: list[Download] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SimRun:
    pipeline: str
    run_id: str
    tasks: list[SimTask] = dataclasses.field(default_factory=list)

    def state(self, path: str) -> str:
        found = [t.state for t in self.tasks if t.path == path]
        if len(found) != 1:
            raise KeyError(f"{path!r}: {len(found)} tasks (paths: {sorted(t.path for t in self.tasks)})")
        return found[0]

    def cache_hits(self) -> list[str]:
        return [t.path for t in self.tasks if t.state == "CACHED"]

    def downloaded_bytes(self, path: str) -> int:
        return sum(d.nbytes or 0 for t in self.tasks if t.path == path for d in t.downloads if d.how != "skipped")


class _Sim:
    def __init__(self, pipeline: dict, stubs: Mapping, cache: CacheStore | None, launcher: LauncherModel,
                 backend: str):
        self.p, self.stubs, self.cache, self.launcher, self.backend = pipeline, stubs, cache, launcher, backend
        self.run = SimRun(pipeline["pipelineInfo"]["name"], uuid.uuid4().hex[:12])
        self.executors = pipeline.get("deploymentSpec", {}).get("executors", {})

    # ------------------------------------------------------------------------------------------- resolution
    def _fail(self, path: str, name: str, message: str, rule: str = "R1"):
        raise BackendResolutionError(path, name, message, RULES[rule].citation)

    def _dag_output(self, out: dict, key: str, artifact: bool, path: str, name: str) -> Any:
        """resolveUpstreamParameters/Artifacts for a producer that is a DAG: follow its output spec."""
        if out["kind"] == "loop":  # dsl.Collected: CollectInputs, no state read
            return [self._dag_output({"kind": "dag", **it}, key, artifact, path, name) for it in out["iterations"]]
        outputs = out["comp"]["dag"].get("outputs", {})
        spec = outputs.get("artifacts" if artifact else "parameters", {}).get(key)
        if spec is None:
            self._fail(path, name, f"producer DAG has no output {key!r}", "R5")
        if artifact:
            selectors = [(s["producerSubtask"], s["outputArtifactKey"]) for s in spec["artifactSelectors"]]
            if len(selectors) > 1 and self.backend != "2.17.0":
                selectors = selectors[-1:]  # 2.15.0/2.16.0 take the last selector (R3)
        elif "valueFromOneof" in spec:
            selectors = [(s["producerSubtask"], s["outputParameterKey"])
                         for s in spec["valueFromOneof"]["parameterSelectors"]]
        else:
            ref = spec["valueFromParameter"]
            selectors = [(ref["producerSubtask"], ref["outputParameterKey"])]
        if len(selectors) > 1:
            try:
                selectors = [oneof_choice(out["state"], selectors, key, self.backend, branch_notes(out["state"]))]
            except OneOfResolutionError as err:
                raise OneOfResolutionError(path, name, f"input {name!r} reads a dsl.OneOf output: "
                                           + str(err).split(": ", 1)[1].rsplit(" [backend-strict", 1)[0],
                                           err.citation) from None
        sub, subkey = selectors[0]
        return self._task_output(out["tasks"], sub, subkey, artifact, path, name)

    def _task_output(self, outs: dict, producer: str, key: str, artifact: bool, path: str, name: str) -> Any:
        if producer not in outs:
            self._fail(path, name, f"producer task {producer!r} is not a sibling in the same DAG", "R5")
        out = outs[producer]
        if out is None:
            self._fail(path, name, f"producer task {producer!r} did not run (its condition was false)", "R5")
        if out["kind"] != "task":
            return self._dag_output(out, key, artifact, path, name)
        values = out["artifacts" if artifact else "parameters"]
        if key not in values:
            self._fail(path, name, f"producer task {producer!r} has no output {key!r}", "R5")
        return values[key]

    def _inputs(self, task: dict, comp: dict, dag_inputs: dict, outs: dict, path: str) -> tuple[dict, dict]:
        params, arts = {}, {}
        for name, spec in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in spec:
                src = spec["componentInputParameter"]
                if src not in dag_inputs:
                    self._fail(path, name, f"parent DAG does not have input parameter {src}")
                value = dag_inputs[src]
            elif "taskOutputParameter" in spec:
                ref = spec["taskOutputParameter"]
                value = self._task_output(outs, ref["producerTask"], ref["outputParameterKey"], False, path, name)
            elif "runtimeValue" in spec:
                value = spec["runtimeValue"]["constant"]
            else:
                self._fail(path, name, f"unsupported input kind {sorted(spec)} (simulator)", "R4")
            selector = spec.get("parameterExpressionSelector")
            if selector:
                match = _FIELD.match(selector)
                if not match or not isinstance(value, dict) or match.group(1) not in value:
                    self._fail(path, name, f"cannot apply {selector!r} to {value!r}", "R7")
                value = value[match.group(1)]
            params[name] = value
        for name, spec in task.get("inputs", {}).get("artifacts", {}).items():
            if "componentInputArtifact" in spec:
                if spec["componentInputArtifact"] not in dag_inputs:
                    self._fail(path, name, f"parent DAG does not have input artifact {spec['componentInputArtifact']}")
                arts[name] = dag_inputs[spec["componentInputArtifact"]]
            else:
                ref = spec["taskOutputArtifact"]
                arts[name] = self._task_output(outs, ref["producerTask"], ref["outputArtifactKey"], True, path, name)
        item = task.get("parameterIterator", {}).get("itemInput")  # supplied per iteration (dag.go)
        for name, spec in comp.get("inputDefinitions", {}).get("parameters", {}).items():
            if name not in params and name != item:
                if "defaultValue" in spec:
                    params[name] = spec["defaultValue"]
                elif not spec.get("isOptional"):
                    self._fail(path, name, f"neither value nor default value provided for non-optional parameter "
                               f"{name!r}", "R10")
        return params, arts

    # ----------------------------------------------------------------------------------------------- running
    def dag(self, comp: dict, dag_inputs: dict, state: DagState, prefix: str) -> dict:
        tasks = comp["dag"]["tasks"]
        outs: dict = {}
        for name in _order(tasks):
            task = tasks[name]
            path = f"{prefix}{name}"
            policy = task.get("triggerPolicy", {})
            if policy.get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED":
                self._fail(path, "", "exit handlers / ignore_upstream_failure are not simulated", "R4")
            child = self.p["components"][task["componentRef"]["name"]]
            params, arts = self._inputs(task, child, dag_inputs, outs, path)
            if policy.get("condition") and not _eval_condition(path, policy["condition"], params):
                record(state, name, "CANCELED")
                self.run.tasks.append(SimTask(path, "CANCELED", params))
                outs[name] = None
                continue
            if "dag" in child:
                outs[name] = self._sub_dag(name, task, child, {**params, **arts}, state, path)
            elif "importer" in self.executors.get(child["executorLabel"], {}):
                outs[name] = self._importer(name, child, params, state, path)
            else:
                outs[name] = self._container(name, task, child, params, arts, state, path)
        return outs

    def _sub_dag(self, name, task, child, inputs, state, path) -> dict:
        size = len(child["dag"]["tasks"])
        iterator = task.get("parameterIterator")
        if task.get("artifactIterator"):
            self._fail(path, "", "artifact iterator not implemented yet in the KFP backend", "R8")
        if not iterator:
            sub = DagState(name, state, size)
            record(state, name, sub)
            return {"kind": "dag", "comp": child, "state": sub, "tasks": self.dag(child, inputs, sub, path + "/")}
        items_spec = iterator["items"]
        items = inputs.get(items_spec["inputParameter"]) if "inputParameter" in items_spec else \
            json.loads(items_spec["raw"])
        if not isinstance(items, list):
            self._fail(path, items_spec.get("inputParameter", "raw"), f"ParallelFor items {items!r} are not a list",
                       "R7")
        head = DagState(name, state, size, iteration_count=len(items))
        record(state, name, head)
        iterations = []
        for i, item in enumerate(items):
            it = DagState(name, head, size, iteration_index=i)
            record(head, f"{name}-{i}", it)
            args = {**inputs, iterator["itemInput"]: item}
            iterations.append({"comp": child, "state": it, "tasks": self.dag(child, args, it, f"{path}[{i}]/")})
        return {"kind": "loop", "iterations": iterations}

    def _importer(self, name, child, params, state, path) -> dict:
        spec = self.executors[child["executorLabel"]]["importer"]
        source = spec["artifactUri"]
        uri = source["constant"] if "constant" in source else params.get(source.get("runtimeParameter", ""))
        if not uri:
            self._fail(path, "uri", "empty artifact URI runtime value", "R10")
        schema = spec["typeSchema"]["schemaTitle"]
        metadata = spec.get("metadata", {})
        reimport = bool(spec.get("reimport"))
        art_id = self.cache.artifact_id(self.run.pipeline, uri, schema, metadata, reimport) if self.cache else \
            f"a-{uuid.uuid4().hex[:16]}"
        record(state, name, "COMPLETE")  # importer_launcher.go: published COMPLETE, no UpdateDAGExecutionsState
        self.run.tasks.append(SimTask(path, "IMPORTED", params))
        return {"kind": "task", "parameters": {}, "artifacts": {"artifact": SimArtifact(uri, art_id, schema, None,
                                                                                        metadata)}}

    def _container(self, name, task, child, params, arts, state, path) -> dict:
        container = self.executors[child["executorLabel"]]["container"]
        outdefs = child.get("outputDefinitions", {})
        out_arts = {k: v["artifactType"]["schemaTitle"] for k, v in outdefs.get("artifacts", {}).items()}
        fp = ""
        if self.cache is not None and self.cache.enabled and task.get("cachingOptions", {}).get("enableCache"):
            key = cache_key(
                input_parameters=params,
                input_artifact_ids={k: [a.id for a in (v if isinstance(v, list) else [v])] for k, v in arts.items()},
                output_artifacts={k: {"type": v, "metadata": {}} for k, v in out_arts.items()},
                output_parameters={k: v["parameterType"] for k, v in outdefs.get("parameters", {}).items()},
                command=container.get("command", []) + container.get("args", []), image=container["image"])
            fp = fingerprint(key)
            rec = self.cache.lookup(self.run.pipeline, fp)
            if rec is not None:  # CACHED: no launcher, no DAG update
                record(state, name, "CACHED")
                self.run.tasks.append(SimTask(path, "CACHED", {**params, **arts}, fp))
                return {"kind": "task", "parameters": rec["parameters"],
                        "artifacts": {k: SimArtifact(a["uri"], a["id"], a["type"], a.get("size"), a["metadata"])
                                      for k, a in rec["artifacts"].items()}}
        prefix = self.launcher.run_prefix(self.run.pipeline, self.run.run_id)
        downloads = self.launcher.plan(path, {k: [(a.uri, a.size, a.metadata) for a in (v if isinstance(v, list)
                                                                                        else [v])]
                                              for k, v in arts.items()}, run_prefix=prefix)
        if name in self.stubs:
            produced = self.stubs[name]({**params, **arts})
        elif "*" in self.stubs:
            produced = self.stubs["*"](name, {**params, **arts})
        else:
            self._fail(path, "", f"no stub for task {name!r} (give stubs[{name!r}] or stubs['*'])", "R10")
        missing = sorted(set(outdefs.get("parameters", {})) - set(produced))
        if missing:
            self._fail(path, missing[0], f"the stub of {name!r} returned no value for outputs {missing}", "R10")
        task_root = posixpath.join(prefix, name, uuid.uuid4().hex[:8])  # driver.go provisionOutputs
        artifacts = {}
        for k, schema in out_arts.items():
            stub_art = produced.get(k) if isinstance(produced.get(k), StubArtifact) else StubArtifact()
            artifacts[k] = SimArtifact(posixpath.join(task_root, k), f"a-{uuid.uuid4().hex[:16]}", schema,
                                       stub_art.size, dict(stub_art.metadata))
        parameters = {k: produced[k] for k in outdefs.get("parameters", {})}
        record(state, name, "COMPLETE")
        launcher_update(state, self.backend)
        if fp:
            self.cache.put(self.run.pipeline, fp, {"task": path, "parameters": parameters, "artifacts": {
                k: {"uri": a.uri, "id": a.id, "type": a.schema, "size": a.size, "metadata": a.metadata}
                for k, a in artifacts.items()}, "citation": CITE_CACHE_KEY})
        self.run.tasks.append(SimTask(path, "COMPLETE", {**params, **arts}, fp, downloads))
        return {"kind": "task", "parameters": parameters, "artifacts": artifacts}


def _order(tasks: dict) -> list[str]:
    """A topological order (dependentTasks), ties by name, as the backend could run them one by one."""
    done: list[str] = []
    pending = dict(sorted(tasks.items()))
    while pending:
        ready = [n for n, t in pending.items() if all(d in done for d in t.get("dependentTasks", []))]
        if not ready:
            raise ValueError(f"tasks {sorted(pending)}: a dependency cycle or an unknown dependency")
        done.append(ready[0])
        del pending[ready[0]]
    return done


def simulate_run(spec: Any, arguments: dict | None = None, *, stubs: Mapping[str, Callable[[dict], dict]],
                 cache: CacheStore | None = None, pipeline_root: str = DEFAULT_ROOT,
                 backend: str = "2.16.0") -> SimRun:
    """One run of the compiled pipeline `spec` (path, YAML text or dict) with `arguments`; see the module doc."""
    pipeline, _ = load_pipeline_spec(spec)
    if cache is not None and not isinstance(cache, CacheStore):
        raise ValueError(f"cache: expected a cluster.backend_cache.CacheStore or None, got {type(cache).__name__}")
    if not isinstance(stubs, Mapping):
        raise ValueError(f"stubs: expected a mapping of task name -> callable, got {type(stubs).__name__}")
    arguments = dict(arguments or {})
    root = pipeline["root"]
    declared = root.get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(arguments) - set(declared) - set(root.get("inputDefinitions", {}).get("artifacts", {})))
    if unknown:
        raise ValueError(f"arguments: {unknown} are not inputs of pipeline {pipeline['pipelineInfo']['name']!r}")
    inputs = {n: s["defaultValue"] for n, s in declared.items() if "defaultValue" in s}
    inputs.update(arguments)
    sim = _Sim(pipeline, stubs, cache, LauncherModel(pipeline_root), check_backend(backend))
    sim.dag(root, inputs, DagState("root", None, len(root["dag"]["tasks"])), "")
    return sim.run
