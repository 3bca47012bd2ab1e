"""Resume only what matches; one line for every bad checkpoint, split fold and numeric environment variable
(issue 13, item 6).

- `--resume` continues only a checkpoint of the same run: same data (content of a committed dataset's
  manifest, else the URI), split CSV (sha256), fold, arch, size, color mode, schedule, loss, threshold policy,
  seed and world size. Anything else is refused with one line naming last.pt and each differing field.
- A truncated, empty or foreign last.pt, a checkpoint missing keys, weights that do not fit the recorded arch
  (for resume and for `predict`), a bad fold value in the split CSV and a non-numeric HPA_S3_RETRIES or
  WORLD_SIZE all end in `error: ...` (exit 2), never a traceback.

Everything but the one training run of the module fixture fails during setup, before any training step; the
CLI runs in-process (`hpa.cli.main`) except for the environment variables, which go through a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.cli import main as cli_main

pytestmark = pytest.mark.slow

# 24 images, 4 folds: 18 train / 6 val, 3 steps of 6; one epoch of resnet18 at 32 px takes a few seconds.
BASE = {"fold": 0, "arch": "resnet18", "size": 32, "epochs": 1, "batch_size": 6, "lr": 1e-3, "seed": 0,
        "workers": 0, "threads": 1, "deterministic": True}


def train_argv(data, split, out, **over) -> list[str]:
    argv = ["train", "--data", str(data), "--split", str(split), "--out", str(out)]
    for key, value in {**BASE, **over}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def commit(src: Path, dst: Path) -> Path:
    """A committed copy of a Kaggle-layout dir (images + manifest.json), as `download` writes it."""
    from hpa.store import open_store

    store = open_store(str(dst))
    store.commit_manifest(store.upload_tree(src), {"source": "test"})
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from hpa.synthetic import generate

    root = tmp_path_factory.mktemp("resume-faults")
    raw = root / "raw"
    generate(raw, 24, 0, size=32, seed=1)
    df = pd.read_csv(raw / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % 4
    df.to_csv(root / "split.csv", index=False)
    df.assign(fold=(np.arange(len(df)) + 1) % 4).to_csv(root / "split2.csv", index=False)  # other folds
    a = commit(raw, root / "a")
    a2 = commit(raw, root / "a2")  # the same images at another URI, committed later (another "created")
    other = root / "raw-b"
    shutil.copytree(raw, other)
    first, second = sorted(other.glob("train/*_green.png"))[:2]
    shutil.copyfile(second, first)  # one image differs: another dataset
    b = commit(other, root / "b")
    base = root / "base"
    assert cli_main(train_argv(a, root / "split.csv", base)) == 0
    assert (base / "last.pt").is_file() and (base / "best.pt").is_file()
    return {"root": root, "a": a, "a2": a2, "b": b, "split": root / "split.csv", "split2": root / "split2.csv",
            "base": base}


def one_error_line(err: str, *words: str) -> str:
    """`err` holds exactly one `error:` line, no traceback, and that line names each of `words`."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(argv)
    return rc, capsys.readouterr().err


def out_with(world, tmp_path, last: bytes | None = None) -> Path:
    """A fresh --out holding the base run's files (hard links: outputs are replaced, never written in place, so
    the base run stays intact whatever a test's run does), last.pt replaced by `last` when given."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("last.pt", "best.pt", "history.csv", "metrics.json"):
        os.link(world["base"] / name, out / name)
    if last is not None:
        (out / "last.pt").unlink()
        (out / "last.pt").write_bytes(last)
    return out


def saved(ckpt: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


# --- resume only what matches -------------------------------------------------------------------------------

@pytest.mark.parametrize("over, was, now", [
    ({"fold": 1}, "fold=0", "fold=1"),
    ({"arch": "resnet34"}, "arch=resnet18", "arch=resnet34"),
    ({"size": 64}, "size=32", "size=64"),
    ({"color_mode": "rgb"}, "color_mode=rgby", "color_mode=rgb"),
    ({"lr": 2e-3}, "lr=0.001", "lr=0.002"),
    ({"seed": 7}, "seed=0", "seed=7"),
    ({"loss": "focal"}, "loss=bce", "loss=focal"),
    ({"threshold_mode": "global"}, "threshold_mode=fitted", "threshold_mode=global"),
    ({"epochs": 2}, "epochs=1", "epochs=2"),  # the LR schedule depends on it: see IDENTITY_FIELDS
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_resume_refuses_another_setting(world, tmp_path, capsys, over, was, now):
    out = out_with(world, tmp_path)
    rc, err = run_cli(train_argv(world["a"], world["split"], out, resume=True, **over), capsys)
    assert rc == 2
    line = one_error_line(err, str(out / "last.pt"), was, now, "start without --resume")
    before, after = line.split("this run has")
    assert was in before and now in after


def test_resume_refuses_other_data(world, tmp_path, capsys):
    out = out_with(world, tmp_path)
    rc, err = run_cli(train_argv(world["b"], world["split"], out, resume=True), capsys)
    assert rc == 2
    one_error_line(err, str(out / "last.pt"), "data=", str(world["a"]), str(world["b"]))


def test_resume_refuses_other_split_file(world, tmp_path, capsys):
    out = out_with(world, tmp_path)
    rc, err = run_cli(train_argv(world["a"], world["split2"], out, resume=True), capsys)
    assert rc == 2
    one_error_line(err, str(out / "last.pt"), "split=", "split2.csv")


def test_resume_refuses_a_checkpoint_without_run_identity(world, tmp_path, capsys):
    ckpt = torch.load(world["base"] / "last.pt", weights_only=True)
    del ckpt["identity"]  # what hpa wrote before run identities were recorded
    out = out_with(world, tmp_path, saved(ckpt))
    rc, err = run_cli(train_argv(world["a"], world["split"], out, resume=True), capsys)
    assert rc == 2
    one_error_line(err, str(out / "last.pt"), "run identity", "start without --resume")


def test_resume_same_run_with_other_execution_settings(world, tmp_path, capsys, caplog):
    """The same run at another URI of the same committed data, with other threads, checkpoint cadence and
    determinism, resumes (and, finished already, reports the same score)."""
    out = out_with(world, tmp_path)
    caplog.set_level("INFO", logger="hpa.train")
    rc, err = run_cli(train_argv(world["a2"], world["split"], out, resume=True, threads=2, deterministic=False,
                                 checkpoint_every_steps=1, val_batch_size=4), capsys)
    assert rc == 0, err[-3000:]
    assert "resumed from" in caplog.text
    assert (out / "metrics.json").read_text() == (world["base"] / "metrics.json").read_text()


# --- one line for every checkpoint problem ------------------------------------------------------------------

def swapped_weights(world) -> dict:
    """base last.pt with its weights replaced by a resnet34's: the arch field no longer describes them."""
    from hpa.models import create_model

    ckpt = torch.load(world["base"] / "last.pt", weights_only=True)
    ckpt["model"] = create_model("resnet34", 4, 28).state_dict()
    return ckpt


@pytest.mark.parametrize("case", ["truncated", "empty", "garbage", "best.pt", "swapped-weights"])
def test_resume_bad_last_pt_is_one_line(world, tmp_path, capsys, case):
    good = (world["base"] / "last.pt").read_bytes()
    last = {"truncated": lambda: good[:len(good) // 2], "empty": lambda: b"",
            "garbage": lambda: os.urandom(4096),
            "best.pt": lambda: (world["base"] / "best.pt").read_bytes(),  # an inference checkpoint renamed
            "swapped-weights": lambda: saved(swapped_weights(world))}[case]()
    out = out_with(world, tmp_path, last)
    rc, err = run_cli(train_argv(world["a"], world["split"], out, resume=True), capsys)
    assert rc == 2
    words = {"best.pt": ["'optimizer'"],
             "swapped-weights": ["resnet18", "do not match"]}.get(case, ["truncated or corrupt"])
    one_error_line(err, str(out / "last.pt"), *words)


@pytest.mark.parametrize("case", ["swapped-weights", "unknown-arch"])
def test_predict_with_a_checkpoint_that_does_not_fit_its_arch(world, tmp_path, capsys, case):
    ckpt = torch.load(world["base"] / "best.pt", weights_only=True)
    if case == "swapped-weights":
        ckpt["model"] = swapped_weights(world)["model"]
    else:
        ckpt["arch"] = "resnet9000"
    path = tmp_path / "model.pt"
    path.write_bytes(saved(ckpt))
    rc, err = run_cli(["predict", "--checkpoint", str(path), "--data", str(world["a"]), "--out",
                       str(tmp_path / "p.npz")], capsys)
    assert rc == 2
    one_error_line(err, str(path), *(["resnet18", "do not match"] if case == "swapped-weights" else ["resnet9000"]))
    assert not (tmp_path / "p.npz").exists()


# --- split CSV fold values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["x", "1.5", "", "-1"])
def test_bad_fold_value_in_split_is_one_line(world, tmp_path, capsys, value):
    df = pd.read_csv(world["split"], dtype=str, keep_default_na=False)
    df.loc[3, "fold"] = value
    split = tmp_path / "split.csv"
    df.to_csv(split, index=False)
    rc, err = run_cli(train_argv(world["a"], split, tmp_path / "out"), capsys)
    assert rc == 2
    one_error_line(err, str(split), "row 5", f"fold {value!r}")
    assert not (tmp_path / "out" / "last.pt").exists()


# --- numeric environment variables ---------------------------------------------------------------------------

def env_argv(world, tmp_path, name: str) -> list[str]:
    if name.startswith("HPA_S3_"):  # a light stage that opens an s3:// store (no request is made)
        return ["split", "--data", "s3://some-bucket/data", "--out", str(tmp_path / "split.csv")]
    return train_argv(world["a"], world["split"], tmp_path / "out")


def check_env_error(rc: int, err: str, name: str) -> None:
    assert rc == 2, err[-3000:]
    line = one_error_line(err, name)
    assert "integer" in line or "number" in line


DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@pytest.mark.parametrize("env, name", [
    ({"HPA_S3_RETRIES": "abc"}, "HPA_S3_RETRIES"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_bad_numeric_environment_variable_through_the_cli(world, tmp_path, env, name):
    """One variable per module that reads them (hpa.store, hpa.ddp), as a user runs it."""
    clean = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run([sys.executable, "-m", "hpa", *env_argv(world, tmp_path, name)], capture_output=True,
                          text=True, timeout=300, env={**clean, **env})
    check_env_error(proc.returncode, proc.stderr, name)


@pytest.mark.parametrize("env, name", [
    ({"HPA_S3_RETRY_DELAY": "soon"}, "HPA_S3_RETRY_DELAY"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK"),
    ({"WORLD_SIZE": "2"}, "RANK"),  # torchrun always sets RANK with WORLD_SIZE; a hand-made env may not
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_bad_numeric_environment_variable_in_process(world, tmp_path, capsys, monkeypatch, env, name):
    """The other cases, in-process (the same CLI entry point, without a torch import per case)."""
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    check_env_error(*run_cli(env_argv(world, tmp_path, name), capsys), name)
