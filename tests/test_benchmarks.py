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
