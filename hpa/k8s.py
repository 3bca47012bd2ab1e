"""Kubernetes helpers shared by `hpa.katib` and `hpa.distributed`: schema validation and custom objects.

Schemas: the Katib OpenAPI file and the Trainer/Training Operator CRDs are reference copies kept
outside the package (`../shared/schemas` next to the repository, or `$HPA_SCHEMAS_DIR`). Validation is
*strict*: an object with a property the schema does not define is refused, as `kubectl apply`
(field validation `Strict`) and Katib's webhook would, so a typo in a field name is caught here.

Client: `custom_objects_api()` uses the in-cluster service account when there is one, else kubeconfig;
tests pass an `ApiClient` whose `Configuration(host=...)` points at a loopback stand-in server.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

import yaml

from hpa import config
from hpa.errors import ConfigError, HPAError

log = logging.getLogger(__name__)

KATIB_OPENAPI = "katib/openapi-spec.swagger.json"
TRAINJOB_CRD = "trainer-v2/trainer.kubeflow.org_trainjobs.v2.3.0.yaml"
PYTORCHJOB_CRD = "training-operator/kubeflow.org_pytorchjobs.yaml"
_OPENAPI_URI = "urn:hpa:katib-openapi"


class ClusterError(HPAError):
    """The Kubernetes API refused a request, or a job failed or timed out."""


def schemas_dir() -> Path | None:
    """`$HPA_SCHEMAS_DIR`, else `shared/schemas` beside or inside the repository; None if absent."""
    repo = Path(__file__).resolve().parent.parent
    candidates = [os.environ.get("HPA_SCHEMAS_DIR", ""), repo.parent / "shared" / "schemas", repo / "shared" / "schemas"]
    for candidate in candidates:
        if candidate and (Path(candidate) / KATIB_OPENAPI).is_file():
            return Path(candidate)
    return None


def _require_schemas() -> Path:
    found = schemas_dir()
    if found is None:
        raise ConfigError("schema files not found: set HPA_SCHEMAS_DIR to a copy of shared/schemas (katib/, trainer-v2/, training-operator/)")
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
def _openapi_registry():
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = _strict(json.loads((_require_schemas() / KATIB_OPENAPI).read_text()))
    return Registry().with_resource(_OPENAPI_URI, Resource(contents=doc, specification=DRAFT202012))


@functools.lru_cache(maxsize=None)
def _openapi_validator(name: str):
    import jsonschema

    schema = {"$ref": f"{_OPENAPI_URI}#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=_openapi_registry())


@functools.lru_cache(maxsize=None)
def _crd_validator(relpath: str, version: str):
    import jsonschema

    crd = yaml.safe_load((_require_schemas() / relpath).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return jsonschema.Draft202012Validator(_strict(entry["schema"]["openAPIV3Schema"]))
    raise ConfigError(f"{relpath}: no version {version!r} in the CRD")


def _raise_first(validator, obj: dict, what: str) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ConfigError(f"{what} does not match its schema at {where}: {error.message[:300]}")


def validate_openapi(obj: dict, schema_name: str, what: str) -> None:
    """Validate against `components.schemas[schema_name]` of the Katib OpenAPI file (with core k8s types)."""
    _raise_first(_openapi_validator(schema_name), obj, what)


def validate_crd(obj: dict, relpath: str, what: str) -> None:
    """Validate a custom object against the openAPIV3Schema of its CRD (version from apiVersion)."""
    version = obj.get("apiVersion", "").rsplit("/", 1)[-1]
    _raise_first(_crd_validator(relpath, version), obj, what)


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
    """S3 endpoint plus the KFP MinIO secret as env via secretKeyRef (no secret value in the manifest)."""
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


def current_namespace(default: str = "kubeflow") -> str:
    """The namespace this pod runs in (a KFP task's own profile namespace), else `default`."""
    try:
        return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip() or default
    except OSError:
        return default


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


def _api_error(exc, what: str) -> ClusterError:
    try:
        message = json.loads(exc.body).get("message", exc.reason)
    except (TypeError, ValueError, AttributeError):
        message = exc.reason
    return ClusterError(f"{what}: HTTP {exc.status} {message}")


def create_object(api, obj: dict, plural: str, namespace: str) -> dict:
    """POST a custom object; a name clash or a rejected object is one clear ClusterError."""
    from kubernetes.client.exceptions import ApiException

    group, version = obj["apiVersion"].split("/")
    what = f"{obj['kind']} {namespace}/{obj['metadata']['name']}"
    try:
        created = api.create_namespaced_custom_object(group, version, namespace, plural, obj)
    except ApiException as exc:
        raise _api_error(exc, f"cannot create {what}") from None
    log.info("created %s", what)
    return created


def wait_for(api, obj: dict, plural: str, namespace: str, outcome: Callable[[dict], str | None],
             timeout: float, poll: float = 5.0) -> dict:
    """Poll the object until `outcome(obj)` returns "succeeded"; "failed: msg" or the timeout raise."""
    from kubernetes.client.exceptions import ApiException

    group, version = obj["apiVersion"].split("/")
    name = obj["metadata"]["name"]
    what = f"{obj['kind']} {namespace}/{name}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            raise _api_error(exc, f"cannot read {what}") from None
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
