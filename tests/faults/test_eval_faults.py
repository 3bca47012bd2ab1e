"""Evaluation faults (issue 8): hostile prediction / threshold files, and ensemble / submit killed
with SIGKILL at random points then re-run.

Every bad input goes through the CLI (`python -m hpa ensemble|submit`) in-process: exit 2, one line
`error: ...` naming the file and field, and nothing under the output's final names. CASES is
module-level so that the count is printed (test_count_of_cases).
"""

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

from hpa.cli import main as cli_main
from hpa.evaluate import save_thresholds
from hpa.labels import NUM_CLASSES
from hpa.predictions import load_predictions, save_predictions

ENSEMBLE_OUTPUTS = ("ensemble_val.npz", "ensemble_test.npz", "thresholds.json", "metrics.json")


def write_inputs(root: Path, n_val=300, n_test=200, seed=0) -> dict:
    """Two models' val/test predictions, a thresholds file and a sample submission."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    y = (rng.random((n_val, NUM_CLASSES)) < 0.1).astype(np.uint8)
    val_ids = np.array([f"v{i:05d}" for i in range(n_val)])
    test_ids = np.array([f"t{i:05d}" for i in range(n_test)])
    paths = {"val": [], "test": []}
    for m in range(2):
        save_predictions(root / f"m{m}_val.npz", val_ids, np.clip(0.5 * y + 0.6 * rng.random(y.shape), 0, 1), y,
                         f"m{m}")
        save_predictions(root / f"m{m}_test.npz", test_ids, rng.random((n_test, NUM_CLASSES)), model=f"m{m}")
        paths["val"].append(str(root / f"m{m}_val.npz"))
        paths["test"].append(str(root / f"m{m}_test.npz"))
    save_thresholds(root / "thr.json", np.full(NUM_CLASSES, 0.4))
    pd.DataFrame({"Id": test_ids, "Predicted": "0"}).to_csv(root / "sample_submission.csv", index=False)
    paths["thr"], paths["sample"] = str(root / "thr.json"), str(root / "sample_submission.csv")
    return paths


def ensemble_argv(p, out, extra=()):
    return ["ensemble", "--val", *p["val"], "--test", *p["test"], "--out", str(out), *extra]


def submit_argv(p, preds, out, thr=None):
    return ["submit", "--predictions", preds, "--thresholds", thr or p["thr"], "--sample-submission", p["sample"],
            "--out", str(out)]


# --- bad inputs ------------------------------------------------------------------------------------

def nan_probs(path):
    d = dict(np.load(path))
    d["probs"][7, 2] = np.nan
    np.savez(path, **d)


def inf_probs(path):
    d = dict(np.load(path))
    d["probs"][0, 0] = np.inf
    np.savez(path, **d)


def zero_bytes(path):
    Path(path).write_bytes(b"")


def no_rows(path):
    np.savez(path, ids=np.array([], dtype=str), probs=np.zeros((0, NUM_CLASSES), np.float32))


def not_npz(path):
    Path(path).write_text("Id,probs\nv1,0.5\n")


def truncated(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def wrong_width(path):
    d = dict(np.load(path))
    np.savez(path, ids=d["ids"], probs=d["probs"][:, :27])


def pickled_ids(path):
    d = dict(np.load(path))
    np.savez(path, ids=d["ids"].astype(object), probs=d["probs"])


def ids_dropped(path):
    d = dict(np.load(path))
    np.savez(path, **{k: (v[1:] if v.ndim else v) for k, v in d.items()})


def thresholds_json(values):
    return lambda path: Path(path).write_text(json.dumps({"values": values}))


# (name, which input to break, how, expected text in the error line)
CASES = [
    ("NaN in val probs", "val", nan_probs, "NaN/inf values, first at id 'v00007' class 2"),
    ("inf in test probs", "test", inf_probs, "NaN/inf values"),
    ("zero-byte predictions file", "val", zero_bytes, "empty file (0 bytes)"),
    ("predictions with no rows", "test", no_rows, "no predictions (0 ids)"),
    ("CSV instead of npz", "val", not_npz, "not a readable .npz"),
    ("truncated npz", "test", truncated, "not a readable .npz"),
    ("27 columns of probs", "val", wrong_width, "'probs' must be float (300, 28)"),
    ("ids stored as pickled objects", "val", pickled_ids, "not a readable .npz"),
    ("ids mismatch between models", "val", ids_dropped, "ids differ between"),
    ("threshold above 1", "thr", thresholds_json([0.5] * 27 + [1.2]), "class 27 (Rods & rings) is 1.2"),
    ("negative threshold", "thr", thresholds_json([-0.1] + [0.5] * 27), "class 0 (Nucleoplasm) is -0.1"),
    ("27 thresholds", "thr", thresholds_json([0.5] * 27), "expected 28 thresholds"),
    ("NaN threshold", "thr", thresholds_json([0.5] * 27 + [float("nan")]), "class 27"),
    # issue 13: the pipeline refuses 0 and 1 (threshold in (0, 1)); the stages accepted them
    ("threshold exactly 0", "thr", thresholds_json([0.0] + [0.5] * 27),
     "class 0 (Nucleoplasm) is 0.0, expected a value in (0, 1)"),
    ("threshold exactly 1", "thr", thresholds_json([0.5] * 27 + [1.0]),
     "class 27 (Rods & rings) is 1.0, expected a value in (0, 1)"),
]


def run_cli(argv, capsys):
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("name,target,breaker,expected", CASES, ids=[c[0] for c in CASES])
def test_ensemble_refuses(tmp_path, capsys, name, target, breaker, expected):
    p = write_inputs(tmp_path / "in")
    broken = p["thr"] if target == "thr" else p[target][1]
    breaker(broken)
    extra = ["--thresholds", p["thr"]] if target == "thr" else []
    rc, err = run_cli(ensemble_argv(p, tmp_path / "out", extra), capsys)
    assert rc == 2 and err[-1].startswith("error: ") and expected in err[-1], err
    assert Path(broken).name in err[-1] or target == "val" and name.startswith("ids mismatch")
    assert not any((tmp_path / "out" / f).exists() for f in ENSEMBLE_OUTPUTS)


@pytest.mark.parametrize("name,target,breaker,expected", [c for c in CASES if c[1] != "val" or "mismatch" not in c[0]],
                         ids=[c[0] for c in CASES if c[1] != "val" or "mismatch" not in c[0]])
def test_submit_refuses(tmp_path, capsys, name, target, breaker, expected):
    p = write_inputs(tmp_path / "in")
    broken = p["thr"] if target == "thr" else p["test"][0]
    breaker(broken)
    expected = expected.replace("(300, 28)", "(200, 28)").replace("v00007", "t00007")
    rc, err = run_cli(submit_argv(p, p["test"][0], tmp_path / "submission.csv"), capsys)
    assert rc == 2 and err[-1].startswith("error: ") and expected in err[-1], err
    assert Path(broken).name in err[-1]
    assert not (tmp_path / "submission.csv").exists()


def test_submit_refuses_ids_that_do_not_match_the_sample(tmp_path, capsys):
    p = write_inputs(tmp_path / "in")
    ids_dropped(p["test"][0])
    rc, err = run_cli(submit_argv(p, p["test"][0], tmp_path / "submission.csv"), capsys)
    assert rc == 2 and "ids do not match" in err[-1] and "'t00000' is in the sample but has no prediction" in err[-1]
    assert not (tmp_path / "submission.csv").exists()


@pytest.mark.parametrize("stage,value", [("ensemble", "0"), ("ensemble", "1"), ("ensemble", "1.0"),
                                         ("submit", "0"), ("submit", "1"), ("submit", "0.0")])
def test_global_threshold_of_0_or_1_is_refused(tmp_path, capsys, stage, value):
    """One number for every class (`ensemble --threshold`, `submit --thresholds`): 0 and 1 are refused as the
    pipeline's threshold parameter is (issue 13 item 8)."""
    p = write_inputs(tmp_path / "in")
    if stage == "ensemble":
        argv = ensemble_argv(p, tmp_path / "out", ["--threshold", value])
    else:
        argv = submit_argv(p, p["test"][0], tmp_path / "submission.csv", thr=value)
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and err[-1].startswith("error: ") and "(0, 1)" in err[-1] and value in err[-1], err
    assert not (tmp_path / "submission.csv").exists()
    assert not any((tmp_path / "out" / f).exists() for f in ENSEMBLE_OUTPUTS)


def test_count_of_cases():
    total = len(CASES) * 2  # each through ensemble and submit (the mismatch case via its own submit test)
    print(f"\nevaluation bad inputs tried: {total} (all refused with one clear line, nothing written)")
    assert total >= 20


# --- SIGKILL and re-run ----------------------------------------------------------------------------

def run_to_end(argv, env):
    return subprocess.run([sys.executable, "-m", "hpa", *argv], env=env, capture_output=True, text=True, timeout=300)


def kill_after(argv, delay, env):
    proc = subprocess.Popen([sys.executable, "-m", "hpa", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def final_files(out: Path) -> dict[str, bytes]:
    """Files under their final names (temporary names start with '.')."""
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if not f.name.startswith(".")} if out.exists() else {}


@pytest.mark.slow
@pytest.mark.fault_class("process")
@pytest.mark.parametrize("stage", ["ensemble", "submit"])
def test_killed_and_rerun_gives_the_same_outputs(tmp_path, stage):
    """SIGKILL at spread-out points of a run: every file under a final name is complete (equal to the
    reference run's), and a re-run completes with byte-identical outputs."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    p = write_inputs(tmp_path / "in", n_val=20_000, n_test=20_000)  # big enough that writes take a while
    ref_dir = tmp_path / "ref"
    if stage == "ensemble":
        argv_for = lambda out: ensemble_argv(p, out, ["--threshold-mode", "fitted"])  # noqa: E731
    else:
        assert run_to_end(ensemble_argv(p, tmp_path / "ens", ["--threshold-mode", "fitted"]), env).returncode == 0
        argv_for = lambda out: submit_argv(p, str(tmp_path / "ens" / "ensemble_test.npz"), out / "submission.csv")  # noqa: E731
    t0 = time.perf_counter()
    done = run_to_end(argv_for(ref_dir), env)
    duration = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    reference = final_files(ref_dir)
    rng = np.random.default_rng(0)
    killed, partial = 0, 0
    for trial, frac in enumerate([0.6, 0.8, 0.9, *rng.uniform(0.5, 1.0, 2)]):
        out = tmp_path / "runs" / f"t{trial}"
        rc = kill_after(argv_for(out), frac * duration, env)
        killed += rc == -signal.SIGKILL
        partial += 0 < len(final_files(out)) < len(reference)
        for name, data in final_files(out).items():
            assert data == reference[name], f"{name} under its final name differs from a complete run (trial {trial})"
        if stage == "ensemble" and (out / "metrics.json").exists():  # written last: all the others are there
            assert set(final_files(out)) == set(ENSEMBLE_OUTPUTS)
        assert run_to_end(argv_for(out), env).returncode == 0
        assert final_files(out) == reference
    print(f"\n{stage}: reference run {duration:.1f} s, {killed} of 5 runs killed mid-way "
          f"({partial} with some outputs already final), all re-runs byte-identical")
    assert killed >= 1
    load_predictions(ref_dir / "ensemble_test.npz") if stage == "ensemble" else None
