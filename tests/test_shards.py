"""hpa.pack and hpa.shards: pack a committed dataset, stream it (ranks x workers), random access, integrity,
cache bound."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import tarfile

import numpy as np
import pytest
import torch
import zstandard

from hpa import data, pack, shards, store, synthetic
from hpa.cli import main as cli_main
from hpa.errors import ConfigError, DataError, StoreError

N_TRAIN, N_TEST, SRC_SIZE, SIZE, PER_SHARD = 23, 5, 48, 32, 5   # 23 samples in 5 shards: not divisible by 2x2


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthetic.generate(root, N_TRAIN, N_TEST, size=SRC_SIZE, seed=0)
    return root


def commit(raw_dir, uri: str) -> str:
    st = store.open_store(uri)
    st.commit_manifest(st.upload_tree(raw_dir), {"source": "synthetic"})
    return uri


@pytest.fixture
def packed(raw, tmp_path):
    """A committed local dataset and its train shards."""
    data_uri = commit(raw, str(tmp_path / "data"))
    out = str(tmp_path / "shards")
    pack.pack(data_uri, out, SIZE, samples_per_shard=PER_SHARD)
    return data_uri, out


def train_ids(raw) -> list[str]:
    return list(data.read_labels(raw / "train.csv")["Id"])


def epoch_ids(uri, world_size=2, num_workers=2, epoch=0, cache_dir=None, **kw) -> list[list[str]]:
    """Ids each rank reads in one epoch through a DataLoader with `num_workers` workers."""
    per_rank = []
    for rank in range(world_size):
        ds = shards.ShardDataset(uri, rank=rank, world_size=world_size, cache_dir=cache_dir, **kw)
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers)
        ids = []
        for images, targets, batch_ids in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (4, SIZE, SIZE)
            assert targets.dtype == torch.float32 and targets.shape[1:] == (28,)
            ids += list(batch_ids)
        assert len(ids) == len(ds)
        per_rank.append(ids)
    return per_rank


def test_pack_writes_tar_shards_and_manifest(packed, raw):
    _, out = packed
    doc = json.loads(open(os.path.join(out, "train", "shards.json")).read())
    assert doc["format"] == "hpa-shards/1" and doc["shape"] == [4, SIZE, SIZE] and doc["num_samples"] == N_TRAIN
    assert doc["colors"] == ["red", "green", "blue", "yellow"] and doc["has_labels"]
    assert [re.sub(r"-[0-9a-f]{16}\.tar$", ".tar", s["name"]) for s in doc["shards"]] == \
        [f"shard-{i:06d}.tar" for i in range(5)]
    assert sorted(doc["samples"]["id"]) == sorted(train_ids(raw))
    labels = data.read_labels(raw / "train.csv").set_index("Id")["labels"]
    position = {i: n for n, i in enumerate(doc["samples"]["id"])}
    for shard_index, shard in enumerate(doc["shards"]):
        path = os.path.join(out, "train", shard["name"])
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]
        assert os.path.getsize(path) == shard["size"]
        with tarfile.open(path) as tar:                    # plain stdlib tar reads it
            members = tar.getmembers()
            assert len(members) == 2 * shard["num_samples"]
            for meta_m, image_m in zip(members[::2], members[1::2]):
                image_id = meta_m.name[: -len(".json")]
                assert image_m.name == f"{image_id}.rgby.zst"
                meta = json.loads(tar.extractfile(meta_m).read())
                assert meta["labels"] == list(labels[image_id]) and meta["shape"] == [4, SIZE, SIZE]
                n = position[image_id]
                assert doc["samples"]["shard"][n] == shard_index
                assert doc["samples"]["offset"][n] == image_m.offset_data
                assert doc["samples"]["length"][n] == image_m.size
                raw_pixels = zstandard.ZstdDecompressor().decompress(tar.extractfile(image_m).read())
                expected = data.load_image(raw, image_id, size=SIZE)
                assert np.array_equal(np.frombuffer(raw_pixels, np.uint8).reshape(4, SIZE, SIZE), expected)


def test_pack_is_idempotent_and_deterministic(packed, tmp_path):
    data_uri, out = packed
    manifest = open(os.path.join(out, "train", "shards.json"), "rb").read()
    again = pack.pack(data_uri, out, SIZE, samples_per_shard=PER_SHARD)
    assert again["skipped_shards"] == again["num_shards"] == 5
    assert open(os.path.join(out, "train", "shards.json"), "rb").read() == manifest
    elsewhere = pack.pack(data_uri, str(tmp_path / "other"), SIZE, samples_per_shard=PER_SHARD, workers=2)
    assert elsewhere["skipped_shards"] == 0
    assert open(tmp_path / "other" / "train" / "shards.json", "rb").read() == manifest
    # a shard replaced by other bytes is rebuilt, not trusted
    victim = os.path.join(out, "train", json.loads(manifest)["shards"][2]["name"])
    good = open(victim, "rb").read()
    open(victim, "wb").write(b"junk")
    assert pack.pack(data_uri, out, SIZE, samples_per_shard=PER_SHARD)["skipped_shards"] == 4
    assert open(victim, "rb").read() == good


def test_pack_test_split_and_refusals(raw, tmp_path):
    data_uri = commit(raw, str(tmp_path / "data"))
    summary = pack.pack(data_uri, str(tmp_path / "sh"), SIZE, split="test", samples_per_shard=2)
    assert summary["num_samples"] == N_TEST and summary["num_shards"] == 3
    reader = shards.ShardReader(str(tmp_path / "sh"), split="test")
    truth = data.read_labels(raw / "test_labels.csv").set_index("Id")["labels"]
    assert all(reader.labels(i) == list(truth[i]) for i in reader.ids)   # synthetic ships test labels
    with pytest.raises(StoreError, match="not a committed dataset"):
        pack.pack(str(raw), str(tmp_path / "x"), SIZE)                 # a dir without manifest.json
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="--size"):
        pack.pack(data_uri, str(tmp_path / "x"), 2)
    with pytest.raises(StoreError, match="not a packed shard set"):
        shards.ShardDataset(str(tmp_path / "nothing"))


def test_cli_pack(raw, tmp_path, capsys):
    data_uri = commit(raw, str(tmp_path / "data"))
    assert cli_main(["pack", "--data", data_uri, "--out", str(tmp_path / "sh"), "--size", str(SIZE),
                     "--samples-per-shard", "8", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["num_shards"] == 3
    assert cli_main(["pack", "--data", str(raw), "--out", str(tmp_path / "sh2"), "--size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: not a committed dataset")


def test_stream_from_s3_every_sample_once_2_ranks_2_workers(raw, s3_bucket, tmp_path):
    data_uri = commit(raw, s3_bucket + "data")
    summary = pack.pack(data_uri, s3_bucket + "shards", SIZE, samples_per_shard=PER_SHARD)
    assert summary["num_shards"] == 5 and summary["uri"] == s3_bucket + "shards/train/"
    per_rank = epoch_ids(s3_bucket + "shards", cache_dir=str(tmp_path / "cache"))
    counts = collections.Counter(i for ids in per_rank for i in ids)
    assert set(counts) == set(train_ids(raw)) and set(counts.values()) == {1}
    assert [len(ids) for ids in per_rank] == [11, 12]
    # random access on S3 equals the PNG-decoded, resized image
    reader = shards.ShardReader(s3_bucket + "shards", cache_dir=str(tmp_path / "cache2"))
    some = train_ids(raw)[7]
    assert np.array_equal(reader.get(some), data.load_image(raw, some, size=SIZE))


def test_corrupt_shard_on_s3_is_named(raw, s3_bucket, tmp_path):
    data_uri = commit(raw, s3_bucket + "data")
    pack.pack(data_uri, s3_bucket + "shards", SIZE, samples_per_shard=PER_SHARD)
    st = store.open_store(s3_bucket + "shards/train")
    name = json.loads(st.get_bytes("shards.json"))["shards"][3]["name"]
    blob = bytearray(st.get_bytes(name))
    blob[2000:2016] = bytes(b ^ 0xFF for b in blob[2000:2016])        # flip bytes inside a payload
    st.put_bytes(name, bytes(blob))
    ds = shards.ShardDataset(s3_bucket + "shards", shuffle=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(StoreError, match=rf"{name}: sha256 mismatch"):
        list(ds)
    with pytest.raises(StoreError, match=re.escape(name)):
        shards.ShardReader(s3_bucket + "shards", cache_dir=str(tmp_path / "c2")).get(
            shards.ShardSet(s3_bucket + "shards").ids[3 * PER_SHARD])


def test_random_access_equals_png(packed, raw):
    _, out = packed
    reader = shards.ShardReader(out)
    assert len(reader) == N_TRAIN
    for image_id in reversed(train_ids(raw)):
        assert np.array_equal(reader.get(image_id), data.load_image(raw, image_id, size=SIZE))
    with pytest.raises(DataError, match="no sample with id 'nope'"):
        reader.get("nope")


def test_epochs_shuffle_and_even_padding(packed, raw, tmp_path):
    _, out = packed
    cache = str(tmp_path / "cache")
    orders = []
    for epoch in range(2):
        per_rank = epoch_ids(out, num_workers=0, epoch=epoch, cache_dir=cache, seed=3)
        assert sorted(per_rank[0] + per_rank[1]) == sorted(train_ids(raw))
        orders.append(per_rank)
    assert orders[0] != orders[1]                                       # set_epoch reshuffles
    assert epoch_ids(out, num_workers=0, epoch=1, cache_dir=cache, seed=3) == orders[1]   # deterministic
    # even=True (DDP training): equal per-rank counts, every sample at least once, world_size-1 repeats
    per_rank = epoch_ids(out, num_workers=2, cache_dir=cache, even=True)
    assert [len(ids) for ids in per_rank] == [12, 12]
    counts = collections.Counter(per_rank[0] + per_rank[1])
    assert set(counts) == set(train_ids(raw)) and sum(counts.values()) == 24
    # 3 ranks x 2 workers over 23 samples in 5 shards: still exactly once
    per_rank = epoch_ids(out, world_size=3, num_workers=2, cache_dir=cache)
    assert sorted(sum(per_rank, [])) == sorted(train_ids(raw))


def test_ids_filter(packed, raw, tmp_path):
    _, out = packed
    subset = train_ids(raw)[::3]
    ds = shards.ShardDataset(out, ids=subset, cache_dir=str(tmp_path / "c"))
    assert len(ds) == len(subset) and sorted(i for _, _, i in ds) == sorted(subset)
    labels = data.read_labels(raw / "train.csv").set_index("Id")["labels"]
    for _, target, image_id in ds:
        assert np.flatnonzero(target.numpy()).tolist() == sorted(labels[image_id])
    with pytest.raises(DataError, match="'missing-id' is not in the shard set"):
        shards.ShardDataset(out, ids=subset + ["missing-id"])


def test_cache_stays_under_its_byte_limit(packed, tmp_path):
    _, out = packed
    doc = json.loads(open(os.path.join(out, "train", "shards.json")).read())
    biggest = max(s["size"] for s in doc["shards"])
    limit = int(2.5 * biggest)
    cache_dir = tmp_path / "cache"
    ds = shards.ShardDataset(out, cache_dir=str(cache_dir), cache_bytes=limit)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for _ in ds:
            files = [p for p in cache_dir.iterdir() if p.suffix == ".tar"]
            assert sum(p.stat().st_size for p in files) <= limit
    assert 1 <= len([p for p in cache_dir.iterdir() if p.suffix == ".tar"]) <= 2 < len(doc["shards"])
    with pytest.raises(ConfigError, match="cache_bytes=100 is smaller than shard"):
        list(shards.ShardDataset(out, cache_dir=str(tmp_path / "c2"), cache_bytes=100))


def test_pack_refuses_a_png_changed_after_commit(raw, tmp_path):
    data_uri = commit(raw, str(tmp_path / "data"))
    victim = sorted((tmp_path / "data" / "train").glob("*_green.png"))[4]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(StoreError, match=rf"corrupted object .*{victim.name}"):
        pack.pack(data_uri, str(tmp_path / "sh"), SIZE, samples_per_shard=PER_SHARD)
    assert not (tmp_path / "sh" / "train" / "shards.json").exists()


def test_shards_are_readable_by_the_webdataset_library(packed):
    wds = pytest.importorskip("webdataset")        # optional: not a dependency (docs/shards.md)
    _, out = packed
    doc = json.loads(open(os.path.join(out, "train", "shards.json")).read())
    urls = [os.path.join(out, "train", s["name"]) for s in doc["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == doc["samples"]["id"]
    image = np.frombuffer(zstandard.ZstdDecompressor().decompress(samples[0]["rgby.zst"]), np.uint8)
    assert image.size == 4 * SIZE * SIZE and json.loads(samples[0]["json"])["labels"] == doc["samples"]["labels"][0]


def test_batch_size_cuts_worker_parts_at_batch_boundaries(packed, tmp_path):
    _, out = packed
    counts = {}
    for batch_size in (None, 4):
        ds = shards.ShardDataset(out, cache_dir=str(tmp_path / "c"), batch_size=batch_size)
        parts = [len(ds.part(0, 1, w, 4)) for w in range(4)]
        assert sum(parts) == N_TRAIN
        counts[batch_size] = sum(p // 4 for p in parts)
    assert counts == {None: 4, 4: 5}                     # 23 samples, 4 workers: 16 vs 20 samples kept
    ds = shards.ShardDataset(out, cache_dir=str(tmp_path / "c"), batch_size=4, rank=1, world_size=2, even=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, drop_last=True)
    batches = [ids for _, _, ids in loader]
    assert len(batches) == len(ds) // 4 == 3 and len({i for b in batches for i in b}) == 12


def test_repack_with_other_settings_replaces_the_set(packed, raw, tmp_path):
    data_uri, out = packed
    before = {s["name"] for s in json.loads(open(os.path.join(out, "train", "shards.json")).read())["shards"]}
    summary = pack.pack(data_uri, out, 16, samples_per_shard=10)       # other size, fewer shards
    assert summary["num_shards"] == 3 and summary["skipped_shards"] == 0
    doc = json.loads(open(os.path.join(out, "train", "shards.json")).read())
    names = [s["name"] for s in doc["shards"]]
    assert [n[:len("shard-000000")] for n in names] == [f"shard-{i:06d}" for i in range(3)]
    assert not before & set(names)                                     # new names: the old set was never overwritten
    assert before <= set(os.listdir(os.path.join(out, "train")))      # and nothing was deleted
    reader = shards.ShardReader(out, cache_dir=str(tmp_path / "c"))
    some = train_ids(raw)[0]
    assert np.array_equal(reader.get(some), data.load_image(raw, some, size=16))


def test_rank_and_world_size_come_from_torch_distributed(packed, tmp_path):
    _, out = packed
    with pytest.raises(ConfigError, match="rank=2 world_size=2"):
        shards.ShardDataset(out, rank=2, world_size=2)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        ds = shards.ShardDataset(out, cache_dir=str(tmp_path / "c"))
        assert (ds.rank, ds.world_size) == (0, 1) and len(ds) == N_TRAIN
    finally:
        torch.distributed.destroy_process_group()
