"""Packed shards: the dataset at a fixed size in WebDataset-style tar files, streamed for training.

Format (`hpa-shards/1`, see docs/shards.md):

    <out>/<split>/shard-000000.tar      POSIX tar; per sample two members, in this order:
                                          <id>.json      {"id", "labels", "shape", "dtype", "colors"}
                                          <id>.rgby.zst  zstd frame (level 3) of the uint8 C,H,W array (R,G,B,Y)
    <out>/<split>/shard-000000.idx.json sidecar: sha256, size, sample offsets, input fingerprint (for re-runs)
    <out>/<split>/shards.json           manifest, written LAST: ids, labels, shards (name, sha256, size),
                                          per-sample shard + byte offset + length (random access), shape

Any tar reader (stdlib `tarfile`, the `webdataset` library) reads the shards; we read them by the byte
offsets in the manifest, which needs no tar parsing and allows random access.

Training streams shards from the store through a bounded local cache (`ShardDataset`); `ShardReader`
is the map-style random-access reader.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import zstandard
from tqdm import tqdm

from hpa.errors import ConfigError, DataError, HPAError, StoreError
from hpa.labels import COLORS, NUM_CLASSES

log = logging.getLogger(__name__)

FORMAT = "hpa-shards/1"
MANIFEST = "shards.json"
IMAGE_EXT = "rgby.zst"
META_EXT = "json"
ZSTD_LEVEL = 3
DEFAULT_SAMPLES_PER_SHARD = 256     # ~120 MB per shard at 512 px on real HPA images
DEFAULT_CACHE_BYTES = 512 << 20
DEFAULT_BUFFER = 64
FETCH_RETRIES = 3                   # on top of the store's own retries (HPA_S3_RETRIES, ~7 s)
FETCH_BACKOFF_S = 1.0               # then 1, 2, 4 s: rides out an S3 server restart; bounded (< 1 min)
_BLOCK = 512                        # tar block size


# ----------------------------------------------------------------------------------------------------
# Encoding

def encode_image(image: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    """uint8 (C,H,W) array -> one zstd frame (content size recorded, so decoding needs no size hint)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise DataError(f"shard image: expected a uint8 (C,H,W) array, got {image.dtype} {image.shape}")
    # write_checksum: a damaged sample fails its own xxhash check even when read by offset alone
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(np.ascontiguousarray(image).tobytes())


def decode_image(payload: bytes, shape: Sequence[int], where: str = "shard") -> np.ndarray:
    """Inverse of `encode_image`; returns a writable uint8 array of `shape`.

    Decompresses straight into the output array (no intermediate bytes object: one 1 MiB buffer
    per 512 px sample instead of two).
    """
    out = np.empty(tuple(shape), dtype=np.uint8)
    view = memoryview(out).cast("B")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(payload)
        filled = 0
        while filled < len(view):
            got = reader.readinto(view[filled:])
            if not got:
                break
            filled += got
        extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise StoreError(f"{where}: corrupt sample payload ({exc})") from None
    if filled != len(view) or extra:
        raise StoreError(f"{where}: sample does not decode to shape {tuple(shape)} ({filled}+ bytes)")
    return out


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
    return {"sha256": _sha256_file(path), "size": os.path.getsize(path), "samples": samples}


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


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
    from hpa.store import open_store

    store = open_store(out_uri)
    shards, labels, shape = [], {}, None
    with tempfile.TemporaryDirectory(prefix="hpa-pack-") as tmp:
        batch: list = []

        def flush():
            name = shard_name(len(shards))
            info = write_shard(os.path.join(tmp, name), batch)
            store.put_file(name, os.path.join(tmp, name))
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
    return hashlib.sha256(_dumps({"format": FORMAT, "level": ZSTD_LEVEL, "split": split, "size": size,
                                  "items": items})).hexdigest()


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
    from hpa.store import open_store

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


def _retire_stale_manifest(dst, source: dict) -> None:
    """A shards.json from a different pack (other size/data) would point at shards we are about to
    overwrite; remove it first, so readers see "not a packed shard set" rather than sha256 errors."""
    if not dst.exists(MANIFEST):
        return
    try:
        old = json.loads(dst.get_bytes(MANIFEST)).get("source")
    except ValueError:
        old = None
    if old != source:
        log.warning("%s: replacing a shard set packed from other inputs", dst.join(MANIFEST))
        dst.delete(MANIFEST)


def _delete_leftovers(dst, num_shards: int) -> None:
    """Shards (and sidecars) past the new count, left by an earlier, larger pack into this prefix."""
    for key in dst.list():
        stem = key.split(".", 1)[0]
        if "/" not in key and stem.startswith("shard-") and stem[6:].isdigit() and int(stem[6:]) >= num_shards:
            dst.delete(key)


def pack(data_uri: str, out_uri: str, size: int, split: str = "train",
         samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, workers: int = 1) -> dict:
    """Pack a committed Kaggle-layout dataset into tar shards of uint8 R,G,B,Y at `size` px.

    Writes `<out_uri>/<split>/shard-*.tar` (each atomic), a sidecar per shard, and `shards.json` last.
    Idempotent: a shard whose sidecar fingerprint (ids, labels, source PNG sha256s, size, format) and
    stored sha256 match is skipped, so a killed run resumes; outputs are byte-identical for the same
    inputs, so concurrent runs into one prefix agree. Returns a summary dict.
    """
    from hpa import data as hpa_data
    from hpa.store import open_store

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
        tasks.append(_ShardTask(data_uri, dst.uri, split, size, shard_name(n), chunk,
                                _fingerprint(split, size, chunk)))
    source = {"data_uri": data_uri, "fingerprint": _fingerprint(split, size, [t.fingerprint for t in tasks])}
    _retire_stale_manifest(dst, source)
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
    dst.put_bytes(MANIFEST, _dumps(doc))        # last: the shard set is committed iff shards.json exists
    _delete_leftovers(dst, len(tasks))
    skipped = sum(bool(s.get("skipped")) for s in shards)
    summary = {"uri": dst.uri, "manifest": dst.join(MANIFEST), "split": split, "size": size,
               "num_samples": doc["num_samples"], "num_shards": len(shards), "skipped_shards": skipped,
               "bytes": sum(s["size"] for s in shards), "seconds": round(time.monotonic() - started, 2)}
    log.info("packed %d %s samples into %d shards (%d already done) at %s", summary["num_samples"], split,
             len(shards), skipped, dst.uri)
    return summary


# ----------------------------------------------------------------------------------------------------
# Reading

class ShardSet:
    """A committed shard set (its shards.json), opened from the split directory or the pack root."""

    def __init__(self, shards_uri: str, split: str = "train"):
        from hpa.store import open_store

        store = open_store(shards_uri)
        if not _retry(lambda: store.exists(MANIFEST), f"{store.join(MANIFEST)}"):
            if _retry(lambda: store.exists(f"{split}/{MANIFEST}"), f"{store.join(split)}"):
                store = store.child(split)
            else:
                raise StoreError(f"{store.join(MANIFEST)}: not a packed shard set (no {MANIFEST} here or under "
                                 f"{split}/); run `python -m hpa pack` first")
        self.store = store
        self.uri = store.uri
        raw = _retry(lambda: store.get_bytes(MANIFEST), store.join(MANIFEST))
        try:
            doc = json.loads(raw)
        except ValueError:
            raise StoreError(f"{store.join(MANIFEST)}: not valid JSON") from None
        if doc.get("format") != FORMAT:
            raise StoreError(f"{store.join(MANIFEST)}: format {doc.get('format')!r}, expected {FORMAT!r}")
        self.doc = doc
        self.shards: list[dict] = doc["shards"]
        self.shape = tuple(doc["shape"])
        samples = doc["samples"]
        self.ids: list[str] = samples["id"]
        self.labels: list = samples["labels"]
        self.shard_of = np.asarray(samples["shard"], dtype=np.int64)
        self.offset = np.asarray(samples["offset"], dtype=np.int64)
        self.length = np.asarray(samples["length"], dtype=np.int64)
        self.index = {image_id: n for n, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, n: int) -> np.ndarray:
        target = np.zeros(NUM_CLASSES, dtype=np.float32)
        if self.labels[n]:
            target[self.labels[n]] = 1.0
        return target

    def select(self, ids: Iterable[str] | None) -> np.ndarray:
        """Manifest positions of `ids` (all samples when None), in manifest order."""
        if ids is None:
            return np.arange(len(self.ids), dtype=np.int64)
        wanted = set(ids)
        missing = wanted - self.index.keys()
        if missing:
            raise DataError(f"{self.store.join(MANIFEST)}: id {sorted(missing)[0]!r} is not in the shard set "
                            f"({len(missing)} missing)")
        return np.asarray(sorted(self.index[i] for i in wanted), dtype=np.int64)


def _retry(call, what: str, retries: int = FETCH_RETRIES, backoff: float = FETCH_BACKOFF_S):
    """Run `call`; when the store gives up on an unreachable server, wait and try again (bounded).

    The store already retries each request; this outer loop covers a server that is down for longer
    (a restart). Errors that are not about reachability (missing key, denied, corrupt) are raised at once.
    """
    for attempt in range(retries + 1):
        try:
            return call()
        except StoreError as exc:
            if "unreachable" not in str(exc) or attempt == retries:
                raise
            log.warning("%s: %s; retrying in %.0f s", what, exc, backoff * 2 ** attempt)
            time.sleep(backoff * 2 ** attempt)


_VERIFIED: set[str] = set()  # cached shard files this process has hashed (or written) itself


class ShardCache:
    """Local copies of shards, named by sha256, verified on fetch, evicted least-recently-used by bytes.

    Shared by DataLoader workers through the directory; an evicted shard that another worker still has
    open stays readable (POSIX unlink), so the limit holds for the directory at all times but one
    in-flight download per worker. A streaming worker holds its current shard and prefetches the
    next, so give at least 2 shards per worker for the cache to also serve later epochs.
    """

    def __init__(self, store, cache_dir: str, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.store, self.dir, self.max_bytes = store, cache_dir, int(max_bytes)
        os.makedirs(cache_dir, exist_ok=True)

    def path(self, shard: dict) -> str:
        final = os.path.join(self.dir, f"{shard['sha256']}.tar")
        try:
            if final not in _VERIFIED and _sha256_file(final) != shard["sha256"]:
                # a cached copy is never trusted unverified (once per process): replace a stale or tampered one
                log.warning("cache: %s does not hash to its name; fetching %s again", final,
                            self.store.join(shard["name"]))
                os.remove(final)
            else:
                _VERIFIED.add(final)
                os.utime(final)                 # LRU: mtime is the last use
                return final
        except FileNotFoundError:
            pass
        if shard["size"] > self.max_bytes:
            raise ConfigError(f"cache_bytes={self.max_bytes} is smaller than shard {self.store.join(shard['name'])} "
                              f"({shard['size']} bytes); raise cache_bytes")
        self._evict(shard["size"])
        tmp = os.path.join(self.dir, f".tmp-{os.getpid()}-{shard['sha256'][:16]}")
        key = shard["name"]
        for attempt in range(2):                # one re-download: a torn transfer is not a corrupt shard
            _retry(lambda: self.store.get_file(key, tmp), self.store.join(key))
            got = _sha256_file(tmp)
            if got == shard["sha256"]:
                os.replace(tmp, final)
                _VERIFIED.add(final)
                return final
            os.remove(tmp)
            log.warning("%s: sha256 mismatch (attempt %d)", self.store.join(key), attempt + 1)
        raise StoreError(f"{self.store.join(key)}: sha256 mismatch (expected {shard['sha256'][:16]}…, "
                         f"got {got[:16]}…); the shard is corrupt, re-run pack")

    def open(self, shard: dict):
        """The verified local copy, opened for reading (re-fetched if another process evicted it just now)."""
        for _ in range(3):
            try:
                return open(self.path(shard), "rb")
            except FileNotFoundError:
                continue
        raise StoreError(f"{self.store.join(shard['name'])}: evicted from the cache {self.dir} while opening it "
                         "three times; raise cache_bytes")

    def _evict(self, incoming: int) -> None:
        entries = []
        for name in os.listdir(self.dir):
            if name.endswith(".tar"):
                try:
                    st = os.stat(os.path.join(self.dir, name))
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, name))
        total = sum(e[1] for e in entries)
        for _, nbytes, name in sorted(entries):
            if total + incoming <= self.max_bytes:
                break
            try:
                os.remove(os.path.join(self.dir, name))
                _VERIFIED.discard(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
            total -= nbytes


def _owned_cache_dir(cache_dir: str | None, owner) -> str:
    """A given cache dir, or a temporary one removed when `owner` is collected in the creating process."""
    if cache_dir is not None:
        return cache_dir
    from hpa.committed import remove_if_creator

    path = tempfile.mkdtemp(prefix="hpa-shard-cache-")
    weakref.finalize(owner, remove_if_creator, path, os.getpid())  # not by the DataLoader workers holding copies
    return path


def _read_sample(f, shard_set: ShardSet, n: int, where: str) -> bytes:
    f.seek(int(shard_set.offset[n]))
    payload = f.read(int(shard_set.length[n]))
    if len(payload) != shard_set.length[n]:
        raise StoreError(f"{where}: truncated at sample {shard_set.ids[n]}")
    return payload


class ShardReader:
    """Map-style random access: `ShardReader(uri).get(id)` -> uint8 (C,H,W) array.

    Reads the whole shard once into the cache (verified), then seeks to the sample's byte offset.
    """

    def __init__(self, shards_uri: str, split: str = "train", cache_dir: str | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.shard_set = ShardSet(shards_uri, split)
        self.cache = ShardCache(self.shard_set.store, _owned_cache_dir(cache_dir, self), cache_bytes)

    @property
    def ids(self) -> list[str]:
        return self.shard_set.ids

    def __len__(self) -> int:
        return len(self.shard_set)

    def labels(self, image_id: str) -> list[int] | None:
        return self.shard_set.labels[self._position(image_id)]

    def _position(self, image_id: str) -> int:
        try:
            return self.shard_set.index[image_id]
        except KeyError:
            raise DataError(f"{self.shard_set.store.join(MANIFEST)}: no sample with id {image_id!r}") from None

    def get(self, image_id: str) -> np.ndarray:
        n = self._position(image_id)
        shard = self.shard_set.shards[int(self.shard_set.shard_of[n])]
        where = self.shard_set.store.join(shard["name"])
        with self.cache.open(shard) as f:
            return decode_image(_read_sample(f, self.shard_set, n, where), self.shard_set.shape, where)


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ConfigError(f"ShardDataset: rank={rank} world_size={world_size}; give both, with 0 <= rank < world_size")
    return int(rank), int(world_size)


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream a shard set for training: yields (uint8 tensor C,H,W, float32 target (28,), id).

    Each epoch (call `set_epoch(e)` before iterating; keep `persistent_workers=False`):
    - the shard order is permuted with (seed, epoch), the samples (optionally only `ids`) are laid out
      shard after shard, and the sequence is cut into world_size × num_workers contiguous parts, one per
      (rank, DataLoader worker): every sample is seen exactly once per epoch over all ranks × workers,
      whatever the shard count, and each part touches about shards/(ranks×workers) + 1 shards;
    - `even=True` (for DDP training) pads the sequence with its own first samples, DistributedSampler
      style, so that every rank gets exactly ceil(N / world_size) samples (at most world_size - 1
      repeats); ranks then run the same number of batches;
    - `batch_size` (give the DataLoader's): parts are cut at multiples of it, so with drop_last=True a
      rank runs exactly len(ds) // batch_size steps and drops < batch_size samples per epoch; without
      it each worker drops its own remainder (up to num_workers × (batch_size - 1) per rank);
    - within a part, samples of a shard are read in a random order (cheap: random access by offset
      into the cached local copy) and mixed across shard boundaries by a shuffle buffer of `buffer`
      compressed samples.
    Rank and world size come from the arguments or from torch.distributed when it is initialised.
    """

    def __init__(self, shards_uri: str, ids: Iterable[str] | None = None, shuffle: bool = True, seed: int = 0,
                 buffer: int = DEFAULT_BUFFER, cache_dir: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 split: str = "train", rank: int | None = None, world_size: int | None = None, even: bool = False,
                 batch_size: int | None = None):
        super().__init__()
        self.shard_set = ShardSet(shards_uri, split)
        self.positions = self.shard_set.select(ids)
        if len(self.positions) == 0:
            raise DataError(f"{self.shard_set.store.join(MANIFEST)}: no samples selected")
        self.shuffle, self.seed, self.buffer = shuffle, int(seed), max(1, int(buffer))
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.even = even
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"ShardDataset: batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.epoch = 0
        self.cache_dir = _owned_cache_dir(cache_dir, self)
        self.cache_bytes = int(cache_bytes)

    @property
    def ids(self) -> list[str]:
        return [self.shard_set.ids[n] for n in self.positions]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shard_set.shape

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (over all its workers)."""
        n = len(self.positions)
        if self.even:
            return -(-n // self.world_size)
        return (self.rank + 1) * n // self.world_size - self.rank * n // self.world_size

    def epoch_order(self) -> np.ndarray:
        """Manifest positions of the whole epoch, before the split across ranks and workers."""
        rng = np.random.default_rng([self.seed, self.epoch])
        shard_order = rng.permutation(len(self.shard_set.shards)) if self.shuffle else \
            np.arange(len(self.shard_set.shards))
        rank_of_shard = np.empty_like(shard_order)
        rank_of_shard[shard_order] = np.arange(len(shard_order))
        # stable sort by the shard's place in this epoch's order keeps manifest order inside a shard
        return self.positions[np.argsort(rank_of_shard[self.shard_set.shard_of[self.positions]], kind="stable")]

    def part(self, rank: int, world_size: int, worker: int, num_workers: int) -> np.ndarray:
        """The manifest positions that (rank, worker) reads this epoch, in shard-reading order."""
        order = self.epoch_order()
        n = len(order)
        if self.even:
            per_rank = -(-n // world_size)
            order = np.concatenate([order, order[: per_rank * world_size - n]])
            mine = order[rank * per_rank:(rank + 1) * per_rank]
        else:
            mine = order[rank * n // world_size:(rank + 1) * n // world_size]
        m = len(mine)
        if self.batch_size is None:
            return mine[worker * m // num_workers:(worker + 1) * m // num_workers]
        # Cut at batch boundaries: every worker's part is whole batches but the last one's, so a
        # DataLoader(batch_size, drop_last=True) drops < batch_size samples per rank, not per worker.
        bs = self.batch_size
        nb = -(-m // bs)
        return mine[(worker * nb // num_workers) * bs:min(m, ((worker + 1) * nb // num_workers) * bs)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        positions = self.part(self.rank, self.world_size, worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        cache = ShardCache(self.shard_set.store, self.cache_dir, self.cache_bytes)
        buffer: list[tuple[int, bytes, str]] = []
        for item in self._payloads(positions, cache, rng):
            if not self.shuffle:
                yield self._sample(*item)
                continue
            buffer.append(item)
            if len(buffer) >= self.buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield self._sample(*buffer.pop())
        for j in (rng.permutation(len(buffer)) if buffer else []):
            yield self._sample(*buffer[j])

    def _payloads(self, positions: np.ndarray, cache: ShardCache, rng) -> Iterator[tuple[int, bytes, str]]:
        """Compressed samples, shard by shard; the next shard is fetched in the background meanwhile."""
        if len(positions) == 0:
            return
        bounds = np.flatnonzero(np.diff(self.shard_set.shard_of[positions])) + 1
        runs = np.split(positions, bounds)
        shards = [self.shard_set.shards[int(self.shard_set.shard_of[run[0]])] for run in runs]
        with futures.ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch") as prefetch:
            pending = prefetch.submit(cache.path, shards[0])
            for k, (run, shard) in enumerate(zip(runs, shards)):
                pending.result()                    # raises the fetch's StoreError here
                f = cache.open(shard)               # (re-fetches if evicted meanwhile)
                if k + 1 < len(runs):
                    pending = prefetch.submit(cache.path, shards[k + 1])
                where = self.shard_set.store.join(shard["name"])
                if self.shuffle:
                    run = rng.permutation(run)
                with f:
                    for n in run:
                        yield int(n), _read_sample(f, self.shard_set, int(n), where), where

    def _sample(self, n: int, payload: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        image = decode_image(payload, self.shard_set.shape, where)
        return torch.from_numpy(image), torch.from_numpy(self.shard_set.target(n)), self.shard_set.ids[n]


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
