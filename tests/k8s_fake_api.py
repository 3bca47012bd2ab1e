"""A loopback stand-in for the Kubernetes API server, for tests only.

There is no Kubernetes cluster here, so the launchers (`hpa.katib.launch`, `hpa.distributed.launch`)
are tested against this small `http.server` on 127.0.0.1 (a free port). It is NOT Kubernetes: it speaks
only the two endpoints the launchers use,

    POST /apis/<group>/<version>/namespaces/<ns>/<plural>          create a custom object
    GET  /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>   read it back (with a status)

validates every posted object against the same schemas as the renderers (Katib OpenAPI
`v1beta1.Experiment` + the trial's Job / PyTorchJob, the TrainJob and PyTorchJob CRDs) and answers 422
with a Kubernetes `Status` when one does not match, 409 for a duplicate name, 404 for an unknown one.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hpa.errors import ConfigError

_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/?]+)(?:/(?P<name>[^/?]+))?/?(?:\?.*)?$")
SUCCESS = {"experiments": "Succeeded", "trainjobs": "Complete", "pytorchjobs": "Succeeded"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_posted(plural: str, obj: dict) -> None:
    """The schema checks of the renderers; raises ConfigError."""
    if plural == "experiments":
        from hpa.katib import validate_experiment

        validate_experiment(obj, what="posted Experiment")
    elif plural in ("trainjobs", "pytorchjobs"):
        from hpa.distributed import validate_manifest

        validate_manifest(obj, what=f"posted {obj.get('kind')}")
    else:
        raise ConfigError(f"the stand-in API server does not serve {plural}")


def optimal_trial(experiment: dict, best: dict | None) -> dict:
    """currentOptimalTrial: `best` assignments, else each parameter's first value / lower bound."""
    assignments = []
    for param in experiment["spec"]["parameters"]:
        space = param["feasibleSpace"]
        value = (best or {}).get(param["name"], space["list"][0] if "list" in space else space["min"])
        assignments.append({"name": param["name"], "value": str(value)})
    objective = experiment["spec"]["objective"]
    metrics = [{"name": objective["objectiveMetricName"], "latest": "0.41", "max": "0.43", "min": "0.2"}]
    metrics += [{"name": m, "latest": "0.12", "max": "0.3", "min": "0.12"} for m in objective.get("additionalMetricNames", [])]
    return {"bestTrialName": f"{experiment['metadata']['name']}-abc123", "parameterAssignments": assignments,
            "observation": {"metrics": metrics}}


class FakeKubeAPI:
    """`with FakeKubeAPI(polls=2, outcome="succeeded") as api: launch(..., api_client=api.api_client())`."""

    def __init__(self, polls: int = 2, outcome: str = "succeeded", best: dict | None = None,
                 lifetime: float = 60.0, max_requests: int = 500, on_create=None):
        assert outcome in ("succeeded", "failed", "never")
        self.polls, self.outcome, self.best = polls, outcome, best
        self.lifetime, self.max_requests = lifetime, max_requests
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.gets: dict[tuple[str, str, str], int] = {}
        self.posted: list[dict] = []
        self.requests = 0
        self.on_create = on_create
        self.hooks: dict[tuple[str, str, str], threading.Thread] = {}
        self.hook_errors: dict[tuple[str, str, str], BaseException] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._stopped = False

    def __enter__(self) -> "FakeKubeAPI":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        threading.Thread(target=self.server.shutdown, daemon=True).start()  # safe from a handler thread too
        self._thread.join(timeout=5)
        self.server.server_close()

    def write_kubeconfig(self, path) -> str:
        """A kubeconfig whose only cluster is this server (for code that loads kubeconfig itself)."""
        import yaml

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
            conditions.append({"type": "Failed", "status": "True", "reason": "MaxFailedTrialsReached" if plural == "experiments" else "BackoffLimitExceeded",
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

            def do_POST(self):
                match = self._route()
                if not match or match["name"]:
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                plural, ns = match["plural"], match["ns"]
                if body.get("apiVersion") != f"{match['group']}/{match['version']}" or body.get("metadata", {}).get("namespace", ns) != ns:
                    return self._error(400, "BadRequest", "apiVersion or namespace of the body does not match the URL")
                try:
                    validate_posted(plural, body)
                except ConfigError as exc:
                    return self._error(422, "Invalid", str(exc))
                key = (plural, ns, body["metadata"]["name"])
                with api.lock:
                    if key in api.objects:
                        return self._error(409, "AlreadyExists", f'{plural} "{key[2]}" already exists')
                    body["metadata"].update(namespace=ns, uid=f"uid-{len(api.objects)}", creationTimestamp=_now())
                    api.objects[key] = body
                    api.posted.append(json.loads(json.dumps(body)))
                    if api.on_create is not None:
                        api.hooks[key] = threading.Thread(target=api._run_hook, args=(key, json.loads(json.dumps(body))), daemon=True)
                        api.hooks[key].start()
                self._send(201, body)

            def do_GET(self):
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
