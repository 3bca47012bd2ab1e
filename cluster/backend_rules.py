"""The KFP backend's rules for a compiled pipeline, and a kfp.local mode that follows them.

kfp.local (the SDK's local runner) is more lenient than the KFP backend: it looks a task's inputs up
through every enclosing DAG, ignores resources and images, and skips a branch whose condition it cannot
resolve. A pipeline that passes locally can still fail on the cluster, or run there without a GPU. This
module carries the backend's rules, each read from the upstream code of kubeflow/pipelines at the tags
2.15.0, 2.16.0 and 2.17.0 (the citation of every rule names the file and the tag), and applies them:

- `check_pipeline_spec(spec, backend="2.16.0") -> list[Violation]`: a static check of a compiled pipeline
  YAML (first document: the PipelineSpec; second, if present: the platform spec).
- `min_backend_version(spec) -> str`: the lowest KFP backend release on which `check_pipeline_spec`
  reports nothing, given the features the spec uses.
- `strict_local()`: a context manager under which `kfp.local` resolves inputs like the backend driver
  (see its docstring for exactly what it changes).

Rule ids (`RULES` holds the title, the citation and `since` of each):

    R1   every componentInputParameter / componentInputArtifact a task uses (its inputs, the runtime
         resource and image placeholders of its container, its Kubernetes platform config) is an input
         of its IMMEDIATE parent DAG
    R2   runtime pod-spec values (accelerator type and count, cpu/memory, image) and the names of
         secrets, config maps and PVCs are read as strings: the parameter feeding them is STRING-typed
    R3   an artifact dsl.OneOf (a DAG output artifact with more than one selector) needs backend 2.17.0
    R4   the spec parses into the backend's protobuf messages (unknown fields rejected), schema 2.1.0
    R5   every taskOutputParameter / taskOutputArtifact / dependency names a sibling task in the same
         DAG that has that output
    R6   every component and executor referenced exists, the Kubernetes config names existing
         executors, secrets are referenced by name and no literal secret value is in the spec
    R7   a task's trigger condition and ParallelFor items read only the task's own inputs
    R8   artifact iterators (ParallelFor over artifacts) are not implemented in any backend
    R9   protobuf fields newer than the backend (2.16.0: parameter literals, securityContext, PVC
         subPath; 2.17.0: pipelineConfig TTL/deadline fields, CreatePVC data_source)
    R10  every non-optional component input without a default is supplied by each task that runs it
    R11  Kubernetes JSON parameters (node selector, affinity, tolerations) are STRUCT (or LIST) typed

`since` is the first backend release on which a spec that triggers the rule runs; None means no
release lifts it (the spec has to change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml

from cluster import backend_local
from cluster.backend_errors import BackendResolutionError

KNOWN_BACKENDS = ("2.15.0", "2.16.0", "2.17.0")  # the tags whose code these rules were read from
OLDEST_BACKEND = KNOWN_BACKENDS[0]
ALL_TAGS = "2.15.0, 2.16.0, 2.17.0"


def _cite(path: str, what: str, tags: str = ALL_TAGS) -> str:
    return f"kubeflow/pipelines {path} ({what}) @ {tags}"


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    title: str
    since: str | None  # first backend release that runs a spec triggering the rule; None: none does
    citation: str


@dataclasses.dataclass(frozen=True)
class Violation:
    """One place where the backend would reject or mis-run the spec.

    task: the task path from the root DAG ("condition-branches-5/condition-7/train-resnet18"), or for a
        rule about a component, an executor or the whole spec: "components/<name>", "executors/<label>",
        "pipelineInfo", "platform", ...
    parameter: the input/output/field name involved ("pipelinechannel--gpus"), or "" when none.
    since: the first backend release on which this is no longer a problem; None: no release lifts it.
    """

    rule: str
    task: str
    parameter: str
    message: str
    citation: str
    since: str | None = None

    @property
    def task_name(self) -> str:
        """The last element of the task path ("train-resnet18")."""
        return self.task.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.rule} {self.task}: {self.message} [{self.citation}]"


def format_violations(violations: list[Violation]) -> str:
    return "\n".join(str(v) for v in violations) or "no violations"


_RESOLVE = "backend/src/v2/driver/resolve.go"
_DRIVER = "backend/src/v2/driver/driver.go"
_K8S = "backend/src/v2/driver/k8s.go"
_DAG_DRIVER = "backend/src/v2/driver/dag.go"
_CONTAINER_DRIVER = "backend/src/v2/driver/container.go"
_ARGO_DAG = "backend/src/v2/compiler/argocompiler/dag.go"

RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("R1", "a task's componentInputParameter/componentInputArtifact is an input of its immediate parent DAG",
         None, _cite(_RESOLVE, 'resolveInputParameter: "parent DAG does not have input parameter"; '
                     'resolveInputArtifact: "parent DAG does not have input artifact"; '
                     'resolvePodSpecInputRuntimeParameter: "executorInput did not contain container Image input '
                     'parameter"') + "; " + _cite(_CONTAINER_DRIVER, "platform config resolved against the "
                                                                     "parent DAG's parameters")),
    Rule("R2", "runtime pod-spec values and secret/config map/PVC names are read as strings",
         None, _cite(_RESOLVE, "resolvePodSpecInputRuntimeParameter: val.GetStringValue(); resolveInputParameterStr") +
         "; " + _cite(_DRIVER, "initPodSpecPatch/getPodResource: accelerator limit only when type and count are "
                               "non-empty; k8s ParseQuantity")),
    Rule("R3", "artifact dsl.OneOf (DAG output artifact with several selectors) resolves only from 2.17.0",
         "2.17.0", "kubeflow/pipelines backend/src/v2/driver/resolve.go (GetProducerTask: 2.16.0 takes the last "
                   "artifact selector; 2.17.0 picks the branch that completed) @ 2.16.0, 2.17.0; fix #13436 "
                   "(commit b31ed1cc30, in 2.17.0 as 456c72a6c1)"),
    Rule("R4", "the spec parses into the backend's protobuf messages",
         None, _cite("backend/src/apiserver/template/v2_template.go", "NewV2SpecTemplate: protojson.Unmarshal "
                     "(unknown fields rejected), schemaVersion 2.1.0, pipelineInfo.name, root") + "; " +
         _cite("backend/src/v2/compiler/argocompiler/container.go", "protojson.Unmarshal of the "
               "KubernetesExecutorConfig") + "; api/v2alpha1/pipeline_spec.proto"),
    Rule("R5", "task outputs are read from sibling tasks in the same DAG",
         None, _cite(_ARGO_DAG, 'addImplicitDependencies: "unknown producer task %q in DAG"') + "; " +
         _cite(_RESOLVE, "resolveUpstreamParameters/resolveUpstreamArtifacts: producer looked up among the "
                         "parent DAG's tasks")),
    Rule("R6", "referenced components and executors exist; secrets by name only",
         None, _cite(_ARGO_DAG, '"component spec for %q not found", "executor with label %q not found"') + "; " +
         _cite("backend/src/v2/compiler/visitor.go", "Kubernetes config looked up by executor label: other "
                                                      "keys are ignored") + "; " +
         _cite(_K8S, "secretAsEnv/secretAsVolume: the secret is referenced by name")),
    Rule("R7", "trigger conditions and ParallelFor items read the task's own inputs",
         None, _cite(_DAG_DRIVER, "expr.Condition(executorInput, condition); parameterIterator: \"cannot find "
                                  "input parameter\"") + "; " + _cite(_CONTAINER_DRIVER, "expr.Condition") + "; " +
         _cite("backend/src/v2/expression/expression.go", "Condition: CEL over the ExecutorInput") + "; " +
         _cite(_ARGO_DAG, '"triggerPolicy.condition on importer task is not supported"')),
    Rule("R8", "artifact iterators are not implemented",
         None, _cite(_ARGO_DAG, '"artifact iterator not implemented yet"') + "; " +
         _cite(_DAG_DRIVER, '"ArtifactIterator is not implemented"')),
    Rule("R9", "protobuf fields newer than the backend",
         "2.17.0", "kubeflow/pipelines api/v2alpha1/pipeline_spec.proto and "
                   "kubernetes_platform/proto/kubernetes_executor_config.proto (git diff 2.15.0 2.16.0, "
                   "2.16.0 2.17.0); backend/src/v2/driver/k8s.go createPVC (data_source from 2.17.0)"),
    Rule("R10", "non-optional inputs without a default are supplied",
         None, _cite(_RESOLVE, 'resolveInputs: "neither value nor default value provided for non-optional '
                               'parameter %q"')),
    Rule("R11", "Kubernetes JSON parameters are STRUCT (tolerations: STRUCT or LIST) typed",
         None, _cite(_K8S, "resolveK8sJsonParameter: GetStructValue(); tolerations: \"must be either struct or "
                           "list type\"")),
)}

# "{{$.inputs.parameters['NAME']}}": the pattern the driver matches (backend/src/v2/driver/util.go,
# inputPipelineChannelPattern), unanchored, first match.
_CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")
_CONDITION_REF = re.compile(r"inputs\.parameter_values\[(['\"])(.+?)\1\]")

# (path inside the executor's container, label, what the backend does with "" there)
_POD_SPEC_FIELDS = (
    (("resources", "accelerator", "resourceType"), "resources.accelerator.resourceType",
     "requests no accelerator (driver.go sets the limit only when type and count are both non-empty)"),
    (("resources", "accelerator", "resourceCount"), "resources.accelerator.resourceCount",
     "requests no accelerator (driver.go sets the limit only when type and count are both non-empty)"),
    (("resources", "resourceCpuLimit"), "resources.resourceCpuLimit",
     "fails the task (driver.go getPodResource: k8s ParseQuantity(\"\"))"),
    (("resources", "resourceCpuRequest"), "resources.resourceCpuRequest",
     "fails the task (driver.go getPodResource: k8s ParseQuantity(\"\"))"),
    (("resources", "resourceMemoryLimit"), "resources.resourceMemoryLimit",
     "fails the task (driver.go getPodResource: k8s ParseQuantity(\"\"))"),
    (("resources", "resourceMemoryRequest"), "resources.resourceMemoryRequest",
     "fails the task (driver.go getPodResource: k8s ParseQuantity(\"\"))"),
    (("image",), "image", "creates a pod with an empty image, which Kubernetes rejects"),
)

# InputParameterSpec fields of the KubernetesExecutorConfig and the types the driver needs (k8s.go).
_K8S_STRING_PARAMS = ("secretNameParameter", "configMapNameParameter", "pvcNameParameter")
_K8S_JSON_PARAMS = {"nodeSelectorJson": ("STRUCT",), "nodeAffinityJson": ("STRUCT",),
                    "tolerationJson": ("STRUCT", "LIST")}

# A heuristic for literal secrets: a name with one of these words as a whole snake/kebab-case segment
# ("api_token", "HPA_S3_SECRET_KEY"; not "max_tokens", "tokenizer"), whose value is a non-empty literal; for
# container env vars also a trailing "_KEY" ("KAGGLE_KEY"). Names ending in name/ref/path/... hold a reference.
_SECRET_WORD = re.compile(r"(?i)(?:^|[_-])(?:password|passwd|secret|token|apikey|api[_-]key|access[_-]key|"
                          r"private[_-]key|credentials?)(?:$|[_-])")
_SECRET_ENV = re.compile(r"(?i)(?:^|_)key$")
_NOT_A_VALUE = re.compile(r"(?i)(?:name|names|ref|env|path|file|id)$")  # "secret_name" holds a name

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _version_tuple(version: str, field: str = "backend") -> tuple[int, ...]:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(f"{field}: expected a KFP release like '2.16.0', got {version!r}")
    return tuple(int(x) for x in version.split("."))


# ------------------------------------------------------------------------------------------ loading
def load_pipeline_spec(spec: Any) -> tuple[dict, dict | None]:
    """(pipeline spec, platform spec or None) from a path, YAML text's documents, or dicts.

    Accepts the path of a compiled YAML (str or Path), a PipelineSpec dict, or a list/tuple of the YAML
    documents ([pipeline_spec, platform_spec]).
    """
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"spec: expected a compiled pipeline YAML file or a dict, got {str(spec)!r} "
                             "(no such file)")
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    elif isinstance(spec, dict):
        docs = [spec]
    elif isinstance(spec, (list, tuple)):
        docs = [d for d in spec if d is not None]
    else:
        raise ValueError(f"spec: expected a path, a dict or a list of YAML documents, got {type(spec).__name__}")
    if not docs or not isinstance(docs[0], dict):
        raise ValueError("spec: the first YAML document must be the PipelineSpec (a mapping)")
    if "platforms" in docs[0] and "root" not in docs[0]:
        raise ValueError("spec: the first YAML document is a platform spec; the PipelineSpec must come first")
    if len(docs) > 2:
        raise ValueError(f"spec: expected at most 2 YAML documents (pipeline spec, platform spec), got {len(docs)}")
    platform = docs[1] if len(docs) == 2 else None
    if platform is not None and not isinstance(platform, dict):
        raise ValueError("spec: the second YAML document (platform spec) must be a mapping")
    return docs[0], platform


# ------------------------------------------------------------------------------------------ the model
@dataclasses.dataclass(frozen=True)
class _Scope:
    """One DAG instance: the root, or a DAG component as run by the task at `path`."""

    name: str                # component name, or "root"
    spec: dict
    path: tuple[str, ...]    # task names from the root down to the task that runs this DAG
    chain: tuple["_Scope", ...] = ()  # the enclosing scopes, outermost first (not including self)
    display: str = ""        # taskInfo.name of the task that runs it (the dsl.If name, e.g. "single-pod")

    @property
    def label(self) -> str:
        if not self.path:
            return "the root DAG"
        shown = f" {self.display!r}" if self.display and self.display != self.path[-1] else ""
        return f"DAG {self.path[-1]}{shown} ({self.name})"

    def tasks(self) -> dict:
        return (self.spec.get("dag") or {}).get("tasks") or {}


def _g(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _in_params(comp: dict) -> dict:
    return _g(comp, "inputDefinitions", "parameters", default={}) or {}


def _in_artifacts(comp: dict) -> dict:
    return _g(comp, "inputDefinitions", "artifacts", default={}) or {}


def _out_params(comp: dict) -> dict:
    return _g(comp, "outputDefinitions", "parameters", default={}) or {}


def _out_artifacts(comp: dict) -> dict:
    return _g(comp, "outputDefinitions", "artifacts", default={}) or {}


class _Model:
    def __init__(self, pipeline: dict, platform: dict | None):
        def mapping(value: Any) -> dict:  # a malformed part reads as empty here; R4 reports it
            return value if isinstance(value, dict) else {}

        self.pipeline = pipeline
        self.components: dict = mapping(pipeline.get("components"))
        self.executors: dict = mapping(_g(pipeline, "deploymentSpec", "executors"))
        self.platform = platform
        self.k8s_executors: dict = mapping(_g(platform, "platforms", "kubernetes", "deploymentSpec", "executors"))
        self.root = _Scope("root", mapping(pipeline.get("root")), ())
        self.scopes = list(self._walk(self.root))

    def _walk(self, scope: _Scope) -> Iterator[_Scope]:
        yield scope
        seen = {s.name for s in scope.chain} | {scope.name}
        for task_name, task in sorted(scope.tasks().items()):
            ref = _g(task, "componentRef", "name")
            comp = self.components.get(ref)
            if isinstance(comp, dict) and "dag" in comp and ref not in seen:
                yield from self._walk(_Scope(ref, comp, scope.path + (task_name,), scope.chain + (scope,),
                                             str(_g(task, "taskInfo", "name", default=""))))

    def component_of(self, task: dict) -> dict:
        return self.components.get(_g(task, "componentRef", "name")) or {}

    def container_of(self, task: dict) -> dict | None:
        label = self.component_of(task).get("executorLabel")
        return _g(self.executors.get(label), "container") if label else None

    def k8s_config_of(self, task: dict) -> dict:
        label = self.component_of(task).get("executorLabel")
        return (self.k8s_executors.get(label) or {}) if label else {}


def _constant_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, (int, float)):
        return "NUMBER_DOUBLE"
    if isinstance(value, list):
        return "LIST"
    if isinstance(value, dict):
        return "STRUCT"
    return None


def _source_type(model: _Model, scope: _Scope, spec: dict) -> tuple[str | None, str]:
    """The parameter type of what an InputParameterSpec resolves to, and where that type was declared.

    A componentInputParameter takes the type its immediate parent DAG declares (the DAG driver converts the
    value to that type, resolve.go handleParamTypeValidationAndConversion). When the parent does not
    declare it (an R1 violation), the nearest enclosing declaration is used, so R2 still reports the type.
    """
    if not isinstance(spec, dict):
        return None, ""
    if isinstance(spec.get("componentInputParameter"), str):
        name = spec["componentInputParameter"]
        for s in (scope,) + tuple(reversed(scope.chain)):
            declared = _in_params(s.spec).get(name)
            if declared is not None:
                return declared.get("parameterType"), f"{s.label} declares {name!r} as {declared.get('parameterType')}"
        root_name = name.removeprefix("pipelinechannel--")
        declared = _in_params(model.root.spec).get(root_name)
        if declared is not None:
            return declared.get("parameterType"), f"pipeline parameter {root_name!r} is {declared.get('parameterType')}"
        return None, ""
    if isinstance(spec.get("taskOutputParameter"), dict):
        producer = spec["taskOutputParameter"].get("producerTask")
        key = spec["taskOutputParameter"].get("outputParameterKey")
        task = scope.tasks().get(producer)
        declared = _out_params(model.component_of(task)).get(key) if task else None
        if declared is not None:
            ptype = declared.get("parameterType")
            return ptype, f"output {key!r} of task {producer!r} is {ptype}"
        return None, ""
    if "runtimeValue" in spec:
        constant = _g(spec, "runtimeValue", "constant")
        return _constant_type(constant), f"the constant {constant!r}"
    if "taskFinalStatus" in spec:
        return "TASK_FINAL_STATUS", "a task final status"
    return None, ""


def _task_input_type(model: _Model, scope: _Scope, task: dict, name: str) -> tuple[str | None, str]:
    """Type of the value the driver puts under task input `name` in the executor input."""
    declared = _in_params(model.component_of(task)).get(name)
    if declared is not None and declared.get("parameterType") == "STRING":
        # The container driver converts any value to text for a STRING component input (resolve.go).
        return "STRING", f"the component declares {name!r} as STRING"
    source = _g(task, "inputs", "parameters", name)
    if source is None:
        return None, ""
    return _source_type(model, scope, source)


def _param_refs(tree: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """(field path, dict) for every dict in a platform config that references a parameter."""
    if isinstance(tree, dict):
        if isinstance(tree.get("componentInputParameter"), str) or isinstance(tree.get("taskOutputParameter"), dict):
            yield path, tree
        for k, v in tree.items():
            yield from _param_refs(v, f"{path}.{k}" if path else k)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _param_refs(v, f"{path}[{i}]")


def _typed_k8s_params(tree: Any, path: str = "") -> Iterator[tuple[str, str, dict]]:
    """(field path, field name, InputParameterSpec) for the typed parameter fields of a platform config."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            sub = f"{path}.{k}" if path else k
            if (k in _K8S_STRING_PARAMS or k in _K8S_JSON_PARAMS) and isinstance(v, dict):
                yield sub, k, v
            else:
                yield from _typed_k8s_params(v, sub)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _typed_k8s_params(v, f"{path}[{i}]")


def _tpath(scope: _Scope, task_name: str) -> str:
    return "/".join(scope.path + (task_name,))


def _each_task(model: _Model) -> Iterator[tuple[_Scope, str, dict]]:
    for scope in model.scopes:
        for task_name, task in sorted(scope.tasks().items()):
            if isinstance(task, dict):
                yield scope, task_name, task


# ------------------------------------------------------------------------------------------ the rules
def _r1_parent_dag_inputs(model: _Model) -> Iterator[Violation]:
    cite = RULES["R1"].citation
    for scope, task_name, task in _each_task(model):
        where = _tpath(scope, task_name)
        params, artifacts = _in_params(scope.spec), _in_artifacts(scope.spec)
        for name, spec in sorted((_g(task, "inputs", "parameters", default={}) or {}).items()):
            ref = spec.get("componentInputParameter") if isinstance(spec, dict) else None
            if isinstance(ref, str) and ref not in params:
                yield Violation("R1", where, ref,
                                f"input {name!r} reads componentInputParameter {ref!r}, but {scope.label}: parent DAG "
                                f"does not have input parameter {ref} (kfp.local finds it further up; the driver "
                                "does not: pass it as an argument or register the channel on the task)", cite)
        for name, spec in sorted((_g(task, "inputs", "artifacts", default={}) or {}).items()):
            ref = spec.get("componentInputArtifact") if isinstance(spec, dict) else None
            if isinstance(ref, str) and ref not in artifacts:
                yield Violation("R1", where, ref,
                                f"input artifact {name!r} reads componentInputArtifact {ref!r}, but {scope.label}: "
                                f"parent DAG does not have input artifact {ref}", cite)
        container = model.container_of(task)
        task_inputs = _g(task, "inputs", "parameters", default={}) or {}
        for keys, label, _ in _POD_SPEC_FIELDS:
            raw = _g(container, *keys)
            match = _CHANNEL.search(raw) if isinstance(raw, str) else None
            if match and match.group(1) not in task_inputs:
                yield Violation("R1", where, match.group(1),
                                f"{label} is {raw!r}, but the task has no input parameter {match.group(1)!r}: "
                                "executorInput did not contain container Image input parameter", cite)
        for field, ref in _param_refs(model.k8s_config_of(task)):
            name = ref.get("componentInputParameter")
            if isinstance(name, str) and name not in params:
                yield Violation("R1", where, name,
                                f"Kubernetes config {field} reads componentInputParameter {name!r}, but {scope.label}: "
                                f"parent DAG does not have input parameter {name}", cite)


def _r2_string_values(model: _Model) -> Iterator[Violation]:
    cite = RULES["R2"].citation
    for scope, task_name, task in _each_task(model):
        where = _tpath(scope, task_name)
        container = model.container_of(task)
        for keys, label, consequence in _POD_SPEC_FIELDS:
            raw = _g(container, *keys)
            match = _CHANNEL.search(raw) if isinstance(raw, str) else None
            if not match:
                continue
            name = match.group(1)
            ptype, why = _task_input_type(model, scope, task, name)
            if ptype is not None and ptype != "STRING":
                yield Violation("R2", where, name,
                                f"{label} reads input parameter {name!r} with GetStringValue(), but {why}: a "
                                f"{ptype} value reads as \"\" and the backend {consequence}; make the pipeline "
                                "parameter a string", cite)
        for field, key, spec in _typed_k8s_params(model.k8s_config_of(task)):
            if key not in _K8S_STRING_PARAMS:
                continue
            ptype, why = _source_type(model, scope, spec)
            if ptype is not None and ptype != "STRING":
                yield Violation("R2", where, spec.get("componentInputParameter") or key,
                                f"Kubernetes config {field} is resolved with resolveInputParameterStr, but {why}: "
                                "\"Expected a string\" fails the task", cite)


def _r3_artifact_oneof(model: _Model) -> Iterator[Violation]:
    rule = RULES["R3"]
    for scope in model.scopes:
        outputs = _g(scope.spec, "dag", "outputs", "artifacts", default={}) or {}
        for key, out in sorted(outputs.items()):
            selectors = (out or {}).get("artifactSelectors") or []
            if len(selectors) > 1:
                last = selectors[-1].get("producerSubtask")
                others = ", ".join(str(s.get("producerSubtask")) for s in selectors[:-1])
                yield Violation("R3", "/".join(scope.path) or "root", key,
                                f"output artifact {key!r} of {scope.label} is a dsl.OneOf over {len(selectors)} "
                                f"branches: backends before 2.17.0 always read the last selector ({last}), so a "
                                f"run that takes {others} fails to resolve it", rule.citation, rule.since)


def _r4_parses(model: _Model) -> Iterator[Violation]:
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    cite = RULES["R4"].citation
    try:
        json_format.ParseDict(model.pipeline, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    except (json_format.ParseError, TypeError, ValueError) as err:
        yield Violation("R4", "pipelineSpec", "", f"invalid v2 pipeline spec: {err}", cite)
    if model.pipeline.get("schemaVersion") != "2.1.0":
        yield Violation("R4", "pipelineSpec", "schemaVersion", "KFP only supports schema version 2.1.0, but the "
                        f"pipeline spec has version {model.pipeline.get('schemaVersion')!r}", cite)
    if not _g(model.pipeline, "pipelineInfo", "name"):
        yield Violation("R4", "pipelineInfo", "name", "invalid v2 pipeline spec: name is empty", cite)
    if not model.pipeline.get("root"):
        yield Violation("R4", "root", "", "invalid v2 pipeline spec: root component is empty", cite)
    if model.platform is None:
        return
    try:
        json_format.ParseDict(model.platform, pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False)
    except (json_format.ParseError, TypeError, ValueError) as err:
        yield Violation("R4", "platform", "", f"cannot unmarshal platform specific configs: {err}", cite)
    try:
        from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
    except ImportError:  # kfp-kubernetes is a dependency of the project; without it, skip this part
        return
    for label, cfg in sorted(model.k8s_executors.items()):
        try:
            json_format.ParseDict(cfg, k8s_pb2.KubernetesExecutorConfig(), ignore_unknown_fields=False)
        except (json_format.ParseError, TypeError, ValueError) as err:
            yield Violation("R4", f"executors/{label}", "", f"failed to unmarshal kubernetes config: {err}", cite)


def _r5_sibling_outputs(model: _Model) -> Iterator[Violation]:
    cite = RULES["R5"].citation

    def check(scope: _Scope, where: str, producer: Any, key: Any, artifact: bool, what: str) -> Iterator[Violation]:
        siblings = scope.tasks()
        if producer not in siblings:
            yield Violation("R5", where, str(key or producer),
                            f"{what} names producer task {producer!r}, which is not a task of {scope.label}: "
                            f"unknown producer task {producer!r} in DAG", cite)
            return
        if key is None:
            return
        outs = (_out_artifacts if artifact else _out_params)(model.component_of(siblings[producer]))
        if key not in outs:
            yield Violation("R5", where, str(key), f"{what} reads output {key!r} of task {producer!r}, which has "
                            f"no such output {'artifact' if artifact else 'parameter'}", cite)

    for scope, task_name, task in _each_task(model):
        where = _tpath(scope, task_name)
        for name, spec in sorted((_g(task, "inputs", "parameters", default={}) or {}).items()):
            if isinstance(_g(spec, "taskOutputParameter"), dict):
                t = spec["taskOutputParameter"]
                yield from check(scope, where, t.get("producerTask"), t.get("outputParameterKey"), False,
                                 f"input {name!r}")
            if isinstance(_g(spec, "taskFinalStatus"), dict):
                yield from check(scope, where, spec["taskFinalStatus"].get("producerTask"), None, False,
                                 f"input {name!r} (task final status)")
        for name, spec in sorted((_g(task, "inputs", "artifacts", default={}) or {}).items()):
            if isinstance(_g(spec, "taskOutputArtifact"), dict):
                t = spec["taskOutputArtifact"]
                yield from check(scope, where, t.get("producerTask"), t.get("outputArtifactKey"), True,
                                 f"input artifact {name!r}")
        for dep in task.get("dependentTasks") or []:
            yield from check(scope, where, dep, None, False, "dependentTasks")
        for field, ref in _param_refs(model.k8s_config_of(task)):
            t = ref.get("taskOutputParameter")
            if isinstance(t, dict):
                yield from check(scope, where, t.get("producerTask"), t.get("outputParameterKey"), False,
                                 f"Kubernetes config {field}")
    for scope in model.scopes:
        where = "/".join(scope.path) or "root"
        outputs = _g(scope.spec, "dag", "outputs", default={}) or {}
        for key, out in sorted((outputs.get("parameters") or {}).items()):
            selectors = [_g(out, "valueFromParameter")] if _g(out, "valueFromParameter") else \
                (_g(out, "valueFromOneof", "parameterSelectors", default=[]) or [])
            for s in selectors:
                yield from check(scope, where, s.get("producerSubtask"), s.get("outputParameterKey"), False,
                                 f"DAG output {key!r}")
        for key, out in sorted((outputs.get("artifacts") or {}).items()):
            for s in (out or {}).get("artifactSelectors") or []:
                yield from check(scope, where, s.get("producerSubtask"), s.get("outputArtifactKey"), True,
                                 f"DAG output artifact {key!r}")


def _is_secret_literal(name: str, value: Any, env: bool = False) -> bool:
    looks_secret = bool(_SECRET_WORD.search(name)) or (env and bool(_SECRET_ENV.search(name)))
    return (isinstance(value, str) and value != "" and "{{$" not in value and looks_secret
            and not _NOT_A_VALUE.search(name))


def _r6_references(model: _Model) -> Iterator[Violation]:
    cite = RULES["R6"].citation
    for scope, task_name, task in _each_task(model):
        ref = _g(task, "componentRef", "name")
        if ref not in model.components:
            yield Violation("R6", _tpath(scope, task_name), str(ref), f"component spec for {ref!r} not found", cite)
        for name, spec in sorted((_g(task, "inputs", "parameters", default={}) or {}).items()):
            if _is_secret_literal(name, _g(spec, "runtimeValue", "constant")):
                yield Violation("R6", _tpath(scope, task_name), name,
                                f"input {name!r} is a literal value that looks like a secret: pass secrets through "
                                "a Kubernetes Secret (kubernetes.use_secret_as_env), never in the spec", cite)
    for comp_name, comp in sorted(model.components.items()):
        label = (comp or {}).get("executorLabel")
        if label and label not in model.executors:
            yield Violation("R6", f"components/{comp_name}", label, f"executor with label {label!r} not found", cite)
    for label, executor in sorted(model.executors.items()):
        for env in _g(executor, "container", "env", default=[]) or []:
            if _is_secret_literal(str(env.get("name", "")), env.get("value"), env=True):
                yield Violation("R6", f"executors/{label}", str(env.get("name")),
                                f"container env {env.get('name')!r} holds a literal value that looks like a secret: "
                                "use kubernetes.use_secret_as_env", cite)
    for name, param in sorted(_in_params(model.root.spec).items()):
        if _is_secret_literal(name, (param or {}).get("defaultValue")):
            yield Violation("R6", "root", name, f"pipeline parameter {name!r} has a default that looks like a secret "
                            "value: secrets come from a Kubernetes Secret, never from a run parameter", cite)
    for label, cfg in sorted(model.k8s_executors.items()):
        if label not in model.executors:
            yield Violation("R6", f"executors/{label}", label,
                            f"the Kubernetes config names executor {label!r}, which does not exist: the backend "
                            "ignores the config silently", cite)
        for kind in ("secretAsEnv", "secretAsVolume"):
            for i, item in enumerate((cfg or {}).get(kind) or []):
                if not item.get("secretName") and not item.get("secretNameParameter"):
                    yield Violation("R6", f"executors/{label}", f"{kind}[{i}]",
                                    f"{kind}[{i}] names no secret (secretName or secretNameParameter)", cite)
                if any(k in item for k in ("data", "stringData", "value")):
                    yield Violation("R6", f"executors/{label}", f"{kind}[{i}]",
                                    f"{kind}[{i}] carries a value: a secret is referenced by name only", cite)


def _r7_own_inputs(model: _Model) -> Iterator[Violation]:
    cite = RULES["R7"].citation
    for scope, task_name, task in _each_task(model):
        where = _tpath(scope, task_name)
        inputs = _g(task, "inputs", "parameters", default={}) or {}
        condition = _g(task, "triggerPolicy", "condition")
        if isinstance(condition, str) and condition:
            for _, name in _CONDITION_REF.findall(condition):
                if name not in inputs:
                    yield Violation("R7", where, name,
                                    f"the condition {condition!r} reads inputs.parameter_values['{name}'], which is "
                                    "not an input of the task: the driver evaluates the condition over the task's "
                                    "own inputs (CEL: no such key)", cite)
            label = model.component_of(task).get("executorLabel")
            if label and "importer" in (model.executors.get(label) or {}):
                yield Violation("R7", where, "", "triggerPolicy.condition on importer task is not supported", cite)
        items = _g(task, "parameterIterator", "items", "inputParameter")
        if isinstance(items, str) and items not in inputs:
            yield Violation("R7", where, items, f"ParallelFor items input {items!r} is not an input of the task: "
                            f"iterating on item input failed: cannot find input parameter", cite)


def _r8_artifact_iterator(model: _Model) -> Iterator[Violation]:
    rule = RULES["R8"]
    for scope, task_name, task in _each_task(model):
        if task.get("artifactIterator"):
            yield Violation("R8", _tpath(scope, task_name), str(_g(task, "artifactIterator", "itemInput", default="")),
                            "ParallelFor over artifacts (artifactIterator): artifact iterator not implemented yet "
                            "(kfp.local runs it; the backend rejects the pipeline)", rule.citation, rule.since)


def _r9_newer_fields(model: _Model) -> Iterator[Violation]:
    cite = RULES["R9"].citation
    comps = [("root", model.root.spec)] + sorted(model.components.items())
    for comp_name, comp in comps:
        for name, param in sorted(_in_params(comp).items()):
            if (param or {}).get("literals") is not None:
                yield Violation("R9", "root" if comp_name == "root" else f"components/{comp_name}", name,
                                f"parameter {name!r} uses literals (a typing.Literal constraint), a "
                                "ComponentInputsSpec.ParameterSpec field added in 2.16.0: older backends reject "
                                "the spec (unknown field)", cite, "2.16.0")
    for label, cfg in sorted(model.k8s_executors.items()):
        if "securityContext" in (cfg or {}):
            yield Violation("R9", f"executors/{label}", "securityContext",
                            "KubernetesExecutorConfig.securityContext was added in 2.16.0: older backends fail to "
                            "unmarshal the Kubernetes config", cite, "2.16.0")
        for i, mount in enumerate((cfg or {}).get("pvcMount") or []):
            if "subPath" in (mount or {}):
                yield Violation("R9", f"executors/{label}", f"pvcMount[{i}].subPath",
                                "PvcMount.subPath was added in 2.16.0: older backends fail to unmarshal it",
                                cite, "2.16.0")
    pipeline_config = _g(model.platform, "platforms", "kubernetes", "pipelineConfig", default={}) or {}
    for key in ("resourceTtlOnCompletion", "resourceTtlOnSuccess", "resourceTtlOnFailure", "activeDeadlineSeconds"):
        if key in pipeline_config:
            yield Violation("R9", "platform", f"pipelineConfig.{key}",
                            f"PipelineConfig.{key} was added in 2.17.0 (2.16.0 has resourceTtl and workspace "
                            "only): older backends reject the platform spec", cite, "2.17.0")
    for scope, task_name, task in _each_task(model):
        container = model.container_of(task) or {}
        if container.get("image") == "argostub/createpvc" and "data_source" in (_g(task, "inputs", "parameters",
                                                                                     default={}) or {}):
            yield Violation("R9", _tpath(scope, task_name), "data_source",
                            "CreatePVC data_source is read by the driver from 2.17.0 (k8s.go createPVC): older "
                            "backends create an empty PVC silently", cite, "2.17.0")


def _r10_required_inputs(model: _Model) -> Iterator[Violation]:
    cite = RULES["R10"].citation
    for scope, task_name, task in _each_task(model):
        comp = model.component_of(task)
        given = _g(task, "inputs", "parameters", default={}) or {}
        iterator = task.get("parameterIterator") or {}
        exempt = {iterator.get("itemInput")} if iterator else set()
        for name, param in sorted(_in_params(comp).items()):
            param = param or {}
            if name in given or name in exempt or param.get("isOptional") or "defaultValue" in param:
                continue
            yield Violation("R10", _tpath(scope, task_name), name,
                            f"neither value nor default value provided for non-optional parameter {name!r} of "
                            f"component {_g(task, 'componentRef', 'name')!r}", cite)


def _r11_k8s_json_types(model: _Model) -> Iterator[Violation]:
    cite = RULES["R11"].citation
    for scope, task_name, task in _each_task(model):
        for field, key, spec in _typed_k8s_params(model.k8s_config_of(task)):
            allowed = _K8S_JSON_PARAMS.get(key)
            if not allowed:
                continue
            ptype, why = _source_type(model, scope, spec)
            if ptype is not None and ptype not in allowed:
                yield Violation("R11", _tpath(scope, task_name), spec.get("componentInputParameter") or key,
                                f"Kubernetes config {field} needs a {' or '.join(allowed)} value, but {why}: the "
                                "driver reads it with GetStructValue() and applies nothing (or fails)", cite)


_CHECKS = (_r1_parent_dag_inputs, _r2_string_values, _r3_artifact_oneof, _r4_parses, _r5_sibling_outputs,
           _r6_references, _r7_own_inputs, _r8_artifact_iterator, _r9_newer_fields, _r10_required_inputs,
           _r11_k8s_json_types)


def _all_violations(spec: Any) -> list[Violation]:
    model = _Model(*load_pipeline_spec(spec))
    found: dict[tuple, Violation] = {}
    for check in _CHECKS:
        try:
            for v in check(model):
                found.setdefault((v.rule, v.task, v.parameter, v.message), v)
        except (AttributeError, TypeError, KeyError) as err:  # a malformed spec: report it, keep checking
            rule = check.__name__.split("_")[1].upper()
            v = Violation("R4", "pipelineSpec", "", f"malformed spec: {rule} could not be checked "
                          f"({type(err).__name__}: {err})", RULES["R4"].citation)
            found.setdefault((v.rule, v.task, v.parameter, v.message), v)
    return list(found.values())


def check_pipeline_spec(spec: Any, backend: str = "2.16.0") -> list[Violation]:
    """Every place where KFP backend `backend` would reject or mis-run the compiled pipeline `spec`.

    spec: the path of a compiled pipeline YAML, a PipelineSpec dict, or [pipeline_spec, platform_spec].
    backend: a KFP release, "2.15.0" or later (the rules were read from 2.15.0, 2.16.0 and 2.17.0; a later
        release is assumed to keep them).
    """
    wanted = _version_tuple(backend)
    if wanted < _version_tuple(OLDEST_BACKEND):
        raise ValueError(f"backend: the rules were read from KFP {', '.join(KNOWN_BACKENDS)}; "
                         f"got {backend!r}, older than {OLDEST_BACKEND}")
    return [v for v in _all_violations(spec) if v.since is None or wanted < _version_tuple(v.since)]


def min_backend_version(spec: Any) -> str:
    """The lowest KFP backend release on which `check_pipeline_spec(spec, backend)` reports nothing.

    That is the newest `since` among the version-gated features the spec uses (artifact dsl.OneOf: 2.17.0,
    protobuf fields newer than 2.15.0, ...), and at least 2.15.0, the oldest release these rules were read
    from. Raises ValueError, listing them, when the spec breaks a rule that no release lifts (R1, R2, ...).
    """
    violations = _all_violations(spec)
    fatal = [v for v in violations if v.since is None]
    if fatal:
        raise ValueError(f"the spec runs on no KFP backend release: {len(fatal)} violation(s) that no release "
                         f"lifts:\n{format_violations(fatal)}")
    versions = [OLDEST_BACKEND] + [v.since for v in violations]
    return max(versions, key=_version_tuple)


# ------------------------------------------------------------------------------------------ strict kfp.local
class _ParentInputMissing(ValueError):
    """kfp.local's IOStore miss, in the driver's words (a ValueError, as kfp.local's own fallbacks expect)."""


@dataclasses.dataclass
class PodSpecValues:
    """What the backend driver would put in the task's pod (driver.go initPodSpecPatch), as strings."""

    task: str
    dag: str
    image: str
    limits: dict[str, str]
    requests: dict[str, str]


@dataclasses.dataclass
class StrictRun:
    """Yielded by `strict_local()`: the pod-spec values of every container task run under it, and every container
    and importer task (`tasks`: backend_local.TaskRecord, state COMPLETE / CACHED / FAILED / IMPORTED, with the
    launcher's planned downloads when a pipeline_root is modelled)."""

    pods: list[PodSpecValues] = dataclasses.field(default_factory=list)
    tasks: list = dataclasses.field(default_factory=list)

    def cache_hits(self) -> list[str]:
        return [t.task for t in self.tasks if t.state == "CACHED"]

    def downloaded_bytes(self, task: str) -> int:
        """Bytes the launcher of `task` would copy into its pod (summed over its runs under this block)."""
        return sum(t.downloaded_bytes for t in self.tasks if t.task == task)

    def pod(self, task: str) -> PodSpecValues:
        found = [p for p in self.pods if p.task == task]
        if len(found) != 1:
            raise KeyError(f"task {task!r}: {len(found)} pods recorded under strict_local (tasks: "
                           f"{sorted({p.task for p in self.pods})})")
        return found[0]


# k8s.io/apimachinery/pkg/api/resource ParseQuantity: <signed number><suffix>, suffix one of the binary SI
# (Ki..Ei), decimal SI (n, u, m, "", k, M, G, T, P, E) or a decimal exponent (e3, E-2).
_QUANTITY = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
_QUANTITY_ERROR = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"

_lock = threading.RLock()
_depth = 0
_installed: list[tuple[Any, str, Any, Any]] = []  # (owner, attribute, original raw value, replacement)
_runs: list[StrictRun] = []
_dag_stack = threading.local()  # per thread: the DAG components kfp.local is running, innermost last


def _current_dag() -> tuple[str, Any] | None:
    stack = getattr(_dag_stack, "stack", None)
    return stack[-1] if stack else None


def _missing_parent_inputs(task_spec, io_store) -> list[tuple[str, str, str]]:
    local = io_store._parent_input_data  # only this DAG's own inputs, as the driver has them
    missing = []
    for name, spec in task_spec.inputs.parameters.items():
        if spec.HasField("component_input_parameter") and spec.component_input_parameter not in local:
            missing.append(("parameter", spec.component_input_parameter, name))
    for name, spec in task_spec.inputs.artifacts.items():
        if spec.HasField("component_input_artifact") and spec.component_input_artifact not in local:
            missing.append(("artifact", spec.component_input_artifact, name))
    return missing


def _strict_task_arguments(task_name: str, task_spec, io_store) -> dict:
    """The task's inputs as the driver resolves them: componentInput* only from the immediate parent DAG."""
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    missing = _missing_parent_inputs(task_spec, io_store)
    if missing:
        dag = _current_dag()
        where = f" (in DAG {dag[0]})" if dag else ""
        raise BackendResolutionError(
            task_name, missing[0][1],
            "; ".join(f"input {name!r}: parent DAG does not have input {kind} {key}" for kind, key, name in missing)
            + f"{where}. kfp.local would find it in an enclosing DAG; the backend driver looks only in the "
              "immediate parent DAG's inputs: pass it to the task as an argument or register the channel "
              "(PipelineTask.register_pipeline_channels)",
            RULES["R1"].citation)
    args = OrchestratorUtils.make_task_arguments(task_spec.inputs, io_store)
    backend_local.check_arguments(task_name, args)  # a dsl.OneOf the driver cannot resolve (resolve.go)
    return args


def _strict_get_parent_input(self, key):
    """IOStore.get_parent_input without the walk up the enclosing DAGs (driver: resolve.go)."""
    if key in self._parent_input_data:
        return self._parent_input_data[key]
    raise _ParentInputMissing(f"parent DAG does not have input parameter {key}")


def _eval_condition(task_name: str, condition: str, inputs: dict) -> bool:
    """A KFP trigger condition (CEL over the task's own inputs, expression.go Condition) in Python."""
    values, expr = {}, condition
    for i, (quote, name) in enumerate(dict.fromkeys(_CONDITION_REF.findall(condition))):
        if name not in inputs:
            raise BackendResolutionError(
                task_name, name, f"the condition {condition!r} reads inputs.parameter_values['{name}'], which is not "
                "an input of the task: the driver evaluates conditions over the task's own inputs (CEL: no such key)",
                RULES["R7"].citation)
        var = f"_kfp_value_{i}"
        expr = expr.replace(f"inputs.parameter_values[{quote}{name}{quote}]", var)
        values[var] = inputs[name]
    if "inputs." in expr:
        raise BackendResolutionError(task_name, "", f"strict_local cannot evaluate the condition {condition!r} "
                                     "(only inputs.parameter_values[...] references are supported)",
                                     RULES["R7"].citation)
    expr = re.sub(r"!(?!=)", " not ", expr.replace("&&", " and ").replace("||", " or "))
    names = {"__builtins__": {}, "int": int, "float": float, "str": str, "bool": bool,
             "true": True, "false": False, "null": None}
    try:
        result = eval(expr, names, values)  # noqa: S307 - the expression comes from the compiled spec
    except Exception as err:  # the driver fails the run on an evaluation error; so does strict mode
        raise BackendResolutionError(task_name, "", f"condition {condition!r}: evaluation error: {err}",
                                     RULES["R7"].citation) from err
    if not isinstance(result, bool):
        raise BackendResolutionError(task_name, "", f"condition {condition!r}: evaluation error: return type is "
                                     f"not bool, got {result!r}", RULES["R7"].citation)
    return result


def _strict_evaluate_condition(condition, io_store):
    """ConditionEvaluator.evaluate_condition over the condition task's own resolved inputs (dag.go)."""
    dag = _current_dag()
    if dag is None:
        raise BackendResolutionError("?", "", f"strict_local: condition {condition!r} evaluated outside a DAG",
                                     RULES["R7"].citation)
    matches = [(name, task) for name, task in dag[1].dag.tasks.items() if task.trigger_policy.condition == condition]
    if not matches:
        raise BackendResolutionError("?", "", f"strict_local: no task of DAG {dag[0]} has the condition {condition!r}",
                                     RULES["R7"].citation)
    results = {name: _eval_condition(name, condition, _strict_task_arguments(name, task, io_store))
               for name, task in matches}
    if len(set(results.values())) != 1:
        raise BackendResolutionError(", ".join(results), "", f"strict_local: tasks with the same condition "
                                     f"{condition!r} evaluate differently ({results}); rename one group",
                                     RULES["R7"].citation)
    if not next(iter(results.values())):
        backend_local.not_triggered(results)  # dag.go: a not-triggered DAG execution is CANCELED
    return next(iter(results.values()))


def _go_float(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _quantity(task_name: str, label: str, value: str, name: str) -> str:
    if not _QUANTITY.match(value):
        raise BackendResolutionError(task_name, name, f"{label} is {value!r}: failed to init podSpecPatch: "
                                     f"{_QUANTITY_ERROR}", RULES["R2"].citation)
    return value


def _pod_spec_values(task_name: str, dag_name: str, container, component, args: dict) -> PodSpecValues:
    """What initPodSpecPatch (driver.go) makes of the container's resources and image, or the error it hits."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    declared = component.input_definitions.parameters
    string_type = pipeline_spec_pb2.ParameterType.STRING

    def resolve(raw: str, label: str, consequence: str) -> str:
        match = _CHANNEL.search(raw) if raw else None
        if not match:
            return raw
        name = match.group(1)
        if name not in args:
            raise BackendResolutionError(task_name, name, f"{label} is {raw!r}, but the task has no input "
                                         f"{name!r}: executorInput did not contain container Image input parameter",
                                         RULES["R1"].citation)
        value = args[name]
        if name in declared and declared[name].parameter_type == string_type and not isinstance(value, str):
            value = json.dumps(value)  # the driver converts values of STRING component inputs to text
        if not isinstance(value, str):
            raise BackendResolutionError(
                task_name, name, f"{label} reads input parameter {name!r} with GetStringValue(), but its value "
                f"{value!r} is a {type(value).__name__}, not a string: on the cluster it reads as \"\" and the "
                f"backend {consequence}. Make the pipeline parameter a string (e.g. gpus: str = \"1\")",
                RULES["R2"].citation)
        return value

    fields = {label: consequence for _, label, consequence in _POD_SPEC_FIELDS}
    res = container.resources
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    for target, new, old, kind, label in (
            (limits, res.resource_memory_limit, res.memory_limit, "memory", "resources.resourceMemoryLimit"),
            (requests, res.resource_memory_request, res.memory_request, "memory", "resources.resourceMemoryRequest"),
            (limits, res.resource_cpu_limit, res.cpu_limit, "cpu", "resources.resourceCpuLimit"),
            (requests, res.resource_cpu_request, res.cpu_request, "cpu", "resources.resourceCpuRequest")):
        if new:  # getPodResource: the new field wins; "" after resolution fails ParseQuantity
            target[kind] = _quantity(task_name, label, resolve(new, label, fields[label]), label)
        elif old:
            target[kind] = _go_float(old) + ("G" if kind == "memory" else "")  # fmt "%vG" / "%v" of a float64
    acc = res.accelerator
    acc_type = resolve(acc.resource_type, "resources.accelerator.resourceType",
                       fields["resources.accelerator.resourceType"]) if acc.resource_type else acc.type
    acc_count = resolve(acc.resource_count, "resources.accelerator.resourceCount",
                        fields["resources.accelerator.resourceCount"]) if acc.resource_count else (
        str(acc.count) if acc.count > 0 else "")
    if acc_type and acc_count:
        _quantity(task_name, "resources.accelerator.resourceCount", acc_count, "resources.accelerator.resourceCount")
        if not re.fullmatch(r"\d+", acc_count):
            raise BackendResolutionError(task_name, "resources.accelerator.resourceCount",
                                         f"accelerator count {acc_count!r}: Kubernetes accepts only whole numbers "
                                         "for extended resources such as GPUs", RULES["R2"].citation)
        limits[acc_type] = acc_count
    image = resolve(container.image, "image", fields["image"])
    if not image:
        raise BackendResolutionError(task_name, "image", "the container image resolves to \"\": Kubernetes rejects "
                                     "the pod (spec.containers[0].image: Required value)", RULES["R2"].citation)
    return PodSpecValues(task_name, dag_name, image, limits, requests)


def _wrap_execute_single_task(original):
    def execute_single_task(task_name, task_spec, pipeline_resource_name, components, executors, io_store,
                            pipeline_root, runner, unique_pipeline_id, fail_stack):
        args = _strict_task_arguments(task_name, task_spec, io_store)
        component = components[task_spec.component_ref.name]
        executor = executors.get(component.executor_label)
        if executor is not None and executor.WhichOneof("spec") == "container":
            dag = _current_dag()
            pod = _pod_spec_values(task_name, dag[0] if dag else "root", executor.container, component, args)
            with _lock:
                for run in _runs:
                    run.pods.append(pod)
        return backend_local.execute(task_name, task_spec, component, executor, args, pipeline_root,
                                     pipeline_resource_name, lambda: original(
                                         task_name=task_name, task_spec=task_spec,
                                         pipeline_resource_name=pipeline_resource_name, components=components,
                                         executors=executors, io_store=io_store, pipeline_root=pipeline_root,
                                         runner=runner, unique_pipeline_id=unique_pipeline_id, fail_stack=fail_stack))

    return execute_single_task


def _strict_build_nested_dag_arguments(task_name, task_spec, component_spec, io_store):
    """task_spec_utils.build_nested_dag_arguments without the fill-in from the enclosing DAG by name."""
    args = _strict_task_arguments(task_name, task_spec, io_store)
    for name, param in component_spec.input_definitions.parameters.items():
        if name not in args and not param.is_optional and not param.HasField("default_value"):
            raise BackendResolutionError(task_name, name, f"neither value nor default value provided for "
                                         f"non-optional parameter {name!r} (kfp.local would take it from the "
                                         "enclosing DAG by name)", RULES["R10"].citation)
    if "-iteration-" in task_name and any(name not in args for name in component_spec.input_definitions.artifacts):
        raise BackendResolutionError(task_name, "", "ParallelFor over artifacts: artifact iterator not implemented "
                                     "yet in the KFP backend", RULES["R8"].citation)
    return args


def _strict_loop_iteration_task_spec(original_task_spec, loop_item, loop_task_name):
    """One iteration of a parameter ParallelFor as the backend runs it (dag.go: each iteration DAG gets the item
    under the iterator's item_input and every other input of the loop task as that task resolved it).
    kfp.local 2.17's task_spec_utils.create_parameter_loop_iteration_task_spec replaces every input of the
    loop task that is another task's output with the loop item, so a loop body reading check-params' GPU
    limit or the download's data_uri would get the item instead."""
    from kfp.compiler import pipeline_spec_builder
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec = pipeline_spec_pb2.PipelineTaskSpec()
    spec.CopyFrom(original_task_spec)
    item_input = original_task_spec.parameter_iterator.item_input
    spec.inputs.parameters[item_input].runtime_value.constant.CopyFrom(pipeline_spec_builder.to_protobuf_value(loop_item))
    spec.ClearField("parameter_iterator")
    spec.ClearField("artifact_iterator")
    return spec


def _wrap_run_parallel_for_task(original):
    """The loop's items as the DAG driver resolves them: from the loop task's own inputs (dag.go: the iterator's
    items are read from the DAG execution's resolved inputs, "cannot find input parameter"), which resolve like
    any task's inputs (a sibling task's output, or an input of the parent DAG). kfp.local 2.17 looks the items
    up only among the enclosing DAG's inputs or as a task output named "Output", so a ParallelFor over any
    other output of a task (check-params' train_plan) fails there although the backend runs it. The resolved
    value is offered under the item input's name while the loop starts, and removed afterwards."""
    def run_parallel_for_task(**kwargs):
        spec, io_store, task_name = kwargs["task_spec"], kwargs["io_store"], kwargs["task_name"]
        items = spec.parameter_iterator.items
        if spec.WhichOneof("iterator") != "parameter_iterator" or not items.HasField("input_parameter"):
            return original(**kwargs)
        name = items.input_parameter
        args = _strict_task_arguments(task_name, spec, io_store)
        if name not in args:
            raise BackendResolutionError(task_name, name, f"ParallelFor items: cannot find input parameter {name!r} "
                                         "among the loop task's inputs", RULES["R7"].citation)
        backend_local.loop_started(task_name, io_store, len(args[name]) if isinstance(args[name], list) else 0)
        present = name in io_store._parent_input_data
        io_store._parent_input_data.setdefault(name, args[name])
        try:
            return original(**kwargs)
        finally:
            if not present:
                io_store._parent_input_data.pop(name, None)

    return run_parallel_for_task


def _wrap_run_enhanced_dag(original, components_name):
    def run_enhanced_dag(*args, **kwargs):
        dag_component_spec = kwargs.get("dag_component_spec", args[1] if len(args) > 1 else None)
        components = kwargs.get("components", args[3] if len(args) > 3 else {}) or {}
        name = components_name(components, dag_component_spec)
        stack = getattr(_dag_stack, "stack", None)
        if stack is None:
            stack = _dag_stack.stack = []
        stack.append((name, dag_component_spec))
        try:
            return original(*args, **kwargs)
        finally:
            stack.pop()

    return run_enhanced_dag


def _component_name(components: dict, spec) -> str:
    for name, comp in components.items():
        if comp is spec:
            return name
    return "root"


def _install() -> None:
    from kfp.local import io as local_io
    from kfp.local.orchestrator import enhanced_dag_orchestrator, task_executor, task_spec_utils

    needed = [(local_io.IOStore, "get_parent_input"), (local_io.IOStore(), "_parent_input_data"),
              (task_executor, "execute_single_task"), (task_spec_utils, "build_nested_dag_arguments"),
              (enhanced_dag_orchestrator, "run_enhanced_dag"), (enhanced_dag_orchestrator.ConditionEvaluator,
                                                                "evaluate_condition"),
              (enhanced_dag_orchestrator, "_run_parallel_for_task"),
              (task_spec_utils, "create_parameter_loop_iteration_task_spec")]
    lacking = [f"{getattr(owner, '__name__', owner)}.{attr}" for owner, attr in needed if not hasattr(owner, attr)]
    if lacking:
        import kfp
        raise RuntimeError(f"strict_local: kfp {kfp.__version__} lacks {', '.join(lacking)}; it was written against "
                           "kfp 2.17.0's kfp.local")
    originals = {
        "execute_single_task": task_executor.execute_single_task,
        "run_enhanced_dag": enhanced_dag_orchestrator.run_enhanced_dag,
        "_run_parallel_for_task": enhanced_dag_orchestrator._run_parallel_for_task,
    }
    patches = [
        (local_io.IOStore, "get_parent_input", _strict_get_parent_input),
        (task_executor, "execute_single_task", _wrap_execute_single_task(originals["execute_single_task"])),
        (task_spec_utils, "build_nested_dag_arguments", _strict_build_nested_dag_arguments),
        (enhanced_dag_orchestrator, "run_enhanced_dag",
         _wrap_run_enhanced_dag(originals["run_enhanced_dag"], _component_name)),
        (enhanced_dag_orchestrator.ConditionEvaluator, "evaluate_condition",
         staticmethod(_strict_evaluate_condition)),
        (enhanced_dag_orchestrator, "_run_parallel_for_task",
         _wrap_run_parallel_for_task(originals["_run_parallel_for_task"])),
        (task_spec_utils, "create_parameter_loop_iteration_task_spec", _strict_loop_iteration_task_spec),
    ]
    for owner, attr, replacement in patches:
        raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        setattr(owner, attr, replacement)
        _installed.append((owner, attr, raw, replacement))
    for owner, attr, replacement in backend_local.patches():  # cache, DAG states, OneOf (layered on the above)
        raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        setattr(owner, attr, replacement)
        _installed.append((owner, attr, raw, replacement))


def _uninstall() -> None:
    while _installed:
        owner, attr, original, replacement = _installed.pop()
        current = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if current is replacement:
            setattr(owner, attr, original)
        else:
            warnings.warn(f"strict_local: {getattr(owner, '__name__', owner)}.{attr} was replaced by someone else "
                          "while strict mode was on; leaving that replacement in place", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def strict_local(cache: Any = None, pipeline_root: str | None = None, backend: str = "2.16.0") -> Iterator[StrictRun]:
    """Run kfp.local (kfp 2.17) with the KFP backend driver's input resolution; yields a `StrictRun`.

    cache: a `cluster.backend_cache.CacheStore` (a directory that outlives the run): cacheable container tasks
    whose cache key matches an earlier successful execution are CACHED and not executed, as on the backend.
    pipeline_root: the cluster's pipeline root the run is modelled against (e.g. "minio://mlpipeline/v2/
    artifacts"): every container task's input artifacts are "downloaded" as the launcher does, and one it cannot
    open fails (`LauncherDownloadError`); kfp.local's local pipeline_root stands for it. backend: "2.15.0",
    "2.16.0" or "2.17.0" (DAG state propagation and the OneOf message differ). Always on: the DAG bookkeeping
    and the dsl.OneOf rule (`OneOfResolutionError`). See cluster/backend_local.py for these rules.

    While a block is open these kfp.local functions are replaced, process-wide (all threads see them); all
    are restored when the outermost open block exits. Nested and concurrent blocks share one installation
    (a counter under a lock); each block's `StrictRun` records the pods of every task run while it is open.
    The replaced functions:

    - `kfp.local.io.IOStore.get_parent_input`: looks a key up in the current DAG's own inputs only, no walk
      up the enclosing DAGs; a miss raises "parent DAG does not have input parameter <key>" (resolve.go).
    - `kfp.local.orchestrator.task_executor.execute_single_task` (every container task): before the task runs,
      every componentInputParameter/componentInputArtifact of the task must be an input of the immediate
      parent DAG (R1), and the runtime pod-spec values are resolved as the driver does (driver.go
      initPodSpecPatch, resolve.go resolvePodSpecInputRuntimeParameter): accelerator type and count, cpu and
      memory limits/requests, image. A placeholder whose value is not a string fails with the GetStringValue()
      explanation (R2); a value that is not a Kubernetes quantity, a fractional GPU count and an empty image
      fail too. The values are recorded in the yielded `StrictRun.pods` (`run.pod("train").limits`).
    - `kfp.local.orchestrator.task_spec_utils.build_nested_dag_arguments` (every nested DAG / condition group /
      loop iteration): the DAG receives only what its task passes (plus the DAG's defaults); kfp.local's fill-in
      by name from the enclosing DAG is gone; a non-optional input without value or default fails (R10).
    - `kfp.local.orchestrator.enhanced_dag_orchestrator.ConditionEvaluator.evaluate_condition`: the condition is
      evaluated over the condition task's own resolved inputs (dag.go: expr.Condition(executorInput, ...));
      a reference that is not a task input, an evaluation error or a non-bool result raises instead of
      kfp.local's silent skip of the branch (R7).
    - `kfp.local.orchestrator.enhanced_dag_orchestrator._run_parallel_for_task`: a ParallelFor's items are the
      loop task's own resolved input (dag.go), so a loop over any output of a task runs, as on the backend
      (kfp.local alone finds only a task output named "Output" or an input of the enclosing DAG); an items
      input the loop task does not have fails (R7).
    - `kfp.local.orchestrator.task_spec_utils.create_parameter_loop_iteration_task_spec`: an iteration gets the
      item under the iterator's item input and keeps every other input of the loop task (kfp.local alone
      replaces each input that is another task's output with the item).
    - `kfp.local.orchestrator.enhanced_dag_orchestrator.run_enhanced_dag`: wrapped only to know which DAG is
      running (for the condition above and for messages); behaviour unchanged.

    Failures raise `BackendResolutionError` naming the task and the parameter. Not changed: task outputs are
    still looked up as kfp.local does (use `check_pipeline_spec` R5 for sibling-only outputs), the platform spec
    (kfp.local never sees it: secrets, node selectors, tolerations are checked statically by R1/R2/R6/R11),
    dsl.OneOf artifact outputs (R3), and artifact iterators beyond the error above (R8). Errors raised inside
    a ParallelFor iteration are logged by kfp.local and surface as its "Inner task failed" RuntimeError.
    """
    global _depth
    session = backend_local.open_session(cache, pipeline_root, backend)
    run = StrictRun(tasks=session.tasks)
    with _lock:
        if _depth == 0:
            try:
                _install()
            except BaseException:
                _uninstall()
                backend_local.close_session(session)
                raise
        _depth += 1
        _runs.append(run)
    try:
        yield run
    finally:
        backend_local.close_session(session)
        with _lock:
            _runs.remove(run)
            _depth -= 1
            if _depth == 0:
                _uninstall()
