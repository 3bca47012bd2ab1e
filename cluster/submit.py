"""`pipeline.py submit`: authenticate to a Kubeflow Pipelines API, upload the compiled pipeline as a named,
versioned pipeline and create a run from that version.

Credentials, the ways Kubeflow documents them (kubeflow/website content/en/docs/components/pipelines/
user-guides/core-functions/connect-api.md; kfp 2.17.0 kfp/client/client.py `Client(existing_token=,
cookies=, credentials=)`). Give at most one:

    --token-file PATH | env KF_PIPELINES_TOKEN   an existing bearer token, e.g. the output of
        `kubectl -n <profile> create token default-editor --audience=pipelines.kubeflow.org`
    --cookie-file PATH | env KF_PIPELINES_COOKIE  a Central Dashboard session cookie copied from the browser,
        `oauth2_proxy_kubeflow=...` (Kubeflow >= 1.9, oauth2-proxy) or `authservice_session=...` (older)
    --in-cluster   the projected service-account token at $KF_PIPELINES_SA_TOKEN_PATH (default
        /var/run/secrets/kubeflow/pipelines/token), re-read on every request as the kubelet rotates it
        (kfp.client.set_volume_credentials.ServiceAccountTokenVolumeCredentials)
    none           standalone KFP behind `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 3000:80`

A secret is never taken on the command line (shell history, `ps`), and never printed, logged or put in an
error message: errors name the credential by kind and source ("the bearer token from --token-file t.jwt").

Upload (the default): the package is compiled here, hashed (sha256), and uploaded as a version of the
pipeline `--pipeline-name` (created if absent) in the profile namespace; a version whose description
records the same sha256 is reused instead of uploaded again. The run is created from that pipeline version
in the experiment `--experiment` (created if absent). `--no-upload` sends the package inline with the run
(kfp.Client.create_run_from_pipeline_package), as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import urllib.parse
import warnings
from pathlib import Path

import yaml

from hpa.config import DEFAULT_CUDA_IMAGE, DEFAULT_IMAGE
from hpa.errors import ConfigError, HPAError

log = logging.getLogger(__name__)

TOKEN_ENV = "KF_PIPELINES_TOKEN"
COOKIE_ENV = "KF_PIPELINES_COOKIE"
# The SDK's names and default (kfp 2.17.0 kfp/client/client.py KF_PIPELINES_SA_TOKEN_ENV / _PATH).
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_DEFAULT = "/var/run/secrets/kubeflow/pipelines/token"
ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
# In-cluster service of the KFP API + UI (connect-api.md "Kubeflow Platform - Inside the Cluster").
IN_CLUSTER_HOST = "http://ml-pipeline-ui.kubeflow"
# Where a pod finds its own namespace (kfp/client/client.py Client._NAMESPACE_PATH).
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_EXPERIMENT = "Default"
MAX_SECRET_BYTES = 64 * 1024
HEALTHZ_TIMEOUT_S = 30
# Filter operations of kubeflow/pipelines backend/api/v2beta1/filter.proto (Predicate.Operation).
EQUALS, IS_SUBSTRING = 1, 9
# RFC 6750 b64token: what may follow "Bearer " (a Kubernetes JWT is three base64url parts and dots).
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 6265 cookie-name (an RFC 7230 token)
_COOKIE_VALUE = re.compile(r'"?[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"?')  # RFC 6265 cookie-value
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


class SubmitError(HPAError):
    """The KFP API refused or failed a request: one line saying what, with which credential kind, and what to check."""


class AuthError(SubmitError):
    """HTTP 401/403: the credential (named by kind and source, never by value) was not accepted."""


# ---------------------------------------------------------------------------------------------- credentials
@dataclasses.dataclass(frozen=True)
class Credential:
    """How requests authenticate. `source` names where the secret came from; the secret itself is kept out
    of repr(), str() and every message."""

    kind: str  # "token" | "cookie" | "in-cluster" | "none"
    source: str = ""  # "--token-file PATH", "KF_PIPELINES_TOKEN", "--cookie-file PATH", the SA token path
    _secret: str = dataclasses.field(default="", repr=False, compare=False)

    def describe(self) -> str:
        return {"token": f"the bearer token from {self.source}",
                "cookie": f"the session cookie from {self.source}",
                "in-cluster": f"the service-account token at {self.source} (--in-cluster)",
                "none": "no credential"}[self.kind]

    def client_kwargs(self) -> dict:
        """The kfp.Client arguments for this credential (kfp 2.17.0 kfp/client/client.py _load_config)."""
        if self.kind == "token":
            return {"existing_token": self._secret}
        if self.kind == "cookie":
            return {"cookies": self._secret}
        if self.kind == "in-cluster":
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            return {"credentials": ServiceAccountTokenVolumeCredentials(path=self.source)}
        return {}

    def scrub(self, text: str) -> str:
        """`text` with every piece of the secret replaced (for server messages quoted in errors)."""
        pieces = {self._secret} if self._secret else set()
        if self.kind == "cookie":
            pieces |= {part.partition("=")[2] for part in self._secret.split("; ")}
        for piece in sorted((p for p in pieces if len(p) >= 4), key=len, reverse=True):
            text = text.replace(piece, "<redacted>")
        return text


def _read_secret_file(path: str, what: str) -> str:
    """The stripped text of a credential file; ConfigError starting with `what` (which names the file), never
    quoting its content."""
    file = Path(path).expanduser()
    try:
        if file.is_dir():
            raise ConfigError(f"{what}: is a directory, expected a file")
        size = file.stat().st_size
        if size > MAX_SECRET_BYTES:
            raise ConfigError(f"{what}: {size} bytes, too large for a credential (at most {MAX_SECRET_BYTES})")
        text = file.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{what}: cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not text:
        raise ConfigError(f"{what}: is empty")
    return text


def _check_token(text: str, what: str) -> str:
    if text[:7].lower() == "bearer ":
        text = text[7:].strip()
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{what}: expected one token on one line, found {text.count(chr(10)) + 1} lines")
    if not _TOKEN.fullmatch(text):
        raise ConfigError(f"{what}: expected a bearer token (base64url characters and dots, as "
                          "`kubectl create token` prints), found other characters")
    return text


def _check_cookie(text: str, what: str) -> str:
    if text[:7].lower() == "cookie:":
        text = text[7:].strip()
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{what}: expected one line `name=value[; name2=value2]`, found several lines")
    pairs = [part.strip() for part in text.split(";") if part.strip()]
    for index, pair in enumerate(pairs, 1):
        name, sep, value = pair.partition("=")
        if not sep or not _COOKIE_NAME.fullmatch(name.strip()) or not _COOKIE_VALUE.fullmatch(value.strip()):
            raise ConfigError(f"{what}: cookie {index} is not `name=value` (e.g. oauth2_proxy_kubeflow=... or "
                              "authservice_session=..., as the browser shows it)")
    if not pairs:
        raise ConfigError(f"{what}: expected `name=value`, e.g. oauth2_proxy_kubeflow=...")
    return "; ".join(f"{n.strip()}={v.strip()}" for n, _, v in (p.partition("=") for p in pairs))


def resolve_credential(token_file: str | None = None, cookie_file: str | None = None, in_cluster: bool = False,
                       env: dict | None = None) -> Credential:
    """Exactly one credential source (or none); read and check it now, before any request."""
    env = os.environ if env is None else env
    given = [name for name, present in (("--token-file", token_file), ("--cookie-file", cookie_file),
                                        ("--in-cluster", in_cluster), (TOKEN_ENV, env.get(TOKEN_ENV)),
                                        (COOKIE_ENV, env.get(COOKIE_ENV))) if present]
    if len(given) > 1:
        raise ConfigError(f"credentials: {' and '.join(given)} both given; use exactly one (unset the environment "
                          "variable or drop the option)")
    if token_file:
        source = f"--token-file {token_file}"
        return Credential("token", source, _check_token(_read_secret_file(token_file, source), source))
    if env.get(TOKEN_ENV):
        return Credential("token", TOKEN_ENV, _check_token(env[TOKEN_ENV].strip(), TOKEN_ENV))
    if cookie_file:
        source = f"--cookie-file {cookie_file}"
        return Credential("cookie", source, _check_cookie(_read_secret_file(cookie_file, source), source))
    if env.get(COOKIE_ENV):
        return Credential("cookie", COOKIE_ENV, _check_cookie(env[COOKIE_ENV].strip(), COOKIE_ENV))
    if in_cluster:
        path = env.get(SA_TOKEN_ENV) or SA_TOKEN_DEFAULT
        what = f"--in-cluster: service-account token {path}" + (f" (from {SA_TOKEN_ENV})" if env.get(SA_TOKEN_ENV) else
                                                                 f" (the default; {SA_TOKEN_ENV} is not set)")
        return Credential("in-cluster", path, _check_token(_read_secret_file(path, what), what))
    return Credential("none")


# ---------------------------------------------------------------------------------------------- request
@dataclasses.dataclass(frozen=True)
class SubmitRequest:
    host: str
    credential: Credential
    namespace: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    pipeline_name: str | None = None  # default: the pipeline's own name
    version_name: str | None = None  # default: <UTC time>-<sha256[:12] of the package>
    upload: bool = True
    min_backend: str | None = None  # e.g. "2.17.0": refuse older KFP backends (healthz tag_name)


def _check_host(host: str) -> str:
    parts = urllib.parse.urlsplit(host)
    if "@" in parts.netloc:  # checked first: never echo a URL that carries user:password
        raise ConfigError("--host: must not carry credentials (user:password@); use --token-file or --cookie-file")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--host {host!r}: expected an http:// or https:// URL, e.g. http://localhost:3000 "
                          "(standalone) or http://localhost:8080/pipeline (Kubeflow Platform)")
    if parts.query or parts.fragment:
        raise ConfigError(f"--host {host!r}: expected no query or fragment, e.g. http://localhost:8080/pipeline")
    return host.rstrip("/")


def _check_name(value: str | None, what: str, limit: int) -> str | None:
    if value is None:
        return None
    if not value.strip() or value != value.strip() or len(value) > limit or any(ord(c) < 32 for c in value):
        raise ConfigError(f"{what} {value!r}: expected 1-{limit} printable characters without leading or trailing "
                          "spaces")
    return value


def make_request(host: str | None = None, namespace: str | None = None, token_file: str | None = None,
                 cookie_file: str | None = None, in_cluster: bool = False, experiment: str | None = None,
                 run_name: str | None = None, pipeline_name: str | None = None, version_name: str | None = None,
                 upload: bool = True, min_backend: str | None = None, env: dict | None = None) -> SubmitRequest:
    """Validate every submit option and read the credential; ConfigError (one line) before any request."""
    env = os.environ if env is None else env
    host = host or env.get(ENDPOINT_ENV) or (IN_CLUSTER_HOST if in_cluster else None)
    if not host:
        raise ConfigError("--host: required (or env KF_PIPELINES_ENDPOINT), the KFP API URL: http://localhost:3000 "
                          "after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 3000:80` (standalone), "
                          "http://localhost:8080/pipeline after `kubectl port-forward -n istio-system "
                          "svc/istio-ingressgateway 8080:80` (Kubeflow Platform)")
    if namespace is not None and not _DNS_LABEL.fullmatch(namespace):
        raise ConfigError(f"--namespace {namespace!r}: expected a Kubernetes namespace (lower-case letters, digits "
                          "and '-', at most 63), the profile namespace, e.g. kubeflow-user-example-com")
    if not upload and (pipeline_name or version_name):
        raise ConfigError(f"{'--pipeline-name' if pipeline_name else '--version-name'}: names an uploaded pipeline; "
                          "drop it or drop --no-upload")
    if min_backend is not None and not _VERSION.fullmatch(min_backend):
        raise ConfigError(f"min_backend {min_backend!r}: expected a version like 2.17.0")
    # Limits of the KFP database columns (kubeflow/pipelines 2.17.0 backend/src/apiserver/model/pipeline.go
    # Name varchar(128), pipeline_version.go Name varchar(127), experiment.go Name varchar(128)).
    return SubmitRequest(
        host=_check_host(host), credential=resolve_credential(token_file, cookie_file, in_cluster, env),
        namespace=namespace, experiment=_check_name(experiment, "--experiment", 128),
        run_name=_check_name(run_name, "--run-name", 128),
        pipeline_name=_check_name(pipeline_name, "--pipeline-name", 128),
        version_name=_check_name(version_name, "--version-name", 127), upload=upload, min_backend=min_backend)


def add_arguments(parser) -> None:
    """The `submit` options (pipeline.py main adds the key=value overrides)."""
    parser.add_argument("--host", default=None,
                        help="KFP API URL (default $KF_PIPELINES_ENDPOINT; with --in-cluster http://ml-pipeline-ui."
                             "kubeflow): http://localhost:3000 for a port-forwarded standalone KFP, "
                             "http://localhost:8080/pipeline through the Kubeflow Platform gateway")
    parser.add_argument("--namespace", default=None,
                        help="profile namespace (required by multi-user Kubeflow; with --in-cluster default the pod's)")
    auth = parser.add_argument_group("authentication (at most one; none for a standalone KFP)")
    auth.add_argument("--token-file", metavar="PATH", default=None,
                      help="file holding a bearer token, e.g. `kubectl -n <ns> create token default-editor "
                           f"--audience=pipelines.kubeflow.org > PATH` (or env {TOKEN_ENV})")
    auth.add_argument("--cookie-file", metavar="PATH", default=None,
                      help="file holding the browser's session cookie, oauth2_proxy_kubeflow=... or "
                           f"authservice_session=... (or env {COOKIE_ENV})")
    auth.add_argument("--in-cluster", action="store_true",
                      help=f"use the pod's projected service-account token (${SA_TOKEN_ENV}, default "
                           f"{SA_TOKEN_DEFAULT})")
    up = parser.add_argument_group("pipeline upload")
    up.add_argument("--pipeline-name", default=None,
                    help="upload as this pipeline (default: the pipeline's own name); created if absent")
    up.add_argument("--version-name", default=None,
                    help="name of the new pipeline version (default <UTC time>-<sha256 of the package, 12 hex>); "
                         "a version of the same package is reused")
    up.add_argument("--no-upload", action="store_true",
                    help="send the package inline with the run instead (no pipeline or version is created)")
    parser.add_argument("--experiment", default=None,
                        help=f"experiment (default {DEFAULT_EXPERIMENT!r}; created if absent)")
    parser.add_argument("--run-name", default=None, help="run name (default: pipeline name and version)")


# ---------------------------------------------------------------------------------------------- package
@dataclasses.dataclass(frozen=True)
class Package:
    path: Path
    sha256: str
    name: str  # pipelineInfo.name
    description: str
    parameters: dict  # root input parameter name -> {"type": ParameterType name, "optional": bool}


_HEADER_DEFAULT = re.compile(r"^(#\s+\w+: \w+ \[Default: )(\{.*\})(\])$", re.M)


def _sorted(value):
    return {k: _sorted(value[k]) for k in sorted(value)} if isinstance(value, dict) else value


def compile_pipeline(pipeline_func, path, pipeline_parameters: dict | None = None) -> Path:
    """kfp's Compiler, with the same bytes every time. kfp 2.17 writes each default into the YAML's comment
    header through a protobuf Struct, whose key order varies from process to process (measured: the
    `models` default came out as {'resnet18': ..} or {'se_resnet18': ..} first, by PYTHONHASHSEED); the
    spec itself is dumped with sorted keys. The header's dict defaults are put in key order, so the same
    pipeline always gives the same file (and `submit` the same sha256-named version)."""
    import ast

    from kfp import compiler

    path = Path(path)
    compiler.Compiler().compile(pipeline_func, str(path), pipeline_parameters=pipeline_parameters)
    text = path.read_text()
    fixed = _HEADER_DEFAULT.sub(lambda m: m.group(1) + repr(_sorted(ast.literal_eval(m.group(2)))) + m.group(3), text)
    if fixed != text:
        path.write_text(fixed)
    return path


def compile_package(pipeline_func, directory: Path, pipeline_parameters: dict | None = None) -> Package:
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    path = compile_pipeline(pipeline_func, Path(directory) / f"{pipeline_func.name}.yaml", pipeline_parameters)
    data = path.read_bytes()
    spec = json_format.ParseDict(next(yaml.safe_load_all(data)), pipeline_spec_pb2.PipelineSpec())
    types = pipeline_spec_pb2.ParameterType.ParameterTypeEnum
    parameters = {name: {"type": types.Name(p.parameter_type), "optional": p.is_optional or p.HasField("default_value")}
                  for name, p in spec.root.input_definitions.parameters.items()}
    return Package(path, hashlib.sha256(data).hexdigest(), spec.pipeline_info.name, spec.pipeline_info.description,
                   parameters)


def default_image_variables(package_text: str) -> dict[str, str]:
    """The image variables (HPA_IMAGE, HPA_CUDA_IMAGE) whose built-in default the compiled package still uses,
    each with that default.

    Images are fixed when the pipeline is compiled (hpa.config.image() / cuda_image() read the variables at
    import time), so the package itself is the evidence: a default reference in it means that the pods
    pull the project's public tag, not the images the user built and pushed (images/README.md)."""
    found = {}
    for name, default in (("HPA_IMAGE", DEFAULT_IMAGE), ("HPA_CUDA_IMAGE", DEFAULT_CUDA_IMAGE)):
        # The CUDA tag extends the CPU one (<tag>-cuda): a match must end where the reference ends.
        if re.search(re.escape(default) + r"(?![\w.-])", package_text):
            found[name] = default
    return found


def warn_default_images(package: Package) -> None:
    """One warning line when the package runs on a default image, naming the variables to set."""
    found = default_image_variables(package.path.read_text())
    if found:
        log.warning("submit: %s is compiled with the default %s (%s): set %s to the images you built and pushed "
                    "(images/README.md)", package.name, " and ".join(found), ", ".join(found.values()),
                    "them" if len(found) > 1 else "it")


def check_parameters(package: Package, arguments: dict) -> None:
    """The backend's run-parameter check, here before any request (kubeflow/pipelines 2.17.0
    backend/src/apiserver/template/v2_template.go validatePipelineJobInputs)."""
    expected = {"NUMBER_DOUBLE": (int, float), "NUMBER_INTEGER": (int, float), "STRING": (str,), "BOOLEAN": (bool,),
                "LIST": (list,), "STRUCT": (dict,)}
    for name, value in arguments.items():
        if name not in package.parameters:
            raise ConfigError(f"run parameter {name!r}: pipeline {package.name} has no such input "
                              f"(it takes {', '.join(sorted(package.parameters))})")
        kind = package.parameters[name]["type"]
        ok = expected.get(kind, ())
        if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
            raise ConfigError(f"run parameter {name}={value!r}: pipeline {package.name} expects a {kind}")
    missing = [n for n, p in package.parameters.items() if not p["optional"] and n not in arguments]
    if missing:
        raise ConfigError(f"run parameters: pipeline {package.name} needs {', '.join(sorted(missing))}")


# ---------------------------------------------------------------------------------------------- server errors
def _server_message(exc, credential: Credential) -> str:
    """The KFP API's own error text (JSON `message`/`error_message`/`error`), scrubbed and shortened; "" for
    HTML sign-in pages and other bodies."""
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or "")
    try:
        data = json.loads(body)
    except ValueError:
        text = body.strip()
        return "" if not text or "<" in text or "\n" in text else credential.scrub(text)[:200]
    if not isinstance(data, dict):
        return ""
    text = str(data.get("message") or data.get("error_message") or data.get("error") or "")
    return credential.scrub(" ".join(text.split()))[:300]


def _auth_error(status: int, step: str, request: SubmitRequest, namespace: str | None, message: str) -> AuthError:
    cred, host = request.credential, request.host
    said = f"; the server said: {message}" if message else ""
    if cred.kind == "none":
        return AuthError(f"{step}: the KFP API at {host} requires authentication (HTTP {status}) and no credential "
                         "was given: multi-user Kubeflow needs --token-file, --cookie-file or --in-cluster" + said)
    if status == 401:
        check = {"token": "that the token has not expired (`kubectl create token` lasts 1 hour unless --duration) "
                          "and was issued by this cluster (audience pipelines.kubeflow.org)",
                 "cookie": "that the session has not expired and belongs to this host: log in again and copy the "
                           "oauth2_proxy_kubeflow (Kubeflow >= 1.9) or authservice_session cookie",
                 "in-cluster": "that the pod mounts a projected service-account token with audience "
                               f"pipelines.kubeflow.org there ({SA_TOKEN_ENV}; PodDefault access-ml-pipeline)"}
        return AuthError(f"{step}: the KFP API at {host} rejected {cred.describe()} (HTTP 401 Unauthorized): check "
                         f"{check[cred.kind]}" + said)
    who = {"token": "the token's service account (e.g. default-editor of that profile, or a RoleBinding to "
                    "kubeflow-edit)",
           "cookie": "your user (an owner or contributor of that profile); if the session expired, log in again",
           "in-cluster": "the pod's service account (a RoleBinding to kubeflow-edit in that namespace)"}[cred.kind]
    return AuthError(f"{step}: the KFP API at {host} refused {cred.describe()} (HTTP 403 Forbidden) for namespace "
                     f"{namespace or '(none)'}: check that {who} may edit pipelines there" + said)


@contextlib.contextmanager
def _api_step(step: str, request: SubmitRequest, namespace: str | None = None):
    """Turn SDK / HTTP failures of one step into one-line SubmitErrors (no traceback, no secret)."""
    import kfp_server_api
    import urllib3

    sdk_output = io.StringIO()  # the SDK prints its own "... details: <link>" lines; the summary has them
    pool_log = logging.getLogger("urllib3.connectionpool")  # "Retrying ...": the one error line below says it
    pool_level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sdk_output), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # kfp.Client: "only works with ... v2.0.0-beta.2 and later"
            yield
    except kfp_server_api.ApiException as exc:
        status, message = exc.status or 0, _server_message(exc, request.credential)
        if status == 0:  # kfp_server_api/rest.py turns TLS failures into ApiException(status=0, reason=...)
            raise SubmitError(f"{step}: cannot reach the KFP API at {request.host}: "
                              f"{request.credential.scrub(str(exc.reason))[:200]}") from None
        if status in (401, 403):
            raise _auth_error(status, step, request, namespace, message) from None
        hint = ""
        if status == 400 and "upload" in step and namespace:
            # The upload handlers answer 400, not 403, when authorization fails (kubeflow/pipelines 2.17.0
            # backend/src/apiserver/server/pipeline_upload_server.go canUploadVersionedPipeline).
            hint = f" (KFP also answers 400 to an upload it does not authorize: check access to namespace {namespace})"
        if status == 404:
            hint = " (is --host the KFP API? Kubeflow Platform serves it under /pipeline, e.g. http://localhost:8080/pipeline)"
        said = f": {message}" if message else ""
        raise SubmitError(f"{step}: the KFP API at {request.host} answered HTTP {status} {exc.reason or ''}".rstrip()
                          + said + hint) from None
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise SubmitError(f"{step}: cannot reach the KFP API at {request.host} ({type(reason).__name__}): is the "
                          "port-forward running and the URL right?") from None
    except ValueError as exc:  # the SDK's own checks, e.g. "Multiple pipelines with the name"
        raise SubmitError(f"{step}: {request.credential.scrub(str(exc))}") from None
    finally:
        pool_log.setLevel(pool_level)


def _healthz(request: SubmitRequest) -> dict:
    """GET /apis/v2beta1/healthz once (kfp.Client's own check retries 5 times, 5 s apart, on 401), with the same
    credential configuration kfp.Client builds (kfp 2.17.0 kfp/client/client.py _load_config)."""
    import kfp_server_api

    config = kfp_server_api.Configuration(host=request.host)
    kwargs = request.credential.client_kwargs()
    if "existing_token" in kwargs:
        config.api_key["authorization"] = kwargs["existing_token"]
        config.api_key_prefix["authorization"] = "Bearer"
    elif "credentials" in kwargs:
        config.api_key["authorization"] = "placeholder"
        config.api_key_prefix["authorization"] = "Bearer"
        config.refresh_api_key_hook = kwargs["credentials"].refresh_api_key_hook
    api = kfp_server_api.HealthzServiceApi(kfp_server_api.ApiClient(config, cookie=kwargs.get("cookies")))
    with _api_step("healthz", request, request.namespace):
        response = api.healthz_service_get_healthz(_preload_content=False, _request_timeout=HEALTHZ_TIMEOUT_S)
    try:
        data = json.loads(response.data)
    except ValueError:
        data = None
    # kubeflow/pipelines 2.17.0 backend/src/apiserver/main.go healthzResponse: commit_sha, tag_name, multi_user.
    if not isinstance(data, dict) or not isinstance(data.get("multi_user"), bool):
        kind = response.headers.get("Content-Type", "?")
        raise SubmitError(f"healthz: {request.host}/apis/v2beta1/healthz did not answer as the KFP API (HTTP "
                          f"{response.status}, {kind}): a sign-in page means {request.credential.describe()} was not "
                          "accepted; Kubeflow Platform serves the API under /pipeline")
    return data


def _check_backend(healthz: dict, request: SubmitRequest) -> str:
    tag = str(healthz.get("tag_name") or "unknown")
    if request.min_backend:
        found, wanted = _VERSION.match(tag), _VERSION.fullmatch(request.min_backend)
        if not found:
            log.warning("KFP backend version %r unknown; this pipeline needs >= %s", tag, request.min_backend)
        elif tuple(map(int, found.groups())) < tuple(map(int, wanted.groups())):
            raise SubmitError(f"the KFP backend at {request.host} is {tag}; this pipeline needs >= "
                              f"{request.min_backend}")
    return tag


def _namespace(healthz: dict, request: SubmitRequest) -> str | None:
    if not healthz["multi_user"]:
        if request.namespace:
            log.warning("the KFP API at %s is standalone (single-user): --namespace %s is ignored", request.host,
                        request.namespace)
        return None
    if request.namespace:
        return request.namespace
    if request.credential.kind == "in-cluster" and Path(POD_NAMESPACE_FILE).is_file():
        return Path(POD_NAMESPACE_FILE).read_text().strip()  # what kfp.Client does in a pod
    raise ConfigError(f"--namespace: required, the KFP API at {request.host} is multi-user: give your profile "
                      "namespace, e.g. kubeflow-user-example-com")


# ---------------------------------------------------------------------------------------------- submit
@dataclasses.dataclass(frozen=True)
class SubmitResult:
    run_id: str
    run_url: str
    experiment_id: str
    experiment: str
    namespace: str | None
    backend: str  # healthz tag_name
    package_sha256: str
    pipeline_id: str | None = None
    pipeline_name: str | None = None
    pipeline_created: bool = False
    version_id: str | None = None
    version_name: str | None = None
    version_reused: bool = False


def _filter(*predicates: tuple[str, int, str]) -> str:
    return json.dumps({"predicates": [{"key": k, "operation": op, "stringValue": v} for k, op, v in predicates]})


def _only(items, what: str):
    items = items or []
    if len(items) > 1:
        raise SubmitError(f"{what}: {len(items)} found with that name, expected one")
    return items[0] if items else None


def _upload(client, request: SubmitRequest, package: Package, namespace: str | None) -> dict:
    """Find or create the pipeline, then find (same sha256) or upload the version; returns ids and names."""
    import kfp_server_api

    name = request.pipeline_name or package.name
    marker = f"sha256:{package.sha256}"
    # list_pipelines with the namespace: kfp.Client.get_pipeline_id lists without one, which in multi-user KFP
    # finds only shared pipelines (kubeflow/pipelines 2.17.0 backend/src/apiserver/server/pipeline_server.go
    # listPipelines filters on the request's namespace).
    with _api_step("find pipeline", request, namespace):
        found = _only(client.list_pipelines(filter=_filter(("display_name", EQUALS, name)), namespace=namespace,
                                            page_size=2).pipelines, f"pipeline {name!r}")
    created = found is None
    if created:
        # An empty pipeline, then the package as its first version, so that every version (the first too) has
        # our name and sha256 description: upload_pipeline names the first version after the pipeline
        # (pipeline_upload_server.go uploadPipeline: the version's Name is the pipeline's).
        with _api_step("create pipeline", request, namespace):
            found = client.pipelines.pipeline_service_create_pipeline(kfp_server_api.V2beta1Pipeline(
                name=name, display_name=name, description=package.description, namespace=namespace))
    pipeline_id = found.pipeline_id

    version = None
    if not created:
        key, op, value = ("display_name", EQUALS, request.version_name) if request.version_name else \
            ("description", IS_SUBSTRING, marker)
        with _api_step("find pipeline version", request, namespace):
            version = _only(client.list_pipeline_versions(pipeline_id, filter=_filter((key, op, value)),
                                                          sort_by="created_at desc", page_size=1).pipeline_versions,
                            f"pipeline {name!r} version")
        if version is not None and marker not in (version.description or ""):
            raise SubmitError(f"--version-name {request.version_name!r}: pipeline {name!r} already has that version "
                              "with another package; choose a new name or omit it (<time>-<sha256>)")
    reused = version is not None
    if not reused:
        version_name = request.version_name or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{package.sha256[:12]}"
        with _api_step("upload pipeline version", request, namespace):
            version = client.upload_pipeline_version(str(package.path), version_name, pipeline_id=pipeline_id,
                                                     description=f"package {marker}")
    return {"pipeline_id": pipeline_id, "pipeline_name": name, "pipeline_created": created,
            "version_id": version.pipeline_version_id, "version_name": version.display_name or version.name,
            "version_reused": reused}


def submit(request: SubmitRequest, pipeline_func, arguments: dict,
           pipeline_parameters: dict | None = None) -> SubmitResult:
    """Compile `pipeline_func`, check `arguments` against it, then (first request) healthz and the rest."""
    import kfp

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_package(pipeline_func, Path(tmp), pipeline_parameters)
        check_parameters(package, arguments)
        healthz = _healthz(request)
        backend = _check_backend(healthz, request)
        namespace = _namespace(healthz, request)
        with _api_step("connect", request, namespace):
            client = kfp.Client(host=request.host, namespace=namespace, **request.credential.client_kwargs())
        experiment_name = request.experiment or DEFAULT_EXPERIMENT
        uploaded = {}
        if request.upload:
            uploaded = _upload(client, request, package, namespace)
            with _api_step("experiment", request, namespace):
                experiment = client.create_experiment(experiment_name, namespace=namespace)  # get or create
            run_name = request.run_name or f"{uploaded['pipeline_name']} {uploaded['version_name']}"
            with _api_step("create run", request, namespace):
                run = client.run_pipeline(experiment.experiment_id, run_name, params=arguments,
                                          pipeline_id=uploaded["pipeline_id"], version_id=uploaded["version_id"])
        else:
            run_name = request.run_name or f"{package.name} {time.strftime('%Y-%m-%d %H-%M-%S')}"
            with _api_step("create run", request, namespace):
                run = client.create_run_from_pipeline_package(
                    str(package.path), arguments=arguments, run_name=run_name, experiment_name=experiment_name,
                    namespace=namespace).run_info
        warn_default_images(package)  # after the run exists: a failed submit stays one error line
    return SubmitResult(run_id=run.run_id, run_url=f"{request.host}/#/runs/details/{run.run_id}",
                        experiment_id=run.experiment_id, experiment=experiment_name, namespace=namespace,
                        backend=backend, package_sha256=package.sha256, **uploaded)


def describe_result(result: SubmitResult) -> str:
    """What `pipeline.py submit` prints: the run URL first, then the pipeline, version and experiment."""
    lines = [f"run {result.run_id}: {result.run_url}"]
    if result.pipeline_id:
        lines.append(f"pipeline {result.pipeline_name}: {result.pipeline_id}"
                     + (" (created)" if result.pipeline_created else ""))
        lines.append(f"version {result.version_name}: {result.version_id}"
                     + (" (reused: same package)" if result.version_reused else " (uploaded)"))
    lines.append(f"package sha256 {result.package_sha256}; experiment {result.experiment} ({result.experiment_id})"
                 + (f" in namespace {result.namespace}" if result.namespace else "")
                 + f"; KFP backend {result.backend}")
    return "\n".join(lines)
