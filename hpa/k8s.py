"""The Kubernetes API side of the in-cluster launchers (`hpa.katib_tune`, `hpa.train_distributed`,
`hpa.tensorboard`): the client, create / delete / wait for custom objects, and the clean-up that keeps a
launched object from outliving its launcher (what the objects hold is `hpa.k8s_manifests`).

Client: `custom_objects_api()` uses the in-cluster service account when there is one, else kubeconfig;
tests pass an `ApiClient` whose `Configuration(host=...)` points at a loopback stand-in server.

Clean-up: `create_and_wait` (one object) and `create_all_and_wait` (several, awaited together) give the
created objects an ownerReference to the KFP launcher's own Pod (when the pod identity is known) and delete
them when the wait fails, times out, or the process gets SIGTERM/SIGINT (a cancelled KFP run), so an
Experiment or TrainJob never outlives its run.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from hpa.errors import HPAError
from hpa.processes import SignalGuard

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds per API request: a stuck API server is an error, not a hang


class ClusterError(HPAError):
    """The Kubernetes API refused a request, or a job failed or timed out."""


class Cancelled(ClusterError):
    """The launcher got SIGTERM or SIGINT while it waited (a cancelled KFP run); the object was deleted."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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
        log.error("could not delete %s (%s): HTTP %s %s; delete it by hand", what, why, exc.status,
                  _server_message(exc))
        return False
    except Exception as exc:  # noqa: BLE001 - a dead connection must not hide the original error
        log.error("could not delete %s (%s): %s; delete it by hand", what, why, exc)
        return False
    log.warning("deleted %s (propagationPolicy=Background): %s", what, why)
    return True


def _cancel_guard(what: str) -> SignalGuard:
    """While active (main thread only), SIGTERM and SIGINT raise Cancelled, except inside `deferred()`,
    where they are held until the block ends, and after `shield()`, where they are ignored (clean-up runs)."""
    return SignalGuard((signal.SIGTERM, signal.SIGINT),
                       lambda signum: Cancelled(f"{what}: cancelled by {signal.Signals(signum).name}", signum),
                       keep_ignored=False, what=what)


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
    with _cancel_guard(what) as guard:
        created = False
        try:
            # A signal during the POST is acted on once it is known whether it created the object.
            with guard.deferred():
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


def create_all_and_wait(api, objs: list[dict], plural: str, namespace: str, outcome: Callable[[dict], str | None],
                        timeout: float, poll: float = 5.0) -> list[dict]:
    """create_and_wait for several objects at once: create each (owned by the KFP task's Pod when
    known), wait for all of them together (one wait_for thread each), return their final states in
    order. If a creation is refused, a wait fails or times out, or the process gets SIGTERM/SIGINT, every
    created object that has not succeeded is deleted (Background propagation) before the error is
    re-raised (a signal raises Cancelled); objects that succeeded are kept, as create_and_wait keeps one."""
    objs = [json.loads(json.dumps(obj)) for obj in objs]
    owner = launcher_owner_reference(namespace)
    for obj in objs:
        if owner is not None:
            obj["metadata"]["ownerReferences"] = [*obj["metadata"].get("ownerReferences", []), owner]
    what = ", ".join(f"{obj['kind']} {namespace}/{obj['metadata']['name']}" for obj in objs)
    created, finished, results = [], {}, queue.Queue()

    def wait_one(index: int, obj: dict) -> None:
        try:
            results.put((index, wait_for(api, obj, plural, namespace, outcome, timeout, poll), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            results.put((index, None, exc))

    with _cancel_guard(what) as guard:
        try:
            for obj in objs:
                # A signal during a POST is acted on once it is known whether it created the object.
                with guard.deferred():
                    create_object(api, obj, plural, namespace)
                    created.append(obj)
            for index, obj in enumerate(objs):
                # Daemon threads: after a failure they end at their next read (404), and never hold up the exit.
                threading.Thread(target=wait_one, args=(index, obj), daemon=True,
                                 name=f"wait-{obj['metadata']['name']}").start()
            while len(finished) < len(objs):
                try:
                    index, final, error = results.get(timeout=1.0)  # wakes for signals at least once a second
                except queue.Empty:
                    continue
                if error is not None:
                    raise error
                finished[index] = final
            return [finished[i] for i in range(len(objs))]
        except BaseException as exc:
            guard.shield()
            why = str(exc)[:300] or exc.__class__.__name__
            deleted = [f"{obj['kind']} {namespace}/{obj['metadata']['name']}" for i, obj in enumerate(created)
                       if i not in finished and delete_object(api, obj, plural, namespace, why)]
            if isinstance(exc, Cancelled):
                raise Cancelled(f"{exc}; deleted {', '.join(deleted) or 'nothing'}", exc.signum) from None
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
            current = api.get_namespaced_custom_object(group, version, namespace, plural, name,
                                                       _request_timeout=REQUEST_TIMEOUT)
            transport_errors = 0
        except ApiException as exc:
            raise _api_error(exc, f"cannot read {what}") from None
        except HTTPError as exc:
            transport_errors += 1
            if transport_errors > 3:
                raise ClusterError(f"cannot read {what}: {exc.__class__.__name__} "
                                   f"({transport_errors} times in a row)") from None
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
