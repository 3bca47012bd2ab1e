"""The benchmarks run (tiny settings, CPU) and print their ratio lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, tmp_path) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(proc.stdout)
    return proc.stdout


def test_decode_throughput_prints_ratio(tmp_path):
    out = run("decode_throughput.py", "--n", "4", "--size", "64", "--repeat", "1", tmp_path=tmp_path)
    for name in ("png", "shards", "raw"):
        assert re.search(rf"^{name}\s+[\d.]+ img/s per core", out, re.M), out
    assert re.search(r"^ratio shards/png: [\d.]+x", out, re.M), out


@pytest.mark.slow
def test_gpu_train_throughput_cpu_mode(tmp_path):
    out = run("gpu_train_throughput.py", "--device", "cpu", "--size", "64", "--steps", "3", tmp_path=tmp_path)
    for arch in ("resnet18", "se_resnet18"):
        assert re.search(rf"^{arch}: \(a\) bare step [\d.]+ img/s \| \(b\) shards loop [\d.]+ img/s \| "
                         rf"\(c\) seed loader [\d.]+ img/s$", out, re.M), out
        assert re.search(rf"^{arch}: ratio b/a .*: [\d.]+", out, re.M), out
        assert re.search(rf"^{arch}: ratio b/c .*: [\d.]+", out, re.M), out


def test_learning_curve_grid_and_goals():
    """benchmarks/learning_curve.py: the grid is the product of the axes, and each row is judged by the
    issue-12 goals (time, 2x the all-classes baseline, ensemble >= best model, 1-3 labels per image)."""
    sys.path.insert(0, str(BENCH))
    try:
        import learning_curve as lc
    finally:
        sys.path.remove(str(BENCH))
    assert lc.parse_grid(["epochs=4,8", "seed=0,1"]) == [
        {"epochs": "4", "seed": "0"}, {"epochs": "4", "seed": "1"}, {"epochs": "8", "seed": "0"},
        {"epochs": "8", "seed": "1"}]
    assert lc.parse_grid([]) == [{}]
    row = {"point": {"seed": "0"}, "elapsed_s": 249.2, "load": (1.0, 2.0), "val_f1": 0.215, "val_f1_in_sample": 0.219,
           "test_f1": 0.237, "all_classes": 0.1005, "members": {"resnet18": 0.202, "se_resnet18": 0.186},
           "labels_per_image": 1.73, "true_labels_per_image": 1.64}
    assert lc.goals(row) == "all met"
    assert lc.goals({**row, "test_f1": 0.19}) == "missed: 2x, ens>=best"
    assert lc.goals({**row, "elapsed_s": 400.0, "labels_per_image": 13.2}) == "missed: time, card"
    table = lc.markdown([row, {"point": {"seed": "1"}, "error": "boom"}])
    assert "| seed=0 | 249 (1.0-2.0) | 0.215 (0.219) | 0.237 | resnet18 0.202, se_resnet18 0.186 |" in table
    assert "failed: boom" in table
