"""The S3 backend of hpa.store: `s3://bucket/prefix` through the minio SDK (S3Store), its client cache, its
settings and how its failures are retried and reported. Open one through hpa.store.open_store/split_uri.

Environment (KFP's MinIO conventions; secret `mlpipeline-minio-artifact`, keys accesskey/secretkey):
    HPA_S3_ENDPOINT    host:port                     default seaweedfs.kubeflow:9000
    HPA_S3_ACCESS_KEY  (fallback AWS_ACCESS_KEY_ID)
    HPA_S3_SECRET_KEY  (fallback AWS_SECRET_ACCESS_KEY)
    HPA_S3_SECURE      "1" for TLS                   default "0"
    HPA_S3_REGION                                    default us-east-1
    HPA_S3_RETRIES     tries per request on connection/5xx errors   default 5
    HPA_S3_RETRY_DELAY first back-off in seconds, doubled each try  default 0.5

One PUT per object: S3 (and SeaweedFS) apply it all-or-nothing (see hpa.store on atomicity). Every object
carries its sha256 as user metadata `sha256`. Every failure is one redacted StoreError line.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from hpa.config import S3_DEFAULT_ENDPOINT
from hpa.errors import StoreError
from hpa.store import (_CHUNK, TMP_PREFIX, Store, StoreNotFoundError, StoreUnreachableError, _clean_prefix, _join,
                       atomic_write, check_key, redact, retry, sha256_bytes, sha256_file)

log = logging.getLogger(__name__)
T = TypeVar("T")

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


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


# -- what is retried ------------------------------------------------------------------------------
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


def _retryable(endpoint: str) -> Callable[[BaseException], bool]:
    """hpa.store.retry's `transient` for one endpoint: connection errors and 5xx answers; a connection error
    also marks the endpoint unsettled (a server that was away may not know its buckets yet)."""
    def transient(exc: BaseException) -> bool:
        if endpoint and _connection_error(exc):
            _unsettled_at[endpoint] = time.monotonic()
        return _transient(exc, endpoint)

    return transient


# -- clients --------------------------------------------------------------------------------------
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
                         _retryable(s["endpoint"]))
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
            msg = (f"S3 server {where} unreachable during {what} {target} after {s['retries']} tries "
                   f"({type(exc).__name__})")
        else:
            detail = f"{code}: {exc.message}" if code else f"{type(exc).__name__}: {exc}"
            msg = f"S3 {what} {target} failed: {detail}"
        # The error type says what the message says: a server that could not be reached or answered 5xx without
        # an S3 code is unreachable (callers that ride out a restart, e.g. hpa.shard_cache, retry on the type).
        kind = (StoreUnreachableError if code is None and _transient(exc, s["endpoint"])
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
        def download(tmp: Path) -> None:
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

            self._check_sha(key, self._call("read", key, get), sha256)

        atomic_write(path, download)

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
        """Remove an object (tests and users; no write path of the package deletes). A KFP 2.15/2.16 profile's keys
        cannot: pipelines-profile-controller/sync.py grants s3:Put*, s3:Get*, s3:List* only (2.15.0 lines 364-367,
        2.16.0 lines 396-399); 2.17.0 adds s3:DeleteObject (lines 477-481). SeaweedFS's own identities authorise
        DELETE with the same `Write` action as PUT (weed/s3api/s3api_server.go), so no identity models "no delete"."""
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, self._name(key)))
