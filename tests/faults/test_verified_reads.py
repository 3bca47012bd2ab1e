"""Issue 13 items 1, 2 and 8 (temp dirs): every read of a committed dataset is verified against its manifest,
through one door (hpa.committed), by train, predict, split, montage and the local cache.

Each case plants a fault in a real SeaweedFS store (or in the cache) and runs the real CLI as a subprocess:
before this work, `train` and `predict` from s3:// exited 0 on replaced bytes, a poisoned cache was used, a
repaired store was ignored, an uncommitted prefix was trained on, and an s3 run left hpa-png-* and hpa-train-*
directories (hundreds of MB on real data) in the temp dir.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from hpa.store import open_store

TRAIN_ARGS = ("--fold", "0", "--arch", "resnet18", "--workers", "0", "--threads", "1", "--size", "32",
              "--epochs", "1", "--batch-size", "4", "--lr", "1e-3")


@pytest.fixture
def committed(s3_bucket, tmp_path):
    """A committed synthetic dataset in S3 (16 train, 4 test images) and a split CSV for it."""
    from hpa.download import download

    uri = s3_bucket + "datasets/tiny"
    download("synthetic", uri, n_train=16, n_test=4, size=32, seed=3)
    df = pd.read_csv(io.BytesIO(open_store(uri).get_bytes("train.csv")), dtype=str)
    df["fold"] = np.arange(len(df)) % 2
    split = tmp_path / "split.csv"
    df.to_csv(split, index=False)
    return uri, split, df


def replace_behind_manifest(uri: str, key: str, data: bytes) -> None:
    """Overwrite an object with a plain S3 client: no sha256 metadata, manifest untouched."""
    store = open_store(uri)
    store.client.put_object(store.bucket, store._name(key), io.BytesIO(data), len(data))


def other_png(uri: str, df: pd.DataFrame) -> bytes:
    """A valid PNG of the same size that is not the original (another image's channel)."""
    return open_store(uri).get_bytes(f"train/{df['Id'].iloc[1]}_blue.png")


def run(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpa", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_train_from_s3_refuses_a_replaced_image(committed, tmp_path):
    uri, split, df = committed
    key = f"train/{df['Id'].iloc[0]}_red.png"
    replace_behind_manifest(uri, key, other_png(uri, df))
    line = one_error_line(run(["train", "--data", uri, "--split", split, "--out", tmp_path / "out", *TRAIN_ARGS]))
    assert f"corrupted object {uri}/{key}" in line and "does not match the manifest" in line
    assert not (tmp_path / "out" / "best.pt").exists()


def test_predict_from_s3_refuses_a_replaced_test_image(committed, tmp_path):
    uri, split, df = committed
    proc = run(["train", "--data", uri, "--split", split, "--out", tmp_path / "run", *TRAIN_ARGS])
    assert proc.returncode == 0, proc.stderr[-2000:]
    sample = pd.read_csv(io.BytesIO(open_store(uri).get_bytes("sample_submission.csv")), dtype=str)
    key = f"test/{sample['Id'].iloc[0]}_green.png"
    replace_behind_manifest(uri, key, open_store(uri).get_bytes(f"test/{sample['Id'].iloc[1]}_green.png"))
    line = one_error_line(run(["predict", "--checkpoint", tmp_path / "run" / "best.pt", "--data", uri,
                               "--ids", "test", "--out", tmp_path / "pred.npz"]))
    assert f"corrupted object {uri}/{key}" in line
    assert not (tmp_path / "pred.npz").exists()


def test_split_refuses_a_replaced_csv(committed, tmp_path):
    uri, _, df = committed
    text = open_store(uri).get_bytes("train.csv").decode()
    replace_behind_manifest(uri, "train.csv", text.replace(df["Target"].iloc[0], "0", 1).encode() + b"\n")
    line = one_error_line(run(["split", "--data", uri, "--out", tmp_path / "split.csv"]))
    assert f"corrupted object {uri}/train.csv" in line


def test_montage_refuses_a_replaced_image(committed, tmp_path):
    from hpa.errors import StoreError
    from hpa.montage import render_montage

    uri, _, df = committed
    for image_id in df["Id"]:  # whichever images the montage samples
        replace_behind_manifest(uri, f"train/{image_id}_yellow.png", other_png(uri, df))
    with pytest.raises(StoreError, match=r"corrupted object .*_yellow\.png: sha256"):
        render_montage(uri, tmp_path / "m.png", n=4)


def test_uncommitted_s3_prefix_is_not_trained_on(committed, tmp_path):
    uri, split, _ = committed
    open_store(uri).delete("manifest.json")
    line = one_error_line(run(["train", "--data", uri, "--split", split, "--out", tmp_path / "out", *TRAIN_ARGS]))
    assert f"not a committed dataset: {uri}/manifest.json does not exist" in line


def test_poisoned_cache_is_never_used_and_a_repaired_store_is_read(committed, tmp_path):
    """The cache is keyed by content, private (0700) and re-verified on use. An object corrupted in the store
    is refused and never cached; once the store is repaired it is read (the old cache was keyed by URI and
    kept the bad copy after the repair). A tampered cached copy is fetched again."""
    uri, split, df = committed
    cache = tmp_path / "cache"
    args = ["train", "--data", uri, "--split", split, "--cache-dir", cache, *TRAIN_ARGS]
    key = f"train/{df['Id'].iloc[2]}_green.png"
    good = open_store(uri).get_bytes(key)
    replace_behind_manifest(uri, key, other_png(uri, df))
    line = one_error_line(run([*args, "--out", tmp_path / "a"]))
    assert f"corrupted object {uri}/{key}" in line
    replace_behind_manifest(uri, key, good)  # the store is repaired
    second = run([*args, "--out", tmp_path / "b"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "(1 fetched, 63 from the cache)" in second.stderr  # the other 63 were verified and kept by run 1
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    cached = [p for p in (cache / "objects").rglob("*") if p.is_file()]
    assert len(cached) == 16 * 4  # one per channel file, named by its sha256
    assert not [p for p in cache.iterdir() if p.name.startswith("hpa-data-")]  # views removed after the run
    for p in cached:  # poison every cached copy: corrupt bytes under a good name
        p.write_bytes(b"not a png")
    third = run([*args, "--out", tmp_path / "c"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert "(64 fetched, 0 from the cache)" in third.stderr


def test_s3_training_leaves_nothing_in_the_temp_dir(committed, tmp_path):
    uri, split, _ = committed
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = run(["train", "--data", uri, "--split", split, "--out", uri.rsplit("/", 1)[0] + "/runs/r1", *TRAIN_ARGS],
               env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fetched" in proc.stderr
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("hpa-"))
    assert left == [], f"left in the temp dir: {left}"


def test_local_committed_dataset_is_verified_in_place(tmp_path):
    """A committed local directory (run --local --store) is hashed once before training reads it."""
    from hpa.download import download

    data = tmp_path / "ds"
    download("synthetic", str(data), n_train=16, n_test=0, size=32, seed=3)
    df = pd.read_csv(data / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % 2
    df.to_csv(tmp_path / "split.csv", index=False)
    victim = data / "train" / f"{df['Id'].iloc[0]}_red.png"
    victim.write_bytes((data / "train" / f"{df['Id'].iloc[1]}_red.png").read_bytes())
    line = one_error_line(run(["train", "--data", data, "--split", tmp_path / "split.csv", "--out", tmp_path / "o",
                               *TRAIN_ARGS]))
    assert f"corrupted object {data}/train/{victim.name}" in line


def test_single_reads_by_uri_are_verified_against_the_dataset_manifest(committed):
    """hpa.store.read_bytes (CSV reads by URI) finds the manifest of the dataset an object belongs to, at the
    object's prefix or its parent's, and re-reads it when the dataset is committed again."""
    from hpa.errors import StoreError
    from hpa.store import read_bytes

    uri, _, df = committed
    key = f"train/{df['Id'].iloc[0]}_red.png"
    assert read_bytes(f"{uri}/{key}") == open_store(uri).get_bytes(key)
    replace_behind_manifest(uri, key, b"x")
    with pytest.raises(StoreError, match="corrupted object"):
        read_bytes(f"{uri}/{key}")
    store = open_store(uri)  # re-commit with the new bytes: the manifest changes, the read follows it
    entries = [dict(o) for o in store.read_manifest()["objects"]]
    for e in entries:
        if e["key"] == key:
            e.update(size=1, sha256=__import__("hashlib").sha256(b"x").hexdigest())
    store.commit_manifest(entries, {})
    assert read_bytes(f"{uri}/{key}") == b"x"
    open_store(uri).put_bytes("notes.txt", b"not part of the dataset")
    assert read_bytes(f"{uri}/notes.txt") == b"not part of the dataset"  # not listed: read as it is


def test_poisoned_shard_cache_is_fetched_again(committed, tmp_path, caplog):
    """A shard cached under its sha256 in a user's --cache-dir was used unverified on a later run; now the
    first use in each process hashes it and a tampered copy is replaced from the store."""
    import hpa.shard_cache as shard_cache
    import hpa.shards as shards
    from hpa.pack import pack

    uri, _, df = committed
    out = uri.rsplit("/", 1)[0] + "/shards/tiny"
    pack(uri, out, 32, samples_per_shard=8)
    cache = tmp_path / "shard-cache"
    first = shards.ShardReader(out, cache_dir=str(cache))
    image_id = first.ids[0]
    good = first.get(image_id)
    cached = sorted(cache.glob("*.tar"))
    assert cached
    for path in cached:  # same size, other bytes
        path.write_bytes(bytes(len(path.read_bytes())))
    getattr(shard_cache, "_VERIFIED", set()).clear()  # what a new process starts with
    with caplog.at_level("WARNING", logger="hpa.shard_cache"):
        again = shards.ShardReader(out, cache_dir=str(cache)).get(image_id)
    np.testing.assert_array_equal(again, good)
    assert "does not hash to its name" in caplog.text
