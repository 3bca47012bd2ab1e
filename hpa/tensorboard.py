"""Live training curves: TensorBoard event files while training, and the Kubeflow Tensorboard that shows them.

    python -m hpa tensorboard --logs s3://mlpipeline/private/team-a/hpa-kfp/tensorboard/RUN \
        --name hpa-run1 --namespace team-a
    python -m hpa tensorboard --logs s3://... --name hpa-run1 --namespace team-a --dry-run   # print the manifest
    python -m hpa tensorboard --poddefault --namespace team-a                                  # the S3-keys PodDefault

Training side: `EventLog` (rank 0 of `python -m hpa train`) writes scalars with torch's SummaryWriter into a
local directory and, when the logs live in an object store, uploads each event file with the store's put
(a whole-object PUT: a reader never sees a torn file) at every epoch end, at most every `publish_seconds`
during an epoch, and at the end, so the curves reach the store while training runs.

Cluster side: a `Tensorboard` (tensorboard.kubeflow.org/v1alpha1, Kubeflow's Tensorboards web app and
tensorboard-controller) whose `spec.logspath` is a run's s3:// logs prefix, validated against the vendored
CRD (hpa/schemas/tensorboard/, kubeflow/kubeflow v1.10.0) and created through the API server.

What the controller does with an s3:// logspath (kubeflow/kubeflow v1.10.0 components/tensorboard-controller/
controllers/tensorboard_controller.go, generateDeployment): it mounts a PVC for a path that is not a cloud path
(isCloudPath: gs://, s3://, /cns/), the secret `user-gcp-sa` for gs://, and for s3:// nothing at all: no
volume, no env. It copies every label of the Tensorboard onto the server pod ("copy all of the CR labels to
the pod which includes poddefault related labels"), so the S3 keys come from a PodDefault (Kubeflow's
admission webhook) that selects one of those labels: `render_poddefault` makes one that takes them from the
namespace's `mlpipeline-minio-artifact` secret, and `render_tensorboard` puts its label on the Tensorboard.
The server is `/usr/local/bin/tensorboard --logdir=<logspath> --bind_all` in TENSORBOARD_IMAGE
(tensorflow/tensorflow:2.5.1 in config/base/kustomization.yaml, and in kubeflow/manifests v1.11.0
applications/tensorboard/tensorboard-controller/upstream/base/kustomization.yaml); TensorFlow's built-in S3
file system reads S3_ENDPOINT, AWS_REGION, S3_USE_HTTPS and S3_VERIFY_SSL (tensorflow/tensorflow
tensorflow/core/platform/s3/s3_file_system.cc, GetDefaultClientConfig; read at an older commit of that file)
and the AWS SDK's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the list users confirm in kubeflow/kubeflow#3578;
the controller mounting no S3 keys is awslabs/kubeflow-manifests#118 and kubeflow/notebooks#733).
The web app (crud-web-apps/tensorboards/backend/app/utils.py, get_tensorboard_dict) builds the same object:
name, namespace, one label "<PodDefault label>": "true" per chosen configuration, spec.logspath. The server is
served at /tensorboard/<namespace>/<name>/ (generateVirtualService).

Permissions (kubeflow/manifests v1.11.0): `kubeflow-tensorboard-ui-edit` (applications/tensorboard/
tensorboards-web-app/upstream/base/cluster-role.yaml, aggregated into kubeflow-edit) grants get/list/create/
delete on tensorboards; a profile's `default-editor` service account is bound to kubeflow-edit (kubeflow/kubeflow
v1.10.0 components/profile-controller/controllers/profile_controller.go) and multi-user KFP runs pipelines as
default-editor (applications/pipeline/upstream/base/installs/multi-user/api-service/params.env,
DEFAULTPIPELINERUNNERSERVICEACCOUNT). PodDefaults are different: kubeflow-edit and kubeflow-admin only
aggregate `kubeflow-poddefaults-view` (get/list/watch; applications/admission-webhook/upstream/base/
cluster-role.yaml), so a cluster admin applies the PodDefault once per profile namespace.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from pathlib import Path

from hpa import config, k8s, k8s_manifests
from hpa.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

API_VERSION = "tensorboard.kubeflow.org/v1alpha1"
KIND = "Tensorboard"
PLURAL = "tensorboards"
TENSORBOARD_CRD = "tensorboard/tensorboard.kubeflow.org_tensorboards.yaml"
PODDEFAULT_CRD = "tensorboard/kubeflow.org_poddefaults.yaml"
PODDEFAULT_NAME = "hpa-kfp-tensorboard-s3"
# The label that a Tensorboard carries and the PodDefault selects (the web app lists the PodDefault under
# "Configurations" by it and sets it to "true" when ticked).
S3_LABEL = "hpa-kfp-tensorboard-s3"
S3_REGION = "us-east-1"  # SeaweedFS ignores the region; TensorFlow's client needs one
LOGS_DIR = "tensorboard"  # under a run's --out, and under the store prefix of a pipeline run


# ---------------------------------------------------------------- event files (training, rank 0)

class EventLog:
    """Scalars of one training run as TensorBoard event files, written by rank 0.

    Every `every_steps` optimizer steps: train/loss (mean batch loss of this rank since the last write),
    train/lr, train/images_per_second (this rank's images x world size over the wall time since the last
    write; DDP steps run in lock-step). Every epoch, at the global step that ends it: epoch/<history.csv
    column> (val_macro_f1 is the out-of-sample score of the metric line), and val_f1_per_class/<class name>,
    the same out-of-sample predictions per class (their mean is val_macro_f1).

    `purge_step` (a resumed run: the checkpoint's step + 1) makes TensorBoard hide what the interrupted run
    logged after its checkpoint, which the resumed run logs again (SummaryWriter's SessionLog START).
    """

    def __init__(self, local_dir: str | Path, publish_to: str | None = None, every_steps: int = 10,
                 world_size: int = 1, purge_step: int | None = None, publish_seconds: float = 60.0):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(local_dir)
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)
        self.publish_to = publish_to
        self.every_steps, self.world_size, self.publish_seconds = every_steps, world_size, publish_seconds
        self.published: dict[str, int] = {}  # event file name -> size uploaded
        self.last_publish = time.monotonic()
        self.upload_failures = 0
        self.start_window()

    def start_window(self) -> None:
        """Start a throughput window (the training loop calls it when an epoch starts, so evaluation and
        checkpoint time between epochs do not count)."""
        self._loss, self._images, self._t0 = 0.0, 0, time.perf_counter()

    def train_step(self, step: int, loss, images: int, lr: float) -> None:
        """After optimizer step `step` (1-based): `loss` is the batch's mean loss (a tensor; it is read, which
        waits for the device, only every `every_steps` steps)."""
        self._loss = self._loss + loss.detach().double() * images
        self._images += images
        if step % self.every_steps:
            return
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        self.writer.add_scalar("train/loss", float(self._loss) / self._images, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_second", self._images * self.world_size / seconds, step)
        self.start_window()
        if self.publish_to and time.monotonic() - self.last_publish >= self.publish_seconds:
            self.publish()

    def epoch_end(self, step: int, row: dict, f1_per_class) -> None:
        """One history row (hpa.train.HISTORY_FIELDS) and the per-class out-of-sample F1, then publish."""
        from hpa.labels import CLASS_NAMES

        for key, value in row.items():
            self.writer.add_scalar(f"epoch/{key}", value, step)
        for name, value in zip(CLASS_NAMES, f1_per_class):
            self.writer.add_scalar(f"val_f1_per_class/{name}", float(value), step)
        self.publish()

    def publish(self) -> None:
        """Flush, then upload every event file that grew since its last upload. A failed upload is logged
        and retried at the next publish: the copy for the viewer must not end a training run."""
        self.writer.flush()
        self.last_publish = time.monotonic()
        if not self.publish_to:
            return
        from hpa.store import open_store

        store = open_store(self.publish_to)
        for path in sorted(self.dir.glob("events.out.tfevents.*")):
            size = path.stat().st_size
            if self.published.get(path.name) == size:
                continue
            try:
                store.put_file(path.name, path)
            except StoreError as exc:
                self.upload_failures += 1
                log.warning("tensorboard: uploading %s to %s failed (%s); retrying at the next epoch",
                            path.name, self.publish_to, exc)
                continue
            self.published[path.name] = size

    def close(self) -> None:
        self.writer.close()
        self.publish()


def run_logs_uri(logs_uri: str, arch: str, fold: int) -> str:
    """Where one training task of a pipeline run writes: a subfolder per model and fold, which TensorBoard
    shows as one run each (it treats every folder with event files under --logdir as a run)."""
    return f"{logs_uri.rstrip('/')}/{arch}-fold{int(fold)}"


def copy_event_files(src_uri: str, dst_uri: str) -> int:
    """Copy the event files under `src_uri` (a run's <out>/tensorboard, local or s3://) to `dst_uri`; returns
    how many. For a training job that cannot be told where else to write (the multi-node job's pods)."""
    import tempfile

    from hpa.store import open_store

    src, dst = open_store(src_uri), open_store(dst_uri)
    keys = [k for k in src.list() if k.rsplit("/", 1)[-1].startswith("events.out.tfevents.")]
    with tempfile.TemporaryDirectory(prefix="hpa-tb-") as tmp:
        for i, key in enumerate(keys):
            local = Path(tmp) / str(i)
            src.get_file(key, local)
            dst.put_file(key, local)
    return len(keys)


def pipeline_logs_uri(store_uri: str, run_id: str) -> str:
    """The logs prefix of one pipeline run: <store_uri>/tensorboard/<run id>."""
    run = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id.strip()).strip("-.")
    if not run:
        raise ConfigError(f"tensorboard run_id {run_id!r}: expected the pipeline run's id")
    return f"{store_uri.rstrip('/')}/{LOGS_DIR}/{run}"


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
    value: secretKeyRef) in the variables TensorFlow's S3 file system reads. Plain HTTP inside the cluster."""
    endpoint = re.sub(r"^https?://", "", s3_endpoint.strip()).rstrip("/")
    secure = s3_endpoint.strip().startswith("https://")
    keys = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
    obj = {
        "apiVersion": "kubeflow.org/v1alpha1", "kind": "PodDefault",
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


def create(obj: dict, api_client=None) -> dict:
    """Create the Tensorboard (not owned by anything: it is for looking at the run after it ends too). An
    existing one with the same logspath is kept (a retried task); one with another logspath is an error."""
    validate(obj)
    meta = obj["metadata"]
    api = k8s.custom_objects_api(api_client)
    try:
        return k8s.create_object(api, obj, PLURAL, meta["namespace"])
    except k8s.Rejected as exc:
        if exc.status != 409:
            raise
    group, version = API_VERSION.split("/")
    try:
        existing = api.get_namespaced_custom_object(group, version, meta["namespace"], PLURAL, meta["name"],
                                                    _request_timeout=k8s.REQUEST_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise k8s.ClusterError(f"Tensorboard {meta['namespace']}/{meta['name']} exists but cannot be read: "
                               f"{exc.__class__.__name__}") from None
    if (existing.get("spec") or {}).get("logspath") != obj["spec"]["logspath"]:
        raise k8s.ClusterError(f"Tensorboard {meta['namespace']}/{meta['name']} already exists with logspath "
                               f"{(existing.get('spec') or {}).get('logspath')!r}, not {obj['spec']['logspath']!r}: "
                               "choose another name")
    log.info("Tensorboard %s/%s already exists with this logspath; kept", meta["namespace"], meta["name"])
    return existing


def create_for_run(logs_uri: str, name: str = "", namespace: str = "", api_client=None,
                   required: bool = False) -> dict:
    """The pipeline's step: a Tensorboard named `name` (default: from the logs prefix) for `logs_uri` in
    `namespace` (default: this pod's). Outside a cluster pod (kfp.local, a laptop with a kubeconfig) nothing
    is created, so a local run never touches a real cluster. Unless `required`, a refusal by the cluster (no
    Tensorboard CRD, no permission) is logged and the run goes on: the event files are in the store anyway.
    Returns {logs_uri, name, namespace, path, created}."""
    logs_uri = logs_uri.rstrip("/")
    name = check_name(name) if name else resource_name(f"hpa-{logs_uri.rsplit('/', 1)[-1]}")
    result = {"logs_uri": logs_uri, "name": name, "namespace": namespace, "path": "", "created": False}
    if not logs_uri.startswith("s3://"):
        log.info("tensorboard: logs at %s (not s3://): no Tensorboard resource; view them with "
                 "`tensorboard --logdir %s`", logs_uri, logs_uri)
        return result
    in_pod = k8s.pod_namespace() is not None
    if api_client is None and not in_pod:
        log.info("tensorboard: not in a cluster pod, no Tensorboard created; `python -m hpa tensorboard --logs %s "
                 "--name %s --namespace NS` creates one", logs_uri, name)
        return result
    namespace = namespace or k8s.current_namespace()
    obj = render_tensorboard(name, namespace, logs_uri)
    try:
        create(obj, api_client)
    except k8s.ClusterError as exc:
        if required:
            raise
        log.warning("tensorboard: %s; training is not affected, its event files are under %s", exc, logs_uri)
        return {**result, "namespace": namespace}
    log.info("Tensorboard %s/%s for %s: Central Dashboard > TensorBoards, or %s (its pod needs the PodDefault %s, "
             "see docs/cluster.md)", namespace, name, logs_uri, ui_path(namespace, name), PODDEFAULT_NAME)
    return {**result, "namespace": namespace, "path": ui_path(namespace, name), "created": True}


def tensorboard_task(store_uri: str, run_id: str, name: str = "", namespace: str = "", required: bool = False,
                     enabled: bool = True) -> tuple[str, str]:
    """The tensorboard pipeline task: the run's logs prefix (pipeline_logs_uri) and a Tensorboard for it named
    `name` or hpa-<run_id> (create_for_run). Returns (logs_uri, the Tensorboard's UI path: "" when none was
    created); not `enabled`: nothing is created and both are empty."""
    if not enabled:
        return "", ""
    result = create_for_run(pipeline_logs_uri(store_uri, run_id), name=name or resource_name(f"hpa-{run_id}"),
                            namespace=namespace, required=required)
    return result["logs_uri"], result["path"]


# ---------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa tensorboard",
                                description="Create (or print) a Kubeflow Tensorboard for a run's s3:// logs, or "
                                            "print the PodDefault that gives it the S3 keys")
    p.add_argument("--logs", default="", help="s3:// prefix of the event files (a run's <out>/tensorboard, or a "
                                              "pipeline run's <store_uri>/tensorboard/<run id>)")
    p.add_argument("--name", default="", help="Tensorboard name (default: from --logs)")
    p.add_argument("--namespace", default="", help="default: this pod's namespace, else kubeflow")
    p.add_argument("--no-s3-label", action="store_true", help=f"leave out the label {S3_LABEL} (no PodDefault keys)")
    p.add_argument("--dry-run", action="store_true", help="print the manifest (YAML), create nothing")
    p.add_argument("--poddefault", action="store_true", help="print the PodDefault (YAML) for --namespace; an admin "
                                                              "applies it once per namespace (kubectl apply -f -)")
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
    name = check_name(args.name) if args.name else resource_name(f"hpa-{logs.rsplit('/', 1)[-1]}")
    obj = render_tensorboard(name, namespace, logs, s3_label=not args.no_s3_label)
    if args.dry_run:
        sys.stdout.write(k8s_manifests.dump_yaml(obj))
        return 0
    create(obj)
    print(json.dumps({"name": name, "namespace": namespace, "logspath": logs, "path": ui_path(namespace, name)}))
    return 0
