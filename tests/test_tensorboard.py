"""TensorBoard: the event files a training run writes (read back with TensorBoard's own EventAccumulator),
their upload to an s3:// --out while training runs, where a pipeline's training task puts them (a prefix that
is the same in every run, so the task stays a KFP cache hit), and the Kubeflow Tensorboard with the PodDefault
that gives its server the S3 keys (rendered, validated against the vendored CRDs, created through the loopback
stand-in API server).
"""

from __future__ import annotations

import io
import json
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import k8s_fake_api
from hpa import k8s, k8s_manifests
from hpa import tensorboard as tb
from hpa.errors import ConfigError
from hpa.labels import CLASS_NAMES
from k8s_fake_api import FakeKubeAPI
from test_train import check_katib_stdout, kill_after, make_data, run_train, train_cmd

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--size", 32, "--epochs", 2, "--batch-size", 6, "--tensorboard-every-steps", 1)
STEPS_PER_EPOCH = 3  # 24 images, 4 folds: 18 train images / batch 6


def accumulate(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def check_run_events(acc, history: pd.DataFrame, metrics: dict, epochs: int = 2) -> None:
    """What every training run logs: per-step train scalars, per-epoch metrics equal to history.csv and
    metrics.json (float32 in the event file), per-class F1 whose mean is the out-of-sample macro F1."""
    steps = epochs * STEPS_PER_EPOCH
    loss = scalars(acc, "train/loss")
    assert [s for s, _ in loss] == list(range(1, steps + 1))  # every step, increasing
    assert all(np.isfinite(v) and v > 0 for _, v in loss)
    assert [s for s, _ in scalars(acc, "train/lr")] == list(range(1, steps + 1))
    assert all(v > 0 for _, v in scalars(acc, "train/images_per_second"))

    epoch_steps = [STEPS_PER_EPOCH * (e + 1) for e in range(epochs)]
    f1 = scalars(acc, "epoch/val_macro_f1")
    assert [s for s, _ in f1] == epoch_steps
    np.testing.assert_allclose([v for _, v in f1], history["val_macro_f1"], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars(acc, "epoch/val_macro_f1_in_sample")],
                               history["val_macro_f1_in_sample"], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars(acc, "epoch/val_loss")], history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars(acc, "epoch/train_loss")], history["train_loss"], rtol=1e-6)
    assert [v for _, v in scalars(acc, "epoch/epoch")] == list(range(1, epochs + 1))
    assert max(v for _, v in f1) == pytest.approx(metrics["best_val_macro_f1"], rel=1e-6)

    per_class = {name: scalars(acc, f"val_f1_per_class/{name}") for name in CLASS_NAMES}
    assert all([s for s, _ in series] == epoch_steps for series in per_class.values())
    mean = np.mean([[v for _, v in series] for series in per_class.values()], axis=0)
    np.testing.assert_allclose(mean, history["val_macro_f1"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- event files of a training run

def test_local_run_writes_event_files_that_tensorboard_reads(tmp_path):
    data, split = make_data(tmp_path, n=24, size=32)
    out = tmp_path / "run"
    proc = run_train(train_cmd(data, split, out, *TINY))
    lines = check_katib_stdout(proc.stdout, 2)  # stdout still carries only the metric lines
    history = pd.read_csv(out / "history.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    acc = accumulate(out / "tensorboard")
    check_run_events(acc, history, metrics)
    # The metric line's 4 decimals are the same number.
    assert [round(v, 4) for _, v in scalars(acc, "epoch/val_macro_f1")] == [r["val_macro_f1"] for r in lines]

    # A resumed run appends a new event file; the curves stay whole (nothing after step 6 to purge).
    run_train(train_cmd(data, split, out, *TINY, "--resume"))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    check_run_events(accumulate(out / "tensorboard"), history, metrics)


def test_no_tensorboard_writes_nothing(tmp_path):
    data, split = make_data(tmp_path, n=24, size=32)
    out = tmp_path / "run"
    run_train(train_cmd(data, split, out, "--size", 32, "--epochs", 1, "--batch-size", 6, "--no-tensorboard"))
    assert (out / "metrics.json").is_file() and not (out / "tensorboard").exists()


def test_s3_out_gets_the_event_files_while_training_runs(tmp_path, s3_bucket):
    """Killed (SIGKILL: no clean-up) right after epoch 1's checkpoint: epoch 1's curves are already in
    <out>/tensorboard/ in the store. Resumed, the run adds an event file, and the two match its metrics."""
    from hpa.store import open_store

    data, split = make_data(tmp_path, n=24, size=32)
    out = s3_bucket + "runs/r1"
    cmd = train_cmd(data, split, out, *TINY, "--work-dir", tmp_path / "work")
    rc, stderr = kill_after(cmd, f"checkpoint saved: last.pt epoch 1 step {STEPS_PER_EPOCH}")
    assert rc == -signal.SIGKILL, stderr[-2000:]
    store = open_store(out)
    events = [k for k in store.list("tensorboard") if k.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 1, store.list()
    store.get_file(events[0], tmp_path / "partial" / Path(events[0]).name)
    partial = accumulate(tmp_path / "partial")
    assert [s for s, _ in scalars(partial, "epoch/val_macro_f1")] == [STEPS_PER_EPOCH]
    assert [s for s, _ in scalars(partial, "train/loss")][:STEPS_PER_EPOCH] == [1, 2, 3]

    # --resume finishes it: a second event file, and together they hold every step once.
    proc = run_train(cmd + ["--resume"])
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["epoch=2"]  # only epoch 2 was left
    events = [k for k in store.list("tensorboard")]
    assert len(events) == 2 and all(k.startswith("tensorboard/events.out.tfevents.") for k in events)
    for key in events:
        store.get_file(key, tmp_path / "full" / Path(key).name)
    history = pd.read_csv(io.BytesIO(store.get_bytes("history.csv")))
    check_run_events(accumulate(tmp_path / "full"), history, json.loads(store.get_bytes("metrics.json")))


def test_tensorboard_dir_sends_the_events_elsewhere_and_keeps_a_local_copy(tmp_path, s3_bucket):
    """What the pipeline's train task does: --out is the local run artifact, --tensorboard-dir the run's
    s3:// logs prefix; the events are in both."""
    from hpa.store import open_store

    data, split = make_data(tmp_path, n=24, size=32)
    out, logs = tmp_path / "run", s3_bucket + "tensorboard/run-1/resnet18-fold0"
    run_train(train_cmd(data, split, out, "--size", 32, "--epochs", 1, "--batch-size", 6, "--tensorboard-dir", logs))
    local = sorted(p.name for p in (out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(local) == 1 and open_store(logs).list() == local
    assert (out / "tensorboard" / local[0]).read_bytes() == open_store(logs).get_bytes(local[0])


def test_purge_step_hides_what_an_interrupted_run_logged_after_its_checkpoint(tmp_path):
    """A run killed at step 6 with its checkpoint at step 3: the resumed run (purge_step 4) logs 4..6
    again, and TensorBoard shows each step once, with the resumed values."""
    import torch

    first = tb.EventLog(tmp_path, every_steps=1)
    for step in range(1, 7):
        first.train_step(step, torch.tensor(1.0), 2, 0.1)
    first.writer.flush()  # what a SIGKILL leaves: flushed, never closed
    resumed = tb.EventLog(tmp_path, every_steps=1, purge_step=4)
    for step in range(4, 7):
        resumed.train_step(step, torch.tensor(2.0), 2, 0.1)
    resumed.close()
    assert scalars(accumulate(tmp_path), "train/loss") == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]


def test_failed_upload_is_a_warning_and_retried(tmp_path, monkeypatch, caplog):
    import torch

    from hpa.errors import StoreError
    from hpa.localstore import LocalStore

    calls = []

    def flaky_put(self, key, path, sha256=None):
        calls.append(key)
        if len(calls) == 1:
            raise StoreError("store unreachable: connection refused")
        return LocalStore.put_bytes(self, key, Path(path).read_bytes())

    monkeypatch.setattr(LocalStore, "put_file", flaky_put)
    log = tb.EventLog(tmp_path / "local", publish_to=str(tmp_path / "remote"), every_steps=1)
    log.train_step(1, torch.tensor(0.5), 2, 0.1)
    log.publish()
    assert log.upload_failures == 1 and "retrying at the next epoch" in caplog.text
    log.close()
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local").iterdir())


def test_bad_every_steps_is_one_clear_line():
    from hpa.train import TrainConfig

    with pytest.raises(ConfigError, match=r"^tensorboard_every_steps: 0 must be >= 1$"):
        TrainConfig(data="d", split="s", out="o", tensorboard_every_steps=0).validate()
    assert TrainConfig().tensorboard is True


# ---------------------------------------------------------------- the Kubeflow Tensorboard resource

LOGS = "s3://mlpipeline/private/team-a/hpa-kfp/tensorboard"
STORE = "s3://mlpipeline/private/team-a/hpa-kfp"


def test_rendered_tensorboard_is_what_the_web_app_makes_and_matches_the_crd():
    obj = tb.render_tensorboard("hpa-run-1", "team-a", LOGS + "/")
    # crud-web-apps/tensorboards backend/app/utils.py get_tensorboard_dict: the same shape.
    assert obj == {"apiVersion": "tensorboard.kubeflow.org/v1alpha1", "kind": "Tensorboard",
                   "metadata": {"name": "hpa-run-1", "namespace": "team-a", "labels": {tb.S3_LABEL: "true"}},
                   "spec": {"logspath": LOGS}}
    crd = yaml.safe_load((k8s_manifests.schemas_dir() / tb.TENSORBOARD_CRD).read_text())
    assert crd["spec"]["group"] + "/" + crd["spec"]["versions"][0]["name"] == tb.API_VERSION
    assert crd["spec"]["names"]["plural"] == tb.PLURAL and crd["spec"]["names"]["kind"] == tb.KIND
    with pytest.raises(ConfigError, match="does not match its schema at spec"):
        tb.validate({**obj, "spec": {"logspath": LOGS, "logsPath": LOGS}})  # a typo is refused (strict)
    with pytest.raises(ConfigError, match="does not match its schema"):
        tb.validate({**obj, "spec": {}})  # logspath is required


@pytest.mark.parametrize("name,logs,message", [
    ("Run_1", LOGS, "expected a DNS-1035 label"),
    ("1run", LOGS, "expected a DNS-1035 label"),
    ("hpa", "/data/logs", "expected s3://bucket/prefix"),
    ("hpa", "gs://b/logs", "expected s3://bucket/prefix"),
])
def test_bad_name_or_logspath_is_one_clear_line(name, logs, message):
    with pytest.raises(ConfigError, match=message) as err:
        tb.render_tensorboard(name, "team-a", logs)
    assert "\n" not in str(err.value)


def test_resource_names_are_valid_labels():
    for text in ("hpa-0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", "9run", "x" * 100, "a_b.c"):
        assert tb.check_name(tb.resource_name(text))
    assert tb.resource_name("hpa-0F1E2D3C") == "hpa-0f1e2d3c"


def test_poddefault_gives_the_secret_keys_by_reference_and_matches_its_crd():
    obj = tb.render_poddefault("team-a")
    env = {e["name"]: e for e in obj["spec"]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == \
        {"name": "mlpipeline-minio-artifact", "key": "accesskey"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == \
        {"name": "mlpipeline-minio-artifact", "key": "secretkey"}
    assert {k: env[k]["value"] for k in ("S3_ENDPOINT", "S3_USE_HTTPS", "S3_VERIFY_SSL")} == \
        {"S3_ENDPOINT": "seaweedfs.kubeflow:9000", "S3_USE_HTTPS": "0", "S3_VERIFY_SSL": "0"}
    assert obj["spec"]["selector"] == {"matchLabels": {tb.S3_LABEL: "true"}}
    assert tb.render_poddefault("team-a", "https://s3.example.com")["spec"]["env"][2:4] == \
        [{"name": "S3_ENDPOINT", "value": "s3.example.com"}, {"name": "S3_USE_HTTPS", "value": "1"}]


def test_default_name_is_one_tensorboard_per_logs_prefix():
    assert tb.check_name(tb.default_name(LOGS)) == tb.default_name(LOGS + "/")
    assert tb.default_name(LOGS) != tb.default_name("s3://mlpipeline/private/team-a/other/tensorboard")


@pytest.fixture
def serves_tensorboards(monkeypatch):
    """The stand-in API server with tensorboards and poddefaults added: each validated against its vendored CRD,
    as the real API server validates a custom resource against its CRD's schema."""
    original = k8s_fake_api.validate_posted

    def validate_posted(plural, obj, trainer_version):
        if plural == "tensorboards":
            return tb.validate(obj, what="posted Tensorboard")
        if plural == "poddefaults":
            return k8s_manifests.validate_crd(obj, tb.PODDEFAULT_CRD, "posted PodDefault")
        return original(plural, obj, trainer_version)

    monkeypatch.setattr(k8s_fake_api, "validate_posted", validate_posted)
    for plural in ("tensorboards", "poddefaults"):
        monkeypatch.setitem(k8s_fake_api.SUCCESS, plural, "Ready")  # the status a GET may get


class RBACKubeAPI(FakeKubeAPI):
    """The stand-in, with the verbs a role lacks refused as the API server's RBAC authorizer refuses them:
    403 Forbidden, `<plural>.<group> is forbidden: User "system:serviceaccount:<ns>:default-editor" cannot
    <verb> resource ...` (a profile without the Jupyter web app's kubeflow-notebook-ui-edit)."""

    def __init__(self, forbidden: set[tuple[str, str]], **kwargs):
        self.forbidden = forbidden  # {(plural, "create"), ...}: set before the handler class is made
        super().__init__(**kwargs)

    def _handler(self):
        base, api = super()._handler(), self

        class Handler(base):
            def do_POST(self):
                match = k8s_fake_api._PATH.match(self.path)
                if match and (match["plural"], "create") in api.forbidden:
                    return self._refuse(403, "Forbidden", f'{match["plural"]}.{match["group"]} is forbidden: User '
                                        f'"system:serviceaccount:{match["ns"]}:default-editor" cannot create resource '
                                        f'"{match["plural"]}" in API group "{match["group"]}" in the namespace '
                                        f'"{match["ns"]}"')
                return super().do_POST()

        return Handler


def test_the_run_makes_the_poddefault_first_then_the_tensorboard_with_its_label(serves_tensorboards, caplog):
    """The PodDefault is created by the run (before the Tensorboard: the admission webhook adds env to pods made
    after it), keys by secretKeyRef only; the Tensorboard carries the label it selects. Later runs keep both;
    another endpoint replaces the PodDefault (delete + create: no Kubeflow role grants update or patch).
    Before: the run made only the Tensorboard, which stayed empty until an admin applied the PodDefault."""
    with FakeKubeAPI() as api:
        client = api.api_client()
        result = tb.create_for_run(LOGS, namespace="team-a", api_client=client, required=True)
        assert [o["kind"] for o in api.posted] == ["PodDefault", "Tensorboard"]
        name = tb.default_name(LOGS)
        assert result == {"logs_uri": LOGS, "name": name, "namespace": "team-a", "created": True,
                          "path": f"/tensorboard/team-a/{name}/", "poddefault": "created"}
        poddefault, board = api.posted
        assert poddefault["spec"] == tb.render_poddefault("team-a")["spec"]
        assert poddefault["metadata"]["namespace"] == "team-a"
        secret_refs = [e["valueFrom"]["secretKeyRef"] for e in poddefault["spec"]["env"] if "valueFrom" in e]
        assert secret_refs == [{"name": "mlpipeline-minio-artifact", "key": "accesskey"},
                               {"name": "mlpipeline-minio-artifact", "key": "secretkey"}]
        assert all("valueFrom" in e or e["name"] not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                   for e in poddefault["spec"]["env"])
        assert poddefault["spec"]["selector"]["matchLabels"].items() <= board["metadata"]["labels"].items()
        assert board["spec"] == {"logspath": LOGS} and "ownerReferences" not in board["metadata"]

        # The next run: both kept, nothing posted, no warning.
        again = tb.create_for_run(LOGS, namespace="team-a", api_client=client, required=True)
        assert (again["created"], again["poddefault"], len(api.posted)) == (False, "kept", 2)
        assert not [r for r in caplog.records if r.levelname == "WARNING"]

        # Another store endpoint: the PodDefault is replaced; the Tensorboard's running pod needs a restart.
        other = tb.create_for_run(LOGS, namespace="team-a", s3_endpoint="s3.team-a:8333", api_client=client,
                                  required=True)
        assert other["poddefault"] == "replaced" and api.deleted[0]["key"][0] == "poddefaults"
        assert api.posted[-1]["spec"] == tb.render_poddefault("team-a", "s3.team-a:8333")["spec"]
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and f"kubectl rollout restart deployment/{name} -n team-a" in warnings[0]

        with pytest.raises(k8s.ClusterError, match="already exists with logspath"):
            tb.create_for_run(LOGS + "-other", name=name, namespace="team-a", api_client=client, required=True)


def test_refused_poddefault_is_one_warning_line_naming_the_admin_command(serves_tensorboards, caplog):
    """default-editor without create on poddefaults (403): the Tensorboard is still made, and the log has
    one warning line with the command an admin runs, no traceback; `required` makes it an error."""
    with RBACKubeAPI(forbidden={("poddefaults", "create")}) as api:
        result = tb.create_for_run(LOGS, namespace="team-a", s3_endpoint="s3.team-a:8333",
                                   api_client=api.api_client())
        assert result["created"] is True and result["poddefault"] == "missing"
        assert [o["kind"] for o in api.posted] == ["Tensorboard"] and api.rejected[0][0] == 403
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and warnings[0].exc_info is None, caplog.text
        line = warnings[0].getMessage()
        assert "\n" not in line and "Traceback" not in caplog.text
        assert "cannot create PodDefault team-a/hpa-kfp-tensorboard-s3: HTTP 403" in line
        assert line.endswith("until an admin runs `python -m hpa tensorboard --poddefault --namespace team-a "
                             "--s3-endpoint s3.team-a:8333 | kubectl apply -f -`")
        with pytest.raises(k8s.ClusterError, match="HTTP 403"):
            tb.create_for_run(LOGS, namespace="team-a", api_client=api.api_client(), required=True)


def test_a_refusing_cluster_is_a_warning_unless_required(caplog):
    with FakeKubeAPI() as api:  # serves neither CRD: 422, like a cluster without them
        result = tb.create_for_run(LOGS, namespace="team-a", api_client=api.api_client())
        assert result["created"] is False and result["logs_uri"] == LOGS and "training is not affected" in caplog.text
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 2 and all("\n" not in w for w in warnings)  # the PodDefault's, the Tensorboard's
        with pytest.raises(k8s.ClusterError, match="cannot create PodDefault team-a/"):
            tb.create_for_run(LOGS, namespace="team-a", api_client=api.api_client(), required=True)


def test_outside_a_cluster_pod_nothing_is_created(monkeypatch):
    monkeypatch.setattr(k8s, "custom_objects_api", lambda *a: pytest.fail("must not reach any cluster"))
    assert tb.create_for_run(LOGS)["created"] is False
    assert tb.create_for_run("/tmp/store/tensorboard")["created"] is False


def test_cli_prints_or_creates(tmp_path, capsys, monkeypatch, serves_tensorboards):
    from hpa.cli import main

    assert main(["tensorboard", "--logs", LOGS, "--name", "hpa-run-1", "--namespace", "team-a", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == tb.render_tensorboard("hpa-run-1", "team-a", LOGS)
    assert main(["tensorboard", "--poddefault", "--namespace", "team-a"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == tb.render_poddefault("team-a")
    assert main(["tensorboard", "--logs", "/data/logs", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tensorboard logspath '/data/logs'") and err.count("\n") == 1
    with FakeKubeAPI() as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "kubeconfig"))
        assert main(["tensorboard", "--logs", LOGS, "--name", "hpa-run-1", "--namespace", "team-a"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["path"], out["poddefault"]) == ("/tensorboard/team-a/hpa-run-1/", "created")
        assert [o["metadata"]["name"] for o in api.posted] == [tb.PODDEFAULT_NAME, "hpa-run-1"]


def test_the_task_in_a_pod_makes_both_and_returns_the_stable_prefix(tmp_path, monkeypatch, serves_tensorboards):
    """The component's own function, as in a profile's pod: the PodDefault and the Tensorboard in the pod's
    namespace, logs_uri <store_uri>/tensorboard."""
    sys.path.insert(0, str(ROOT))
    from components.tensorboard.component import tensorboard

    with FakeKubeAPI() as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "kubeconfig"))  # in place of the pod's token
        monkeypatch.setattr(k8s, "pod_namespace", lambda: "team-a")
        logs_uri, path = tensorboard.python_func(store_uri=STORE + "/", s3_endpoint="")
        assert logs_uri == LOGS and path == f"/tensorboard/team-a/{tb.default_name(LOGS)}/"
        assert [(o["kind"], o["metadata"]["namespace"]) for o in api.posted] == \
            [("PodDefault", "team-a"), ("Tensorboard", "team-a")]
    assert tensorboard.python_func(store_uri=STORE, enabled=False) == ("", "")
    with pytest.raises(ConfigError, match="tensorboard store_uri ''"):
        tensorboard.python_func(store_uri="")


# ---------------------------------------------------------------- the training tasks' input across runs

def _pipeline_specs():
    from google.protobuf import json_format

    sys.path.insert(0, str(ROOT))
    import pipeline

    pipelines = (pipeline.hpa_pipeline, pipeline.hpa_pipeline_multinode)
    return [json_format.MessageToDict(p.pipeline_spec) for p in pipelines]


def _tensorboard_task(spec) -> tuple[str, dict]:
    tasks = spec["root"]["dag"]["tasks"].items()
    (found,) = [(n, t) for n, t in tasks if t["componentRef"]["name"] == "comp-tensorboard"]
    return found


def _resolved_inputs(spec, task: dict, run_id: str) -> dict:
    """The tensorboard task's parameter values in run `run_id`, as the backend driver resolves them: pipeline
    parameters at their defaults (the run form's), check-params' store_uri, and every {{$.…}} placeholder of a
    constant replaced by a value of this run (the driver's runtime placeholders: pipeline_job_uuid,
    pipeline_job_name, ...; kubeflow/pipelines 2.16.0 backend/src/v2/driver/resolve.go)."""
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    values = {}
    for key, source in task["inputs"]["parameters"].items():
        if "runtimeValue" in source:
            value = source["runtimeValue"]["constant"]
            values[key] = re.sub(r"\{\{\$\.[A-Za-z_]+\}\}", f"{run_id}", value) if isinstance(value, str) else value
        elif "componentInputParameter" in source:
            values[key] = defaults[source["componentInputParameter"]]
        else:
            out = source["taskOutputParameter"]
            assert (out["producerTask"], out["outputParameterKey"]) == ("check-params", "store_uri"), source
            values[key] = STORE
    return values


def test_training_tasks_get_the_same_tensorboard_input_in_every_run():
    """Run parameter tensorboard=true (the cluster default), two runs: the training tasks' tensorboard_uri is
    the tensorboard task's logs_uri, and that value is the same in both runs, so their KFP cache keys (which
    hold every input parameter value: kubeflow/pipelines 2.16.0 and 2.17.0 backend/src/v2/cacheutils/cache.go,
    GenerateCacheKey) do not change. Before: logs_uri was <store>/tensorboard/<run id>, a miss every run."""
    sys.path.insert(0, str(ROOT))
    from components.tensorboard.component import tensorboard

    for spec in _pipeline_specs():
        board, task = _tensorboard_task(spec)
        (loop,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
        trainings = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
        for training in trainings:
            channel = training["inputs"]["parameters"]["tensorboard_uri"]["componentInputParameter"]
            assert loop["inputs"]["parameters"][channel] == \
                {"taskOutputParameter": {"producerTask": board, "outputParameterKey": "logs_uri"}}
        assert task.get("cachingOptions", {}).get("enableCache") is not True  # it makes cluster objects
        first, second = (tensorboard.python_func(**_resolved_inputs(spec, task, run))[0]
                         for run in ("0f1e2d3c-4b5a-run-one", "9a8b7c6d-5e4f-run-two"))
        assert first == second == LOGS


# ---------------------------------------------------------------- where a training task writes

def test_training_digest_names_one_folder_per_distinct_training(tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("Id,Target,fold\na,0,0\n")
    params = {"arch": "resnet18", "fold": 0, "models": {"resnet18": 0.001}, "seed": 0, "tensorboard_uri": LOGS}
    where = tb.run_logs_uri(LOGS + "/", "resnet18", 0, inputs=params, split=split)
    assert re.fullmatch(re.escape(LOGS) + r"/resnet18-fold0-[0-9a-f]{10}", where)
    assert tb.run_logs_uri(LOGS, "resnet18", 0, inputs={**params, "tensorboard_uri": "s3://b/x"}, split=split) == where
    assert tb.run_logs_uri(LOGS, "resnet18", 0, inputs={**params, "seed": 1}, split=split) != where
    assert tb.run_logs_uri(LOGS, "resnet18", 0, inputs=params) != where
    split.write_text("Id,Target,fold\na,0,1\n")
    assert tb.run_logs_uri(LOGS, "resnet18", 0, inputs=params, split=split) != where
    assert tb.run_logs_uri(LOGS, "resnet18", 1) == LOGS + "/resnet18-fold1"  # the call without inputs still works
    for args, message in [(("", "resnet18", 0), "tensorboard_uri '': expected the logs prefix"),
                          ((LOGS, "a/b", 0), "tensorboard arch 'a/b': expected a model name")]:
        with pytest.raises(ConfigError, match=message):
            tb.run_logs_uri(*args)
    with pytest.raises(ConfigError, match="tensorboard split .*: cannot read the split file"):
        tb.run_logs_uri(LOGS, "resnet18", 0, inputs=params, split=tmp_path / "missing.csv")


def _artifact(path: Path):
    from types import SimpleNamespace

    return SimpleNamespace(path=str(path), metadata={})


def test_a_training_task_writes_its_curves_under_its_stable_sub_prefix(tmp_path, s3_bucket):
    """The train component's own function, twice with the same inputs as two runs would give it (the second
    as with caching off): both write under <tensorboard_uri>/<arch>-fold<k>-<digest of its inputs>, the run
    artifact records that folder, and TensorBoard shows each step once there (the second training's curves).
    Before: <tensorboard_uri>/<arch>-fold<k>, with the run id in tensorboard_uri."""
    sys.path.insert(0, str(ROOT))
    from components.train.component import train

    from hpa.synthetic import generate

    data, split = make_data(tmp_path, n=24, size=32)
    generate(data, 24, 4, size=32)  # the same training images, and a test set to predict
    logs = s3_bucket + "hpa-kfp/tensorboard"
    folders = []
    for run in ("one", "two"):
        out = tmp_path / run
        outputs = {name: _artifact(out / name) for name in ("model", "run", "val_predictions", "test_predictions")}
        metrics = type("Metrics", (), {"log_metric": lambda self, k, v: None})()
        train.python_func(data_uri=str(data), split_csv=_artifact(split), arch="resnet18", fold=0,
                          models={"resnet18": 0.001}, metrics=metrics, image_size=32, epochs=1, batch_size=6, tta=1,
                          tensorboard_uri=logs, **outputs)
        folders.append(outputs["run"].metadata["tensorboard"])
    assert folders[0] == folders[1] and re.fullmatch(re.escape(logs) + r"/resnet18-fold0-[0-9a-f]{10}", folders[0])
    from hpa.store import open_store

    keys = open_store(logs).list()
    assert len(keys) == 2 and all(k.startswith(folders[0].rsplit("/", 1)[1] + "/events.out.tfevents.") for k in keys)
    for key in keys:
        open_store(logs).get_file(key, tmp_path / "view" / Path(key).name)
    acc = accumulate(tmp_path / "view")
    assert [s for s, _ in scalars(acc, "epoch/val_macro_f1")] == [STEPS_PER_EPOCH]  # once, not twice


def _event_files(directory: Path, loss: float, steps=range(1, 4)) -> None:
    import torch

    log = tb.EventLog(directory, every_steps=1)
    for step in steps:
        log.train_step(step, torch.tensor(loss), 2, 0.1)
    log.close()


def test_a_fresh_training_into_a_folder_with_curves_replaces_them(tmp_path):
    """Same folder, trained again from the start (no checkpoint): the earlier curves are purged (step 1), not
    interleaved; the same for the multi-node task's copy, which places a restart marker before the new files."""
    import time

    _event_files(tmp_path / "same", 1.0)
    time.sleep(1.1)  # event file names carry the second they were made: TensorBoard reads them in name order
    _event_files(tmp_path / "same", 2.0)
    assert scalars(accumulate(tmp_path / "same"), "train/loss") == [(1, 2.0), (2, 2.0), (3, 2.0)]

    _event_files(tmp_path / "job1", 1.0)
    time.sleep(1.1)
    _event_files(tmp_path / "job2", 2.0)
    dst = tmp_path / "stable" / "resnet18-fold0-0123456789"
    assert tb.copy_event_files(str(tmp_path / "job1"), str(dst)) == 1
    assert tb.copy_event_files(str(tmp_path / "job1"), str(dst)) == 1  # a retried copy: no marker
    assert len(list(dst.iterdir())) == 1
    assert tb.copy_event_files(str(tmp_path / "job2"), str(dst)) == 1
    assert len(list(dst.iterdir())) == 3 and len(list(dst.glob("*hpa-restart"))) == 1
    assert scalars(accumulate(dst), "train/loss") == [(1, 2.0), (2, 2.0), (3, 2.0)]
