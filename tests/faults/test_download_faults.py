"""Download killed mid-upload and re-run; concurrent downloads into one prefix (real S3 server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hpa.download import download
from hpa.store import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    from hpa.synthetic import generate

    root = tmp_path_factory.mktemp("src")
    generate(root, 40, 8, size=32, seed=5)
    return root


def _objects(uri: str) -> dict[str, str]:
    return {o["key"]: o["sha256"] for o in open_store(uri).read_manifest()["objects"]}


def _cli(source, dest, env, workers=1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpa", "download", "--source", str(source), "--dest", dest,
                             "--workers", str(workers)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_upload_then_rerun(source_dir, s3_bucket, s3_env, tmp_path):
    reference = download(str(source_dir), s3_bucket + "ref")
    dest = s3_bucket + "killed"
    store = open_store(dest)
    # its own TMPDIR: nothing can remove the staging dir of a SIGKILLed process
    proc = _cli(source_dir, dest, {**s3_env, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while len(store.list()) < 25 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the download finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    stored = len(store.list())
    assert 25 <= stored < reference["objects"]
    assert not store.exists("manifest.json")  # nothing committed
    result = download(str(source_dir), dest)
    assert result["uploaded"] == reference["objects"] - stored  # only what was missing
    assert _objects(dest) == _objects(s3_bucket + "ref")
    assert store.list() == sorted([*_objects(dest), "manifest.json"])  # no strays, no temporaries
    assert store.verify() == reference["objects"]
    print(f"killed after {stored}/{reference['objects']} objects; the re-run uploaded {result['uploaded']}")


def test_four_concurrent_downloads_one_consistent_dataset(source_dir, s3_bucket, s3_env):
    dest = s3_bucket + "shared"
    t0 = time.monotonic()
    procs = [_cli(source_dir, dest, s3_env, workers=2) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in outputs]
    reference = download(str(source_dir), s3_bucket + "ref")
    store = open_store(dest)
    assert _objects(dest) == _objects(s3_bucket + "ref")
    assert store.list() == sorted([*_objects(dest), "manifest.json"])
    assert store.verify() == reference["objects"]
    print(f"4 concurrent downloads of {reference['objects']} objects: {time.monotonic() - t0:.1f}s")
