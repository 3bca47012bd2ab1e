"""A loopback stand-in for the Kubeflow Pipelines API (v2beta1), for tests only.

There is no KFP API server here, so `pipeline.py submit` (cluster/submit.py, through kfp.Client 2.17.0) is
tested against this small `http.server` on 127.0.0.1 (a free port). It is NOT KFP: it serves only the REST
paths the SDK calls in the submit flows (paths and bodies from kfp_server_api 2.17: api/*_service_api.py),

    GET  /apis/v2beta1/healthz                         {"commit_sha", "tag_name", "multi_user", "pipeline_store"}
    POST /apis/v2beta1/pipelines                       create a pipeline (no version)
    GET  /apis/v2beta1/pipelines                       list, `filter` on display_name/name/description
    POST /apis/v2beta1/pipelines/upload                multipart `uploadfile` -> pipeline + first version
    POST /apis/v2beta1/pipelines/upload_version        multipart `uploadfile`, ?pipelineid=&name=
    GET  /apis/v2beta1/pipelines/{id}/versions         list, `filter`, sort_by created_at [desc]
    POST /apis/v2beta1/experiments                     create
    GET  /apis/v2beta1/experiments                     list, `filter`, ?namespace=
    POST /apis/v2beta1/runs                            from a pipeline version or an inline pipeline_spec

optionally under a path prefix (`prefix="/pipeline"`, as the Kubeflow Platform gateway serves it), and it
validates every request the way the real pieces do (each rule cites its source, kubeflow/pipelines 2.17.0):

- Authentication, as the gateway does (kubeflow/manifests common/oauth2-proxy/base/oauth2_proxy.cfg:
  `api_routes` get 401, not a login redirect): when the test configures `token` and/or `cookie`, every
  request, healthz included, must carry `Authorization: Bearer <token>` or a Cookie header holding every
  configured `name=value` pair, else 401. With neither configured it is a standalone KFP (no auth).
- Authorization (backend/src/apiserver/resource/resource_manager.go IsAuthorized), multi-user only: a
  namespace outside `namespaces` gets 403 PermissionDenied; the upload handlers answer 400 instead
  (server/pipeline_upload_server.go canUploadVersionedPipeline). Experiments and runs need a namespace
  (server/experiment_server.go canAccessExperiment, run_server.go createRun). Standalone ignores namespaces
  (resource_manager.go ReplaceNamespace).
- Packages (template/v2_template.go NewV2SpecTemplate, server/util.go ReadPipelineFile): a .yaml/.yml/.json
  file whose YAML documents hold one PipelineSpec (strict google.protobuf.json_format parse into
  kfp.pipeline_spec.pipeline_spec_pb2.PipelineSpec, schemaVersion 2.1.0, a name, a root) and at most one
  kubernetes PlatformSpec; else 400.
- Runs (template/v2_template.go validatePipelineJobInputs): every runtime parameter is a root input of the
  pipeline with a value of its type, required inputs are given, no extras; else 400.
- Uniqueness (model/pipeline.go namespace+name, pipeline_version.go pipeline+name, experiment.go
  namespace+name): 409.

Every request is recorded in `calls` (method, path without the prefix, query, which credential matched,
status) so tests can assert on them; secrets are not recorded. It is bounded: it stops itself after
`lifetime` seconds or `max_requests` requests, and `stop()` (or leaving the `with` block) ends it.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import urllib.parse
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from loopback import LoopbackServer

API = "/apis/v2beta1"
# gRPC codes in the error bodies (google.rpc.Code).
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED = 3, 5, 6, 7, 16
OPERATIONS = {1: "EQUALS", 9: "IS_SUBSTRING", "EQUALS": "EQUALS", "IS_SUBSTRING": "IS_SUBSTRING"}
# Filterable fields (model/pipeline.go, pipeline_version.go, experiment.go APIToModelFieldMap; subset).
PIPELINE_FIELDS = {"display_name", "name", "description", "namespace"}
VERSION_FIELDS = {"display_name", "name", "description"}
EXPERIMENT_FIELDS = {"display_name", "name", "description"}
PARAMETER_JSON_TYPES = {"NUMBER_DOUBLE": "number", "NUMBER_INTEGER": "number", "STRING": "string",
                        "BOOLEAN": "bool", "LIST": "list", "STRUCT": "struct"}


class Reply(Exception):
    def __init__(self, code: int, body, content_type: str = "application/json"):
        super().__init__(code)
        self.code, self.body, self.content_type = code, body, content_type


def rpc_error(http: int, grpc: int, message: str) -> Reply:
    return Reply(http, {"error": message, "code": grpc, "message": message, "details": []})


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "struct"}.get(type(value), "null")


def parse_package(filename: str, data: bytes) -> tuple[dict, pipeline_spec_pb2.PipelineSpec]:
    """The uploaded file as (pipeline spec dict, PipelineSpec); Reply(400) when the backend would refuse it."""
    if not filename.lower().endswith((".yaml", ".yml", ".json")):
        raise rpc_error(400, INVALID_ARGUMENT, "Unexpected pipeline file format. Support .zip, .tar.gz, .json or YAML")
    try:
        docs = [d for d in yaml.safe_load_all(data.decode("utf-8")) if d is not None]
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise rpc_error(400, INVALID_ARGUMENT, f"unable to decode yaml document: {exc}") from None
    specs, platforms = [], 0
    for doc in docs:
        if not isinstance(doc, dict):
            raise rpc_error(400, INVALID_ARGUMENT, "unable to decode yaml document: not a mapping")
        if "pipelineInfo" in doc or "root" in doc:
            try:
                spec = json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())
            except json_format.ParseError as exc:
                raise rpc_error(400, INVALID_ARGUMENT, f"invalid v2 pipeline spec: {exc}") from None
            if spec.schema_version != "2.1.0":
                raise rpc_error(400, INVALID_ARGUMENT, f"KFP only supports schema version 2.1.0, but the pipeline "
                                                       f"spec has version {spec.schema_version}")
            if not spec.pipeline_info.name or not re.search(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", spec.pipeline_info.name):
                raise rpc_error(400, INVALID_ARGUMENT, "invalid v2 pipeline spec: name is empty or invalid")
            if not spec.HasField("root"):
                raise rpc_error(400, INVALID_ARGUMENT, "invalid v2 pipeline spec: root component is empty")
            specs.append((doc, spec))
        elif "kubernetes" in doc.get("platforms", {}):
            try:
                json_format.ParseDict(doc, pipeline_spec_pb2.PlatformSpec())
            except json_format.ParseError as exc:
                raise rpc_error(400, INVALID_ARGUMENT, f"cannot unmarshal platform specific configs: {exc}") from None
            platforms += 1
    if len(specs) != 1 or platforms > 1:
        raise rpc_error(400, INVALID_ARGUMENT, f"expected one pipeline spec and at most one platform spec, found "
                                               f"{len(specs)} and {platforms}")
    return specs[0]


def check_run_parameters(spec: pipeline_spec_pb2.PipelineSpec, parameters: dict) -> None:
    """validatePipelineJobInputs: types, required inputs, no extras (Reply 400 otherwise)."""
    inputs = spec.root.input_definitions.parameters
    names = pipeline_spec_pb2.ParameterType.ParameterTypeEnum
    for name, param in inputs.items():
        if name not in parameters:
            if not param.is_optional and not param.HasField("default_value"):
                raise rpc_error(400, INVALID_ARGUMENT, f"parameter {name} is not optional, yet has neither default "
                                                       "value nor user provided value")
            continue
        kind = names.Name(param.parameter_type)
        wanted = PARAMETER_JSON_TYPES.get(kind)
        if wanted is None:
            raise rpc_error(400, INVALID_ARGUMENT, f"input parameter {name} requires type {kind}, invalid for root")
        if json_kind(parameters[name]) != wanted:
            raise rpc_error(400, INVALID_ARGUMENT, f"input parameter {name} requires type {kind}, but the parameter "
                                                   f"value is not of {wanted} value type")
    extra = sorted(set(parameters) - set(inputs))
    if extra:
        raise rpc_error(400, INVALID_ARGUMENT,
                        f"parameter(s) provided are not required by pipeline: {', '.join(extra)}")


def matches(filter_text: str | None, obj: dict, fields: set) -> bool:
    """The list `filter` (backend/api/v2beta1/filter.proto; only EQUALS and IS_SUBSTRING on strings here)."""
    if not filter_text:
        return True
    try:
        predicates = json.loads(filter_text).get("predicates", [])
    except (ValueError, AttributeError):
        raise rpc_error(400, INVALID_ARGUMENT, "invalid filter: not a JSON Filter") from None
    for predicate in predicates:
        key, op = predicate.get("key"), OPERATIONS.get(predicate.get("operation"))
        value = predicate.get("stringValue", predicate.get("string_value"))
        if key not in fields:
            raise rpc_error(400, INVALID_ARGUMENT, f'no support for filtering on unrecognized field "{key}"')
        if op is None or not isinstance(value, str):
            raise rpc_error(400, INVALID_ARGUMENT, f"the stand-in supports EQUALS and IS_SUBSTRING on strings, got "
                                                   f"{predicate.get('operation')!r}")
        field = str(obj.get(key) or "")
        if (op == "EQUALS" and field != value) or (op == "IS_SUBSTRING" and value not in field):
            return False
    return True


class FakeKFPAPI(LoopbackServer):
    """`with FakeKFPAPI(multi_user=True, token="t", namespaces={"alice"}, prefix="/pipeline") as api: ...`;
    `api.host` is the URL to give kfp.Client / `pipeline.py submit --host`."""

    def __init__(self, *, multi_user: bool = False, token: str | None = None, cookie: str | None = None,
                 namespaces=(), prefix: str = "", tag_name: str = "2.17.0", lifetime: float = 60.0,
                 max_requests: int = 300):
        self.multi_user, self.token, self.cookie = multi_user, token, cookie
        self.namespaces, self.prefix, self.tag_name = set(namespaces), prefix.rstrip("/"), tag_name
        self.max_requests = max_requests
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # + "_spec": the parsed PipelineSpec
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.calls: list[dict] = []
        super().__init__(self._handler(), lifetime)
        self.host = f"{self.url}{self.prefix}"

    def calls_to(self, method: str, path: str) -> list[dict]:
        return [c for c in self.calls if c["method"] == method and c["path"] == path]

    # ------------------------------------------------------------ checks shared by the endpoints

    def authenticate(self, headers) -> str | None:
        """Which configured credential the request carries ("bearer" / "cookie"), None if none is configured."""
        if self.token is None and self.cookie is None:
            return None
        if self.token is not None and headers.get("Authorization") == f"Bearer {self.token}":
            return "bearer"
        if self.cookie is not None:
            sent = dict(p.strip().partition("=")[::2] for p in (headers.get("Cookie") or "").split(";") if "=" in p)
            wanted = dict(p.strip().partition("=")[::2] for p in self.cookie.split(";") if "=" in p)
            if wanted and all(sent.get(k) == v for k, v in wanted.items()):
                return "cookie"
        raise Reply(401, "Unauthorized\n", "text/plain; charset=utf-8")

    def namespace(self, value: str | None) -> str:
        return (value or "") if self.multi_user else ""  # ReplaceNamespace

    def authorize(self, namespace: str, verb: str) -> None:
        """IsAuthorized in multi-user mode; shared ("") resources: reads pass, writes need the KFP namespace."""
        if not self.multi_user or (not namespace and verb in ("get", "list")):
            return
        target = namespace or "kubeflow"
        if target not in self.namespaces:
            raise rpc_error(403, PERMISSION_DENIED, f"Failed to authorize with API: PermissionDenied: User is not "
                                                   f"authorized to {verb} in namespace {target}")

    # ------------------------------------------------------------ endpoints

    def healthz(self, query, body) -> dict:
        return {"commit_sha": "stand-in", "tag_name": self.tag_name, "multi_user": self.multi_user,
                "pipeline_store": "database"}

    def _new_pipeline(self, name: str, display_name: str, description: str, namespace: str) -> dict:
        if any(p["name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise rpc_error(409, ALREADY_EXISTS, f"Failed to create a pipeline: pipeline {name} already exists")
        pipeline = {"pipeline_id": str(uuid.uuid4()), "name": name, "display_name": display_name or name,
                    "description": description, "namespace": namespace, "created_at": _now()}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _new_version(self, pipeline_id: str, name: str, display_name: str, description: str, doc: dict, spec) -> dict:
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name for v in self.versions.values()):
            raise rpc_error(409, ALREADY_EXISTS, "Failed to create a pipeline version")
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "name": name,
                   "display_name": display_name or name, "description": description, "created_at": _now(),
                   "pipeline_spec": doc, "_spec": spec, "_order": len(self.versions)}
        self.versions[version["pipeline_version_id"]] = version
        return version

    def create_pipeline(self, query, body) -> dict:
        name = body.get("name") or body.get("display_name") or ""
        if not name:
            raise rpc_error(400, INVALID_ARGUMENT, "name is required")
        namespace = self.namespace(body.get("namespace"))
        self.authorize(namespace, "create")
        return self._new_pipeline(name, body.get("display_name") or "", body.get("description") or "", namespace)

    def list_pipelines(self, query, body) -> dict:
        namespace = self.namespace(query.get("namespace"))
        self.authorize(namespace, "list")
        found = [p for p in self.pipelines.values() if p["namespace"] == namespace
                 and matches(query.get("filter"), p, PIPELINE_FIELDS)]
        return {"pipelines": found, "total_size": len(found)} if found else {}

    def upload_pipeline(self, query, upload) -> dict:
        filename, data = upload
        namespace = self.namespace(query.get("namespace"))
        try:
            self.authorize(namespace, "create")
        except Reply:
            raise rpc_error(400, INVALID_ARGUMENT, "Failed to create a pipeline") from None
        doc, spec = parse_package(filename, data)
        name = query.get("name") or query.get("display_name") or filename
        pipeline = self._new_pipeline(name, query.get("display_name") or name, query.get("description") or "",
                                      namespace)
        self._new_version(pipeline["pipeline_id"], name, pipeline["display_name"], pipeline["description"], doc, spec)
        return pipeline

    def upload_version(self, query, upload) -> dict:
        filename, data = upload
        pipeline = self.pipelines.get(query.get("pipelineid") or "")
        if pipeline is None:
            raise rpc_error(400, INVALID_ARGUMENT, "Failed to create a pipeline version")
        try:
            self.authorize(pipeline["namespace"], "create")
        except Reply:
            raise rpc_error(400, INVALID_ARGUMENT, "Failed to create a pipeline version") from None
        doc, spec = parse_package(filename, data)
        name = query.get("name") or query.get("display_name") or filename
        return self._public(self._new_version(pipeline["pipeline_id"], name, query.get("display_name") or name,
                                              query.get("description") or "", doc, spec))

    def list_versions(self, query, body, pipeline_id: str) -> dict:
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline is None:
            raise rpc_error(404, NOT_FOUND, f"Failed to get pipeline {pipeline_id}: not found")
        self.authorize(pipeline["namespace"], "list")
        sort_by = query.get("sort_by") or ""
        if sort_by not in ("", "created_at", "created_at desc"):
            raise rpc_error(400, INVALID_ARGUMENT, f"the stand-in sorts on created_at only, got {sort_by!r}")
        found = sorted((v for v in self.versions.values() if v["pipeline_id"] == pipeline_id
                        and matches(query.get("filter"), v, VERSION_FIELDS)),
                       key=lambda v: v["_order"], reverse=sort_by.endswith("desc"))
        found = found[:int(query.get("page_size") or 0) or None]
        return {"pipeline_versions": [self._public(v) for v in found], "total_size": len(found)} if found else {}

    def create_experiment(self, query, body) -> dict:
        name, namespace = body.get("display_name") or "", self.namespace(body.get("namespace"))
        if not name:
            raise rpc_error(400, INVALID_ARGUMENT, "Experiment must have a non-empty name")
        if self.multi_user and not namespace:
            raise rpc_error(400, INVALID_ARGUMENT, "An experiment cannot have an empty namespace in multi-user mode")
        self.authorize(namespace, "create")
        if any(e["display_name"] == name and e["namespace"] == namespace for e in self.experiments.values()):
            raise rpc_error(409, ALREADY_EXISTS, f"Failed to create a new experiment: {name} already exists")
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": name,
                      "description": body.get("description") or "", "namespace": namespace, "created_at": _now(),
                      "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def list_experiments(self, query, body) -> dict:
        namespace = self.namespace(query.get("namespace"))
        if self.multi_user and not namespace:
            raise rpc_error(400, INVALID_ARGUMENT, "An experiment cannot have an empty namespace in multi-user mode")
        self.authorize(namespace, "list")
        found = [e for e in self.experiments.values() if e["namespace"] == namespace
                 and matches(query.get("filter"), e, EXPERIMENT_FIELDS)]
        return {"experiments": found, "total_size": len(found)} if found else {}

    def create_run(self, query, body) -> dict:
        if not body.get("display_name"):
            raise rpc_error(400, INVALID_ARGUMENT, "The run name is empty. Please specify a valid name")
        experiment = self.experiments.get(body.get("experiment_id") or "")
        if experiment is None:
            raise rpc_error(404, NOT_FOUND, f"experiment {body.get('experiment_id')!r} not found")
        self.authorize(experiment["namespace"], "create")
        reference, inline = body.get("pipeline_version_reference"), body.get("pipeline_spec")
        if (reference is None) == (inline is None):
            raise rpc_error(400, INVALID_ARGUMENT, "a run needs exactly one of pipeline_version_reference and "
                                                   "pipeline_spec")
        if reference is not None:
            version = self.versions.get(reference.get("pipeline_version_id") or "")
            if version is None or version["pipeline_id"] != reference.get("pipeline_id"):
                raise rpc_error(404, NOT_FOUND, "pipeline version not found in that pipeline")
            self.authorize(self.pipelines[version["pipeline_id"]]["namespace"], "get")
            spec = version["_spec"]
        else:
            doc = inline.get("pipeline_spec", inline) if "platform_spec" in inline else inline
            _, spec = parse_package("inline.json", json.dumps(doc).encode())
        parameters = (body.get("runtime_config") or {}).get("parameters") or {}
        check_run_parameters(spec, parameters)
        run = {"run_id": str(uuid.uuid4()), "experiment_id": experiment["experiment_id"],
               "display_name": body["display_name"], "state": "PENDING", "storage_state": "AVAILABLE",
               "created_at": _now(), "runtime_config": {"parameters": parameters}}
        if reference is not None:
            run["pipeline_version_reference"] = reference
        self.runs[run["run_id"]] = {**run, "namespace": experiment["namespace"],
                                    "pipeline_name": spec.pipeline_info.name, "_spec": spec}
        return run

    @staticmethod
    def _public(version: dict) -> dict:
        return {k: v for k, v in version.items() if not k.startswith("_")}

    # ------------------------------------------------------------ HTTP

    def _handler(self):
        api = self
        routes = [("GET", re.compile(rf"{API}/healthz"), api.healthz, None),
                  ("POST", re.compile(rf"{API}/pipelines"), api.create_pipeline, "json"),
                  ("GET", re.compile(rf"{API}/pipelines"), api.list_pipelines, None),
                  ("POST", re.compile(rf"{API}/pipelines/upload"), api.upload_pipeline, "multipart"),
                  ("POST", re.compile(rf"{API}/pipelines/upload_version"), api.upload_version, "multipart"),
                  ("GET", re.compile(rf"{API}/pipelines/(?P<pipeline_id>[^/]+)/versions"), api.list_versions, None),
                  ("POST", re.compile(rf"{API}/experiments"), api.create_experiment, "json"),
                  ("GET", re.compile(rf"{API}/experiments"), api.list_experiments, None),
                  ("POST", re.compile(rf"{API}/runs"), api.create_run, "json")]

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, reply: Reply) -> None:
                data = reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body).encode()
                self.send_response(reply.code)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self, kind: str):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ctype = self.headers.get("Content-Type") or ""
                if kind == "json":
                    if not ctype.startswith("application/json"):
                        raise rpc_error(400, INVALID_ARGUMENT, f"expected a JSON body, got {ctype!r}")
                    try:
                        body = json.loads(raw or b"null")
                    except ValueError:
                        raise rpc_error(400, INVALID_ARGUMENT, "body is not JSON") from None
                    if not isinstance(body, dict):
                        raise rpc_error(400, INVALID_ARGUMENT, "body is not a JSON object")
                    return body
                if not ctype.startswith("multipart/form-data") or "boundary=" not in ctype:
                    raise rpc_error(400, INVALID_ARGUMENT, "Failed to read pipeline from file")
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                files = [(part.get_filename(), part.get_payload(decode=True)) for part in message.iter_parts()
                         if part.get_param("name", header="content-disposition") == "uploadfile"]
                if len(files) != 1 or not files[0][0]:
                    raise rpc_error(400, INVALID_ARGUMENT, "Failed to read pipeline from file")
                return files[0]

            def _serve(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
                path = url.path[len(api.prefix):] if url.path.startswith(api.prefix + "/") else None
                call = {"method": method, "path": path if path is not None else url.path, "query": query,
                        "auth": None, "status": None}
                with api.lock:
                    api.calls.append(call)
                    over = len(api.calls) > api.max_requests
                try:
                    if over:
                        threading.Thread(target=api.stop, daemon=True).start()
                        raise rpc_error(503, 14, "stand-in KFP API request limit reached")
                    call["auth"] = api.authenticate(self.headers)
                    if path is None:
                        raise rpc_error(404, NOT_FOUND, f"the stand-in serves only {api.prefix or '/'}{API[1:]}/...")
                    for route_method, pattern, endpoint, kind in routes:
                        match = pattern.fullmatch(path)
                        if match and route_method == method:
                            body = self._body(kind) if kind else None
                            with api.lock:
                                raise Reply(200, endpoint(query, body, **match.groupdict()))
                    if any(p.fullmatch(path) for _, p, _, _ in routes):
                        raise rpc_error(405, 12, f"{method} {path} is not allowed")
                    raise rpc_error(404, NOT_FOUND, f"the stand-in does not serve {method} {path}")
                except Reply as reply:
                    call["status"] = reply.code
                    self._send(reply)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        return Handler
