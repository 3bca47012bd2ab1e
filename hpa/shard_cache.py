"""The local cache of packed shards: whole shard files fetched from the store, named by their sha256, verified
on fetch (and once per process before a cached copy is trusted), evicted least-recently-used to stay under a
byte limit; shared by DataLoader workers and ranks through the directory. Used by the readers in hpa.shards.

Store reads of shards go through `fetch_retrying`: the store's retry, once more around a call that the store
already retried, for a server away for longer (a restart).
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref

from hpa.committed import remove_if_creator
from hpa.errors import ConfigError, StoreError
from hpa.store import retry, sha256_file

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 512 << 20
FETCH_RETRIES = 3                   # on top of the store's own retries (HPA_S3_RETRIES, ~7 s)
FETCH_BACKOFF_S = 1.0               # then 1, 2, 4 s: rides out an S3 server restart; bounded (< 1 min)


def fetch_retrying(call, what: str):
    """The store's retry around a store call: the store already retries each request; this covers a server
    that stays unreachable for longer (StoreUnreachableError, e.g. a restart): FETCH_RETRIES more tries after
    FETCH_BACKOFF_S, doubling. Other errors (missing key, denied, corrupt) are raised at once."""
    return retry(call, what, FETCH_RETRIES + 1, FETCH_BACKOFF_S)


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
            if final not in _VERIFIED and sha256_file(final) != shard["sha256"]:
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
            fetch_retrying(lambda: self.store.get_file(key, tmp), self.store.join(key))
            got = sha256_file(tmp)
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


def owned_cache_dir(cache_dir: str | None, owner) -> str:
    """A given cache dir, or a temporary one removed when `owner` is collected in the creating process."""
    if cache_dir is not None:
        return cache_dir
    path = tempfile.mkdtemp(prefix="hpa-shard-cache-")
    weakref.finalize(owner, remove_if_creator, path, os.getpid())  # not by the DataLoader workers holding copies
    return path
