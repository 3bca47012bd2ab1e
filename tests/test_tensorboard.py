"""TensorBoard: the event files a training run writes (read back with TensorBoard's own EventAccumulator),
their upload to an s3:// --out while training runs, and the Kubeflow Tensorboard resource (rendered,
validated against the vendored CRD, created through the loopback stand-in API server).
"""

from __future__ import annotations

import io
import json
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

LOGS = "s3://mlpipeline/private/team-a/hpa-kfp/tensorboard/0f1e2d3c-run"


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


@pytest.fixture
def serves_tensorboards(monkeypatch):
    """The stand-in API server with tensorboards added: validated against the vendored CRD, as the real
    API server validates a custom resource against its CRD's schema."""
    original = k8s_fake_api.validate_posted

    def validate_posted(plural, obj, trainer_version):
        if plural == "tensorboards":
            return tb.validate(obj, what="posted Tensorboard")
        return original(plural, obj, trainer_version)

    monkeypatch.setattr(k8s_fake_api, "validate_posted", validate_posted)
    monkeypatch.setitem(k8s_fake_api.SUCCESS, "tensorboards", "Ready")  # the status a GET may get


def test_create_posts_the_resource_and_a_retry_keeps_it(serves_tensorboards):
    with FakeKubeAPI() as api:
        client = api.api_client()
        result = tb.create_for_run(LOGS, namespace="team-a", api_client=client, required=True)
        assert result == {"logs_uri": LOGS, "name": "hpa-0f1e2d3c-run", "namespace": "team-a",
                          "path": "/tensorboard/team-a/hpa-0f1e2d3c-run/", "created": True}
        assert api.posted == [{**tb.render_tensorboard("hpa-0f1e2d3c-run", "team-a", LOGS),
                               "metadata": {**api.posted[0]["metadata"]}}]
        assert "ownerReferences" not in api.posted[0]["metadata"]  # it outlives the run, for looking back
        # 409, same logspath
        assert tb.create_for_run(LOGS, namespace="team-a", api_client=client, required=True)["created"]
        with pytest.raises(k8s.ClusterError, match="already exists with logspath"):
            tb.create_for_run(LOGS + "-other", name="hpa-0f1e2d3c-run", namespace="team-a", api_client=client,
                              required=True)
        assert len(api.posted) == 1


def test_a_refusing_cluster_is_a_warning_unless_required(caplog):
    with FakeKubeAPI() as api:  # serves no tensorboards: 422 like a cluster without the CRD's webhook
        result = tb.create_for_run(LOGS, namespace="team-a", api_client=api.api_client())
        assert result["created"] is False and result["logs_uri"] == LOGS and "training is not affected" in caplog.text
        with pytest.raises(k8s.ClusterError, match="cannot create Tensorboard team-a/"):
            tb.create_for_run(LOGS, namespace="team-a", api_client=api.api_client(), required=True)


def test_outside_a_cluster_pod_nothing_is_created(monkeypatch):
    monkeypatch.setattr(k8s, "custom_objects_api", lambda *a: pytest.fail("must not reach any cluster"))
    assert tb.create_for_run(LOGS)["created"] is False
    assert tb.create_for_run("/tmp/store/tensorboard/run")["created"] is False


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
        assert json.loads(capsys.readouterr().out)["path"] == "/tensorboard/team-a/hpa-run-1/"
        assert [o["metadata"]["name"] for o in api.posted] == ["hpa-run-1"]


def test_component_returns_the_run_logs_prefix_and_creates_nothing_locally():
    sys.path.insert(0, str(ROOT))
    from components.tensorboard.component import tensorboard
    from components.train.component import train

    run = tensorboard.python_func(store_uri="s3://mlpipeline/private/team-a/hpa-kfp/", run_id="0f1e2d3c-4b5a")
    assert run == ("s3://mlpipeline/private/team-a/hpa-kfp/tensorboard/0f1e2d3c-4b5a", "")
    assert tensorboard.python_func(store_uri="s3://b/p", run_id="r", enabled=False) == ("", "")
    assert tb.run_logs_uri(run[0], "se_resnet18", 1) == run[0] + "/se_resnet18-fold1"
    assert "tensorboard_uri" in train.component_spec.inputs


def test_component_runs_in_kfp_local_with_the_run_id_placeholder(tmp_path):
    """As the lead wires it: run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, the whole value (the backend driver
    resolves a placeholder only then: kubeflow/pipelines 2.16.0 backend/src/v2/driver/resolve.go)."""
    import kfp.local
    from kfp import dsl

    sys.path.insert(0, str(ROOT))
    from components.tensorboard.component import tensorboard

    def board(store_uri: str) -> str:
        return tensorboard(store_uri=store_uri, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).outputs["logs_uri"]

    board.__annotations__ = {"store_uri": str, "return": str}  # real types: this module has postponed annotations
    board = dsl.pipeline(board)

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    logs_uri = board(store_uri="s3://mlpipeline/private/team-a/hpa-kfp").output
    prefix = "s3://mlpipeline/private/team-a/hpa-kfp/tensorboard/"
    assert logs_uri.startswith(prefix) and len(logs_uri) > len(prefix) and "{{" not in logs_uri
