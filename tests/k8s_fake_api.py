"""A loopback stand-in for the Kubernetes API server, for tests only.

There is no Kubernetes cluster here, so the launchers (`hpa.katib_tune.launch`, `hpa.train_distributed.launch`)
are tested against this small `http.server` on 127.0.0.1 (a free port). It is NOT Kubernetes: it speaks
only the endpoints the launchers use,

    POST   /apis/<group>/<version>/namespaces/<ns>/<plural>          create a custom object
    GET    /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>   read it back (with a status)
    DELETE /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>   delete it (propagationPolicy required)
    GET    /apis/apiextensions.k8s.io/v1/customresourcedefinitions/trainjobs.trainer.kubeflow.org

and checks each request as the real server (or the operator's webhook) would:

- POST: every object is validated against the same schemas as the renderers (Katib OpenAPI
  `v1beta1.Experiment` + the trial's Job / PyTorchJob, the PyTorchJob CRD, and the TrainJob CRD of the
  Trainer release this server plays, `trainer_version`), answering 422 with a Kubernetes `Status` when
  one does not match, 409 for a duplicate name. With `?fieldValidation=Strict` a TrainJob field that the
  installed CRD lacks is refused as the API server does: 400 BadRequest, `strict decoding error: unknown
  field "spec.x"` (kubernetes staging/src/k8s.io/apiextensions-apiserver/pkg/apiserver/
  customresource_handler.go returns the pruned paths that way). `metadata.ownerReferences` entries need
  apiVersion, kind, name and uid (apimachinery ValidateOwnerReferences).
- Garbage collection is played for owners of kind Pod: `add_pod()` registers a pod; an object whose every
  owner is absent (an unknown pod, another namespace, another uid, or a pod removed by `delete_pod()`)
  is deleted, as Kubernetes' garbage collector deletes dependents whose owners are all gone.
- DELETE: `propagationPolicy` must be Background or Foreground (Orphan would leave the operator's pods
  running); each deletion is recorded in `deleted`; an unknown name is 404.
- CRD GET: the vendored CRD of `trainer_version`, or 403 Forbidden when `crd_readable=False` (a profile's
  service account that may not read cluster-scoped CRDs).

After `polls` GETs of an object it sets the status the test asked for: `succeeded` (an Experiment gets a
`currentOptimalTrial`), `failed`, or `never` (for timeout tests). It is bounded: it stops itself after
`lifetime` seconds or `max_requests` requests, and `stop()` (or leaving the `with` block) ends it.

`on_create(obj)`, when given, plays the operator: it runs in a thread after a successful POST (for
example the job's own command, locally), and the object reaches its final status only after it
returns (`failed` if it raised).
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import yaml
from loopback import LoopbackServer

from hpa import k8s_manifests
from hpa.errors import ConfigError

_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/?]+)"
                   r"(?:/(?P<name>[^/?]+))?/?(?:\?.*)?$")
_CRD_PATH = re.compile(r"^/apis/apiextensions\.k8s\.io/v1/customresourcedefinitions/(?P<name>[^/?]+)/?(?:\?.*)?$")
SUCCESS = {"experiments": "Succeeded", "trainjobs": "Complete", "pytorchjobs": "Succeeded"}
TRAINJOB_CRD_NAME = "trainjobs.trainer.kubeflow.org"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_posted(plural: str, obj: dict, trainer_version: str) -> None:
    """The schema checks of the renderers (a TrainJob against the installed Trainer's CRD); raises ConfigError."""
    if plural == "experiments":
        from hpa.katib import validate_experiment

        validate_experiment(obj, what="posted Experiment")
    elif plural in ("trainjobs", "pytorchjobs"):
        from hpa.train_distributed import validate_manifest

        validate_manifest(obj, what=f"posted {obj.get('kind')}", trainer_versions=(trainer_version,))
    else:
        raise ConfigError(f"the stand-in API server does not serve {plural}")
    for i, ref in enumerate(obj.get("metadata", {}).get("ownerReferences", [])):
        missing = [key for key in ("apiVersion", "kind", "name", "uid")
                   if not isinstance(ref, dict) or not ref.get(key)]
        if missing:
            raise ConfigError(f"metadata.ownerReferences[{i}]: {', '.join(missing)} required")


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """The paths structural pruning would drop (a field not declared in the CRD schema), dotted like the
    API server's strict decoding error: spec.runtimePatches, spec.trainer.numNode, ... (metadata is not pruned)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            child = f"{path}.{key}" if path else key
            if key not in schema["properties"]:
                found.append(child)
            elif child != "metadata":
                found += unknown_fields(value, schema["properties"][key], child)
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            found += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return found


def optimal_trial(experiment: dict, best: dict | None) -> dict:
    """currentOptimalTrial: `best` assignments, else each parameter's first value / lower bound."""
    assignments = []
    for param in experiment["spec"]["parameters"]:
        space = param["feasibleSpace"]
        value = (best or {}).get(param["name"], space["list"][0] if "list" in space else space["min"])
        assignments.append({"name": param["name"], "value": str(value)})
    objective = experiment["spec"]["objective"]
    metrics = [{"name": objective["objectiveMetricName"], "latest": "0.41", "max": "0.43", "min": "0.2"}]
    metrics += [{"name": m, "latest": "0.12", "max": "0.3", "min": "0.12"}
                for m in objective.get("additionalMetricNames", [])]
    return {"bestTrialName": f"{experiment['metadata']['name']}-abc123", "parameterAssignments": assignments,
            "observation": {"metrics": metrics}}


class FakeKubeAPI(LoopbackServer):
    """`with FakeKubeAPI(polls=2, outcome="succeeded") as api: launch(..., api_client=api.api_client())`."""

    def __init__(self, polls: int = 2, outcome: str = "succeeded", best: dict | None = None,
                 lifetime: float = 60.0, max_requests: int = 500, on_create=None,
                 trainer_version: str = "v2.3.0", crd_readable: bool = True):
        assert outcome in ("succeeded", "failed", "never") and trainer_version in k8s_manifests.TRAINJOB_CRDS
        self.polls, self.outcome, self.best = polls, outcome, best
        self.lifetime, self.max_requests = lifetime, max_requests
        self.trainer_version, self.crd_readable = trainer_version, crd_readable
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.gets: dict[tuple[str, str, str], int] = {}
        self.posted: list[dict] = []
        self.rejected: list[tuple[int, str]] = []  # (HTTP status, message) of refused POSTs
        self.deleted: list[dict] = []  # {"key", "propagationPolicy", "by"}: by "client" or "garbage-collector"
        self.crd_reads = 0
        self.pods: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid
        self.requests = 0
        self.on_create = on_create
        self.hooks: dict[tuple[str, str, str], threading.Thread] = {}
        self.hook_errors: dict[tuple[str, str, str], BaseException] = {}
        super().__init__(self._handler(), lifetime)  # its `lock` guards this server's state too
        self.host = self.url

    def write_kubeconfig(self, path) -> str:
        """A kubeconfig whose only cluster is this server (for code that loads kubeconfig itself)."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.host}}],
            "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "u"}}]}))
        return str(path)

    def api_client(self):
        from kubernetes import client

        configuration = client.Configuration(host=self.host)
        return client.ApiClient(configuration)

    # ------------------------------------------------------------ pods and garbage collection

    def add_pod(self, namespace: str, name: str, uid: str) -> None:
        with self.lock:
            self.pods[(namespace, name)] = uid

    def delete_pod(self, namespace: str, name: str) -> None:
        with self.lock:
            self.pods.pop((namespace, name), None)
            self._collect_garbage()

    def _owner_present(self, namespace: str, ref: dict) -> bool:
        if ref.get("kind") != "Pod" or ref.get("apiVersion") != "v1":
            return True  # only Pod owners are played here
        return self.pods.get((namespace, ref.get("name"))) == ref.get("uid")

    def _collect_garbage(self) -> None:
        """Delete every object whose owners are all absent (call with the lock held)."""
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not any(self._owner_present(key[1], ref) for ref in refs):
                del self.objects[key]
                self.deleted.append({"key": key, "propagationPolicy": "Background", "by": "garbage-collector"})

    def crd(self) -> dict:
        """The TrainJob CRD of the Trainer release this server plays (the vendored file)."""
        crd = k8s_manifests.schemas_dir() / k8s_manifests.TRAINJOB_CRDS[self.trainer_version]
        return yaml.safe_load(crd.read_text())

    # ------------------------------------------------------------ state changes

    def _run_hook(self, key, obj: dict) -> None:
        try:
            self.on_create(obj)
        except BaseException as exc:  # reported as a failed job
            self.hook_errors[key] = exc

    def _ready(self, key) -> bool:
        hook = self.hooks.get(key)
        return self.gets[key] >= self.polls and (hook is None or not hook.is_alive())

    def _status(self, plural: str, obj: dict, failed: bool = False) -> dict:
        now = _now()
        conditions = [{"type": "Created", "status": "True", "reason": "Created", "message": "created",
                       "lastUpdateTime": now, "lastTransitionTime": now}]
        if self.outcome == "failed" or failed:
            reason = "MaxFailedTrialsReached" if plural == "experiments" else "BackoffLimitExceeded"
            conditions.append({"type": "Failed", "status": "True", "reason": reason,
                               "message": "3 trials failed", "lastUpdateTime": now, "lastTransitionTime": now})
        elif self.outcome == "never":
            conditions.append({"type": "Running", "status": "True", "reason": "Running", "message": "running",
                               "lastUpdateTime": now, "lastTransitionTime": now})
        elif self.outcome == "succeeded":
            conditions.append({"type": SUCCESS[plural], "status": "True", "reason": "Done", "message": "done",
                               "lastUpdateTime": now, "lastTransitionTime": now})
        status = {"conditions": conditions}
        if plural == "experiments" and self.outcome == "succeeded":
            status["currentOptimalTrial"] = optimal_trial(obj, self.best)
        return status

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "message": message, "reason": reason, "code": code})

            def _route(self):
                with api.lock:
                    api.requests += 1
                    over = api.requests > api.max_requests
                if over:
                    self._error(503, "ServiceUnavailable", "stand-in API server request limit reached")
                    threading.Thread(target=api.stop, daemon=True).start()
                    return None
                match = _PATH.match(self.path)
                if not match:
                    self._error(404, "NotFound", f"the stand-in API server does not serve {self.path}")
                return match

            def _refuse(self, code: int, reason: str, message: str) -> None:
                with api.lock:
                    api.rejected.append((code, message))
                self._error(code, reason, message)

            def do_POST(self):
                match = self._route()
                if not match or match["name"]:
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                plural, ns = match["plural"], match["ns"]
                query = parse_qs(urlsplit(self.path).query)
                if body.get("apiVersion") != f"{match['group']}/{match['version']}" or \
                        body.get("metadata", {}).get("namespace", ns) != ns:
                    return self._refuse(400, "BadRequest", "apiVersion or namespace of the body does not match the URL")
                if plural == "trainjobs" and query.get("fieldValidation") == ["Strict"]:
                    version = body["apiVersion"].rsplit("/", 1)[-1]
                    for entry in api.crd()["spec"]["versions"]:
                        if entry["name"] == version:
                            unknown = unknown_fields(body, entry["schema"]["openAPIV3Schema"])
                            if unknown:
                                fields_text = ", ".join(f'unknown field "{path}"' for path in unknown)
                                return self._refuse(400, "BadRequest",
                                                    f'{body["kind"]} in version "{version}" cannot be handled as a '
                                                    f'{body["kind"]}: strict decoding error: {fields_text}')
                try:
                    validate_posted(plural, body, api.trainer_version)
                except ConfigError as exc:
                    return self._refuse(422, "Invalid", str(exc))
                key = (plural, ns, body["metadata"]["name"])
                with api.lock:
                    clash = key in api.objects
                    if not clash:
                        body["metadata"].update(namespace=ns, uid=f"uid-{len(api.objects)}", creationTimestamp=_now())
                        api.objects[key] = body
                        api.posted.append(json.loads(json.dumps(body)))
                        if api.on_create is not None:
                            api.hooks[key] = threading.Thread(target=api._run_hook,
                                                              args=(key, json.loads(json.dumps(body))), daemon=True)
                            api.hooks[key].start()
                        api._collect_garbage()
                if clash:
                    return self._refuse(409, "AlreadyExists", f'{plural} "{key[2]}" already exists')
                self._send(201, body)

            def do_DELETE(self):
                match = self._route()
                if not match:
                    return
                if not match["name"]:
                    return self._error(405, "MethodNotAllowed", "the stand-in API server does not delete collections")
                policy = parse_qs(urlsplit(self.path).query).get("propagationPolicy", [""])[0]
                if policy not in ("Background", "Foreground"):
                    return self._error(400, "BadRequest",
                                       f"propagationPolicy {policy!r}: the stand-in expects Background or Foreground")
                key = (match["plural"], match["ns"], match["name"])
                with api.lock:
                    obj = api.objects.pop(key, None)
                    if obj is not None:
                        api.deleted.append({"key": key, "propagationPolicy": policy, "by": "client"})
                if obj is None:
                    return self._error(404, "NotFound", f'{key[0]} "{key[2]}" not found')
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                 "details": {"name": key[2], "kind": key[0], "uid": obj["metadata"]["uid"]}})

            def do_GET(self):
                crd = _CRD_PATH.match(self.path)
                if crd:
                    with api.lock:
                        api.requests += 1
                        api.crd_reads += 1
                    if not api.crd_readable:
                        return self._error(403, "Forbidden",
                                           f'customresourcedefinitions.apiextensions.k8s.io "{crd["name"]}" is '
                                           'forbidden: User "system:serviceaccount:team:default-editor" cannot get '
                                           'resource "customresourcedefinitions" in API group "apiextensions.k8s.io" '
                                           'at the cluster scope')
                    if crd["name"] != TRAINJOB_CRD_NAME:
                        return self._error(404, "NotFound",
                                           f'customresourcedefinitions.apiextensions.k8s.io "{crd["name"]}" not found')
                    return self._send(200, api.crd())
                match = self._route()
                if not match:
                    return
                key = (match["plural"], match["ns"], match["name"])
                with api.lock:
                    obj = api.objects.get(key)
                    if obj is not None:
                        api.gets[key] = api.gets.get(key, 0) + 1
                        if api._ready(key):
                            obj["status"] = api._status(key[0], obj, failed=key in api.hook_errors)
                if obj is None:
                    return self._error(404, "NotFound", f'{key[0]} "{key[2]}" not found')
                self._send(200, obj)

        return Handler
