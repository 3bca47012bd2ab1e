"""`torchrun --standalone --nproc_per_node=2 -m hpa train` on CPU (gloo): one tiny epoch completes,
rank 0 alone writes files and prints the metric line, and the gathered validation is exact."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.evaluate import fit_thresholds, macro_f1

KATIB_RE = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")


def test_torchrun_two_processes_cpu(tmp_path):
    from hpa.synthetic import generate

    generate(tmp_path / "data", 42, 0, size=32, seed=3)
    df = pd.read_csv(tmp_path / "data" / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % 3  # 14 val images, and one more so that the 15 split unevenly
    df.loc[df.index[-1], "fold"] = 0     # over the 2 ranks (8 + 7): nothing padded or repeated
    df.to_csv(tmp_path / "split.csv", index=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hpa", "train", "--data", str(tmp_path / "data"), "--split", str(tmp_path / "split.csv"),
           "--out", str(out), "--fold", "0", "--arch", "resnet18", "--size", "32", "--epochs", "1",
           "--batch-size", "4", "--workers", "0", "--threads", "1", "--checkpoint-every-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    metric_lines = [line for line in proc.stdout.splitlines() if KATIB_RE.search(line)]
    assert len(metric_lines) == 1 and metric_lines[0].startswith("epoch=1 "), proc.stdout
    assert "[rank0]" in proc.stderr and "[rank1]" in proc.stderr
    assert proc.stderr.count("checkpoint saved: last.pt") == proc.stderr.count("[rank0] checkpoint saved: last.pt") > 1
    assert "world size 2" in proc.stderr

    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.pt", "config.json", "history.csv", "last.pt", "metrics.json", "tensorboard",
                     "thresholds.json", "val_predictions.npz"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert len(pd.read_csv(out / "history.csv")) == 1

    # Every val image exactly once, in split order, and the logged F1 is the F1 of these predictions.
    preds = np.load(out / "val_predictions.npz")
    val_ids = df.loc[df["fold"] == 0, "Id"].tolist()
    assert preds["ids"].tolist() == val_ids
    # (out-of-sample: each of 5 stratified parts scored with thresholds fitted on the other 4, hpa.crossfit)
    from hpa.crossfit import crossfit_binarize, crossfit_groups, policy_fitter

    groups = crossfit_groups(preds["ids"], preds["targets"])
    f1 = macro_f1(preds["targets"],
                  crossfit_binarize(preds["probs"], preds["targets"], groups, policy_fitter("fitted")))
    assert abs(float(pd.read_csv(out / "history.csv")["val_macro_f1"][0]) - f1) < 1e-9
    in_sample = macro_f1(preds["targets"], preds["probs"] >= fit_thresholds(preds["probs"], preds["targets"]))
    assert abs(float(pd.read_csv(out / "history.csv")["val_macro_f1_in_sample"][0]) - in_sample) < 1e-9

    # The gathered probabilities are those of the saved model on each image (ordering is right).
    from hpa.data import HPADataset
    from hpa.models import load_checkpoint

    model, _ = load_checkpoint(out / "best.pt")
    ds = HPADataset(tmp_path / "data", val_ids, size=32)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.stack([ds[i][0] for i in range(len(ds))]))).numpy()
    np.testing.assert_allclose(probs, preds["probs"], atol=1e-4)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


@pytest.mark.slow
def test_torchrun_sigterm_then_resume_is_bit_exact(tmp_path):
    """SIGTERM to torchrun (what a pod gets) reaches every worker: rank 0 writes last.pt with every
    rank's RNG states and running loss, and a resumed 2-process run ends bit-identical to an
    uninterrupted one (gloo on CPU, --deterministic)."""
    import signal

    from hpa.synthetic import generate

    generate(tmp_path / "data", 48, 0, size=32, seed=0)
    df = pd.read_csv(tmp_path / "data" / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % 4  # 36 train: 18 per rank, 6 steps of 3 per epoch
    df.to_csv(tmp_path / "split.csv", index=False)

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hpa",
                "train", "--data", str(tmp_path / "data"), "--split", str(tmp_path / "split.csv"), "--out", str(out),
                "--size", "32", "--epochs", "2", "--batch-size", "3", "--workers", "0", "--threads", "1",
                "--checkpoint-every-steps", "2", "--deterministic", "--drop-rate", "0.2", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run(command(ref), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    popen = subprocess.Popen(command(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in popen.stderr:
            if "checkpoint saved: last.pt epoch 0 step 2" in line:
                popen.send_signal(signal.SIGTERM)
                break
        _, err = popen.communicate(timeout=300)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert err.count("SIGTERM: checkpoint written") == 2, err[-3000:]  # both workers, rank 0 wrote
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and 2 <= ckpt["step"] < 6 and len(ckpt["rank_loss"]) == 2

    proc = subprocess.run(command(run, "--resume"), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (ref, run))
    assert a["step"] == b["step"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ha, hb = (pd.read_csv(p / "history.csv").drop(columns="seconds") for p in (ref, run))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)


def test_torchrun_resume_from_s3_out_on_every_rank(tmp_path, s3_bucket):
    """--resume with an s3:// --out (what every multi-node TrainJob pod runs): each rank fetches last.pt and
    resumes from it. Rank 1 used to fetch it into a staging dir owned by a temporary object, deleted before the
    file was read, and started from scratch while rank 0 resumed (its collectives then failed)."""
    from hpa.synthetic import generate

    generate(tmp_path / "data", 24, 0, size=32, seed=5)
    df = pd.read_csv(tmp_path / "data" / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % 3
    df.to_csv(tmp_path / "split.csv", index=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hpa", "train", "--data", str(tmp_path / "data"), "--split", str(tmp_path / "split.csv"),
           "--out", f"{s3_bucket}ddp-out", "--size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
           "--threads", "1", "--no-tensorboard", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("resumed from") == 2 and "starting from scratch" not in again.stderr, \
        again.stderr[-4000:]
