"""Live training curves on Kubeflow: the logs prefix of a pipeline's training tasks, the Tensorboard that shows
it, and the PodDefault that gives the Tensorboard's server the object store's keys.

    python -m hpa tensorboard --logs s3://mlpipeline/private/team-a/hpa-kfp/tensorboard --namespace team-a
    python -m hpa tensorboard --logs s3://... --name hpa-run1 --namespace team-a --dry-run   # print the manifest
    python -m hpa tensorboard --poddefault --namespace team-a                                  # the S3-keys PodDefault

The event files themselves (EventLog, where a training task writes them) are hpa.tensorboard_events; the names
are re-exported here.

Logs prefix: `<store_uri>/tensorboard` (store_logs_uri), the same in every run, so the training tasks that get it
stay KFP cache hits (a task's cache key holds its parameter values: kubeflow/pipelines 2.16.0 and 2.17.0
backend/src/v2/cacheutils/cache.go, GenerateCacheKey); each training writes its own `<arch>-fold<k>-<digest>`
under it. The tensorboard task is not cached; the run id is in nothing it makes.

One Tensorboard per logs prefix (default_name): its `spec.logspath` is the whole prefix, because the controller
runs `tensorboard --logdir=<logspath>`, one folder (generateDeployment below), and which digests a run's
trainings get is known only when they start (Katib's learning rates, the split). So it shows every training
this store holds, named `<arch>-fold<k>-<digest>` (a task's run artifact records its folder), a cache hit's
curves included, live while a training runs; it is created once and kept by later runs.

What the controller does with an s3:// logspath (kubeflow/kubeflow v1.10.0 components/tensorboard-controller/
controllers/tensorboard_controller.go, generateDeployment): it mounts a PVC for a path that is not a cloud path
(isCloudPath: gs://, s3://, /cns/), the secret `user-gcp-sa` for gs://, and for s3:// nothing at all: no
volume, no env. It copies every label of the Tensorboard onto the server pod ("copy all of the CR labels to
the pod which includes poddefault related labels"), so the S3 keys come from a PodDefault that selects one of
those labels: Kubeflow's admission webhook adds a matching PodDefault's env when a pod is created, not later
(kubeflow/kubeflow v1.10.0 components/admission-webhook/main.go, filterPodDefaults), so the PodDefault is made
before the Tensorboard. `render_poddefault` takes the keys from the namespace's `mlpipeline-minio-artifact`
secret (secretKeyRef) and `render_tensorboard` puts its label on the Tensorboard. The server is
`/usr/local/bin/tensorboard --logdir=<logspath> --bind_all` in TENSORBOARD_IMAGE (tensorflow/tensorflow:2.5.1
in kubeflow/manifests v1.11.0 applications/tensorboard/tensorboard-controller/upstream/base/kustomization.yaml);
TensorFlow's built-in S3 file system reads S3_ENDPOINT, AWS_REGION, S3_USE_HTTPS and S3_VERIFY_SSL
(tensorflow/tensorflow tensorflow/core/platform/s3/s3_file_system.cc, GetDefaultClientConfig) and the AWS SDK's
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (kubeflow/kubeflow#3578; the controller mounting no S3 keys is
awslabs/kubeflow-manifests#118 and kubeflow/notebooks#733). The web app (crud-web-apps/tensorboards/backend/app/
utils.py, get_tensorboard_dict) builds the same object. It is served at /tensorboard/<namespace>/<name>/.

Permissions (kubeflow/manifests v1.11.0; the same files under apps/ in v1.10.0): multi-user KFP runs pipelines as
the profile's `default-editor` (applications/pipeline/upstream/base/installs/multi-user/api-service/params.env,
DEFAULTPIPELINERUNNERSERVICEACCOUNT), which the profile controller binds to `kubeflow-edit` (kubeflow/kubeflow
v1.10.0 components/profile-controller/controllers/profile_controller.go). kubeflow-edit aggregates every
ClusterRole labelled aggregate-to-kubeflow-edit (common/kubeflow-roles/base/cluster-roles.yaml), among them
`kubeflow-tensorboard-ui-edit` (get/list/create/delete tensorboards: applications/tensorboard/
tensorboards-web-app/upstream/base/cluster-role.yaml) and `kubeflow-notebook-ui-edit` (get/list/create/delete
poddefaults: applications/jupyter/jupyter-web-app/upstream/base/cluster-role.yaml), so a run may create the
PodDefault itself; the admission webhook's own `kubeflow-poddefaults-edit` grants only get/list/watch
(applications/admission-webhook/upstream/base/cluster-role.yaml). No role grants update or patch on poddefaults,
so a PodDefault with another spec is replaced by delete and create. Where the Jupyter web app is not installed
the API refuses (403): one warning line names the admin's command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys

from hpa import config, k8s, k8s_manifests
from hpa.errors import ConfigError
from hpa.tensorboard_events import EventLog, copy_event_files, run_logs_uri, training_digest  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

API_VERSION = "tensorboard.kubeflow.org/v1alpha1"
KIND = "Tensorboard"
PLURAL = "tensorboards"
TENSORBOARD_CRD = "tensorboard/tensorboard.kubeflow.org_tensorboards.yaml"
PODDEFAULT_API = "kubeflow.org/v1alpha1"
PODDEFAULT_PLURAL = "poddefaults"
PODDEFAULT_CRD = "tensorboard/kubeflow.org_poddefaults.yaml"
PODDEFAULT_NAME = "hpa-kfp-tensorboard-s3"
# The label that a Tensorboard carries and the PodDefault selects (the web app lists the PodDefault under
# "Configurations" by it and sets it to "true" when ticked).
S3_LABEL = "hpa-kfp-tensorboard-s3"
S3_REGION = "us-east-1"  # SeaweedFS ignores the region; TensorFlow's client needs one
LOGS_DIR = "tensorboard"  # under a run's --out, and under the store prefix of a pipeline


def store_logs_uri(store_uri: str) -> str:
    """The logs prefix of a pipeline's training tasks: <store_uri>/tensorboard, with no run id in it."""
    if not isinstance(store_uri, str) or not store_uri.strip().rstrip("/"):
        raise ConfigError(f"tensorboard store_uri {store_uri!r}: expected the run's store prefix (check-params' "
                          "store_uri)")
    return f"{store_uri.strip().rstrip('/')}/{LOGS_DIR}"


def default_name(logs_uri: str) -> str:
    """The Tensorboard of a logs prefix: hpa-kfp-<8 hex of its sha256>, one per prefix (two stores in one
    namespace get two), the same in every run."""
    return f"hpa-kfp-{hashlib.sha256(logs_uri.strip().rstrip('/').encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- the Kubeflow Tensorboard resource

def resource_name(text: str) -> str:
    """A valid Tensorboard name from any text: the controller names a Deployment, a Service (a DNS-1035
    label: starts with a letter, at most 63 characters) and a VirtualService after it."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"tb-{name}".rstrip("-")
    if len(name) > 63:
        name = f"{name[:56].rstrip('-')}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
    return name


def check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name or ""):
        raise ConfigError(f"tensorboard name {name!r}: expected a DNS-1035 label (lowercase letters, digits and '-', "
                          f"starting with a letter, at most 63 characters); e.g. {resource_name(name or 'run')!r}")
    return name


def check_logs_uri(logs_uri: str) -> str:
    if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?", logs_uri or ""):
        raise ConfigError(f"tensorboard logspath {logs_uri!r}: expected s3://bucket/prefix (the controller reads any "
                          "other path as a PersistentVolumeClaim)")
    return logs_uri.rstrip("/")


def render_tensorboard(name: str, namespace: str, logs_uri: str, s3_label: bool = True) -> dict:
    """The Tensorboard custom resource for `logs_uri`; with `s3_label`, the label that the PodDefault of
    `render_poddefault` selects (the controller copies it onto the server pod)."""
    metadata = {"name": check_name(name), "namespace": namespace}
    if s3_label:
        metadata["labels"] = {S3_LABEL: "true"}
    obj = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata,
           "spec": {"logspath": check_logs_uri(logs_uri)}}
    validate(obj)
    return obj


def render_poddefault(namespace: str, s3_endpoint: str = config.S3_DEFAULT_ENDPOINT) -> dict:
    """A PodDefault giving pods labelled S3_LABEL the keys of the namespace's KFP object-store secret (never a
    value: secretKeyRef) in the variables TensorFlow's S3 file system reads, and `s3_endpoint` (empty: KFP's
    SeaweedFS), plain HTTP inside the cluster unless it starts with https://."""
    s3_endpoint = (s3_endpoint or "").strip() or config.S3_DEFAULT_ENDPOINT
    endpoint = re.sub(r"^https?://", "", s3_endpoint).rstrip("/")
    if not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", endpoint):
        raise ConfigError(f"tensorboard s3_endpoint {s3_endpoint!r}: expected host:port, optionally after https://")
    secure = s3_endpoint.startswith("https://")
    keys = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
    obj = {
        "apiVersion": PODDEFAULT_API, "kind": "PodDefault",
        "metadata": {"name": PODDEFAULT_NAME, "namespace": namespace},
        "spec": {
            "desc": "S3 keys for TensorBoard (hpa-kfp): the KFP object store secret",
            "selector": {"matchLabels": {S3_LABEL: "true"}},
            "env": [*k8s_manifests.secret_env(config.S3_SECRET_NAME, keys),
                    {"name": "S3_ENDPOINT", "value": endpoint},
                    {"name": "S3_USE_HTTPS", "value": "1" if secure else "0"},
                    {"name": "S3_VERIFY_SSL", "value": "1" if secure else "0"},
                    {"name": "AWS_REGION", "value": S3_REGION}],
        },
    }
    k8s_manifests.validate_crd(obj, PODDEFAULT_CRD, "PodDefault")
    return obj


def validate(obj: dict, what: str = "Tensorboard") -> None:
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        raise ConfigError(f"{what}: expected apiVersion {API_VERSION} and kind {KIND}")
    k8s_manifests.validate_crd(obj, TENSORBOARD_CRD, what)


def ui_path(namespace: str, name: str) -> str:
    """The server's path on the Kubeflow gateway (the controller's VirtualService prefix)."""
    return f"/tensorboard/{namespace}/{name}/"


def _api_message(exc) -> str:
    """The API server's one-line reason in a kubernetes ApiException (its Status body's message)."""
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return exc.reason


def _read(api, obj: dict, plural: str) -> dict | None:
    """GET the object named like `obj`; None when there is none (404)."""
    from kubernetes.client.exceptions import ApiException

    group, version = obj["apiVersion"].split("/")
    meta = obj["metadata"]
    try:
        return api.get_namespaced_custom_object(group, version, meta["namespace"], plural, meta["name"],
                                                _request_timeout=k8s.REQUEST_TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise k8s.ClusterError(f"cannot read {obj['kind']} {meta['namespace']}/{meta['name']}: HTTP {exc.status} "
                               f"{_api_message(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise k8s.ClusterError(f"cannot read {obj['kind']} {meta['namespace']}/{meta['name']}: "
                               f"{exc.__class__.__name__}") from None


def create(obj: dict, api_client=None) -> tuple[dict, bool]:
    """Create the Tensorboard (not owned by anything: it is for looking at the curves after a run too); returns
    (the object, whether this call created it). An existing one with the same logspath is kept (a later run, a
    retried task); one with another logspath is an error."""
    validate(obj)
    meta = obj["metadata"]
    api = k8s.custom_objects_api(api_client)
    try:
        return k8s.create_object(api, obj, PLURAL, meta["namespace"]), True
    except k8s.Rejected as exc:
        if exc.status != 409:
            raise
    existing = _read(api, obj, PLURAL) or {}
    if (existing.get("spec") or {}).get("logspath") != obj["spec"]["logspath"]:
        raise k8s.ClusterError(f"Tensorboard {meta['namespace']}/{meta['name']} already exists with logspath "
                               f"{(existing.get('spec') or {}).get('logspath')!r}, not {obj['spec']['logspath']!r}: "
                               "choose another name")
    log.info("Tensorboard %s/%s already exists with this logspath; kept", meta["namespace"], meta["name"])
    return existing, False


def apply_poddefault(namespace: str, s3_endpoint: str = "", api_client=None) -> str:
    """Make the PodDefault of render_poddefault exist in `namespace`, idempotently: "kept" (there with this
    spec), "created", or "replaced" (there with another spec: deleted and created again, as no Kubeflow role
    grants update or patch on poddefaults). A refusal of the API raises k8s.ClusterError (one line)."""
    from kubernetes.client.exceptions import ApiException

    obj = render_poddefault(namespace, s3_endpoint)
    api = k8s.custom_objects_api(api_client)
    existing = _read(api, obj, PODDEFAULT_PLURAL)
    if existing is not None and existing.get("spec") == obj["spec"]:
        return "kept"
    if existing is not None:
        group, version = PODDEFAULT_API.split("/")
        try:
            api.delete_namespaced_custom_object(group, version, namespace, PODDEFAULT_PLURAL, PODDEFAULT_NAME,
                                                propagation_policy="Background", _request_timeout=k8s.REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise k8s.ClusterError(f"cannot replace PodDefault {namespace}/{PODDEFAULT_NAME} (another spec): "
                                       f"HTTP {exc.status} {_api_message(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - a dead connection, reported as one line
            raise k8s.ClusterError(f"cannot replace PodDefault {namespace}/{PODDEFAULT_NAME}: "
                                   f"{exc.__class__.__name__} talking to the API server") from None
    try:
        k8s.create_object(api, obj, PODDEFAULT_PLURAL, namespace)
    except k8s.Rejected as exc:
        if exc.status != 409:  # 409: made at this moment by a run beside this one
            raise
    return "created" if existing is None else "replaced"


def admin_command(namespace: str, s3_endpoint: str = "") -> str:
    """The command that applies the PodDefault with a cluster admin's rights."""
    endpoint = (s3_endpoint or "").strip()
    option = f" --s3-endpoint {endpoint}" if endpoint and endpoint != config.S3_DEFAULT_ENDPOINT else ""
    return f"python -m hpa tensorboard --poddefault --namespace {namespace}{option} | kubectl apply -f -"


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def create_with_keys(obj: dict, s3_endpoint: str = "", api_client=None, required: bool = False) -> dict:
    """The PodDefault (apply_poddefault), then the Tensorboard `obj` (create): in this order, since the webhook
    adds a PodDefault's env only to pods created after it. A refused PodDefault is one warning line naming the
    admin's command (with `required`, an error). Returns {"created": bool, "poddefault": kept | created |
    replaced | missing}; a refused Tensorboard raises k8s.ClusterError."""
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    keys = "missing"
    if S3_LABEL in (meta.get("labels") or {}):
        try:
            keys = apply_poddefault(namespace, s3_endpoint, api_client)
        except k8s.ClusterError as exc:
            if required:
                raise
            log.warning("tensorboard: %s; the Tensorboard shows no data until an admin runs `%s`", one_line(exc),
                        admin_command(namespace, s3_endpoint))
    _, created = create(obj, api_client)
    if not created and keys in ("created", "replaced"):
        log.warning("tensorboard: Tensorboard %s/%s was there before PodDefault %s: its server has no S3 keys until "
                    "it restarts (`kubectl rollout restart deployment/%s -n %s`, or delete it in the TensorBoards "
                    "app and run again)", namespace, name, PODDEFAULT_NAME, name, namespace)
    return {"created": created, "poddefault": keys}


def create_for_run(logs_uri: str, name: str = "", namespace: str = "", s3_endpoint: str = "", api_client=None,
                   required: bool = False) -> dict:
    """The pipeline's step: the PodDefault and a Tensorboard named `name` (default: default_name) for
    `logs_uri` in `namespace` (default: this pod's), create_with_keys. Outside a cluster pod (kfp.local, a laptop
    with a kubeconfig) nothing is created, so a local run never touches a real cluster. Unless `required`, a
    refusal by the cluster (no Tensorboard CRD, no permission) is one warning line and the run goes on: the
    event files are in the store anyway. Returns {logs_uri, name, namespace, path, created, poddefault}."""
    logs_uri = logs_uri.rstrip("/")
    name = check_name(name) if name else default_name(logs_uri)
    result = {"logs_uri": logs_uri, "name": name, "namespace": namespace, "path": "", "created": False,
              "poddefault": ""}
    if not logs_uri.startswith("s3://"):
        log.info("tensorboard: logs at %s (not s3://): no Tensorboard resource; view them with "
                 "`tensorboard --logdir %s`", logs_uri, logs_uri)
        return result
    if api_client is None and k8s.pod_namespace() is None:
        log.info("tensorboard: not in a cluster pod, no Tensorboard created; `python -m hpa tensorboard --logs %s "
                 "--namespace NS` creates one", logs_uri)
        return result
    namespace = namespace or k8s.current_namespace()
    result["namespace"] = namespace
    try:
        made = create_with_keys(render_tensorboard(name, namespace, logs_uri), s3_endpoint, api_client, required)
    except k8s.ClusterError as exc:
        if required:
            raise
        log.warning("tensorboard: %s; training is not affected, its event files are under %s", one_line(exc),
                    logs_uri)
        return result
    log.info("Tensorboard %s/%s for %s: Central Dashboard > TensorBoards, or %s", namespace, name, logs_uri,
             ui_path(namespace, name))
    return {**result, **made, "path": ui_path(namespace, name)}


def tensorboard_task(store_uri: str, name: str = "", namespace: str = "", s3_endpoint: str = "",
                     required: bool = False, enabled: bool = True) -> tuple[str, str]:
    """The tensorboard pipeline task: the logs prefix of the training tasks (store_logs_uri: the same in every
    run) and the Tensorboard with its PodDefault for it (create_for_run). Returns (logs_uri, the Tensorboard's UI
    path: "" when none was made); not `enabled`: nothing is made and both are empty."""
    if not enabled:
        return "", ""
    result = create_for_run(store_logs_uri(store_uri), name=name, namespace=namespace, s3_endpoint=s3_endpoint,
                            required=required)
    return result["logs_uri"], result["path"]


# ---------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa tensorboard",
                                description="Create (or print) a Kubeflow Tensorboard for s3:// event files with the "
                                            "PodDefault that gives it the S3 keys, or print that PodDefault")
    p.add_argument("--logs", default="", help="s3:// prefix of the event files (a run's <out>/tensorboard, or a "
                                              "pipeline's <store_uri>/tensorboard)")
    p.add_argument("--name", default="", help="Tensorboard name (default: hpa-kfp-<hash of --logs>, the pipeline's)")
    p.add_argument("--namespace", default="", help="default: this pod's namespace, else kubeflow")
    p.add_argument("--no-s3-label", action="store_true", help=f"leave out the label {S3_LABEL} (no PodDefault keys)")
    p.add_argument("--dry-run", action="store_true", help="print the manifest (YAML), create nothing")
    p.add_argument("--poddefault", action="store_true", help="print the PodDefault (YAML) for --namespace, for an "
                                                              "admin to apply (kubectl apply -f -)")
    p.add_argument("--s3-endpoint", default=config.S3_DEFAULT_ENDPOINT, help="host:port the TensorBoard server reads "
                                                                            "(PodDefault); https:// for TLS")
    return p


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    namespace = args.namespace or k8s.current_namespace()
    if args.poddefault:
        sys.stdout.write(k8s_manifests.dump_yaml(render_poddefault(namespace, args.s3_endpoint)))
        return 0
    if not args.logs:
        raise ConfigError("tensorboard: --logs s3://... is required (or --poddefault)")
    logs = check_logs_uri(args.logs)
    name = check_name(args.name) if args.name else default_name(logs)
    obj = render_tensorboard(name, namespace, logs, s3_label=not args.no_s3_label)
    if args.dry_run:
        sys.stdout.write(k8s_manifests.dump_yaml(obj))
        return 0
    made = create_with_keys(obj, args.s3_endpoint)
    print(json.dumps({"name": name, "namespace": namespace, "logspath": logs, "path": ui_path(namespace, name),
                      **made}))
    return 0
