"""`pipeline.py submit` against a loopback stand-in of the KFP v2beta1 API (tests/kfp_fake_api.py).

The stand-in checks the credential on every request (bearer token or session cookie, 401 otherwise, as the
Kubeflow gateway's oauth2-proxy answers API routes), the namespace (403 outside the profile, as the KFP API
server's SubjectAccessReview), the uploaded package (parsed as a PipelineSpec) and the run parameters
(types against the pipeline's root inputs). Secrets used here are unique strings so that any leak into
stdout, stderr or an exception message is found.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kfp  # noqa: E402
from kfp import dsl  # noqa: E402

import pipeline  # noqa: E402
from cluster import submit as cluster_submit  # noqa: E402
from kfp_fake_api import FakeKFPAPI  # noqa: E402

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2VjcmV0LXNpZ25hdHVyZS0xMjM0NQ"
COOKIE = "oauth2_proxy_kubeflow=Y29va2llLXNlY3JldC12YWx1ZS02Nzg5MA"
NS = "kubeflow-user-example-com"
ENV_NAMES = ("KF_PIPELINES_TOKEN", "KF_PIPELINES_COOKIE", "KF_PIPELINES_SA_TOKEN_PATH", "KF_PIPELINES_ENDPOINT",
             "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
             "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME")


def secrets_in(text: str) -> list[str]:
    pieces = [TOKEN, COOKIE, COOKIE.partition("=")[2], TOKEN.split(".")[2]]
    return [p for p in pieces if p in text]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    # kfp.Client reads (and may write) ~/.config/kfp/context.json: keep the user's file out of the tests.
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context" / "context.json"))


@pytest.fixture
def kfp_api():
    """Start stand-ins with `kfp_api(**options)`; all are stopped at the end of the test."""
    started = []

    def start(**options) -> FakeKFPAPI:
        api = FakeKFPAPI(**options).__enter__()
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def submit(capsys, *args: str) -> tuple[int, str, str]:
    code = pipeline.main(["submit", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    clean.update(HOME=str(tmp_path), **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "submit", *args], cwd=ROOT, env=clean,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------- CLI, subprocess
def test_help_lists_the_auth_options():
    out = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "submit", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps the help lines
    for option in ("--token-file", "--cookie-file", "--in-cluster", "--namespace", "--host", "--pipeline-name",
                   "--version-name", "--no-upload", "KF_PIPELINES_TOKEN", "KF_PIPELINES_COOKIE",
                   "KF_PIPELINES_SA_TOKEN_PATH", "kubectl -n <ns> create token"):
        assert option in text, option
    assert not re.search(r"--token(?![-\w])", text), "a secret must never be a command-line value"


def test_cli_token_file_uploads_and_runs_with_the_bearer_checked(kfp_api, tmp_path):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS}, prefix="/pipeline")
    token_file = write(tmp_path / "token", TOKEN + "\n")  # as `kubectl create token ... > token` writes it
    out = run_cli(tmp_path, "--host", api.host, "--namespace", NS, "--token-file", token_file, "epochs=1", "tta=1")
    assert out.returncode == 0, out.stderr
    assert not secrets_in(out.stdout + out.stderr)
    [run] = api.runs.values()
    assert f"run {run['run_id']}: {api.host}/#/runs/details/{run['run_id']}" in out.stdout
    assert run["namespace"] == NS and run["runtime_config"]["parameters"] == {"epochs": 1, "tta": 1}
    [pipe] = api.pipelines.values()
    [version] = api.versions.values()
    assert pipe["name"] == "hpa-pipeline" and pipe["namespace"] == NS
    assert run["pipeline_version_reference"] == {"pipeline_id": pipe["pipeline_id"],
                                                 "pipeline_version_id": version["pipeline_version_id"]}
    assert f"pipeline hpa-pipeline: {pipe['pipeline_id']} (created)" in out.stdout
    assert f"version {version['name']}: {version['pipeline_version_id']} (uploaded)" in out.stdout
    assert all(call["auth"] == "bearer" and call["status"] == 200 for call in api.calls), api.calls


def test_cli_wrong_token_is_one_line_401_without_the_secret(kfp_api, tmp_path):
    api = kfp_api(multi_user=True, token="the-servers-token", namespaces={NS}, prefix="/pipeline")
    token_file = write(tmp_path / "token", TOKEN)
    out = run_cli(tmp_path, "--host", api.host, "--namespace", NS, "--token-file", token_file, "epochs=1")
    assert out.returncode == 1
    assert out.stdout == "" and not secrets_in(out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"error: healthz: the KFP API at {api.host} rejected the bearer token from "
                                 f"--token-file {token_file} (HTTP 401 Unauthorized): check that the token has not "
                                 "expired")
    assert [(c["path"], c["status"]) for c in api.calls] == [("/apis/v2beta1/healthz", 401)]


# ---------------------------------------------------------------------------------------------- credentials
def test_session_cookie_from_file_and_from_env(kfp_api, tmp_path, capsys, monkeypatch):
    api = kfp_api(multi_user=True, cookie=COOKIE, namespaces={NS}, prefix="/pipeline")
    # As copied from the browser's request headers, with another cookie beside it.
    cookie_file = write(tmp_path / "cookie", f"Cookie: {COOKIE}; csrf=abc\n")
    code, out, err = submit(capsys, "--host", api.host, "--namespace", NS, "--cookie-file", cookie_file, "epochs=1")
    assert code == 0, err
    assert not secrets_in(out + err)
    assert api.calls and all(call["auth"] == "cookie" and call["status"] == 200 for call in api.calls)

    monkeypatch.setenv("KF_PIPELINES_COOKIE", COOKIE)
    code, out, err = submit(capsys, "--host", api.host, "--namespace", NS, "epochs=1")
    assert code == 0, err
    assert len(api.runs) == 2 and "(reused: same package)" in out

    api.cookie = "oauth2_proxy_kubeflow=a-newer-session"
    code, out, err = submit(capsys, "--host", api.host, "--namespace", NS, "epochs=1")
    assert code == 1 and not secrets_in(out + err) and len(err.strip().splitlines()) == 1
    assert "rejected the session cookie from KF_PIPELINES_COOKIE (HTTP 401 Unauthorized)" in err
    assert "log in again" in err


def test_in_cluster_service_account_token(kfp_api, tmp_path, capsys, monkeypatch):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS})
    token_path = write(tmp_path / "token", TOKEN)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", token_path)
    code, out, err = submit(capsys, "--in-cluster", "--host", api.host, "--namespace", NS, "epochs=1")
    assert code == 0, err
    assert not secrets_in(out + err)
    assert api.runs and all(call["auth"] == "bearer" for call in api.calls)

    # The projected token is re-read for every request (the kubelet rotates it): rotate it between two runs of
    # the same kfp.Client configuration, which ServiceAccountTokenVolumeCredentials re-reads.
    rotated = TOKEN[::-1].replace("=", "")
    request = cluster_submit.make_request(host=api.host, namespace=NS, in_cluster=True)
    write(tmp_path / "token", rotated)
    api.token = rotated
    result = cluster_submit.submit(request, pipeline.hpa_pipeline, {"epochs": 1})
    assert result.run_id in api.runs

    Path(token_path).unlink()
    code, out, err = submit(capsys, "--in-cluster", "--host", api.host, "--namespace", NS, "epochs=1")
    assert code == 2 and err == (f"error: --in-cluster: service-account token {token_path} (from "
                                 "KF_PIPELINES_SA_TOKEN_PATH): no such file\n")


def test_standalone_without_credentials_and_no_upload(kfp_api, capsys):
    api = kfp_api(multi_user=False)
    code, out, err = submit(capsys, "--host", api.host, "--no-upload", "--experiment", "hpa", "epochs=3", "gpus=1",
                            "kaggle_submit=true", 'tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}]')
    assert code == 0, err
    [run] = api.runs.values()
    assert "pipeline_version_reference" not in run and run["pipeline_name"] == "hpa-pipeline"
    assert run["runtime_config"]["parameters"] == {"epochs": 3, "gpus": 1, "kaggle_submit": True,
                                                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}
    assert "comp-train" in run["_spec"].components  # the whole pipeline travelled inline
    assert api.pipelines == {} and api.versions == {}
    assert [e["display_name"] for e in api.experiments.values()] == ["hpa"]
    [create] = api.calls_to("POST", "/apis/v2beta1/runs")
    assert create["status"] == 200 and all(call["auth"] is None for call in api.calls)
    assert out.splitlines()[0] == f"run {run['run_id']}: {api.host}/#/runs/details/{run['run_id']}"


def test_multi_user_without_a_credential_says_what_to_pass(kfp_api, capsys):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS}, prefix="/pipeline")
    code, out, err = submit(capsys, "--host", api.host, "--namespace", NS, "epochs=1")
    assert code == 1 and out == ""
    assert err.strip() == (f"error: healthz: the KFP API at {api.host} requires authentication (HTTP 401) and no "
                           "credential was given: multi-user Kubeflow needs --token-file, --cookie-file or "
                           "--in-cluster; the server said: Unauthorized")


def test_an_unreachable_host_is_one_line(capsys):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = submit(capsys, "--host", f"http://127.0.0.1:{port}", "epochs=1")
    assert code == 1 and err == (f"error: healthz: cannot reach the KFP API at http://127.0.0.1:{port} "
                                 "(NewConnectionError): is the port-forward running and the URL right?\n")


def test_multi_user_needs_a_namespace_and_one_the_token_may_use(kfp_api, tmp_path, capsys):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS}, prefix="/pipeline")
    token_file = write(tmp_path / "token", TOKEN)
    code, out, err = submit(capsys, "--host", api.host, "--token-file", token_file, "epochs=1")
    assert code == 2 and err.startswith(f"error: --namespace: required, the KFP API at {api.host} is multi-user")
    assert [c["path"] for c in api.calls] == ["/apis/v2beta1/healthz"]

    code, out, err = submit(capsys, "--host", api.host, "--namespace", "someone-else", "--token-file", token_file,
                            "epochs=1")
    assert code == 1 and not secrets_in(out + err) and len(err.strip().splitlines()) == 1
    assert (f"refused the bearer token from --token-file {token_file} (HTTP 403 Forbidden) for namespace "
            "someone-else: check that the token's service account") in err
    assert api.pipelines == {} and api.runs == {}


@pytest.mark.parametrize("setup, message", [
    (lambda d: ["--token-file", str(d / "missing")], "--token-file {d}/missing: no such file"),
    (lambda d: ["--token-file", write(d / "empty", "  \n")], "--token-file {d}/empty: is empty"),
    (lambda d: ["--token-file", str(d)], "--token-file {d}: is a directory, expected a file"),
    (lambda d: ["--token-file", "/proc/self/mem"], "--token-file /proc/self/mem: cannot be read"),
    (lambda d: ["--token-file", write(d / "two", f"{TOKEN}\n{TOKEN}\n")],
     "--token-file {d}/two: expected one token on one line, found 2 lines"),
    (lambda d: ["--token-file", write(d / "json", '{"token": "%s"}' % TOKEN)],
     "--token-file {d}/json: expected a bearer token"),
    (lambda d: ["--cookie-file", write(d / "c", COOKIE.partition("=")[2])], "--cookie-file {d}/c: cookie 1 is not"),
    (lambda d: ["--cookie-file", str(d / "c"), "--token-file", str(d / "t")],
     "credentials: --token-file and --cookie-file both given; use exactly one"),
    (lambda d: ["--in-cluster", "--token-file", str(d / "t")],
     "credentials: --token-file and --in-cluster both given"),
    (lambda d: ["--no-upload", "--version-name", "v1"], "--version-name: names an uploaded pipeline"),
    (lambda d: ["--namespace", "Not_A_Namespace"], "--namespace 'Not_A_Namespace': expected a Kubernetes namespace"),
])
def test_bad_credentials_and_options_fail_in_one_line_before_any_request(kfp_api, tmp_path, capsys, setup, message):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS})
    code, out, err = submit(capsys, "--host", api.host, *setup(tmp_path), "epochs=1")
    assert code == 2 and out == ""
    assert err.startswith("error: " + message.format(d=tmp_path)), err
    assert err.count("\n") == 1 and not secrets_in(err)
    assert api.calls == []


def test_token_and_cookie_in_the_environment_conflict(kfp_api, capsys, monkeypatch):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS})
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    monkeypatch.setenv("KF_PIPELINES_COOKIE", COOKIE)
    code, out, err = submit(capsys, "--host", api.host, "--namespace", NS, "epochs=1")
    assert code == 2 and err == ("error: credentials: KF_PIPELINES_TOKEN and KF_PIPELINES_COOKIE both given; use "
                                 "exactly one (unset the environment variable or drop the option)\n")
    assert api.calls == []


@pytest.mark.parametrize("override, message", [
    ("epochs=-1", "epochs"), ("epochs=one", "override 'epochs=one': epochs expects a int"),
    ("no_such_parameter=1", "override 'no_such_parameter=1': expected key=value"),
])
def test_bad_overrides_are_rejected_before_any_request(kfp_api, tmp_path, capsys, override, message):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS})
    token_file = write(tmp_path / "token", TOKEN)
    code, out, err = submit(capsys, "--host", api.host, "--namespace", NS, "--token-file", token_file, override)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert api.calls == []


def test_run_parameters_are_checked_against_the_compiled_pipeline_before_any_request(kfp_api):
    api = kfp_api()
    request = cluster_submit.make_request(host=api.host)
    with pytest.raises(pipeline.ConfigError, match=r"run parameter epochs='3': pipeline hpa-pipeline expects a "
                                                   r"NUMBER_INTEGER"):
        cluster_submit.submit(request, pipeline.hpa_pipeline, {"epochs": "3"})
    with pytest.raises(pipeline.ConfigError, match=r"run parameter 'learning_rate': pipeline hpa-pipeline has no "
                                                   r"such input"):
        cluster_submit.submit(request, pipeline.hpa_pipeline, {"learning_rate": 0.1})
    assert api.calls == []


# ---------------------------------------------------------------------------------------------- upload and versions
def test_upload_creates_the_pipeline_then_versions_of_it(kfp_api, tmp_path, capsys):
    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS}, prefix="/pipeline")
    token_file = write(tmp_path / "token", TOKEN)
    args = ["--host", api.host, "--namespace", NS, "--token-file", token_file]

    code, out, err = submit(capsys, *args, "epochs=1")
    assert code == 0, err
    [pipe] = api.pipelines.values()
    [first] = api.versions.values()
    sha = re.search(r"package sha256 ([0-9a-f]{64})", out).group(1)
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-{sha[:12]}", first["name"])
    assert first["description"] == f"package sha256:{sha}"
    assert len(api.calls_to("POST", "/apis/v2beta1/pipelines")) == 1

    # A different package (other compile-time defaults) becomes a new version of the same pipeline.
    result = pipeline.submit_run(api.host, {"epochs": 1}, namespace=NS, token_file=token_file,
                                 pipeline_parameters={"epochs": 3})
    assert not result.pipeline_created and not result.version_reused and result.pipeline_id == pipe["pipeline_id"]
    assert len(api.pipelines) == 1 and len(api.versions) == 2 and result.package_sha256 != sha
    second = api.versions[result.version_id]
    assert second["pipeline_id"] == pipe["pipeline_id"] and second["name"].endswith(result.package_sha256[:12])
    assert api.runs[result.run_id]["pipeline_version_reference"]["pipeline_version_id"] == result.version_id

    # The first package again: detected by its sha256, its version is reused, nothing is uploaded.
    uploads = len(api.calls_to("POST", "/apis/v2beta1/pipelines/upload_version"))
    code, out, err = submit(capsys, *args, "--run-name", "again", "epochs=2")
    assert code == 0, err
    assert f"version {first['name']}: {first['pipeline_version_id']} (reused: same package)" in out
    assert len(api.calls_to("POST", "/apis/v2beta1/pipelines/upload_version")) == uploads and len(api.versions) == 2
    [again] = [r for r in api.runs.values() if r["display_name"] == "again"]
    assert again["pipeline_version_reference"]["pipeline_version_id"] == first["pipeline_version_id"]

    # An explicit version name for a new package; the same name again for another package is refused.
    code, out, err = submit(capsys, *args, "--version-name", "v-one", "--pipeline-name", "hpa-nightly", "epochs=1")
    assert code == 0, err
    assert "pipeline hpa-nightly:" in out and "version v-one:" in out and len(api.pipelines) == 2
    result = pipeline.submit_run(api.host, {}, namespace=NS, token_file=token_file, pipeline_name="hpa-nightly",
                                 version_name="v-one")
    assert result.version_reused  # same package under that name
    with pytest.raises(cluster_submit.SubmitError, match=r"--version-name 'v-one': pipeline 'hpa-nightly' already "
                                                         r"has that version with another package"):
        pipeline.submit_run(api.host, {}, namespace=NS, token_file=token_file, pipeline_name="hpa-nightly",
                            version_name="v-one", pipeline_parameters={"epochs": 5})
    assert all(call["auth"] == "bearer" for call in api.calls)


@dsl.component(base_image="python:3.11-slim")
def _echo(text: str) -> str:
    return text


@dsl.pipeline(name="submit-test-pipeline")
def _small_pipeline(text: str = "hi", repeat: int = 1):
    _echo(text=text)


def test_submit_run_takes_the_pipeline_to_compile_and_a_minimum_backend(kfp_api):
    api = kfp_api(tag_name="2.16.0")
    result = pipeline.submit_run(api.host, {"repeat": 2}, pipeline_func=_small_pipeline)
    assert result.pipeline_name == "submit-test-pipeline" and result.backend == "2.16.0"
    assert api.runs[result.run_id]["pipeline_name"] == "submit-test-pipeline"
    with pytest.raises(cluster_submit.SubmitError, match=rf"the KFP backend at {re.escape(api.host)} is 2.16.0; "
                                                         r"this pipeline needs >= 2.17.0"):
        pipeline.submit_run(api.host, {}, pipeline_func=_small_pipeline, min_backend="2.17.0")


# ---------------------------------------------------------------------------------------------- the stand-in itself
@pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")
def test_the_stand_in_refuses_what_the_kfp_api_refuses(kfp_api, tmp_path):
    """No fake that accepts anything: bad packages, bad run parameters and missing credentials are refused."""
    import kfp_server_api

    api = kfp_api(multi_user=True, token=TOKEN, namespaces={NS})
    client = kfp.Client(host=api.host, namespace=NS, existing_token=TOKEN)
    bad = write(tmp_path / "bad.yaml", "pipelineInfo: {name: x}\nroot: {}\nschemaVersion: 2.0.0\n")
    with pytest.raises(kfp_server_api.ApiException) as info:
        client.upload_pipeline(bad, "x", namespace=NS)
    assert info.value.status == 400 and "schema version 2.1.0" in str(info.value.body)
    not_a_spec = write(tmp_path / "typo.yaml", "pipelineInfo: {name: x}\nroot: {dag: {}}\nschemaVersion: 2.1.0\n"
                                               "deploymentSpecc: {}\n")
    with pytest.raises(kfp_server_api.ApiException) as info:
        client.upload_pipeline(not_a_spec, "x", namespace=NS)
    assert info.value.status == 400 and "deploymentSpecc" in str(info.value.body)

    package = cluster_submit.compile_package(pipeline.hpa_pipeline, tmp_path)
    uploaded = client.upload_pipeline(str(package.path), "hpa", namespace=NS)
    [version] = client.list_pipeline_versions(uploaded.pipeline_id).pipeline_versions
    experiment = client.create_experiment("e", namespace=NS)
    for params, text in (({"epochs": "3"}, "epochs requires type NUMBER_INTEGER"),
                         ({"plot_samples": 1}, "plot_samples requires type BOOLEAN"),
                         ({"nope": 1}, "not required by pipeline: nope")):
        with pytest.raises(kfp_server_api.ApiException) as info:
            client.run_pipeline(experiment.experiment_id, "r", params=params, pipeline_id=uploaded.pipeline_id,
                                version_id=version.pipeline_version_id)
        assert info.value.status == 400 and text in str(info.value.body), info.value.body
    with pytest.raises(kfp_server_api.ApiException) as info:
        client.create_experiment("e2", namespace="other-profile")
    assert info.value.status == 403

    anonymous = kfp.Client(host=api.host, namespace=NS)
    with pytest.raises(kfp_server_api.ApiException) as info:
        anonymous.list_experiments(namespace=NS)
    assert info.value.status == 401
    assert api.runs == {}


def test_credentials_keep_the_secret_out_of_repr_and_scrub_it(tmp_path):
    token_file = write(tmp_path / "t", f"Bearer {TOKEN}")
    request = cluster_submit.make_request(host="http://localhost:3000", token_file=token_file, env={})
    assert request.credential.client_kwargs() == {"existing_token": TOKEN}
    assert not secrets_in(repr(request) + str(request.credential) + request.credential.describe())
    assert request.credential.scrub(f"echo {TOKEN} back") == "echo <redacted> back"
    cookie = cluster_submit.resolve_credential(env={"KF_PIPELINES_COOKIE": f"{COOKIE}; other=x"})
    assert cookie.client_kwargs() == {"cookies": f"{COOKIE}; other=x"}
    assert not secrets_in(cookie.scrub(f"bad cookie {COOKIE.partition('=')[2]}") + repr(cookie))
    with pytest.raises(pipeline.ConfigError, match="must not carry credentials") as info:
        cluster_submit.make_request(host=f"http://user:{TOKEN}@localhost:3000", env={})
    assert not secrets_in(str(info.value))


# ---------------------------------------------------------------------------------------------- default images
def test_submit_warns_when_the_package_runs_on_the_default_images(kfp_api, capsys, caplog):
    """Images are fixed at compile time (HPA_IMAGE / HPA_CUDA_IMAGE, images/README.md); `submit` compiles,
    so a user who forgot them would run the project's public tags without a word. One warning line names
    the variables and the defaults; a package on other images gets none."""
    from hpa import config

    api = kfp_api(multi_user=False)
    code, _, err = submit(capsys, "--host", api.host, "--no-upload", "epochs=1")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "default" in r.getMessage()]
    assert warnings == [f"submit: hpa-pipeline is compiled with the default HPA_IMAGE and HPA_CUDA_IMAGE "
                        f"({config.DEFAULT_IMAGE}, {config.DEFAULT_CUDA_IMAGE}): set them to the images you "
                        "built and pushed (images/README.md)"]
    caplog.clear()
    pipeline.submit_run(api.host, {"repeat": 1}, pipeline_func=_small_pipeline)  # python:3.11-slim only
    assert not [r for r in caplog.records if "default HPA_" in r.getMessage()]


def test_default_image_variables_tell_the_cuda_tag_from_the_cpu_tag():
    from hpa import config

    custom = "image: registry.example/team/hpa-kfp:0.2.0\n"
    assert cluster_submit.default_image_variables(custom) == {}
    assert cluster_submit.default_image_variables(f"image: {config.DEFAULT_CUDA_IMAGE}\n") == \
        {"HPA_CUDA_IMAGE": config.DEFAULT_CUDA_IMAGE}
    assert cluster_submit.default_image_variables(f"image: {config.DEFAULT_IMAGE}\n{custom}") == \
        {"HPA_IMAGE": config.DEFAULT_IMAGE}
    assert list(cluster_submit.default_image_variables(f'"{config.DEFAULT_IMAGE}" {config.DEFAULT_CUDA_IMAGE}')) == \
        ["HPA_IMAGE", "HPA_CUDA_IMAGE"]


def test_submit_with_only_hpa_image_set_names_hpa_cuda_image(kfp_api, tmp_path, monkeypatch):
    """Through the CLI, as a user runs it: HPA_IMAGE alone (what images/README.md used to say) leaves every
    GPU pod on the default CUDA tag; the warning says so and names HPA_CUDA_IMAGE only."""
    from hpa import config

    api = kfp_api(multi_user=False)
    monkeypatch.delenv("HPA_CUDA_IMAGE", raising=False)
    out = run_cli(tmp_path, "--host", api.host, "--no-upload", "epochs=1",
                  env={"HPA_IMAGE": "registry.example/team/hpa-kfp:0.2.0"})
    assert out.returncode == 0, out.stderr
    [line] = [line for line in out.stderr.splitlines() if "default HPA_" in line]  # kfp sets the log format
    assert line.endswith(f"submit: hpa-pipeline is compiled with the default HPA_CUDA_IMAGE "
                         f"({config.DEFAULT_CUDA_IMAGE}): set it to the images you built and pushed (images/README.md)")
