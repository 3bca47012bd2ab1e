"""What the rendered Kubernetes manifests (Katib Experiments, TrainJobs, PyTorchJobs) are made of and how they are
checked, shared by `hpa.katib` and `hpa.train_distributed` (the API side is `hpa.k8s`).

Pods: `PodArgs` (the pods' namespace, image, resources, placement and S3 endpoint, a base of both launchers'
configs), the env, resources, /dev/shm, placement and securityContext blocks, and `default_image` (the CLIs' image).

Schemas: the Katib OpenAPI file and the Trainer/Training Operator CRDs are vendored in `hpa/schemas/`
(source, tag and git blob of each file in its README); `$HPA_SCHEMAS_DIR` points elsewhere. Validation
is *strict*: an object with a property the schema does not define is refused, as `kubectl apply`
(field validation `Strict`) and Katib's webhook would, so a typo in a field name is caught here.

YAML: `dump_yaml` (quotes number-like strings), `load_yaml` (one object), `write_manifest` (a file or stdout).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from hpa import config
from hpa.errors import ConfigError
from hpa.options import help_of, opt, require

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
# The project images run as uid 1000 (images/Dockerfile*); refuse to start anything as root.
CONTAINER_SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False}


# ---------------------------------------------------------------- the pods

@dataclass
class PodArgs:
    """The pods' namespace, image, resources, placement and S3 endpoint: the fields that the Katib trials
    (hpa.katib.KatibConfig) and the multi-node jobs (hpa.train_distributed.DistributedConfig) share."""

    namespace: str = opt("kubeflow", "Kubernetes namespace the objects are created in (a DNS label)")
    # Fixed by whoever renders: the pipeline passes the image chosen at compile time; this default (and
    # the CLIs', which pick by GPU count: IMAGE_OPTION) reads HPA_CUDA_IMAGE / HPA_IMAGE now.
    image: str = opt(default_factory=config.cuda_image, help="image of the pods")
    accelerator_type: str = config.pipeline_default("accelerator_type", help="Kubernetes resource name of the "
                                                     "accelerator")
    cpu: str = opt("8", "CPU request of each pod (a Kubernetes quantity)")
    memory: str = opt("32Gi", "memory request and limit of each pod (a Kubernetes quantity)")
    shm_size: str = opt("8Gi", "size of the RAM-backed /dev/shm of each pod (DataLoader workers)")
    node_selector: dict = opt(default_factory=dict, help="node labels the pods must run on, label: value")
    tolerations: list = opt(default_factory=list, help="tolerations of the pods (Kubernetes Toleration objects)")
    s3_endpoint: str = opt(config.S3_DEFAULT_ENDPOINT, "S3 endpoint host:port the pods read and write the store at")

    # The fields that hold store URIs, where {namespace} stands for the objects' namespace.
    STORE_FIELDS = ()

    def check_pods(self, what: str) -> None:
        """The checks of the shared fields: the namespace a DNS label, the placement well-formed."""
        require(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.namespace) is not None,
                f"{what} namespace {self.namespace!r}: expected a DNS label")
        validate_placement(self.node_selector, self.tolerations, what)

    def with_namespace(self):
        """A copy whose store URIs (STORE_FIELDS) have {namespace} (the default store prefix's placeholder)
        set to the objects' namespace."""
        return replace(self, **{name: config.expand_store_uri(getattr(self, name), self.namespace)
                                for name in self.STORE_FIELDS})


def pod_field(name: str, default):
    """A PodArgs field with another default (e.g. smaller pods for Katib trials), same help."""
    return opt(default, help_of(PodArgs, name))


# argparse overrides of add_options for --image: no default, so that the CLI picks by GPU count (default_image).
IMAGE_OPTION = {"image": {"default": None, "help": "image of the pods (default: $HPA_CUDA_IMAGE when they get "
                                                   "GPUs, else $HPA_IMAGE, or their defaults)"}}


def default_image(image: str | None, gpus: int) -> str:
    """The CLI's image: the one given, else the CUDA image for GPU pods and the CPU image otherwise."""
    return image if image is not None else (config.cuda_image() if gpus > 0 else config.image())


def secret_env(secret_name: str, keys: dict[str, str]) -> list[dict]:
    """Env entries that read each key of a Kubernetes secret (the value never appears in a manifest)."""
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
            for key, env in keys.items()]


def container_env(s3_endpoint: str = config.S3_DEFAULT_ENDPOINT) -> list[dict]:
    """S3 endpoint plus the keys of KFP's object store secret (mlpipeline-minio-artifact, served by SeaweedFS
    since KFP 2.15) as env via secretKeyRef: no secret value in the manifest."""
    return [
        {"name": "HPA_S3_ENDPOINT", "value": s3_endpoint},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # metric lines reach the collector as they are printed
        *secret_env(config.S3_SECRET_NAME, config.S3_SECRET_KEYS),
    ]


def pod_resources(cpu: str, memory: str, gpus: int, accelerator_type: str) -> dict:
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if gpus > 0:
        resources["limits"][accelerator_type] = str(gpus)
    return resources


def validate_placement(node_selector, tolerations, what: str) -> None:
    """node_selector: {label: value} strings; tolerations: a list of objects (their fields are checked
    against io.k8s.api.core.v1.Toleration when the pod spec is schema-validated)."""
    if not isinstance(node_selector, dict) or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in node_selector.items()):
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
    return ({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}},
            {"name": "dshm", "mountPath": "/dev/shm"})


# ---------------------------------------------------------------- vendored schemas, strict validation

def schemas_dir() -> Path:
    """`$HPA_SCHEMAS_DIR` when set (it must hold katib/, trainer-v2/, training-operator/), else the
    copies vendored in the package (`hpa/schemas`, shipped in the wheel as package data)."""
    override = os.environ.get("HPA_SCHEMAS_DIR", "")
    if override:
        if not (Path(override) / KATIB_OPENAPI).is_file():
            raise ConfigError(f"HPA_SCHEMAS_DIR={override!r}: expected a folder with {KATIB_OPENAPI} "
                              "(unset it to use the vendored hpa/schemas)")
        return Path(override)
    return PACKAGE_SCHEMAS


def _require_schemas() -> Path:
    found = schemas_dir()
    if not (found / KATIB_OPENAPI).is_file():
        raise ConfigError(f"schema files not found in {found}: the package is incomplete (reinstall hpa-kfp) "
                          "or set HPA_SCHEMAS_DIR")
    return found


def _strict(node):
    """Close every object schema that lists properties (no additionalProperties, no preserve-unknown)."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
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
        raise ConfigError(f"{what}: expected apiVersion batch/v1, kind Job and only {sorted(allowed)} "
                          f"(extra: {sorted(extra)})")
    spec_keys = {"template", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "completions",
                 "parallelism"}
    if "template" not in job.get("spec", {}) or set(job["spec"]) - spec_keys:
        raise ConfigError(f"{what}: spec must have template and only {sorted(spec_keys)}")
    validate_openapi(job["spec"]["template"], "io.k8s.api.core.v1.PodTemplateSpec", f"{what} spec.template")


# ---------------------------------------------------------------- YAML

class _Dumper(yaml.SafeDumper):
    """Quotes every string that any YAML 1.1/1.2 reader could take for a number (PyYAML leaves `1e-05`
    plain, Go's yaml reads it as a float, and Katib's string fields would then fail to decode)."""


_NUMBER_LIKE = re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$|^0[xob]|^[-+]?\.?(inf|nan)$",
                          re.I)


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


def write_manifest(text: str, path: str) -> None:
    """A rendered manifest to `path` (its folder created), or to stdout when `path` is "-"."""
    if path == "-":
        sys.stdout.write(text)
        return
    from hpa.store import atomic_write

    atomic_write(path, text.encode())
    log.info("wrote %s", path)
