"""Object store: `s3://bucket/prefix` and local directories behind one small interface (Store), opened by URI
(open_store, split_uri), with the URI-level reads and writes every stage uses (read_bytes, write_bytes, fetch,
publish, exists_uri, join_uri), and the package's one hash (sha256_bytes/sha256_file), one atomic local write
(atomic_write) and one retry (retry). Backends: hpa.localstore.LocalStore, hpa.s3store.S3Store (the minio SDK;
endpoint and credentials from HPA_S3_*, listed in its docstring).

Writes are atomic. Local: temporary file in the same directory, then os.replace. S3: one PUT per
object, which S3 (and SeaweedFS) apply all-or-nothing — a reader sees the old object, the new one
or none, never a partial one — so a temporary key plus server-side copy would triple the requests
for nothing. A multi-object dataset is atomic at the dataset level: its `manifest.json` (key, size,
sha256 of every object) is written last, and readers trust only committed datasets.

No write path deletes (a KFP 2.15/2.16 profile's S3 keys may Put, Get and List only: hpa.s3store.S3Store.delete):
a dataset being replaced is uncommitted by a PUT of UNCOMMITTED over its manifest (hpa.download), and packed
shards are named by their content (hpa.pack), so a new shard set never needs the old one removed.

Every object written through this module carries its sha256 (S3 user metadata `sha256`), which makes
re-uploads idempotent without reading the object back. Messages never contain keys or secrets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

from hpa.errors import DataError, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "hpa-dataset/1"
TMP_PREFIX = ".tmp-"
UNCOMMITTED = b'{"format": "hpa-uncommitted/1"}\n'  # a manifest key's bytes while its dataset is being replaced
UNCOMMITTED_WHY = "marks it uncommitted (a write into it did not finish; run it again)"
_CHUNK = 1 << 20


class StoreUnreachableError(StoreError):
    """The S3 endpoint could not be reached (connection refused/reset, timeout) after every retry."""


class StoreNotFoundError(StoreError):
    """The object does not exist (callers that treat "missing" specially catch this, without asking first)."""


class MissingFileError(StoreNotFoundError, DataError):
    """read_bytes of a URI that names no object: "<uri>: file not found", a DataError too (a missing input file)."""


# -- hashing and keys ------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_key(key: str, allow_empty: bool = False) -> str:
    """Return a clean '/'-separated relative key; refuse anything that could escape the store root."""
    if not isinstance(key, str):
        raise StoreError(f"store key must be a string, got {type(key).__name__}")
    if key == "" and allow_empty:
        return ""
    parts = key.split("/")
    if (not key or "\\" in key or "\x00" in key or key.startswith("/") or re.match(r"^[A-Za-z]:", key)
            or any(p in ("..", ".") for p in parts)):
        raise StoreError(f"refused store key {key!r}: keys must be relative, '/'-separated, without '..'")
    if allow_empty and key.endswith("/"):
        parts = parts[:-1]
    if any(p == "" for p in parts):
        raise StoreError(f"refused store key {key!r}: empty path component")
    return "/".join(parts)


def _clean_prefix(prefix: str) -> str:
    """A listing prefix: a plain string prefix of keys ("train/" = that folder, "train" also train.csv)."""
    return check_key(prefix, allow_empty=True) + ("/" if prefix.endswith("/") and prefix.strip("/") else "")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# -- redaction, retries, atomic local writes -------------------------------------------------------
def redact(text: str, *secrets: str) -> str:
    """Remove credentials (given ones, the environment's, and any in URLs) from a message."""
    env = os.environ
    found = list(secrets) + [env.get(k, "") for k in ("HPA_S3_ACCESS_KEY", "HPA_S3_SECRET_KEY",
                                                      "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KAGGLE_KEY")]
    for s in sorted({s for s in found if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(s, "***")
    text = re.sub(r"(X-Amz-(Credential|Signature|Security-Token)=)[^&\s]+", r"\1***", text)
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, StoreUnreachableError)


def retry(fn: Callable[[], T], what: str, tries: int, delay: float,
          transient: Callable[[BaseException], bool] = _unreachable) -> T:
    """Call `fn`; when it raises an exception `transient` accepts, try again after delay, 2*delay, ... (at most
    `tries` calls; then the exception). The default retries StoreUnreachableError (a server away for longer than
    one request's retries, e.g. restarting); S3Store retries each request's connection errors and 5xx answers."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by transient
            if not transient(exc) or attempt == tries:
                raise
            log.warning("%s failed (%s), try %d/%d in %.1fs", what, type(exc).__name__, attempt, tries, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[Path], object], fsync: bool = False) -> None:
    """Write a local file atomically: a temporary file in the same directory (TMP_PREFIX), then os.replace. The
    one atomic local write of the package; a reader never sees a partial file under the final name. `data`: the
    bytes, or a function that fills the temporary file given its path (a copy, a download); when it raises, the
    final name is left as it was. `fsync`: the data reaches the disk before the rename (checkpoints), so a crash
    of the machine cannot leave a short file under the final name either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        if fsync:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="obj", disable=not sys.stderr.isatty(), leave=False)


# -- the interface --------------------------------------------------------------------------------
class Store:
    """A directory-like namespace: keys are '/'-separated and relative to the store root (`uri`)."""

    uri: str

    def child(self, prefix: str) -> "Store":
        raise NotImplementedError

    def join(self, key: str) -> str:
        key = check_key(key, allow_empty=True)
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    # primitives implemented by subclasses
    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> str:
        """Write atomically; returns the sha256 (pass a known `sha256` to skip hashing again)."""
        raise NotImplementedError

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        raise NotImplementedError

    def put_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> str:
        raise NotImplementedError

    def get_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under `prefix` (recursive, temporary objects excluded)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def stored_sha256(self, key: str) -> str | None:
        """sha256 recorded when the object was written (None if unknown or missing)."""
        raise NotImplementedError

    # shared logic
    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.list_sizes(prefix))

    def _check_sha(self, key: str, data_sha: str, expected: str | None) -> None:
        if expected is not None and data_sha != expected:
            raise StoreError(f"corrupted object {self.join(key)}: sha256 {data_sha[:12]}… "
                             f"does not match the manifest's {expected[:12]}…")

    def upload_files(self, files: Iterable[tuple[str, str | os.PathLike]], workers: int = 8,
                     skip_existing: bool | dict | None = None, desc: str = "upload",
                     hashes: dict[str, str] | None = None) -> list[dict]:
        """Upload (key, local path) pairs in parallel; returns manifest entries + "uploaded" flag.

        skip_existing: None/True -> skip an object whose stored sha256 equals the local file's;
        a dict {key: sha256} (e.g. a previous manifest) -> trust it instead of asking the store;
        False -> always upload. `hashes` {key: sha256} saves hashing files the caller already hashed.
        """
        files = [(check_key(k), Path(p)) for k, p in files]
        known = skip_existing if isinstance(skip_existing, dict) else None
        check = skip_existing is not False

        def one(key: str, path: Path) -> dict:
            digest = (hashes or {}).get(key) or sha256_file(path)
            stored = (known.get(key) if known is not None else self.stored_sha256(key)) if check else None
            uploaded = stored != digest
            if uploaded:
                self.put_file(key, path, sha256=digest)
            return {"key": key, "size": path.stat().st_size, "sha256": digest, "uploaded": uploaded}

        return self._parallel(one, files, workers, desc)

    def upload_tree(self, local_dir: str | os.PathLike, prefix: str = "", workers: int = 8,
                    skip_existing: bool | dict | None = None) -> list[dict]:
        """Upload every file under `local_dir` to `prefix/<relative path>`; see `upload_files`."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StoreError(f"not a directory: {root}")
        prefix = check_key(prefix, allow_empty=True)
        files = [(_join(prefix, p.relative_to(root).as_posix()), p) for p in sorted(root.rglob("*")) if p.is_file()]
        return self.upload_files(files, workers, skip_existing, desc=f"upload {root.name}")

    def download_tree(self, prefix: str, local_dir: str | os.PathLike, workers: int = 8,
                      expected: dict[str, str] | None = None) -> list[str]:
        """Download every object under `prefix` to `local_dir/<key relative to prefix>`; returns paths.

        `expected` {key: sha256} (e.g. from a manifest) verifies each object and names a corrupted one.
        """
        prefix = check_key(prefix, allow_empty=True)
        base = prefix + "/" if prefix else ""
        keys = [k for k in self.list(base) if expected is None or k in expected]

        def one(key: str) -> str:
            target = Path(local_dir) / key[len(base):]
            self.get_file(key, target, sha256=(expected or {}).get(key))
            return str(target)

        return self._parallel(one, [(k,) for k in keys], workers, f"download {prefix or '/'}")

    def _parallel(self, fn: Callable, items: list[tuple], workers: int, desc: str) -> list:
        results: list = [None] * len(items)
        with ThreadPoolExecutor(max(1, workers)) as pool, _progress(len(items), desc) as bar:
            futures = {pool.submit(fn, *item): i for i, item in enumerate(items)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return results

    def commit_manifest(self, entries: list[dict], meta: dict, name: str = MANIFEST) -> None:
        """Commit a dataset: check that every entry is stored with its size, then write the manifest last."""
        objects = sorted(({"key": check_key(e["key"]), "size": int(e["size"]), "sha256": e["sha256"]}
                          for e in entries), key=lambda e: e["key"])
        stored = self.list_sizes()
        for e in objects:
            if stored.get(e["key"]) != e["size"]:
                raise StoreError(f"cannot commit {self.join(name)}: {self.join(e['key'])} is "
                                 f"{'missing' if e['key'] not in stored else 'of the wrong size'}")
        doc = {"format": MANIFEST_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "meta": meta, "objects": objects}
        self.put_bytes(name, json.dumps(doc, indent=1, sort_keys=True).encode())
        log.info("committed %s (%d objects)", self.join(name), len(objects))

    def read_manifest(self, name: str = MANIFEST) -> dict:
        try:
            raw = self.get_bytes(name)
            doc = json.loads(raw)
        except StoreNotFoundError:
            raise StoreError(f"not a committed dataset: {self.join(name)} does not exist") from None
        except ValueError:
            raise StoreError(f"not a committed dataset: {self.join(name)} is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or "objects" not in doc:
            raise StoreError(f"not a committed dataset: {self.join(name)} " + (
                UNCOMMITTED_WHY if raw == UNCOMMITTED else f"is not an {MANIFEST_FORMAT} manifest"))
        return doc

    def verify(self, entries: list[dict] | None = None, workers: int = 8) -> int:
        """Read back every object and check its sha256; StoreError names the first corrupted one."""
        entries = self.read_manifest()["objects"] if entries is None else entries

        def check(entry: dict) -> None:
            self.get_bytes(entry["key"], sha256=entry["sha256"])

        self._parallel(check, [(e,) for e in entries], workers, "verify")
        return len(entries)


# -- URIs -----------------------------------------------------------------------------------------
def open_store(uri: str | os.PathLike, create_bucket: bool = False) -> Store:
    """"s3://bucket/prefix" -> S3Store; anything else -> LocalStore (a directory, created on write)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        from hpa.s3store import S3Store

        bucket, _, prefix = uri[5:].partition("/")
        prefix = re.sub(r"/+", "/", prefix).strip("/")
        return S3Store(bucket, prefix, create_bucket=create_bucket)
    if re.match(r"^[a-z][a-z0-9+.-]*://", uri):
        raise StoreError(f"unsupported store URI {redact(uri)!r}: expected s3://bucket/prefix or a local path")
    from hpa.localstore import LocalStore

    return LocalStore(uri)


def split_uri(uri: str | os.PathLike, create_bucket: bool = False) -> tuple[Store, str]:
    """For a URI that names one object: (store of its parent, key)."""
    uri = str(uri).rstrip("/")
    if uri.startswith("s3://"):
        parent, _, key = uri.rpartition("/")
        if parent == "s3:/" or "/" not in uri[5:]:
            raise StoreError(f"{uri!r} names a bucket, not an object")
        return open_store(parent, create_bucket), key
    path = Path(uri).expanduser().absolute()
    return open_store(path.parent), path.name


def join_uri(base: str | os.PathLike, name: str) -> str:
    """`name` inside the folder `base` (an s3:// URI or a local path)."""
    base = str(base)
    return f"{base.rstrip('/')}/{name}" if base.startswith("s3://") else str(Path(base) / name)


def exists_uri(uri: str | os.PathLike) -> bool:
    store, key = split_uri(uri)
    return store.exists(key)


def read_bytes(uri: str | os.PathLike, sha256: str | None = None) -> bytes:
    """The object's bytes; verified against `sha256`, or, when it belongs to a committed dataset, against the
    dataset's manifest (hpa.committed.expected_sha256). A missing object is a MissingFileError naming `uri`."""
    store, key = split_uri(uri)
    if sha256 is None:
        from hpa.committed import expected_sha256

        sha256 = expected_sha256(store, key)
    try:
        return store.get_bytes(key, sha256)
    except StoreNotFoundError:
        raise MissingFileError(f"{uri}: file not found") from None


def write_bytes(uri: str | os.PathLike, data: bytes, create_bucket: bool = False) -> str:
    """Write atomically (readers never see a half-written object); returns the sha256."""
    store, key = split_uri(uri, create_bucket)
    return store.put_bytes(key, data)


def fetch(uri: str | os.PathLike, local_path: str | os.PathLike, sha256: str | None = None) -> None:
    """Copy the object to local_path atomically, verified as read_bytes verifies."""
    store, key = split_uri(uri)
    if sha256 is None:
        from hpa.committed import expected_sha256

        sha256 = expected_sha256(store, key)
    store.get_file(key, local_path, sha256)


def publish(local_path: str | os.PathLike, uri: str | os.PathLike, create_bucket: bool = False) -> str:
    store, key = split_uri(uri, create_bucket)
    return store.put_file(key, local_path)


def use_endpoint(s3_endpoint: str) -> None:
    """A component's `s3_endpoint` parameter: a non-empty value becomes HPA_S3_ENDPOINT for this process (read by
    s3_settings at each connection); empty keeps the environment's (the pod's, or the default)."""
    if s3_endpoint:
        os.environ["HPA_S3_ENDPOINT"] = s3_endpoint
