"""The offline packer: a committed Kaggle-layout dataset -> packed shards (`python -m hpa pack`, the `pack` stage).

Writes the `hpa-shards/1` format that `hpa.shards` documents and reads: per split, tar shards of zstd-compressed
uint8 R,G,B,Y arrays at one size (`load_image(size=)`: the bytes a PNG-layout reader yields at that size, see
hpa.inputs), a sidecar per shard (sha256, sample offsets, input fingerprint: a re-run skips finished shards) and
`shards.json` last. `write_shards` packs in-memory records (generated data) the same way.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import zstandard
from tqdm import tqdm

from hpa.errors import ConfigError, DataError, HPAError, StoreError
from hpa.labels import COLORS, NUM_CLASSES
from hpa.shards import FORMAT, MANIFEST
from hpa.store import open_store, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

IMAGE_EXT = "rgby.zst"
META_EXT = "json"
ZSTD_LEVEL = 3
DEFAULT_SAMPLES_PER_SHARD = 256     # ~120 MB per shard at 512 px on real HPA images
_BLOCK = 512                        # tar block size


# ----------------------------------------------------------------------------------------------------
# Writing shards

def encode_image(image: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """uint8 (C,H,W) array -> one zstd frame (content size recorded, so decoding needs no size hint)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise DataError(f"shard image: expected a uint8 (C,H,W) array, got {image.dtype} {image.shape}")
    # write_checksum: a damaged sample fails its own xxhash check even when read by offset alone
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(np.ascontiguousarray(image).tobytes())


def _check_id(image_id: str) -> str:
    # WebDataset groups members by the name up to the first dot, and a tar name must not hold a path.
    if not image_id or any(c in image_id for c in "./\\\0") or len(image_id) > 200:
        raise DataError(f"sample id {image_id!r}: must be non-empty, at most 200 chars, without '.', '/', '\\\\'")
    return image_id


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same samples always give the same bytes (re-runs, concurrent runs).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(path: str, records: Iterable[tuple[str, list[int] | None, np.ndarray]],
                level: int = ZSTD_LEVEL) -> dict:
    """Write one tar shard from (id, labels or None, uint8 C,H,W image) records.

    Returns {"sha256", "size", "samples": [{"id", "offset", "length"}]}; `offset` is the byte offset of
    the `<id>.rgby.zst` payload inside the tar, so a reader can seek straight to it.
    """
    samples = []
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for image_id, labels, image in records:
            _check_id(image_id)
            meta = json.dumps({"id": image_id, "labels": labels, "shape": list(image.shape), "dtype": "uint8",
                               "colors": list(COLORS)}, sort_keys=True).encode()
            tar.addfile(_tarinfo(f"{image_id}.{META_EXT}", len(meta)), io.BytesIO(meta))
            payload = encode_image(image, level)
            tar.addfile(_tarinfo(f"{image_id}.{IMAGE_EXT}", len(payload)), io.BytesIO(payload))
            padded = -(-len(payload) // _BLOCK) * _BLOCK
            samples.append({"id": image_id, "offset": tar.offset - padded, "length": len(payload)})
    return {"sha256": sha256_file(path), "size": os.path.getsize(path), "samples": samples}


def shard_name(index: int, digest: str) -> str:
    """`shard-<index>-<digest[:16]>.tar`: named by its content (pack: the input fingerprint, known before the shard
    is built, so a re-run finds it; write_shards: the file's sha256). A shard set of other inputs gets other names,
    so packing into a prefix never overwrites, nor needs to delete, a shard that a committed shards.json names:
    KFP 2.15/2.16 profile keys cannot delete (hpa.s3store.S3Store.delete); unreferenced shards are left behind."""
    return f"shard-{index:06d}-{digest[:16]}.tar"


def _index_name(name: str) -> str:
    return name[: -len(".tar")] + ".idx.json"


def _dumps(obj) -> bytes:
    # Canonical JSON: identical inputs give byte-identical manifests (idempotent, concurrent-safe).
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_manifest(shards: list[dict], labels: dict[str, list[int] | None], shape: Sequence[int],
                   split: str, source: dict) -> dict:
    """The shards.json document from per-shard results (write_shard output + "name")."""
    ids, shard_of, offsets, lengths = [], [], [], []
    for s_index, shard in enumerate(shards):
        for sample in shard["samples"]:
            ids.append(sample["id"])
            shard_of.append(s_index)
            offsets.append(sample["offset"])
            lengths.append(sample["length"])
    return {
        "format": FORMAT, "split": split, "size": int(shape[-1]), "shape": list(shape), "dtype": "uint8",
        "colors": list(COLORS), "codec": "zstd", "zstd_level": ZSTD_LEVEL, "num_classes": NUM_CLASSES,
        "num_samples": len(ids), "has_labels": all(labels[i] is not None for i in ids), "source": source,
        "shards": [{"name": s["name"], "sha256": s["sha256"], "size": s["size"], "num_samples": len(s["samples"])}
                   for s in shards],
        "samples": {"id": ids, "labels": [labels[i] for i in ids], "shard": shard_of, "offset": offsets,
                    "length": lengths},
    }


def write_shards(out_uri: str, records: Iterable[tuple[str, list[int] | None, np.ndarray]],
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, split: str = "train",
                 source: dict | None = None) -> dict:
    """Pack in-memory records straight into a shard set at `out_uri` (the directory of shards.json).

    For generated data (benchmarks, load tests) that never existed as PNGs; `pack` is the real path.
    Returns the manifest.
    """
    store = open_store(out_uri)
    shards, labels, shape = [], {}, None
    with tempfile.TemporaryDirectory(prefix="hpa-pack-") as tmp:
        batch: list = []

        def flush():
            path = os.path.join(tmp, "shard.tar")
            info = write_shard(path, batch)
            name = shard_name(len(shards), info["sha256"])
            store.put_file(name, path, sha256=info["sha256"])
            shards.append({"name": name, **info})
            batch.clear()

        for image_id, target, image in records:
            shape = shape or list(image.shape)
            if list(image.shape) != shape:
                raise DataError(f"sample {image_id}: shape {list(image.shape)} differs from {shape}")
            labels[image_id] = target
            batch.append((image_id, target, image))
            if len(batch) == samples_per_shard:
                flush()
        if batch:
            flush()
    if not shards:
        raise DataError(f"{out_uri}: no samples to pack")
    manifest = build_manifest(shards, labels, shape, split, source or {"generated": True})
    store.put_bytes(MANIFEST, _dumps(manifest))
    return manifest


# ----------------------------------------------------------------------------------------------------
# Packing a committed dataset

@dataclass(frozen=True)
class _ShardTask:
    data_uri: str
    out_uri: str            # the split directory
    split: str
    size: int
    name: str
    items: tuple            # ((id, labels or None, ((key, sha256) per color)), ...)
    fingerprint: str


def _read_table(src, split: str, objects: dict) -> tuple[list[str], dict[str, list[int] | None]]:
    """Ids (in CSV order) and labels of one split of a committed Kaggle-layout dataset."""
    from hpa import data as hpa_data

    table = {"train": "train.csv", "test": "sample_submission.csv"}[split]
    if table not in objects:
        raise DataError(f"{src.join(table)}: missing from the dataset manifest")
    with tempfile.TemporaryDirectory(prefix="hpa-pack-csv-") as tmp:
        local = os.path.join(tmp, table)
        src.get_file(table, local)
        if split == "train":
            df = hpa_data.read_labels(local, where=src.join(table))
            return list(df["Id"]), {i: list(map(int, t)) for i, t in zip(df["Id"], df["labels"])}
        ids = list(hpa_data.read_sample_submission(local)["Id"])
        labels: dict = {i: None for i in ids}
        if "test_labels.csv" in objects:      # synthetic data ships its test labels
            src.get_file("test_labels.csv", os.path.join(tmp, "test_labels.csv"))
            df = hpa_data.read_labels(os.path.join(tmp, "test_labels.csv"), where=src.join("test_labels.csv"))
            known = {i: list(map(int, t)) for i, t in zip(df["Id"], df["labels"])}
            if set(known) >= set(ids):
                labels = {i: known[i] for i in ids}
        return ids, labels


def _fingerprint(split: str, size: int, items) -> str:
    return sha256_bytes(_dumps({"format": FORMAT, "level": ZSTD_LEVEL, "split": split, "size": size,
                                "items": items}))


def _load_images(src, task: _ShardTask, tmp: str) -> Iterator[tuple[str, list[int] | None, np.ndarray]]:
    """Fetch the PNGs of a shard (threads: S3 latency), verify them against the dataset manifest, decode."""
    from hpa import data as hpa_data

    def fetch(item):
        _, _, files = item
        for key, sha in files:
            blob = src.get_bytes(key, sha256=sha)        # verified against the dataset manifest
            with open(os.path.join(tmp, key), "wb") as f:
                f.write(blob)

    os.makedirs(os.path.join(tmp, task.split), exist_ok=True)
    with futures.ThreadPoolExecutor(8) as pool:
        window = 32                 # bounded look-ahead: memory does not grow with the shard size
        for start in range(0, len(task.items), window):
            chunk = task.items[start:start + window]
            list(pool.map(fetch, chunk))
            for image_id, labels, files in chunk:
                image = hpa_data.load_image(tmp, image_id, split=task.split, size=task.size)
                for key, _ in files:
                    os.remove(os.path.join(tmp, key))
                yield image_id, (list(labels) if labels is not None else None), image


def _build_shard(task: _ShardTask) -> dict:
    """Write one shard (+ its sidecar) unless an identical one is already stored. Runs in a worker."""
    src, dst = open_store(task.data_uri), open_store(task.out_uri)
    index_key = _index_name(task.name)
    try:
        index = json.loads(dst.get_bytes(index_key))
    except (ValueError, StoreError):  # missing (StoreNotFoundError) or unreadable: build the shard
        index = {}
    # stored_sha256: recorded at write on S3, re-hashed locally
    if index.get("fingerprint") == task.fingerprint and dst.stored_sha256(task.name) == index.get("sha256"):
        return {**index, "skipped": True}
    with tempfile.TemporaryDirectory(prefix="hpa-pack-") as tmp:
        path = os.path.join(tmp, task.name)
        info = write_shard(path, _load_images(src, task, tmp))
        dst.put_file(task.name, path)                                      # atomic: temp key, then final
    index = {"name": task.name, "fingerprint": task.fingerprint, **info}
    dst.put_bytes(index_key, _dumps(index))
    return {**index, "skipped": False}


def pack(data_uri: str, out_uri: str, size: int, split: str = "train",
         samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, workers: int = 1) -> dict:
    """Pack a committed Kaggle-layout dataset into tar shards of uint8 R,G,B,Y at `size` px.

    Writes `<out_uri>/<split>/shard-*.tar` (each atomic), a sidecar per shard, and `shards.json` last.
    Idempotent: a shard whose sidecar fingerprint (ids, labels, source PNG sha256s, size, format) and
    stored sha256 match is skipped, so a killed run resumes; outputs are byte-identical for the same
    inputs, so concurrent runs into one prefix agree. Returns a summary dict.
    """
    from hpa import data as hpa_data
    if split not in ("train", "test"):
        raise ConfigError(f"--split: expected 'train' or 'test', got {split!r}")
    if not isinstance(size, int) or not 8 <= size <= 4096:
        raise ConfigError(f"--size: expected an integer in [8, 4096], got {size!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard: expected a positive integer, got {samples_per_shard!r}")
    started = time.monotonic()
    src = open_store(data_uri)
    manifest = src.read_manifest()          # StoreError "not a committed dataset" when absent
    objects = {o["key"]: o for o in manifest["objects"]}
    ids, labels = _read_table(src, split, objects)
    if not ids:
        raise DataError(f"{src.join(split)}: the {split} split has no samples")
    items = []
    for image_id in ids:
        files = []
        for color in COLORS:
            stem = f"{split}/{_check_id(image_id)}_{color}"
            key = next((stem + ext for ext in hpa_data.EXTENSIONS if stem + ext in objects), None)
            if key is None:
                raise DataError(f"{src.join(stem + '.png')}: listed in the {split} table but not in the dataset "
                                "manifest")
            files.append((key, objects[key]["sha256"]))
        items.append((image_id, labels[image_id], tuple(files)))

    dst = open_store(out_uri).child(split)
    tasks = []
    for n, start in enumerate(range(0, len(items), samples_per_shard)):
        chunk = tuple(items[start:start + samples_per_shard])
        fingerprint = _fingerprint(split, size, chunk)
        tasks.append(_ShardTask(data_uri, dst.uri, split, size, shard_name(n, fingerprint), chunk, fingerprint))
    source = {"data_uri": data_uri, "fingerprint": _fingerprint(split, size, [t.fingerprint for t in tasks])}
    results: dict[str, dict] = {}
    bar = tqdm(total=len(tasks), desc=f"pack {split}", unit="shard", disable=not sys.stderr.isatty())
    if workers <= 1:
        for task in tasks:
            results[task.name] = _build_shard(task)
            bar.update()
    else:
        # spawn: the store's HTTP pools and torch do not survive fork reliably.
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for task, result in zip(tasks, pool.map(_build_shard, tasks)):
                results[task.name] = result
                bar.update()
    bar.close()

    shards = [results[t.name] for t in tasks]
    for task, shard in zip(tasks, shards):
        if [s["id"] for s in shard["samples"]] != [it[0] for it in task.items]:
            raise StoreError(f"{dst.join(_index_name(task.name))}: sidecar does not list the shard's samples")
    shape = [len(COLORS), size, size]
    doc = build_manifest(shards, labels, shape, split, source)
    # last, one PUT: readers see the old set (its shards untouched) or the new one; nothing is deleted
    dst.put_bytes(MANIFEST, _dumps(doc))
    skipped = sum(bool(s.get("skipped")) for s in shards)
    summary = {"uri": dst.uri, "manifest": dst.join(MANIFEST), "split": split, "size": size,
               "num_samples": doc["num_samples"], "num_shards": len(shards), "skipped_shards": skipped,
               "bytes": sum(s["size"] for s in shards), "seconds": round(time.monotonic() - started, 2)}
    log.info("packed %d %s samples into %d shards (%d already done) at %s", summary["num_samples"], split,
             len(shards), skipped, dst.uri)
    return summary


# ----------------------------------------------------------------------------------------------------
# CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa pack", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="committed dataset (Kaggle layout): s3://bucket/prefix or dir")
    parser.add_argument("--out", required=True, help="shard root; shards go to <out>/<split>/")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="which split to pack")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                        help="samples per tar shard (256 ~ 120 MB at 512 px)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="processes packing shards in parallel")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    summary = pack(args.data, args.out, args.size, split=args.split, samples_per_shard=args.samples_per_shard,
                   workers=args.workers)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HPAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
