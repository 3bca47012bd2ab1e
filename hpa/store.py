"""Object store: `s3://bucket/prefix` (minio SDK) and local directories behind one small interface.

Environment (KFP's MinIO conventions; secret `mlpipeline-minio-artifact`, keys accesskey/secretkey):
    HPA_S3_ENDPOINT    host:port                     default seaweedfs.kubeflow:9000
    HPA_S3_ACCESS_KEY  (fallback AWS_ACCESS_KEY_ID)
    HPA_S3_SECRET_KEY  (fallback AWS_SECRET_ACCESS_KEY)
    HPA_S3_SECURE      "1" for TLS                   default "0"
    HPA_S3_REGION                                    default us-east-1
    HPA_S3_RETRIES     tries per request on connection/5xx errors   default 5
    HPA_S3_RETRY_DELAY first back-off in seconds, doubled each try  default 0.5

Writes are atomic. Local: temporary file in the same directory, then os.replace. S3: one PUT per
object, which S3 (and SeaweedFS) apply all-or-nothing — a reader sees the old object, the new one
or none, never a partial one — so a temporary key plus server-side copy would triple the requests
for nothing. A multi-object dataset is atomic at the dataset level: its `manifest.json` (key, size,
sha256 of every object) is written last, and readers trust only committed datasets.

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
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

from hpa.config import S3_DEFAULT_ENDPOINT
from hpa.errors import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "hpa-dataset/1"
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StoreUnreachableError(StoreError):
    """The S3 endpoint could not be reached (connection refused/reset, timeout) after every retry."""


class StoreNotFoundError(StoreError):
    """The object does not exist (callers that treat "missing" specially catch this, without asking first)."""


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


# -- environment, redaction, retries --------------------------------------------------------------
def s3_settings() -> dict:
    """Connection settings from the environment (see the module docstring)."""
    from hpa.config import env_float, env_int

    env = os.environ
    endpoint = (env.get("HPA_S3_ENDPOINT") or S3_DEFAULT_ENDPOINT).strip().rstrip("/")
    scheme, _, rest = endpoint.rpartition("://")  # tolerate "http://host:port" as KFP configs often write it
    secure = env.get("HPA_S3_SECURE", "1" if scheme == "https" else "0").strip().lower() in ("1", "true", "yes")
    return {
        "endpoint": rest,
        "access_key": env.get("HPA_S3_ACCESS_KEY") or env.get("AWS_ACCESS_KEY_ID") or "",
        "secret_key": env.get("HPA_S3_SECRET_KEY") or env.get("AWS_SECRET_ACCESS_KEY") or "",
        "secure": secure,
        "region": env.get("HPA_S3_REGION") or "us-east-1",
        "retries": env_int("HPA_S3_RETRIES", 5, minimum=1),
        "retry_delay": env_float("HPA_S3_RETRY_DELAY", 0.5, minimum=0.0),
    }


def redact(text: str, *secrets: str) -> str:
    """Remove credentials (given ones, the environment's, and any in URLs) from a message."""
    env = os.environ
    found = list(secrets) + [env.get(k, "") for k in ("HPA_S3_ACCESS_KEY", "HPA_S3_SECRET_KEY",
                                                      "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KAGGLE_KEY")]
    for s in sorted({s for s in found if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(s, "***")
    text = re.sub(r"(X-Amz-(Credential|Signature|Security-Token)=)[^&\s]+", r"\1***", text)
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


_RETRY_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServiceUnavailableError"}
# A restarting server answers "no such bucket" for a moment before its metadata is loaded, and a
# bucket we just created may take a moment to be seen by every gateway: for this long after either
# event on an endpoint, NoSuchBucket is retried like a connection error.
SETTLE_S = 30.0
_unsettled_at: dict[str, float] = {}


def _connection_error(exc: BaseException) -> bool:
    import urllib3

    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _transient(exc: BaseException, endpoint: str | None = None) -> bool:
    from minio.error import S3Error, ServerError

    if isinstance(exc, S3Error):
        # (a PUT may get a bare 404, which minio calls NoSuchKey)
        bare_404 = exc.code == "NoSuchKey" and not getattr(exc.response, "data", b"")
        if (exc.code == "NoSuchBucket" or bare_404) and endpoint in _unsettled_at:
            return time.monotonic() - _unsettled_at[endpoint] < SETTLE_S
        return exc.code in _RETRY_CODES
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    return _connection_error(exc)


def retry(fn: Callable[[], T], what: str, tries: int, delay: float, endpoint: str | None = None) -> T:
    """Call `fn`; on connection errors and 5xx answers try again after delay, 2*delay, ... (bounded)."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by _transient
            if endpoint and _connection_error(exc):
                _unsettled_at[endpoint] = time.monotonic()
            if not _transient(exc, endpoint) or attempt == tries:
                raise
            log.warning("%s failed (%s), try %d/%d in %.1fs", what, type(exc).__name__, attempt, tries, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


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
            doc = json.loads(self.get_bytes(name))
        except StoreNotFoundError:
            raise StoreError(f"not a committed dataset: {self.join(name)} does not exist") from None
        except ValueError:
            raise StoreError(f"not a committed dataset: {self.join(name)} is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or "objects" not in doc:
            raise StoreError(f"not a committed dataset: {self.join(name)} is not an {MANIFEST_FORMAT} manifest")
        return doc

    def verify(self, entries: list[dict] | None = None, workers: int = 8) -> int:
        """Read back every object and check its sha256; StoreError names the first corrupted one."""
        entries = self.read_manifest()["objects"] if entries is None else entries

        def check(entry: dict) -> None:
            self.get_bytes(entry["key"], sha256=entry["sha256"])

        self._parallel(check, [(e,) for e in entries], workers, "verify")
        return len(entries)


class LocalStore(Store):
    """A local directory. Temporary files are `.tmp-<uuid>-<name>` next to their final name."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self.root / check_key(prefix, allow_empty=True))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_atomic(self, key: str, write: Callable[[Path], None]) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{final.name}")
        try:
            write(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> str:
        self._write_atomic(key, lambda tmp: tmp.write_bytes(data))
        return sha256 or sha256_bytes(data)

    def put_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> str:
        import shutil

        self._write_atomic(key, lambda tmp: shutil.copyfile(path, tmp))
        return sha256 or sha256_file(path)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreNotFoundError(f"no such object: {path}") from None
        self._check_sha(key, sha256_bytes(data), sha256)
        return data

    def get_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> None:
        atomic_write(path, self.get_bytes(key, sha256))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StoreNotFoundError(f"no such object: {self._path(key)}") from None

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = _clean_prefix(prefix)
        if not self.root.is_dir():
            return {}
        out = {}
        for p in self.root.rglob("*"):
            key = p.relative_to(self.root).as_posix()
            if p.is_file() and not p.name.startswith(TMP_PREFIX) and key.startswith(prefix):
                out[key] = p.stat().st_size
        return out

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def stored_sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file atomically: a temporary file in the same directory (TMP_PREFIX), then os.replace. The
    one atomic local write of the package; a reader never sees a partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _forget_clients_after_fork() -> None:
    """A forked child (a DataLoader worker) must not share the parent's pooled keep-alive sockets: two
    processes writing on one socket corrupt each other's responses. The child builds its own clients;
    the lock is replaced too, since another thread may have held it at the fork."""
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


def s3_client(settings: dict):
    """One minio client per (endpoint, keys, TLS, region); thread-safe. Our `retry` does the retrying."""
    import urllib3
    from minio import Minio

    ident = (settings["endpoint"], settings["access_key"], settings["secret_key"], settings["secure"],
             settings["region"])
    with _clients_lock:
        if ident not in _clients:
            http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=60), maxsize=32, retries=False)
            _clients[ident] = Minio(settings["endpoint"], access_key=settings["access_key"] or None,
                                    secret_key=settings["secret_key"] or None, secure=settings["secure"],
                                    region=settings["region"], http_client=http)
        return _clients[ident]


class S3Store(Store):
    """`s3://bucket/prefix` through the minio SDK; endpoint and credentials from HPA_S3_* (see module doc)."""

    def __init__(self, bucket: str, prefix: str = "", create_bucket: bool = False, settings: dict | None = None):
        if not _BUCKET_RE.match(bucket):
            raise StoreError(f"invalid S3 bucket name {bucket!r}: expected 3-63 lowercase letters, digits, '.', '-'")
        self.bucket, self.prefix = bucket, check_key(prefix, allow_empty=True)
        self.create_bucket = create_bucket
        self.settings = settings or s3_settings()
        self.uri = f"s3://{bucket}/{self.prefix + '/' if self.prefix else ''}"
        self._bucket_ready = False  # created (or found) by _ensure_bucket
        self._bucket_seen = False  # a listing of the bucket succeeded
        self._bucket_lock = threading.Lock()

    @property
    def client(self):
        return s3_client(self.settings)

    def child(self, prefix: str) -> "S3Store":
        return S3Store(self.bucket, _join(self.prefix, check_key(prefix, allow_empty=True)), self.create_bucket,
                       self.settings)

    def _name(self, key: str) -> str:
        return _join(self.prefix, check_key(key))

    def _call(self, what: str, key: str | None, fn: Callable[[], T], ensure_bucket: bool = True) -> T:
        """Run one request with retries; turn every failure into one clear, redacted StoreError line.

        With create_bucket, the first request creates the bucket when it is missing."""
        if ensure_bucket and self.create_bucket and not self._bucket_ready:
            self._ensure_bucket()
        s = self.settings
        try:
            return retry(fn, f"{what} {self.join(key) if key else self.uri}", s["retries"], s["retry_delay"],
                         s["endpoint"])
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated below
            raise self._translate(exc, what, key) from None

    def _translate(self, exc: BaseException, what: str, key: str | None) -> StoreError:
        from minio.error import S3Error

        s = self.settings
        target = self.join(key) if key else self.uri
        where = f"{'https' if s['secure'] else 'http'}://{s['endpoint']}"
        code = exc.code if isinstance(exc, S3Error) else None
        log.debug("%s %s failed: %s %s (status %s)", what, target, type(exc).__name__, code,
                  getattr(getattr(exc, "response", None), "status", None))
        if code in ("AccessDenied", "NoSuchKey") and not getattr(exc.response, "data", b""):
            diagnosed = self._diagnose()  # a HEAD answer has no body: ask again with a GET
            code = code if diagnosed in (None, "?") else diagnosed
        messages = {
            "InvalidAccessKeyId": f"S3 access key not recognised by {where} (check HPA_S3_ACCESS_KEY)",
            "SignatureDoesNotMatch": f"S3 secret key rejected by {where} (check HPA_S3_SECRET_KEY)",
            "NoSuchBucket": f"S3 bucket '{self.bucket}' does not exist at {where}",
            "NoSuchKey": f"no such object: {target}",
            "AccessDenied": f"access denied: the S3 credentials may not {what} {target}",
        }
        if code in messages:
            msg = messages[code]
        elif code in _RETRY_CODES:  # a 5xx answer, still failing after the retries
            msg = f"S3 server {where} failed to {what} {target} after {s['retries']} tries ({code}: {exc.message})"
        elif _transient(exc, s["endpoint"]):
            msg = f"S3 server {where} unreachable during {what} {target} after {s['retries']} tries ({type(exc).__name__})"
        else:
            detail = f"{code}: {exc.message}" if code else f"{type(exc).__name__}: {exc}"
            msg = f"S3 {what} {target} failed: {detail}"
        kind = (StoreUnreachableError if code is None and _connection_error(exc)
                else StoreNotFoundError if code == "NoSuchKey" else StoreError)
        return kind(redact(msg, s["access_key"], s["secret_key"]).splitlines()[0])

    def _diagnose(self) -> str | None:
        """The precise error code of a bucket-level GET (HEAD errors carry no code)."""
        from minio.error import S3Error

        try:
            next(iter(self.client.list_objects(self.bucket, prefix=self.prefix or None,
                                               extra_query_params={"max-keys": "1"})), None)
        except S3Error as exc:
            return exc.code
        except Exception:  # noqa: BLE001 - unknown: the caller keeps the original error
            return "?"
        return None

    def _ensure_bucket(self) -> None:
        """Create the bucket unless it exists. No HEAD first: SeaweedFS caches a "missing" answer."""
        from minio.error import S3Error

        def make() -> None:
            try:
                self.client.make_bucket(self.bucket)
                _unsettled_at[self.settings["endpoint"]] = time.monotonic()
                log.info("created bucket %s", self.bucket)
            except S3Error as exc:
                # exists already, or we may not create buckets: the real request will tell
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists", "AccessDenied"):
                    raise

        with self._bucket_lock:  # every worker thread waits until the bucket exists
            if not self._bucket_ready:
                self._call("create bucket", None, make, ensure_bucket=False)
                self._bucket_ready = True

    # primitives
    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> str:
        import io

        digest = sha256 or sha256_bytes(data)
        self._call("write", key, lambda: self.client.put_object(
            self.bucket, self._name(key), io.BytesIO(data), len(data), metadata={"sha256": digest}))
        return digest

    def put_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> str:
        digest = sha256 or sha256_file(path)
        size = os.path.getsize(path)

        def put() -> None:
            with open(path, "rb") as f:  # reopened per try: a retry starts from byte 0
                self.client.put_object(self.bucket, self._name(key), f, size, metadata={"sha256": digest})

        self._call("write", key, put)
        return digest

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        def get() -> bytes:
            resp = self.client.get_object(self.bucket, self._name(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        data = self._call("read", key, get)
        self._check_sha(key, sha256_bytes(data), sha256)
        return data

    def get_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")

        def get() -> str:  # streams to the temporary file, rewritten from byte 0 on each try
            digest = hashlib.sha256()
            resp = self.client.get_object(self.bucket, self._name(key))
            try:
                with open(tmp, "wb") as f:
                    for block in resp.stream(_CHUNK):
                        digest.update(block)
                        f.write(block)
            finally:
                resp.close()
                resp.release_conn()
            return digest.hexdigest()

        try:
            self._check_sha(key, self._call("read", key, get), sha256)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _stat(self, key: str):
        from minio.error import S3Error

        def stat():
            try:
                return self.client.stat_object(self.bucket, self._name(key))
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "ResourceNotFound") and self._bucket_ok():
                    return None
                raise

        return self._call("read", key, stat)

    def _bucket_ok(self) -> bool:
        """True when the bucket is there and readable (cached); else the caller reports the real error."""
        if not self._bucket_seen:
            self._bucket_seen = self._diagnose() is None
        return self._bucket_seen

    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def size(self, key: str) -> int:
        st = self._stat(key)
        if st is None:
            raise StoreNotFoundError(f"no such object: {self.join(key)}")
        return int(st.size)

    def stored_sha256(self, key: str) -> str | None:
        st = self._stat(key)
        if st is None:
            return None
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        return meta.get("x-amz-meta-sha256")

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = _clean_prefix(prefix)
        full = (self.prefix + "/" if self.prefix else "") + prefix
        cut = len(self.prefix) + 1 if self.prefix else 0

        def listing() -> dict[str, int]:
            objs = self.client.list_objects(self.bucket, prefix=full or None, recursive=True)
            return {o.object_name[cut:]: int(o.size) for o in objs
                    if not o.is_dir and not o.object_name.rsplit("/", 1)[-1].startswith(TMP_PREFIX)}

        return self._call("list", prefix or None, listing)

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, self._name(key)))


# -- URIs -----------------------------------------------------------------------------------------
def open_store(uri: str | os.PathLike, create_bucket: bool = False) -> Store:
    """"s3://bucket/prefix" -> S3Store; anything else -> LocalStore (a directory, created on write)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        prefix = re.sub(r"/+", "/", prefix).strip("/")
        return S3Store(bucket, prefix, create_bucket=create_bucket)
    if re.match(r"^[a-z][a-z0-9+.-]*://", uri):
        raise StoreError(f"unsupported store URI {redact(uri)!r}: expected s3://bucket/prefix or a local path")
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
    return LocalStore(path.parent), path.name


def read_bytes(uri: str | os.PathLike, sha256: str | None = None) -> bytes:
    """The object's bytes; verified against `sha256`, or, when it belongs to a committed dataset, against the
    dataset's manifest (hpa.committed.expected_sha256)."""
    store, key = split_uri(uri)
    if sha256 is None:
        from hpa.committed import expected_sha256

        sha256 = expected_sha256(store, key)
    return store.get_bytes(key, sha256)


def write_bytes(uri: str | os.PathLike, data: bytes, create_bucket: bool = False) -> str:
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
