"""A preempted or evicted `train` task resumes from the store (issue 22 #7, journey J6).

With `store_uri`, the task trains with --out <store_uri>/checkpoints/<key>/ and --resume, where <key> is a digest
of what defines the training (hpa.train.checkpoint.training_key): a retry of the task (the same inputs, a new pod)
finds last.pt there and continues; any other training gets another key. The store here is real S3 (the session's
S3 server, `s3_bucket`).

Before: the component had no `store_uri` input and kept last.pt in the pod only, so the J6 test failed with
`TypeError: train() got an unexpected keyword argument "store_uri"` (and a retried pod started from scratch)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.store import open_store
from hpa.train import TrainConfig
from hpa.train.checkpoint import KEY_EXCLUDED, training_key
from test_train_launcher import ROOT, make_data, task_command, task_env

# 30 train images / 6 = 5 steps per epoch, last.pt every 4 steps and at each epoch's end: the kill lands after
# step 4 of epoch 1. Deterministic algorithms and one thread: the resumed run can be compared bit for bit.
TRAINING = {"epochs": 2, "batch_size": 6, "tta": 2, "seed": 3,
            "train_options": {"deterministic": True, "checkpoint_every_steps": 4, "threads": 1, "drop_rate": 0.2}}
KILL_AFTER = "checkpoint saved: last.pt epoch 0 step 4"


def commit_dataset(data: Path, uri: str) -> None:
    """Upload a Kaggle-layout dir and commit its manifest, as the download task does."""
    store = open_store(uri)
    store.commit_manifest(store.upload_tree(data), {"source": "test"})


def one_core() -> None:
    """The task on one core (preexec_fn): it then loads its batches in its own process (DataLoader workers = cores
    - 1 = 0). Seen once in a clean-clone run with one worker: the task and its DataLoader worker both idle, each
    waiting on the other's queue (py-spy), until the suite's timeout; what this test checks does not depend on
    the loader's workers."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def run_task(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=task_env(), cwd=ROOT,
                          preexec_fn=one_core)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def killed_after(cmd: list[str], marker: str, tmp: Path) -> str:
    """Run the task, SIGKILL it (a node lost, an OOM kill: nothing runs after) as soon as stderr has `marker`.
    Its temporary dirs, which nothing can remove after a SIGKILL, go to `tmp`."""
    tmp.mkdir()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=task_env(TMPDIR=str(tmp)), cwd=ROOT, preexec_fn=one_core)
    lines = []
    watchdog = threading.Timer(300, proc.kill)  # a task that never prints the marker fails the test, not the suite
    watchdog.start()
    try:
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(lines)[-3000:]
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines)


def epochs_printed(stdout: str) -> list[int]:
    return [int(line.split()[0].split("=")[1]) for line in stdout.splitlines() if line.startswith("epoch=")]


def assert_same_outputs(a: Path, b: Path) -> None:
    """Bit-identical (CPU, deterministic): best.pt's weights and thresholds, the history but wall time, the
    metrics, and both TTA predictions."""
    ma, mb = (torch.load(p / "model", weights_only=True) for p in (a, b))
    assert (ma["epoch"], ma["step"]) == (mb["epoch"], mb["step"])
    for key, value in ma["model"].items():
        assert torch.equal(value, mb["model"][key]), key
    assert torch.equal(ma["thresholds"], mb["thresholds"])
    ha, hb = (pd.read_csv(p / "run" / "history.csv").drop(columns="seconds") for p in (a, b))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    ja, jb = (json.loads((p / "run" / "metrics.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ja.items() if k != "out"} == {k: v for k, v in jb.items() if k != "out"}
    for name in ("val_predictions", "test_predictions"):
        pa, pb = (np.load(p / name) for p in (a, b))
        assert pa["ids"].tolist() == pb["ids"].tolist() and np.array_equal(pa["probs"], pb["probs"]), name


@pytest.mark.slow
def test_killed_train_task_resumes_from_the_store_and_ends_as_an_uninterrupted_one(tmp_path, s3_bucket):
    data, split = make_data(tmp_path)
    commit_dataset(data, s3_bucket + "datasets/tiny")
    inputs = {"data_uri": s3_bucket + "datasets/tiny", **TRAINING}

    # The uninterrupted run, under another store prefix (the same key there).
    ref = run_task(task_command(data, split, tmp_path / "ref", store_uri=s3_bucket + "ref", **inputs))
    assert epochs_printed(ref.stdout) == [1, 2]

    # The same task killed mid-epoch 1, then run again with the same inputs (what a KFP retry does).
    retried = task_command(data, split, tmp_path / "retry", store_uri=s3_bucket + "run", **inputs)
    killed_after(task_command(data, split, tmp_path / "killed", store_uri=s3_bucket + "run", **inputs), KILL_AFTER,
                 tmp_path / "tmp")
    [key] = {k.split("/")[0] for k in open_store(s3_bucket + "run/checkpoints").list()}
    last = torch.load(io.BytesIO(open_store(f"{s3_bucket}run/checkpoints/{key}").get_bytes("last.pt")),
                      weights_only=True)
    assert (last["epoch"], last["step"]) == (0, 4)  # it died inside epoch 1, with last.pt in the store

    again = run_task(retried)
    assert "resumed from" in again.stderr and "epoch 0, step 4 (4 into the epoch)" in again.stderr, again.stderr[-3000:]
    assert f"checkpoints: {s3_bucket}run/checkpoints/{key}/" in again.stdout
    assert epochs_printed(again.stdout) == [1, 2]  # epoch 1 finished from step 4, then epoch 2
    assert_same_outputs(tmp_path / "ref", tmp_path / "retry")

    # A third try after success (a retry of a task that failed after training, or a re-run without the KFP cache):
    # the finished training is reused, checked against its recorded identity, and nothing is trained again.
    reused = run_task(task_command(data, split, tmp_path / "reused", store_uri=s3_bucket + "run", **inputs))
    assert epochs_printed(reused.stdout) == [] and "resumed from" in reused.stderr
    assert_same_outputs(tmp_path / "ref", tmp_path / "reused")


def test_the_key_is_the_training_not_the_machine(tmp_path):
    """One key per training: every option that changes what is computed, the data's content, the split's content
    and the process count change it; where files go and how the machine is used do not (a retried pod may land
    on a node with other cores, another cache dir, a per-run TensorBoard URI)."""
    data, split = make_data(tmp_path, n=8)
    split_bytes = split.read_bytes()
    base = TrainConfig(data=str(data), split=str(split), out="x", size=32, lr=1e-3).validate()
    key = training_key(base, None, split_bytes, 1)
    assert key.startswith("resnet18-fold0-") and len(key) == len("resnet18-fold0-") + 20
    assert training_key(dataclasses.replace(base), None, split_bytes, 1) == key  # deterministic

    same = dict(out="s3://b/elsewhere", cache_dir=str(tmp_path / "c"), work_dir="/w", workers=3, threads=2,
                tensorboard_dir="s3://b/tb/run-123/resnet18-fold0", resume=True, predict_tta=8)
    for name, value in same.items():
        assert training_key(dataclasses.replace(base, **{name: value}), None, split_bytes, 1) == key, name
    assert set(same) <= set(KEY_EXCLUDED)

    different = dict(lr=3e-4, fold=1, arch="se_resnet18", epochs=3, seed=1, size=64, loss="focal", batch_size=16,
                     threshold_mode="prior", weights="/w/resnet18.pt", augment=False, deterministic=True)
    keys = {training_key(dataclasses.replace(base, **{name: value}), None, split_bytes, 1) for name, value
            in different.items()}
    assert len(keys) == len(different) and key not in keys
    assert training_key(base, None, split_bytes, 2) != key  # 2 processes: another world size, another run
    assert training_key(base, None, split_bytes.replace(b",0\n", b",1\n", 1), 1) != key  # another split

    # A committed dataset is known by its manifest's objects: the same images at another URI are the same data;
    # other images are not.
    a, b, c = (str(tmp_path / name) for name in ("a", "b", "c"))
    for uri in (a, b):
        commit_dataset(data, uri)
    (data / "train" / next(p.name for p in (data / "train").iterdir())).write_bytes(b"changed")
    commit_dataset(data, c)
    ka, kb, kc = (training_key(dataclasses.replace(base, data=uri), None, split_bytes, 1) for uri in (a, b, c))
    assert ka == kb != kc
