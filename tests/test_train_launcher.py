"""The single-pod `train` task uses every GPU it was given (issue 22 #5): with gpus > 1 it trains as one DDP
process per GPU, started by `<this interpreter> -m torch.distributed.run --standalone` (never a `torchrun` script
from PATH), as gloo CPU processes where there is no CUDA; and its processes stop with it.

Before: the component had no `gpus` input (the pipeline asked the pod for 2 GPUs and trained on one), so the
J5 test failed with `TypeError: train() got an unexpected keyword argument "gpus"`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.errors import ConfigError
from hpa.train import TrainConfig, config_from_args, get_args_parser
from hpa.train import launch

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = (("model", "Model"), ("run", "Artifact"), ("val_predictions", "Dataset"), ("test_predictions", "Dataset"),
             ("metrics", "Metrics"))

# The `train` component's own function, in a process of its own (as the KFP executor runs it): argv[1] is a JSON
# object of its parameter inputs plus "split" (the split CSV) and "outputs" (the output artifacts' directory).
TASK_SCRIPT = r"""
import json, logging, sys
from kfp import dsl
from components.train.component import train
from hpa.processes import Interrupted

logging.basicConfig(level=logging.INFO, format="%%(levelname)s %%(name)s: %%(message)s")  # as python -m hpa does
args = json.loads(sys.argv[1])
split, outdir = args.pop("split"), args.pop("outputs")
outputs = {name: getattr(dsl, cls)(name=name, uri=f"{outdir}/{name}") for name, cls in %r}
try:
    train.python_func(split_csv=dsl.Dataset(name="split", uri=split), **args, **outputs)
except Interrupted as exc:
    sys.exit(exc.exit_code)
print("task metrics " + json.dumps(outputs["metrics"].metadata), flush=True)
""" % (ARTIFACTS,)


def make_data(root: Path, n: int = 40, folds: int = 4, seed: int = 0) -> tuple[Path, Path]:
    from hpa.synthetic import generate

    generate(root / "data", n, 6, size=32, seed=seed)
    df = pd.read_csv(root / "data" / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % folds
    df.to_csv(root / "split.csv", index=False)
    return root / "data", root / "split.csv"


def task_command(data, split, outputs: Path, **inputs) -> list[str]:
    params = {"data_uri": str(data), "arch": "resnet18", "fold": 0, "models": {"resnet18": 1e-3}, "image_size": 32,
              "epochs": 1, "batch_size": 6, "tta": 1, "split": str(split), "outputs": str(outputs), **inputs}
    return [sys.executable, "-c", TASK_SCRIPT, json.dumps(params)]


def task_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_launcher_runs_this_interpreter_with_every_option_of_the_config():
    """The command starts torch.distributed.run under sys.executable (workers: PYTHON_EXEC, else that same
    interpreter) and passes every TrainConfig field, so that the workers train exactly the task's config."""
    cfg = TrainConfig(data="s3://b/shards", split="/tmp/split.csv", out="s3://b/checkpoints/k", fold=2,
                      arch="se_resnet18", lr=3.3e-4, size=64, epochs=3, augment=False, amp=False, resume=True,
                      tensorboard_dir="", weights="", cache_dir=None, workers=1, threads=2, checkpoint_every_steps=7,
                      deterministic=True, predict_tta=4, predict_data="s3://b/data")
    cmd = launch.train_command(cfg, 2)
    assert cmd[:9] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                       "hpa", "train"]
    assert not any("torchrun" in part for part in cmd)
    assert config_from_args(get_args_parser().parse_args(cmd[9:])) == cfg


def test_fewer_cuda_devices_than_gpus_is_one_line_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(launch.RunProcesses, "popen", lambda *a, **k: pytest.fail("started processes"))
    cfg = TrainConfig(data=str(tmp_path), split=str(tmp_path / "s.csv"), out=str(tmp_path / "out"))
    with pytest.raises(ConfigError) as err:
        launch.train_processes(cfg, 2)
    assert str(err.value) == ("train gpus=2: this pod sees 1 CUDA device(s); expected at least 2 (the task's GPU "
                              "limit is the gpus run parameter)")
    assert launch.check_devices(1) == "cuda"


def test_train_task_with_two_gpus_on_cpu_trains_as_two_gloo_processes(tmp_path, monkeypatch, capfd, caplog):
    """J5: the `train` component with gpus=2 on a machine without CUDA starts 2 gloo processes (rank 0 and
    rank 1 in a world of 2) and ends with the usual outputs, predictions made once, in the task's process."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA machine would need 2 devices
    from kfp import dsl

    from components.train.component import train

    data, split = make_data(tmp_path)
    outputs = {name: getattr(dsl, cls)(name=name, uri=str(tmp_path / "outputs" / name)) for name, cls in ARTIFACTS}
    (tmp_path / "outputs").mkdir()
    train.python_func(data_uri=str(data), split_csv=dsl.Dataset(name="split", uri=str(split)), arch="resnet18", fold=0,
                      models={"resnet18": 1e-3}, image_size=32, epochs=1, batch_size=4, tta=2, gpus=2, **outputs)
    out, err = capfd.readouterr()
    assert "world size 2" in err and "[rank0]" in err and "[rank1]" in err, err[-3000:]
    assert "training as 2 gloo CPU processes" in caplog.text  # the task's own log
    assert [line for line in out.splitlines() if line.startswith("epoch=")] == \
        [line for line in out.splitlines() if line.startswith("epoch=1 ")]  # rank 0 alone prints the metric line
    best = torch.load(tmp_path / "outputs" / "model", weights_only=True)
    assert best["world_size"] == 2  # trained by the 2-process group
    run = tmp_path / "outputs" / "run"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "history.csv", "metrics.json", "tensorboard",
                                                     "thresholds.json", "val_predictions.npz"]
    assert len(pd.read_csv(run / "history.csv")) == 1
    test = np.load(tmp_path / "outputs" / "test_predictions")
    assert test["probs"].shape == (6, 28)
    val = np.load(tmp_path / "outputs" / "val_predictions")
    assert len(val["ids"]) == 10
    assert outputs["run"].metadata["processes"] == 2 and "best_val_macro_f1" in outputs["metrics"].metadata


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of `pid` (from /proc)."""
    parents, commands = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                commands[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] not in "ZX":
                parents[int(entry)] = int(fields[1])
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_task_stops_every_training_process(tmp_path, sig):
    """SIGTERM (a deleted or evicted pod, a cancelled run) or SIGINT to the task stops the launcher and both
    workers: none is left running, and the task exits non-zero soon after."""
    data, split = make_data(tmp_path, n=24)
    proc = subprocess.Popen(task_command(data, split, tmp_path / "outputs", epochs=200, batch_size=4, gpus=2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=task_env(), cwd=ROOT)
    seen: dict[int, str] = {}
    try:
        for line in proc.stderr:
            if "world size 2" in line:  # both ranks are in the process group: training has begun
                break
        seen = _descendants(proc.pid)
        proc.send_signal(sig)
        signalled = time.monotonic()
        tail = proc.stderr.read()
        code = proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    workers = [pid for pid, cmd in seen.items() if "-m hpa train" in cmd and "torch.distributed.run" not in cmd]
    assert len(workers) == 2 and any("torch.distributed.run" in cmd for cmd in seen.values()), seen
    assert code == 128 + sig
    # The workers checkpoint at their next step and exit: well within the launcher's grace before SIGKILL.
    assert took < launch.STOP_GRACE, (took, tail[-3000:])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in seen):
        time.sleep(0.1)
    alive = {pid: cmd for pid, cmd in seen.items() if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"}
    assert not alive, alive
