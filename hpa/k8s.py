"""Kubernetes helpers shared by `hpa.katib` and `hpa.distributed`: schema validation, custom objects,
and the create-wait-clean-up loop of the in-cluster launchers.

Schemas: the Katib OpenAPI file and the Trainer/Training Operator CRDs are vendored in `hpa/schemas/`
(source, tag and git blob of each file in its README); `$HPA_SCHEMAS_DIR` points elsewhere. Validation
is *strict*: an object with a property the schema does not define is refused, as `kubectl apply`
(field validation `Strict`) and Katib's webhook would, so a typo in a field name is caught here.

Client: `custom_objects_api()` uses the in-cluster service account when there is one, else kubeconfig;
tests pass an `ApiClient` whose `Configuration(host=...)` points at a loopback stand-in server.

Clean-up: `create_and_wait` gives the created object an ownerReference to the KFP launcher's own Pod
(when the pod identity is known) and deletes the object itself when the wait fails, times out, or the
process gets SIGTERM/SIGINT (a cancelled KFP run), so an Experiment or TrainJob never outlives its run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from dataclasses import fields
from typing import Callable

import yaml

from hpa import config
from hpa.errors import ConfigError, HPAError

log = logging.getLogger(__name__)

KATIB_OPENAPI = "katib/openapi-spec.swagger.json"
# Trainer release -> its TrainJob CRD (hpa/schemas/README.md). The field that patches the runtime's pods
# is `podTemplateOverrides` in v2.1.0 and `runtimePatches` from v2.2.0 on.
TRAINJOB_CRDS = {
    "v2.1.0": "trainer-v2/trainer.kubeflow.org_trainjobs.v2.1.0.yaml",
    "v2.2.0": "trainer-v2/trainer.kubeflow.org_trainjobs.v2.2.0.yaml",
    "v2.3.0": "trainer-v2/trainer.kubeflow.org_trainjobs.v2.3.0.yaml",
}
PYTORCHJOB_CRD = "training-operator/kubeflow.org_pytorchjobs.yaml"
PACKAGE_SCHEMAS = Path(__file__).resolve().with_name("schemas")
_OPENAPI_URI = "urn:hpa:katib-openapi"

# Profile namespaces have Istio injection on; a sidecar keeps a finished training pod Running (and its
# Job/TrainJob never completes) and intercepts the DDP rendezvous traffic.
ISTIO_INJECT = "sidecar.istio.io/inject"
NO_ISTIO = {ISTIO_INJECT: "false"}


REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds per API request: a stuck API server is an error, not a hang


class ClusterError(HPAError):
    """The Kubernetes API refused a request, or a job failed or timed out."""


class Cancelled(ClusterError):
    """The launcher got SIGTERM or SIGINT while it waited (a cancelled KFP run); the object was deleted."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def schemas_dir() -> Path:
    """`$HPA_SCHEMAS_DIR` when set (it must hold katib/, trainer-v2/, training-operator/), else the
    copies vendored in the package (`hpa/schemas`, shipped in the wheel as package data)."""
    override = os.environ.get("HPA_SCHEMAS_DIR", "")
    if override:
        if not (Path(override) / KATIB_OPENAPI).is_file():
            raise ConfigError(f"HPA_SCHEMAS_DIR={override!r}: expected a folder with {KATIB_OPENAPI} (unset it to use the vendored hpa/schemas)")
        return Path(override)
    return PACKAGE_SCHEMAS


def _require_schemas() -> Path:
    found = schemas_dir()
    if not (found / KATIB_OPENAPI).is_file():
        raise ConfigError(f"schema files not found in {found}: the package is incomplete (reinstall hpa-kfp) or set HPA_SCHEMAS_DIR")
    return found


def _strict(node):
    """Close every object schema that lists properties (no additionalProperties, no preserve-unknown)."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


@functools.lru_cache(maxsize=None)
def _openapi_registry(root: Path):
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = _strict(json.loads((root / KATIB_OPENAPI).read_text()))
    return Registry().with_resource(_OPENAPI_URI, Resource(contents=doc, specification=DRAFT202012))


@functools.lru_cache(maxsize=None)
def _openapi_validator(root: Path, name: str):
    import jsonschema

    schema = {"$ref": f"{_OPENAPI_URI}#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=_openapi_registry(root))


@functools.lru_cache(maxsize=None)
def _crd_schema(root: Path, relpath: str, version: str) -> dict:
    crd = yaml.safe_load((root / relpath).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise ConfigError(f"{relpath}: no version {version!r} in the CRD")


def crd_schema(relpath: str, version: str) -> dict:
    """The openAPIV3Schema of `version` in the CRD file `relpath`, as published (not made strict; do not modify)."""
    return _crd_schema(_require_schemas(), relpath, version)


@functools.lru_cache(maxsize=None)
def _crd_validator(root: Path, relpath: str, version: str):
    import jsonschema

    return jsonschema.Draft202012Validator(_strict(_crd_schema(root, relpath, version)))


def _raise_first(validator, obj: dict, what: str) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ConfigError(f"{what} does not match its schema at {where}: {error.message[:300]}")


def validate_openapi(obj: dict, schema_name: str, what: str) -> None:
    """Validate against `components.schemas[schema_name]` of the Katib OpenAPI file (with core k8s types)."""
    _raise_first(_openapi_validator(_require_schemas(), schema_name), obj, what)


def validate_crd(obj: dict, relpath: str, what: str) -> None:
    """Validate a custom object against the openAPIV3Schema of its CRD (version from apiVersion)."""
    version = obj.get("apiVersion", "").rsplit("/", 1)[-1]
    _raise_first(_crd_validator(_require_schemas(), relpath, version), obj, what)


def validate_job(job: dict, what: str) -> None:
    """A batch/v1 Job: the Katib OpenAPI file has no `v1.Job`, so check its frame by hand and
    validate `spec.template` as `io.k8s.api.core.v1.PodTemplateSpec` (strict)."""
    allowed = {"apiVersion", "kind", "metadata", "spec"}
    extra = set(job) - allowed
    if job.get("apiVersion") != "batch/v1" or job.get("kind") != "Job" or extra:
        raise ConfigError(f"{what}: expected apiVersion batch/v1, kind Job and only {sorted(allowed)} (extra: {sorted(extra)})")
    spec_keys = {"template", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "completions", "parallelism"}
    if "template" not in job.get("spec", {}) or set(job["spec"]) - spec_keys:
        raise ConfigError(f"{what}: spec must have template and only {sorted(spec_keys)}")
    validate_openapi(job["spec"]["template"], "io.k8s.api.core.v1.PodTemplateSpec", f"{what} spec.template")


def secret_env(secret_name: str, keys: dict[str, str]) -> list[dict]:
    """Env entries that read each key of a Kubernetes secret (the value never appears in a manifest)."""
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}} for key, env in keys.items()]


def container_env(s3_endpoint: str = config.S3_DEFAULT_ENDPOINT) -> list[dict]:
    """S3 endpoint plus the keys of KFP's object store secret (mlpipeline-minio-artifact, served by SeaweedFS
    since KFP 2.15) as env via secretKeyRef: no secret value in the manifest."""
    return [
        {"name": "HPA_S3_ENDPOINT", "value": s3_endpoint},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # metric lines reach the collector as they are printed
        *secret_env(config.S3_SECRET_NAME, config.S3_SECRET_KEYS),
    ]


# The project images run as uid 1000 (images/Dockerfile*); refuse to start anything as root.
CONTAINER_SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False}


def pod_resources(cpu: str, memory: str, gpus: int, accelerator_type: str) -> dict:
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if gpus > 0:
        resources["limits"][accelerator_type] = str(gpus)
    return resources


def validate_placement(node_selector, tolerations, what: str) -> None:
    """node_selector: {label: value} strings; tolerations: a list of objects (their fields are checked
    against io.k8s.api.core.v1.Toleration when the pod spec is schema-validated)."""
    if not isinstance(node_selector, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in node_selector.items()):
        raise ConfigError(f"{what} node_selector {node_selector!r}: expected a JSON object of label: value strings")
    if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
        raise ConfigError(f"{what} tolerations {tolerations!r}: expected a JSON list of toleration objects")


def placement(node_selector: dict, tolerations: list) -> dict:
    """The pod spec fields that place training pods (only the non-empty ones)."""
    spec = {}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    return spec


def shm_volume(size: str) -> tuple[dict, dict]:
    """A RAM-backed /dev/shm: DataLoader workers pass batches through shared memory (64 MiB by default)."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}, {"name": "dshm", "mountPath": "/dev/shm"}


class _Dumper(yaml.SafeDumper):
    """Quotes every string that any YAML 1.1/1.2 reader could take for a number (PyYAML leaves `1e-05`
    plain, Go's yaml reads it as a float, and Katib's string fields would then fail to decode)."""


_NUMBER_LIKE = re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$|^0[xob]|^[-+]?\.?(inf|nan)$", re.I)


def _represent_str(dumper, value: str):
    style = "'" if _NUMBER_LIKE.search(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def load_yaml(path: str | Path) -> dict:
    try:
        obj = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict) or "kind" not in obj:
        raise ConfigError(f"{path}: expected one Kubernetes object with a kind")
    return obj


SERVICEACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def pod_namespace() -> str | None:
    """The namespace of this pod from its service-account mount, or None outside a pod."""
    try:
        return Path(SERVICEACCOUNT_NAMESPACE).read_text().strip() or None
    except OSError:
        return None


def current_namespace(default: str = "kubeflow") -> str:
    """The namespace this pod runs in (a KFP task's own profile namespace), else `default`."""
    return pod_namespace() or default

# The KFP v2 backend gives every executor (launcher) container its own pod's name and uid through the
# downward API: env KFP_POD_NAME (metadata.name) and KFP_POD_UID (metadata.uid), `commonEnvs` in
# kubeflow/pipelines backend/src/v2/compiler/argocompiler/common.go, set on the executor container in
# argocompiler/container.go (2.15.0, 2.16.0 and 2.17.0 alike; component/constants.go EnvPodName/EnvPodUID,
# read by component/launcher_v2.go). The component's Python runs as a child of the launcher and inherits them.
POD_NAME_ENV, POD_UID_ENV = "KFP_POD_NAME", "KFP_POD_UID"


def launcher_owner_reference(namespace: str) -> dict | None:
    """An ownerReference to this KFP task's own Pod, so that Kubernetes garbage-collects the created
    object when the run's pods are deleted (KFP's Argo deletes a finished workflow, and its pods, after
    its ttlStrategy: 3600 s in kubeflow/pipelines manifests/kustomize/third-party/argo/base/
    workflow-controller-configmap-patch.yaml, 2.17.0). None, with a log line saying why, when the pod
    identity is unknown (a local run) or the object goes to another namespace: Kubernetes treats a
    cross-namespace owner as absent and would delete the object at once."""
    name, uid = os.environ.get(POD_NAME_ENV, ""), os.environ.get(POD_UID_ENV, "")
    if not name or not uid:
        log.info("%s/%s not set (not a KFP pod): the created object gets no ownerReference; it is deleted on "
                 "failure or SIGTERM/SIGINT of this process only", POD_NAME_ENV, POD_UID_ENV)
        return None
    own = pod_namespace()
    if own != namespace:
        log.warning("this pod (%s) runs in namespace %s but the object goes to %s: no ownerReference (Kubernetes "
                    "allows owners only in the same namespace); it is deleted on failure or SIGTERM/SIGINT only",
                    name, own or "(unknown)", namespace)
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def custom_objects_api(api_client=None):
    """CustomObjectsApi for `api_client`, else in-cluster config, else kubeconfig."""
    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                # KUBECONFIG read now: the client reads it once, at import time.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
            except (config.ConfigException, OSError) as exc:
                raise ClusterError(f"no Kubernetes access: not in a cluster and no usable kubeconfig ({exc})") from None
    return client.CustomObjectsApi(api_client)


def read_crd(api, name: str) -> dict:
    """GET apiextensions.k8s.io/v1 customresourcedefinitions/<name> as a dict (raises ClusterError: a
    profile's service account often may not read cluster-scoped CRDs)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        response = client.ApiextensionsV1Api(api.api_client).read_custom_resource_definition(
            name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        raise _api_error(exc, f"cannot read CustomResourceDefinition {name}") from None
    except HTTPError as exc:
        raise ClusterError(f"cannot read CustomResourceDefinition {name}: {exc.__class__.__name__}") from None
    return json.loads(response.data)


def _server_message(exc) -> str:
    try:
        return json.loads(exc.body).get("message", exc.reason)
    except (TypeError, ValueError, AttributeError):
        return exc.reason


def _api_error(exc, what: str) -> ClusterError:
    return ClusterError(f"{what}: HTTP {exc.status} {_server_message(exc)}")


class Rejected(ClusterError):
    """The API server refused to create an object (`status`: its HTTP status, `message`: its reason)."""

    def __init__(self, text: str, status: int, message: str):
        super().__init__(text)
        self.status, self.message = status, message


def create_object(api, obj: dict, plural: str, namespace: str) -> dict:
    """POST a custom object with fieldValidation=Strict, so that a field the installed CRD lacks is an
    error instead of being dropped silently; a clash or a rejected object is one clear `Rejected`."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    group, version = obj["apiVersion"].split("/")
    what = f"{obj['kind']} {namespace}/{obj['metadata']['name']}"
    try:
        created = api.create_namespaced_custom_object(group, version, namespace, plural, obj, field_validation="Strict",
                                                      _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        message = _server_message(exc)
        raise Rejected(f"cannot create {what}: HTTP {exc.status} {message}", exc.status, message) from None
    except HTTPError as exc:
        raise ClusterError(f"cannot create {what}: {exc.__class__.__name__} talking to the API server") from None
    log.info("created %s", what)
    return created


def delete_object(api, obj: dict, plural: str, namespace: str, why: str) -> bool:
    """DELETE with propagationPolicy=Background (the operator's pods go too); True if this call deleted it.
    Used while cleaning up after another error, so a failure here is logged, not raised."""
    from kubernetes.client.exceptions import ApiException

    group, version = obj["apiVersion"].split("/")
    what = f"{obj['kind']} {namespace}/{obj['metadata']['name']}"
    try:
        api.delete_namespaced_custom_object(group, version, namespace, plural, obj["metadata"]["name"],
                                            propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            log.info("%s is already gone (%s)", what, why)
            return False
        log.error("could not delete %s (%s): HTTP %s %s; delete it by hand", what, why, exc.status, _server_message(exc))
        return False
    except Exception as exc:  # noqa: BLE001 - a dead connection must not hide the original error
        log.error("could not delete %s (%s): %s; delete it by hand", what, why, exc)
        return False
    log.warning("deleted %s (propagationPolicy=Background): %s", what, why)
    return True


class _SignalGuard:
    """While active (main thread only), SIGTERM and SIGINT raise Cancelled, except inside `deferred()`,
    where they are held until the block ends, and after `shield()`, where they are ignored (clean-up runs)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, what: str):
        self.what, self.pending, self.deferring, self.shielded = what, None, False, False
        self.previous = {}

    def _handle(self, signum, frame):
        if self.shielded:
            return
        if self.deferring:
            self.pending = signum
            return
        self.shielded = True
        raise Cancelled(f"{self.what}: cancelled by {signal.Signals(signum).name}", signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        else:
            log.debug("not in the main thread: SIGTERM/SIGINT handlers for %s not installed", self.what)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None and not self.shielded:
            self.shielded = True
            raise Cancelled(f"{self.what}: cancelled by {signal.Signals(self.pending).name}", self.pending)

    def shield(self) -> None:
        self.shielded = True


def create_and_wait(api, obj: dict, plural: str, namespace: str, outcome: Callable[[dict], str | None],
                    timeout: float, poll: float = 5.0) -> dict:
    """Create `obj` and wait for it (see `wait_for`); the object does not outlive a failed launcher.

    - ownerReference to the KFP task's Pod when known (`launcher_owner_reference`): garbage-collected with the run.
    - The wait failing, timing out, or SIGTERM/SIGINT (Argo's emissary forwards the SIGTERM of a cancelled
      run to the process group of the main container: argoproj/argo-workflows cmd/argoexec/commands/
      emissary.go and workflow/executor/osspecific/signal_darwin.go, which signal_linux.go links to)
      delete it (Background propagation) and re-raise; a signal raises `Cancelled`, so the process exits
      non-zero. Success keeps it (its status and the trials' records stay readable until the run goes).
    """
    obj = json.loads(json.dumps(obj))
    owner = launcher_owner_reference(namespace)
    if owner is not None:
        obj["metadata"]["ownerReferences"] = [*obj["metadata"].get("ownerReferences", []), owner]
    what = f"{obj['kind']} {namespace}/{obj['metadata']['name']}"
    with _SignalGuard(what) as guard:
        created = False
        try:
            with guard.deferred():  # a signal during the POST is acted on once it is known whether it created the object
                create_object(api, obj, plural, namespace)
                created = True
            return wait_for(api, obj, plural, namespace, outcome, timeout, poll)
        except BaseException as exc:
            guard.shield()
            if not created:
                raise
            why = str(exc).removeprefix(what).lstrip(": ") or exc.__class__.__name__
            deleted = delete_object(api, obj, plural, namespace, why[:300])
            if isinstance(exc, Cancelled):
                raise Cancelled(f"{exc}; {'deleted' if deleted else 'could not delete'} {what}", exc.signum) from None
            raise




def wait_for(api, obj: dict, plural: str, namespace: str, outcome: Callable[[dict], str | None],
             timeout: float, poll: float = 5.0) -> dict:
    """Poll the object until `outcome(obj)` returns "succeeded"; "failed: msg" or the timeout raise.
    Up to 3 consecutive transport errors (connection reset, read timeout) are waited out."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    group, version = obj["apiVersion"].split("/")
    name = obj["metadata"]["name"]
    what = f"{obj['kind']} {namespace}/{name}"
    deadline = time.monotonic() + timeout
    transport_errors = 0
    while True:
        try:
            current = api.get_namespaced_custom_object(group, version, namespace, plural, name, _request_timeout=REQUEST_TIMEOUT)
            transport_errors = 0
        except ApiException as exc:
            raise _api_error(exc, f"cannot read {what}") from None
        except HTTPError as exc:
            transport_errors += 1
            if transport_errors > 3:
                raise ClusterError(f"cannot read {what}: {exc.__class__.__name__} ({transport_errors} times in a row)") from None
            log.warning("reading %s: %s; retrying", what, exc.__class__.__name__)
            time.sleep(poll)
            continue
        state = outcome(current)
        if state == "succeeded":
            return current
        if state and state.startswith("failed"):
            raise ClusterError(f"{what} {state}")
        if time.monotonic() + poll > deadline:
            raise ClusterError(f"{what} did not finish within {timeout:g} s (last state: {state or 'pending'})")
        time.sleep(poll)


def condition_outcome(obj: dict, success: str, failure: str = "Failed") -> str | None:
    """'succeeded' / 'failed: <reason: message>' / the latest true condition type (or None)."""
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for cond in conditions:
        if cond.get("type") == failure:
            return f"failed: {cond.get('reason', '')}: {cond.get('message', '')}".rstrip(": ")
    if any(c.get("type") == success for c in conditions):
        return "succeeded"
    return conditions[-1]["type"] if conditions else None


# ---------------------------------------------------------------- CLI helpers of the renderers

def _json_arg(kind: type):
    def parse(text: str):
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {text!r}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {text!r}")
        return value
    return parse


def add_config_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), choices: dict | None = None) -> None:
    """One --option per dataclass field (JSON for dict/list fields); --image defaults to None so that
    the caller picks the CPU or CUDA image from hpa.config for the GPU count (`default_image`)."""
    defaults = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, value = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.name == "image":
            parser.add_argument(flag, default=None, help="image of the pods (default: $HPA_CUDA_IMAGE when they get GPUs, else $HPA_IMAGE, or their defaults)")
        elif isinstance(value, (dict, list)):
            parser.add_argument(flag, type=_json_arg(type(value)), default=value, help=f"JSON (default {json.dumps(value)})")
        else:
            parser.add_argument(flag, type=type(value), default=value, **({"choices": choices[f.name]} if f.name in (choices or {}) else {}))


def default_image(image: str | None, gpus: int) -> str:
    """The CLI's image: the one given, else the CUDA image for GPU pods and the CPU image otherwise."""
    return image if image is not None else (config.cuda_image() if gpus > 0 else config.image())
