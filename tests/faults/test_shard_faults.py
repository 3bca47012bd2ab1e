"""Faults around packed shards: pack killed and re-run, concurrent packs, S3 restart while streaming, load.

Against the real SeaweedFS server of tests/conftest.py.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from hpa import pack, shard_cache, shards, store, synthetic

SIZE = 32


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthetic.generate(root, 40, 0, size=32, seed=1)
    return root


def commit(raw_dir, uri: str) -> str:
    st = store.open_store(uri)
    st.commit_manifest(st.upload_tree(raw_dir), {"source": "synthetic"})
    return uri


def pack_cmd(data_uri: str, out_uri: str, per_shard: int = 1) -> list[str]:
    return [sys.executable, "-m", "hpa", "pack", "--data", data_uri, "--out", out_uri, "--size", str(SIZE),
            "--samples-per-shard", str(per_shard), "--workers", "1"]


def verify_all(out_uri: str, cache_dir) -> dict:
    """Every shard of the committed set verifies (sha256) and every sample decodes exactly once."""
    ds = shards.ShardDataset(out_uri, shuffle=False, cache_dir=str(cache_dir))
    ids = [i for _, _, i in ds]
    assert sorted(ids) == sorted(ds.shard_set.ids) and len(set(ids)) == len(ids)
    return ds.shard_set.doc


def test_pack_killed_midway_then_rerun_gives_the_same_shards(raw, s3_bucket, tmp_path):
    data_uri = commit(raw, s3_bucket + "data")
    out = s3_bucket + "shards"
    split_store = store.open_store(out + "/train")
    # its own TMPDIR: nothing can remove the staging dir of a SIGKILLed process
    proc = subprocess.Popen(pack_cmd(data_uri, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len([k for k in split_store.list() if k.endswith(".tar")]) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"pack ended before it could be killed: {proc.stderr.read()[-500:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    stored = split_store.list()
    done = [k for k in stored if k.endswith(".tar")]
    print(f"killed after {len(done)} of 40 shards")
    assert "shards.json" not in stored and 3 <= len(done) < 40          # not committed
    pack.pack(data_uri, s3_bucket + "reference", SIZE, samples_per_shard=1)
    reference = store.open_store(s3_bucket + "reference/train")
    ref_doc = json.loads(reference.get_bytes("shards.json"))
    by_name = {s["name"]: s["sha256"] for s in ref_doc["shards"]}
    for key in done:                               # whatever is under a final name is whole
        assert split_store.stored_sha256(key) == by_name[key]
        assert store.sha256_bytes(split_store.get_bytes(key)) == by_name[key]
    again = pack.pack(data_uri, out, SIZE, samples_per_shard=1)
    assert again["skipped_shards"] >= len(done) - 1 and again["num_shards"] == 40
    assert split_store.get_bytes("shards.json") == reference.get_bytes("shards.json")
    verify_all(out, tmp_path / "cache")


def test_four_concurrent_packs_into_one_prefix(raw, s3_bucket, tmp_path):
    data_uri = commit(raw, s3_bucket + "data")
    out = s3_bucket + "shards"
    procs = [subprocess.Popen(pack_cmd(data_uri, out, per_shard=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()[-1000:]
    summaries = [json.loads(o) for o, _ in results]
    assert {s["num_shards"] for s in summaries} == {10}
    doc = verify_all(out, tmp_path / "cache")
    assert doc["num_samples"] == 40
    keys = store.open_store(out + "/train").list()
    # shards are named by their content (shard-NNNNNN-<digest>.tar, issue 22 item 10): the same bytes, the same names
    assert sorted(re.sub(r"-[0-9a-f]{16}\.tar$", ".tar", k) for k in keys if k.endswith(".tar")) == \
        [f"shard-{i:06d}.tar" for i in range(10)]
    reference = pack.pack(data_uri, str(tmp_path / "ref"), SIZE, samples_per_shard=4)
    assert reference["num_shards"] == 10
    assert (tmp_path / "ref" / "train" / "shards.json").read_bytes() == \
        store.open_store(out + "/train").get_bytes("shards.json")


def test_s3_restart_while_streaming_resumes(raw, s3_server, s3_bucket, tmp_path):
    data_uri = commit(raw, s3_bucket + "data")
    pack.pack(data_uri, s3_bucket + "shards", SIZE, samples_per_shard=8)
    ds = shards.ShardDataset(s3_bucket + "shards", shuffle=False, cache_dir=str(tmp_path / "cache"))
    ids, restarted = [], threading.Event()
    try:
        for n, (_, _, image_id) in enumerate(ds):
            ids.append(image_id)
            if n == 0:                               # shard 0 is cached; the next fetch meets a dead server
                s3_server.stop(kill=True)
                threading.Timer(2.0, lambda: (s3_server.start(), restarted.set())).start()
    finally:
        restarted.wait(60)
        s3_server.start()
    assert restarted.is_set()
    assert collections.Counter(ids) == collections.Counter(ds.shard_set.ids)


def test_s3_down_while_streaming_gives_one_clear_error(raw, s3_server, s3_bucket, tmp_path, monkeypatch):
    data_uri = commit(raw, s3_bucket + "data")
    pack.pack(data_uri, s3_bucket + "shards", SIZE, samples_per_shard=8)
    ds = shards.ShardDataset(s3_bucket + "shards", shuffle=False, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("HPA_S3_RETRIES", "2")
    monkeypatch.setenv("HPA_S3_RETRY_DELAY", "0.1")
    monkeypatch.setattr(shard_cache, "FETCH_RETRIES", 1)
    monkeypatch.setattr(shard_cache, "FETCH_BACKOFF_S", 0.1)
    ds.shard_set.store = store.open_store(s3_bucket + "shards/train")   # pick up the fast-fail settings
    try:
        with pytest.raises(shards.StoreError) as info:
            for n, _ in enumerate(ds):
                if n == 0:
                    s3_server.stop(kill=True)
    finally:
        s3_server.start()
    message = str(info.value)
    print(message)
    assert "\n" not in message and "unreachable" in message
    assert re.search(r"shards/train/shard-00000[1-4]-[0-9a-f]{16}\.tar", message)  # names the shard it was fetching
    assert s3_server.secret_key not in message


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _cheap_samples(n: int):
    """n distinct, compressible 4x32x32 images and random labels (no PNGs: 80,000 files would take minutes)."""
    rng = np.random.default_rng(0)
    base = (np.add.outer(np.arange(SIZE), np.arange(SIZE)) * 4).astype(np.uint8)
    for k in range(n):
        image = np.stack([base + (k % 251), base ^ (k % 97), base // 2, np.full_like(base, k % 256)])
        image[:, k % SIZE, :] = 255
        labels = sorted(set(rng.integers(0, 28, size=1 + k % 3).tolist()))
        yield f"s{k:06d}", labels, image


@pytest.mark.slow
def test_20000_sample_epoch_streams_with_flat_memory(s3_bucket, tmp_path):
    n = 20_000
    start = time.monotonic()
    pack.write_shards(s3_bucket + "load/train", _cheap_samples(n), samples_per_shard=1000)
    built = time.monotonic() - start
    ds = shards.ShardDataset(s3_bucket + "load", cache_dir=str(tmp_path / "cache"), cache_bytes=8 << 20)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=0)
    seen = 0
    rss_start = rss_end = None
    for b, (images, targets, ids) in enumerate(loader):
        seen += len(ids)
        if b == 1:
            rss_start = rss_mib()                    # after the first shard and batch are in flight
    rss_end = rss_mib()
    elapsed = time.monotonic() - start
    print(f"20,000 samples: built shards in {built:.1f} s, epoch done at {elapsed:.1f} s; "
          f"RSS start {rss_start:.1f} MiB, end {rss_end:.1f} MiB, growth {rss_end - rss_start:.1f} MiB")
    assert seen == n
    assert rss_end - rss_start < 100
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir() if p.suffix == ".tar") <= 8 << 20
