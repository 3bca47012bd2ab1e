"""Packed shards, the training-time reader: a dataset at a fixed size in WebDataset-style tar files, streamed.

Format (`hpa-shards/1`, see docs/shards.md):

    <out>/<split>/shard-000000-<digest>.tar  POSIX tar; per sample two members, in this order:
                                          <id>.json      {"id", "labels", "shape", "dtype", "colors"}
                                          <id>.rgby.zst  zstd frame (level 3) of the uint8 C,H,W array (R,G,B,Y)
    <out>/<split>/shard-000000-<digest>.idx.json  sidecar: sha256, size, sample offsets, input fingerprint
    <out>/<split>/shards.json           manifest, written LAST: ids, labels, shards (name, sha256, size),
                                          per-sample shard + byte offset + length (random access), shape

A shard's name carries 16 hex digits of its content digest (hpa.pack.shard_name), so a re-pack of other inputs
into the same prefix writes new shards and then replaces shards.json: readers see the old set or the new one,
and no object is ever deleted (unreferenced shards stay; KFP 2.15/2.16 profile keys cannot delete).

Any tar reader (stdlib `tarfile`, the `webdataset` library) reads the shards; we read them by the byte
offsets in the manifest, which needs no tar parsing and allows random access.

`hpa.pack` writes them (`python -m hpa pack`). Training and prediction stream shards from the store through a
bounded local cache (hpa.shard_cache) with `ShardDataset`, which yields what every source yields (uint8 R,G,B,Y
at the requested size, see hpa.inputs); `ShardReader` is the map-style random-access reader. `decode_image` is
the one decoder of a sample's payload.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import logging
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import zstandard

from hpa.errors import ConfigError, DataError, StoreError
from hpa.inputs import resize_image
from hpa.labels import NUM_CLASSES
from hpa.shard_cache import DEFAULT_CACHE_BYTES, ShardCache, fetch_retrying, owned_cache_dir
from hpa.store import open_store

log = logging.getLogger(__name__)

FORMAT = "hpa-shards/1"
MANIFEST = "shards.json"
DEFAULT_BUFFER = 64


# ----------------------------------------------------------------------------------------------------
# Decoding

def decode_image(payload: bytes, shape: Sequence[int], where: str = "shard") -> np.ndarray:
    """Inverse of `hpa.pack.encode_image`; returns a writable uint8 array of `shape`.

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


# ----------------------------------------------------------------------------------------------------
# Reading

class ShardSet:
    """A committed shard set (its shards.json), opened from the split directory or the pack root."""

    def __init__(self, shards_uri: str, split: str = "train"):
        store = open_store(shards_uri)
        if not fetch_retrying(lambda: store.exists(MANIFEST), f"{store.join(MANIFEST)}"):
            if fetch_retrying(lambda: store.exists(f"{split}/{MANIFEST}"), f"{store.join(split)}"):
                store = store.child(split)
            else:
                raise StoreError(f"{store.join(MANIFEST)}: not a packed shard set (no {MANIFEST} here or under "
                                 f"{split}/); run `python -m hpa pack` first")
        self.store = store
        self.uri = store.uri
        raw = fetch_retrying(lambda: store.get_bytes(MANIFEST), store.join(MANIFEST))
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
        self.cache = ShardCache(self.shard_set.store, owned_cache_dir(cache_dir, self), cache_bytes)

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
    """Stream a shard set (training, prediction): yields (uint8 tensor C,H,W, float32 target (28,), id).

    Per epoch (call `set_epoch(e)` first; keep `persistent_workers=False`) every selected sample (`ids`) is read
    exactly once over all ranks x DataLoader workers: the shards in a (seed, epoch) order, cut into one contiguous
    part per (rank, worker), the samples of a shard in random order, mixed by a shuffle buffer of `buffer`
    compressed samples. `even=True` (DDP training) pads with the first samples so that every rank gets
    ceil(N / world_size); `batch_size` (the DataLoader's) cuts the parts at batch boundaries, so drop_last drops
    < batch_size samples per rank. Rank and world size: the arguments, else torch.distributed when initialised.
    `size`: the requested size; samples packed at another size are resized (hpa.inputs.resize_image), so the
    items equal those of hpa.data.PNGDataset at that size. The details: docs/shards.md, "Streaming".
    """

    def __init__(self, shards_uri: str, ids: Iterable[str] | None = None, shuffle: bool = True, seed: int = 0,
                 buffer: int = DEFAULT_BUFFER, cache_dir: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 split: str = "train", rank: int | None = None, world_size: int | None = None, even: bool = False,
                 batch_size: int | None = None, size: int | None = None):
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
        self.cache_dir = owned_cache_dir(cache_dir, self)
        self.cache_bytes = int(cache_bytes)
        self.size = size

    @property
    def ids(self) -> list[str]:
        return [self.shard_set.ids[n] for n in self.positions]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the images it yields."""
        return self.shard_set.shape if self.size is None else (*self.shard_set.shape[:-2], self.size, self.size)

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
        if self.size is not None:
            image = resize_image(image, self.size)
        return torch.from_numpy(image), torch.from_numpy(self.shard_set.target(n)), self.shard_set.ids[n]
