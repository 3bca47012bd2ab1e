"""Committed datasets: the one verified door to their bytes.

A dataset in the store is committed by its `manifest.json` (key, size, sha256 of every object; see
hpa.store). Every read of a committed dataset's object goes through this module and is checked against
the manifest, once, as it is read; a mismatch is one StoreError line naming the object:

    ds = open_dataset("s3://mlpipeline/hpa-kfp/datasets/x")      # reads the manifest once
    ds.read_bytes("train.csv")                                   # verified bytes
    view = ds.materialize(["train/a_red.png", ...], cache_dir)    # a private local copy, verified
    view.root                                                    # -> HPADataset(view.root, ...)

Local copies:

- Without a cache dir, objects are fetched into a private temporary directory (mode 0700, `hpa-data-*`)
  that is removed when its `DatasetView` is closed or collected, or when the process exits.
- With a cache dir (train/predict `--cache-dir`, the components' per-task temp dir), objects are kept by
  content: `<cache>/objects/<sha256[:2]>/<sha256>`. The cache dir must belong to this user and is made
  mode 0700. A cached object is re-hashed before each use and replaced when it does not match, so a
  stale or tampered copy is never used; a repaired store is picked up on the next read because the key
  is the manifest's sha256, not the object's name. The view links (or copies) cached objects under the
  dataset's key layout.
- A local directory that is a committed dataset is verified in place (its files hashed once) and read
  where it is; a local directory without a manifest (a user's own Kaggle download) is read as it is:
  there is nothing to verify it against. An s3:// dataset must be committed.

`expected_sha256(store, key)` serves single reads by URI (hpa.store.read_bytes): it finds the manifest
of the dataset an object belongs to (its prefix or its parent's) and returns the object's recorded
sha256, so CSVs read by URI are verified too. Manifests are cached per process by their stat (size,
etag or mtime), so a re-committed dataset is re-read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from hpa.errors import StoreError
from hpa.localstore import LocalStore
from hpa.s3store import S3Store
from hpa.store import (MANIFEST, MANIFEST_FORMAT, UNCOMMITTED, UNCOMMITTED_WHY, Store, StoreNotFoundError, open_store,
                       sha256_bytes, sha256_file)

log = logging.getLogger(__name__)

VIEW_PREFIX = "hpa-data-"
FETCH_WORKERS = 16


class CommittedDataset:
    """A committed dataset opened for reading (its manifest read once)."""

    def __init__(self, store: Store, manifest: dict, manifest_sha256: str):
        self.store, self.manifest, self.manifest_sha256 = store, manifest, manifest_sha256
        self.objects = {o["key"]: o for o in manifest["objects"]}

    @property
    def uri(self) -> str:
        return self.store.uri

    def sha256(self, key: str) -> str:
        try:
            return self.objects[key]["sha256"]
        except KeyError:
            raise StoreError(f"{self.store.join(key)}: not in the committed dataset "
                             f"({self.store.join(MANIFEST)} does not list it)") from None

    def find(self, stem: str, extensions: Iterable[str]) -> str | None:
        """The first key `stem + ext` the manifest lists, or None."""
        return next((stem + ext for ext in extensions if stem + ext in self.objects), None)

    def read_bytes(self, key: str) -> bytes:
        return self.store.get_bytes(key, sha256=self.sha256(key))

    def materialize(self, keys: Iterable[str], cache_dir: str | os.PathLike | None = None,
                    workers: int = FETCH_WORKERS) -> "DatasetView":
        """A local directory holding `keys` under their dataset layout, every byte verified."""
        keys = sorted(set(keys))
        expected = {k: self.sha256(k) for k in keys}  # unknown keys fail before any transfer
        if isinstance(self.store, LocalStore):
            _parallel(lambda k: _verify_local(self.store, k, expected[k]), keys, workers)
            log.info("verified %d objects of %s in place", len(keys), self.uri)
            return DatasetView(str(self.store.root), owned=False)
        cache = ContentCache(cache_dir) if cache_dir else None
        root = Path(tempfile.mkdtemp(prefix=VIEW_PREFIX, dir=cache.dir if cache else None))
        view = DatasetView(str(root), owned=True)
        counts = {"fetched": 0, "cached": 0}
        lock = threading.Lock()

        def one(key: str) -> None:
            dest = root / key
            if cache is None:
                self.store.get_file(key, dest, sha256=expected[key])
                hit = False
            else:
                hit = cache.place(self.store, key, expected[key], dest)
            with lock:
                counts["cached" if hit else "fetched"] += 1

        try:
            _parallel(one, keys, workers)
        except BaseException:
            view.close()
            raise
        log.info("%s: %d objects verified into %s (%d fetched, %d from the cache)", self.uri, len(keys), root,
                 counts["fetched"], counts["cached"])
        return view


class DatasetView:
    """A local root to read a dataset from; an owned (temporary) one is removed by close(), when collected
    in the process that made it, or at exit."""

    def __init__(self, root: str, owned: bool):
        self.root, self.owned = root, owned
        pid = os.getpid()
        # DataLoader workers hold copies of the view: only the creating process removes the directory.
        self._finalizer = weakref.finalize(self, remove_if_creator, root if owned else None, pid)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "DatasetView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __fspath__(self) -> str:
        return self.root


def remove_if_creator(path: str | None, pid: int) -> None:
    """Remove the directory `path` in the process `pid` that made it only: DataLoader workers (forked) hold
    copies of its owner, and their exit must not remove what the parent still reads."""
    if path and os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def private_dir(directory: str | os.PathLike) -> Path:
    """`directory`, created if needed, owned by this user and mode 0700 (a cache others cannot read or poison)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise StoreError(f"cache dir {path} belongs to another user (uid {st.st_uid}); use a directory of your own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


class ContentCache:
    """Objects by sha256 under `<dir>/objects/`, private to this user, verified on every use."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = private_dir(directory)

    def path(self, sha256: str) -> Path:
        return self.dir / "objects" / sha256[:2] / sha256

    def place(self, store: Store, key: str, sha256: str, dest: Path) -> bool:
        """Put the object (sha256) at dest, from the cache when a verified copy is there; True on a hit."""
        cached = self.path(sha256)
        hit = cached.is_file() and sha256_file(cached) == sha256
        if not hit:
            if cached.exists():
                log.warning("cache: %s does not hash to its name; fetching %s again", cached, store.join(key))
            store.get_file(key, cached, sha256=sha256)  # atomic and verified
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(cached, dest)
        except OSError:  # another file system, or no hard links: a copy
            shutil.copyfile(cached, dest)
        return hit


def _verify_local(store: LocalStore, key: str, expected: str) -> None:
    path = store.root / key
    try:
        got = sha256_file(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing, though the committed dataset lists it") from None
    store._check_sha(key, got, expected)


def _parallel(fn, items: list, workers: int) -> None:
    if not items:
        return
    with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        for fut in [pool.submit(fn, item) for item in items]:
            fut.result()  # the first failure propagates (in key order); the rest finish or fail too


def open_dataset(uri: str | os.PathLike, required: bool | None = None) -> CommittedDataset | None:
    """The committed dataset at `uri`. A missing manifest is a StoreError for s3:// (or required=True);
    a local directory without one gives None (nothing to verify against)."""
    store = open_store(uri)
    if required is None:
        required = isinstance(store, S3Store)
    try:
        raw = store.get_bytes(MANIFEST)
    except StoreNotFoundError:
        if required:
            raise StoreError(f"not a committed dataset: {store.join(MANIFEST)} does not exist") from None
        return None
    return CommittedDataset(store, _parse_manifest(store, raw), sha256_bytes(raw))


def _parse_manifest(store: Store, raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise StoreError(f"not a committed dataset: {store.join(MANIFEST)} is not valid JSON") from None
    if raw == UNCOMMITTED:
        raise StoreError(f"not a committed dataset: {store.join(MANIFEST)} {UNCOMMITTED_WHY}")
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("objects"), list):
        raise StoreError(f"not a committed dataset: {store.join(MANIFEST)} is not an {MANIFEST_FORMAT} manifest")
    return doc


# -- single reads by URI ----------------------------------------------------------------------------
_manifests: dict[str, tuple[object, dict]] = {}
_manifests_lock = threading.Lock()


def _manifest_stamp(store: Store) -> object | None:
    """What changes when the manifest is rewritten (None: no manifest)."""
    if isinstance(store, LocalStore):
        try:
            st = (store.root / MANIFEST).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)
    st = store._stat(MANIFEST)
    return None if st is None else (st.size, st.etag, st.last_modified)


def _objects_of(store: Store) -> dict | None:
    stamp = _manifest_stamp(store)
    if stamp is None:
        return None
    with _manifests_lock:
        cached = _manifests.get(store.uri)
    if cached and cached[0] == stamp:
        return cached[1]
    doc = _parse_manifest(store, store.get_bytes(MANIFEST))
    objects = {o["key"]: o["sha256"] for o in doc["objects"]}
    with _manifests_lock:
        _manifests[store.uri] = (stamp, objects)
    return objects


def expected_sha256(store: Store, key: str) -> str | None:
    """The sha256 a committed dataset's manifest records for `store`/`key`, or None when no manifest at the
    object's prefix or its parent lists it (not part of a committed dataset)."""
    if key.rsplit("/", 1)[-1] == MANIFEST:
        return None
    candidates = [(store, key)]
    parent_uri, sep, last = store.uri.rstrip("/").rpartition("/")
    if sep and last and parent_uri not in ("s3:", "s3:/", ""):  # not above a bucket or the file system root
        candidates.append((open_store(parent_uri), f"{last}/{key}"))
    for owner, rel in candidates:
        objects = _objects_of(owner)
        if objects is not None and rel in objects:
            return objects[rel]
    return None


def image_view(data: str, split: str, ids: Iterable[str], cache_dir: str | os.PathLike | None = None) -> DatasetView:
    """A local root holding `<split>/<id>_<color>.<ext>` for `ids`, for training, prediction and every data
    source: `data` itself when it is a local directory (verified in place when committed), else a verified
    local copy of exactly those objects (whichever image extension the manifest lists)."""
    from hpa.data import EXTENSIONS
    from hpa.errors import DataError
    from hpa.labels import COLORS

    ds = open_dataset(data)
    if ds is None:
        return DatasetView(str(data), owned=False)
    keys = []
    for image_id in ids:
        for color in COLORS:
            key = ds.find(f"{split}/{image_id}_{color}", EXTENSIONS)
            if key is None:
                raise DataError(f"{ds.store.join(split)}: missing {color} channel for Id {image_id} "
                                f"(not in {ds.store.join(MANIFEST)})")
            keys.append(key)
    return ds.materialize(keys, cache_dir)


# -- what the store holds before a pipeline run (the cache keys of download and pack) ---------------
ABSENT = "absent-"


def absent_token() -> str:
    """What dataset_state reports for a missing manifest: unique per call, so that a task keyed on it is never a
    cache hit (a constant "" would match the cached first run that made the dataset, and "succeed" again)."""
    import uuid

    return ABSENT + uuid.uuid4().hex


def manifest_sha256(uri: str, name: str = MANIFEST) -> str:
    """sha256 of the dataset's manifest as stored now, or "" when there is none (nor its bucket), or it is the
    uncommitted marker (hpa.store.UNCOMMITTED)."""
    store = open_store(uri)
    if isinstance(store, S3Store) and not store._call("read", None, lambda: store.client.bucket_exists(store.bucket),
                                                      ensure_bucket=False):
        return ""
    try:
        raw = store.get_bytes(name)
    except StoreNotFoundError:
        return ""
    return "" if raw == UNCOMMITTED else sha256_bytes(raw)


def shards_sha256(shards_uri: str) -> str:
    """One sha256 over the train and test `shards.json` under `shards_uri`, or "" when either is missing."""
    parts = [manifest_sha256(f"{shards_uri.rstrip('/')}/{split}", "shards.json") for split in ("train", "test")]
    return sha256_bytes("".join(parts).encode()) if all(parts) else ""


def is_committed_dataset(source: str) -> bool:
    """True when `source` is itself a committed s3:// dataset (its manifest.json is there): every task reads it
    where it is, nothing copies it."""
    return source.startswith("s3://") and bool(manifest_sha256(source))


def dataset_state(source: str, store_uri: str, n_train: int, n_test: int, image_size: int, seed: int,
                  merge_with: str = "") -> dict:
    """Where this run's dataset is and what the store holds for it now:

    - existing: True when `source` is itself a committed s3:// dataset (the download task uses it where it is,
      instead of copying it);
    - data_uri: that dataset, or the prefix `download` commits to (<store_uri>/datasets/<name>, named after the
      source and `merge_with` too: hpa.download.dataset_uri);
    - manifest_sha256 / shards_sha256: the dataset's manifest and its shards' manifests as stored now; when
      absent, a token unique to this call (absent_token), so the next task can never be a cache hit.

    The KFP backend keys its cache on a task's input values (backend/src/v2/cacheutils/cache.go
    GenerateCacheKey: InputParameterValues, input artifact names, outputs' specs, image and command), not on
    what the store holds: passing these hashes to download, split and pack as inputs makes a deleted or
    changed dataset a cache miss instead of a cached task that "succeeds" over missing data."""
    from hpa.download import dataset_uri

    existing = is_committed_dataset(source)
    data_uri = source.rstrip("/") if existing else dataset_uri(store_uri, source, n_train, n_test, image_size, seed,
                                                               merge_with)
    state = {"existing": existing, "data_uri": data_uri,
             "manifest_sha256": manifest_sha256(data_uri) or absent_token(),
             "shards_sha256": shards_sha256(shards_prefix(data_uri, image_size)) or absent_token()}
    log.info("dataset state: %s", state)
    return state


def shards_prefix(data_uri: str, image_size: int) -> str:
    """Where `pack` writes a dataset's shards at `image_size`."""
    return f"{data_uri.rstrip('/')}/shards-{image_size}px"


def intact(uri: str, expected_manifest: str) -> bool:
    """True when the dataset at `uri` is committed with exactly `expected_manifest` (sha256) and every object it
    lists is stored with its size: a re-run of download can skip the fetch (each read still verifies bytes)."""
    if not expected_manifest or expected_manifest.startswith(ABSENT) or manifest_sha256(uri) != expected_manifest:
        return False
    ds = open_dataset(uri, required=True)
    stored = ds.store.list_sizes()
    return all(stored.get(k) == o["size"] for k, o in ds.objects.items())


def use_dataset(uri: str, expected_manifest: str = "") -> dict:
    """An existing committed dataset for a run: its manifest is read and, when `expected_manifest` is given,
    must still be the one seen when the run started. Returns {"data_uri", "manifest_sha256", "objects"}."""
    ds = open_dataset(uri, required=True)
    if expected_manifest and not expected_manifest.startswith(ABSENT) and ds.manifest_sha256 != expected_manifest:
        raise StoreError(f"{ds.store.join(MANIFEST)} changed during the run (sha256 {ds.manifest_sha256[:12]}…, "
                         f"expected {expected_manifest[:12]}…); run again")
    return {"data_uri": str(uri).rstrip("/"), "manifest_sha256": ds.manifest_sha256, "objects": len(ds.objects)}
