"""`python -m hpa download`: fetch a dataset in the Kaggle layout, validate it, commit it to the store.

Sources: `synthetic` (hpa.synthetic), a local directory in Kaggle layout, an `s3://` prefix, an
`https://` zip/tar archive (size limit, optional sha256, safe extraction),
`kaggle:<competition>` (needs the optional `kaggle` package and KAGGLE_USERNAME / KAGGLE_KEY), and
`hpav18:<csv>` (the HPA v18 external images, resumable, optionally merged with a Kaggle-layout dataset,
with perceptual hashes in phash.csv: hpa.hpav18).

The dataset lands exactly under `dest` (`<dest>/train.csv`, `train/<Id>_<color>.png`, ...) and is
committed by `<dest>/manifest.json`, written last. A re-run uploads only objects whose sha256 is not
already stored; if the new content differs from a committed dataset, the old manifest is removed
first, so readers never see a manifest that disagrees with the objects.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import gzip
import hashlib
import ipaddress
import logging
import lzma
import os
import re
import stat
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from hpa.config import env_int
from hpa.errors import ConfigError, DataError, HPAError, StoreError
from hpa.labels import COLORS
from hpa.store import MANIFEST, Store, open_store, redact, sha256_file

log = logging.getLogger(__name__)

KAGGLE_COMPETITION = "human-protein-atlas-image-classification"
SYNTHETIC_DEFAULTS = (600, 200)
# The real Kaggle archive is ~17 GB; override with --max-bytes / HPA_DOWNLOAD_MAX_BYTES.
DEFAULT_MAX_BYTES = env_int("HPA_DOWNLOAD_MAX_BYTES", 32 << 30, minimum=1)
CSV_FILES = ("train.csv", "sample_submission.csv", "test_labels.csv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_CSV = {"train": "train.csv", "test": "sample_submission.csv"}


# -- archives -------------------------------------------------------------------------------------
# Limits on what an archive may unpack to. Bytes are counted as they are written, so lying headers do
# not help: the real Kaggle archive is ~17 GB of PNGs that barely compress (ratio ~1, its train.zip
# alone ~14 GB), while zip bombs expand a thousand times and more.
DEFAULT_MAX_MEMBER_BYTES = env_int("HPA_DOWNLOAD_MAX_MEMBER_BYTES", 20 << 30, minimum=1)
DEFAULT_MAX_RATIO = 200.0  # uncompressed / compressed: per zip member, over a whole tar archive
RATIO_FLOOR = 1 << 20  # the ratio is checked past this many bytes only (small CSVs compress well)
MAX_ARCHIVE_DEPTH = 2  # an archive and archives inside it (Kaggle ships train.zip in its zip); deeper is refused
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, NotImplementedError,
                   RuntimeError, OSError)


def _allowed_url(url: str, allow_http: bool) -> bool:
    """The one rule for every URL fetched, redirects included: https, or http to loopback with allow_http."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme == "https" or (allow_http and parts.scheme == "http" and _loopback(host))


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL that fetch_url would accept itself (no downgrade to plain http)."""

    def __init__(self, shown: str, allow_http: bool):
        self.shown, self.allow_http = shown, allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not _allowed_url(newurl, self.allow_http):
            fp.close()
            raise DataError(f"{self.shown}: refused redirect to {shown_source(newurl)}: only https:// archives "
                            "(plain http only to 127.0.0.1 with --allow-http, for tests)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _request(url: str) -> urllib.request.Request:
    """A GET without userinfo in the URL: user:password@ becomes a Basic header that redirects never carry."""
    parts = urllib.parse.urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host, fragment="")))
    if userinfo:
        token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def fetch_url(url: str, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, sha256: str | None = None,
              allow_http: bool = False, timeout: float = 60.0) -> str:
    """Stream an https:// URL to `path`, refusing more than max_bytes; check sha256 when given."""
    shown = shown_source(url)
    if not _allowed_url(url, allow_http):
        raise ConfigError(f"refused source {shown}: only https:// archives (plain http only to 127.0.0.1 "
                          "with --allow-http, for tests)")
    opener = urllib.request.build_opener(_CheckedRedirects(shown, allow_http))
    digest = hashlib.sha256()
    total = 0
    try:
        with opener.open(_request(url), timeout=timeout) as resp, open(path, "wb") as out:
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise DataError(f"{shown}: archive is {declared} bytes, more than the limit of {max_bytes}")
            for block in iter(lambda: resp.read(1 << 20), b""):
                total += len(block)
                if total > max_bytes:
                    raise DataError(f"{shown}: archive exceeds the limit of {max_bytes} bytes")
                digest.update(block)
                out.write(block)
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, malformed URLs
        if isinstance(exc, DataError):
            raise
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise DataError(f"cannot download {shown}: {redact(str(reason), url)}") from None
    if sha256 and digest.hexdigest() != sha256.lower():
        raise DataError(f"{shown}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    log.info("downloaded %s (%d bytes)", shown, total)
    return digest.hexdigest()


def _url_parts(source: str) -> urllib.parse.SplitResult | None:
    if "://" not in source:
        return None
    try:
        return urllib.parse.urlsplit(source)
    except ValueError:  # e.g. a broken [IPv6] host
        return None


def shown_source(source: str) -> str:
    """The source as it may appear in logs, errors and manifests: no userinfo, query (tokens) or fragment."""
    parts = _url_parts(source)
    if parts is None:
        if "://" in source:  # unparsable URL: cut everything that could hold a credential
            source = re.sub(r"[?#].*", "?…", re.sub(r"(://)[^/]*@", r"\1", source), flags=re.S)
        return redact(source)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="…" if parts.query else "", fragment="")
    return redact(urllib.parse.urlunsplit(shown))


def dataset_name(source: str, n_train: int | None, n_test: int | None, image_size: int, seed: int) -> str:
    """The store name of a dataset (`<store>/datasets/<name>`): one per distinct source and counts.

    Built from the source's host and path only: userinfo, query string and fragment (where signed URLs
    carry their credentials) never become part of an object key, an output or a log line.
    """
    if source == "synthetic":
        return f"synthetic-{n_train}x{n_test}-{image_size}px-seed{seed}"
    parts = _url_parts(source)
    if parts is not None:
        where = parts.netloc.rpartition("@")[2] + parts.path
    else:
        where = shown_source(source).split("://")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", where).strip("-.")[-60:] or "source"
    return f"{name}-{n_train or 'all'}x{n_test or 'all'}-seed{seed}"


def dataset_uri(store_uri: str, source: str, n_train: int | None, n_test: int | None, image_size: int,
                seed: int) -> str:
    """Where `download` commits a source's dataset: `<store_uri>/datasets/<dataset_name>`."""
    return store_uri.rstrip("/") + "/datasets/" + dataset_name(source, n_train, n_test, image_size, seed)


def _loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _safe_member(member: str, target: Path, name: str) -> Path:
    """The extraction path of an archive member; refuse names that escape `target` (zip-slip)."""
    clean = member.replace("\\", "/")
    out = (target / clean).resolve()
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean) or not out.is_relative_to(target.resolve()):
        raise DataError(f"{name}: refused archive entry {member!r}: it escapes the extraction directory")
    return out


@dataclass
class ArchiveLimits:
    """What extraction may write: in all (shared by an archive and the archives inside it), per file, and
    per compressed byte."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_ratio: float = DEFAULT_MAX_RATIO
    written: int = 0  # bytes on disk now: inner archives are subtracted once unpacked and deleted

    def take(self, n: int, name: str) -> None:
        self.written += n
        if self.written > self.max_bytes:
            raise DataError(f"{name}: unpacks to more than the limit of {self.max_bytes} bytes")


def _copy_capped(src, out: Path, member: str, name: str, limits: ArchiveLimits, ratio_base: int,
                 compressed: int) -> int:
    """Stream one member to `out`, stopping at the first cap crossed; returns the bytes written.

    The ratio compares ratio_base + this member's bytes with `compressed` (the zip member's compressed
    size, or a whole tar archive's size with ratio_base its bytes so far)."""
    n = 0
    with open(out, "wb") as f:
        for block in iter(lambda: src.read(1 << 20), b""):
            n += len(block)
            if n > limits.max_member_bytes:
                raise DataError(f"{name}: archive entry {member!r} unpacks to more than the per-file limit of "
                                f"{limits.max_member_bytes} bytes")
            limits.take(len(block), name)
            done = ratio_base + n
            if done > RATIO_FLOOR and done > limits.max_ratio * max(compressed, 1):
                raise DataError(f"{name}: archive entry {member!r} expands more than {limits.max_ratio:g} times "
                                f"its compressed size: refused as a compression bomb")
            f.write(block)
    return n


def _extract_zip(archive: Path, target: Path, name: str, limits: ArchiveLimits) -> list[Path]:
    written = []
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for m in members:
            _safe_member(m.filename, target, name)
            if stat.S_ISLNK(m.external_attr >> 16):
                raise DataError(f"{name}: refused archive entry {m.filename!r}: symbolic link")
        if limits.written + sum(m.file_size for m in members) > limits.max_bytes:  # early, on the headers
            raise DataError(f"{name}: unpacks to more than the limit of {limits.max_bytes} bytes")
        size = archive.stat().st_size
        for m in members:
            out = _safe_member(m.filename, target, name)
            if m.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src:
                _copy_capped(src, out, m.filename, name, limits, 0, min(m.compress_size, size))
            written.append(out)
    return written


def _decompressed(archive: Path):
    """The archive's bytes as a stream, decompressed by its magic number; gzip/bz2/xz verify their
    checksums at the end of the stream (tarfile's own stream reader does not)."""
    with open(archive, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(archive, "rb")
    if head.startswith(b"BZh"):
        return bz2.open(archive, "rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(archive, "rb")
    return open(archive, "rb")


class _Counted:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream):
        self.stream, self.n = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.n += len(data)
        return data


def _extract_tar(archive: Path, target: Path, name: str, limits: ArchiveLimits) -> list[Path]:
    """One pass over the stream: check each entry, then write it counting bytes; the ratio is on the total."""
    written, total, size = [], 0, archive.stat().st_size
    with _decompressed(archive) as raw:
        stream = _Counted(raw)
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                out = _safe_member(m.name, target, name)
                if m.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                if not m.isfile():
                    raise DataError(f"{name}: refused archive entry {m.name!r}: not a regular file or directory")
                if limits.written + m.size > limits.max_bytes:
                    raise DataError(f"{name}: unpacks to more than the limit of {limits.max_bytes} bytes")
                out.parent.mkdir(parents=True, exist_ok=True)
                total += _copy_capped(tf.extractfile(m), out, m.name, name, limits, total, size)
                written.append(out)
            end = tf.offset  # where the end-of-archive marker must be
        while stream.read(1 << 20):  # to the end, so that gzip/bz2/xz verify their checksum
            if stream.n > RATIO_FLOOR and stream.n > limits.max_ratio * size:
                raise DataError(f"{name}: expands more than {limits.max_ratio:g} times its compressed size: "
                                "refused as a compression bomb")
    if stream.n < end + tarfile.BLOCKSIZE:  # tarfile takes a missing marker for the end: truncation
        raise DataError(f"{name}: truncated tar archive (it ends without an end-of-archive marker)")
    return written


def _archive_kind(archive: Path) -> str | None:
    with open(archive, "rb") as f:
        head = f.read(6)
    if zipfile.is_zipfile(archive) or head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    try:
        return "tar" if tarfile.is_tarfile(archive) else None
    except _ARCHIVE_ERRORS:
        return None


def _archive_stem(filename: str) -> str:
    lower = filename.lower()
    suffix = next(s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if lower.endswith(s))
    return filename[: -len(suffix)]


def _unpack(archive: Path, target: Path, name: str, limits: ArchiveLimits, depth: int = 1) -> None:
    """Extract one archive, then the archives found in it (same limits, depth-limited)."""
    target.mkdir(parents=True, exist_ok=True)
    kind = _archive_kind(archive)
    if kind is None:
        raise DataError(f"{name}: not a zip or tar archive")
    try:
        written = (_extract_zip if kind == "zip" else _extract_tar)(archive, target, name, limits)
    except DataError:
        raise
    except _ARCHIVE_ERRORS as exc:
        detail = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
        detail = redact(detail.splitlines()[0])
        raise DataError(f"{name}: corrupt or unreadable {kind} archive ({detail})") from None
    for path in dict.fromkeys(written):  # a name may repeat in an archive
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES) or not path.is_file():
            continue
        inner = f"{name} (inner {path.relative_to(target.resolve()).as_posix()})"
        if depth >= MAX_ARCHIVE_DEPTH:
            raise DataError(f"{inner}: refused: archives nested more than {MAX_ARCHIVE_DEPTH} levels deep")
        folder = path.with_name(_archive_stem(path.name))
        _unpack(path, folder, inner, limits, depth + 1)
        limits.written -= path.stat().st_size
        path.unlink()
        _hoist(folder)


def _hoist(folder: Path) -> None:
    """train.zip holding a single train/ folder: lift its contents, so the result is train/<files>."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name == folder.name:
        inner = entries[0].rename(folder.with_name(folder.name + ".hoist"))
        folder.rmdir()
        inner.rename(folder)


def extract_archive(archive: Path, target: Path, max_bytes: int = DEFAULT_MAX_BYTES, *,
                    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, max_ratio: float = DEFAULT_MAX_RATIO,
                    name: str | None = None) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into `target` safely, archives inside it included.

    Refused, as one DataError line naming `name` (what the user gave; default the archive's path):
    entries that escape `target`, links and devices, more than max_bytes in all (counted as written,
    across nesting levels), more than max_member_bytes in one file, a zip member (or a whole tar) that
    expands more than max_ratio times, archives nested deeper than MAX_ARCHIVE_DEPTH, corrupt data.
    """
    archive, target = Path(archive), Path(target)
    limits = ArchiveLimits(max_bytes, max_member_bytes, max_ratio)
    _unpack(archive, target, name or str(archive), limits)
    return target


def find_layout_root(top: Path) -> Path:
    """The directory holding train.csv: `top` itself or one or two below it (archives often add a folder)."""
    for candidate in [top, *sorted(p for p in top.glob("*") if p.is_dir()),
                      *sorted(p for p in top.glob("*/*") if p.is_dir())]:
        if (candidate / "train.csv").is_file():
            return candidate
    raise DataError(f"{top}: no train.csv found (looked at the top and two folders below)")


# -- sources --------------------------------------------------------------------------------------
def _kaggle_credentials_present() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file()


def fetch_kaggle(competition: str, raw: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Download a Kaggle competition's files with the `kaggle` package; returns the layout root."""
    if not _kaggle_credentials_present():
        raise ConfigError("kaggle source needs KAGGLE_USERNAME and KAGGLE_KEY in the environment "
                          "(Kubernetes secret kaggle-credentials) or ~/.kaggle/kaggle.json")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise ConfigError("kaggle source needs the kaggle package: pip install 'hpa-kfp[kaggle]' "
                          "(kaggle==2.2.4)") from None
    try:
        api = KaggleApi()
        api.authenticate()
        api.competition_download_files(competition, path=str(raw), quiet=True)
    except Exception as exc:  # noqa: BLE001 - the kaggle package raises many types
        raise DataError(f"kaggle download of {competition!r} failed: "
                        f"{redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    limits = ArchiveLimits(max_bytes)  # one budget for every downloaded file and what is inside them
    for archive in sorted(raw.glob("*.zip")):
        _unpack(archive, raw, f"kaggle:{competition} ({archive.name})", limits)
        archive.unlink()
    return find_layout_root(raw)


def fetch_s3(source: str, raw: Path, workers: int = 8) -> Path:
    """Copy an s3:// prefix in Kaggle layout; a committed one (manifest.json) is verified object by object."""
    store = open_store(source)
    expected = None
    if store.exists(MANIFEST):
        expected = {o["key"]: o["sha256"] for o in store.read_manifest()["objects"]}
    else:
        log.warning("%s has no %s: copying it unverified", shown_source(source), MANIFEST)
    store.download_tree("", raw, workers=workers, expected=expected)
    (raw / MANIFEST).unlink(missing_ok=True)
    return find_layout_root(raw)


def acquire(source: str, work: Path, *, n_train: int, n_test: int, size: int, seed: int, sha256: str | None,
            max_bytes: int, allow_http: bool, workers: int, max_images: int | None = None,
            merge_with: str | None = None, skip_broken: bool = False) -> Path:
    """Bring `source` to a local directory in Kaggle layout; returns its root."""
    raw = work / "raw"
    raw.mkdir()
    if (merge_with or max_images or skip_broken) and not source.startswith("hpav18:"):
        raise ConfigError("--merge-with, --max-images and --skip-broken apply to the hpav18:<csv> source only")
    if source.startswith("hpav18:"):
        from hpa.hpav18 import V18Options, acquire_hpav18

        opts = V18Options(size=size, max_images=max_images, seed=seed, allow_http=allow_http,
                          skip_broken=skip_broken, workers=workers)
        return acquire_hpav18(source, raw, work, opts, merge_with)
    if source == "synthetic":
        from hpa.synthetic import generate

        generate(raw, n_train, n_test, size=size, seed=seed)
        return raw
    if source.startswith("kaggle:"):
        return fetch_kaggle(source.split(":", 1)[1] or KAGGLE_COMPETITION, raw, max_bytes)
    if source.startswith("s3://"):
        return fetch_s3(source, raw, workers)
    if source.startswith(("https://", "http://")):
        archive = work / "archive"
        fetch_url(source, archive, max_bytes, sha256, allow_http)
        extract_archive(archive, raw, max_bytes, name=shown_source(source))
        archive.unlink()
        return find_layout_root(raw)
    if "://" in source:
        raise ConfigError(f"unsupported source {shown_source(source)!r}: expected synthetic, a directory, s3://..., "
                          f"https://..., kaggle:{KAGGLE_COMPETITION} or hpav18:<csv>")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise DataError(f"source directory {path} does not exist")
    return path.resolve()


# -- staging: exactly the files that form the dataset ---------------------------------------------
def _read_table(csv_path: Path, kind: str):
    """A Kaggle CSV through the one real CSV parser (hpa.data): quoting, BOM, CRLF, embedded newlines."""
    from hpa.data import read_labels, read_sample_submission

    if kind == "Predicted":
        return read_sample_submission(csv_path)
    return read_labels(csv_path).drop(columns="labels")


def _write_table(df, dst: Path, kind: str) -> None:
    """Write a CSV in the one stored dialect: UTF-8 without BOM, LF, minimal quoting; Id, `kind` first, then
    any extra columns in their original order."""
    import csv

    columns = ["Id", kind] + [c for c in df.columns if c not in ("Id", kind)]
    df[columns].to_csv(dst, index=False, encoding="utf-8", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


def stage(root: Path, staging: Path, n_train: int | None, n_test: int | None, seed: int) -> dict[str, int]:
    """Build `staging`: the CSVs (a seeded subset when n_* is smaller) and links to the chosen images.

    The CSVs are parsed and written back canonically (_write_table), rows in their original order.
    """
    staging.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, limit in (("train", n_train), ("test", n_test)):
        csv = root / SPLIT_CSV[split]
        if not csv.is_file():
            if split == "train":
                raise DataError(f"{csv}: missing (a Kaggle layout needs train.csv)")
            continue
        kind = "Target" if split == "train" else "Predicted"
        df = _read_table(csv, kind)
        if limit and limit < len(df):
            chosen = set(df["Id"].sample(n=limit, random_state=seed))
            df = df[df["Id"].isin(chosen)]
        counts[f"n_{split}"] = len(df)
        _write_table(df, staging / csv.name, kind)
        if split == "test" and (root / "test_labels.csv").is_file():
            labels = _read_table(root / "test_labels.csv", "Target")
            _write_table(labels[labels["Id"].isin(set(df["Id"]))], staging / "test_labels.csv", "Target")
        _link_images(root / split, staging / split, df["Id"])
    if (root / "phash.csv").is_file():  # perceptual hashes (hpa.phash) of the train images that were kept
        from hpa.phash import read_phash, write_phash

        hashes = read_phash(root / "phash.csv")
        kept = set(_read_table(staging / "train.csv", "Target")["Id"])
        write_phash(hashes[hashes["Id"].isin(kept)], staging / "phash.csv")
    return counts


def _link_images(src: Path, dst: Path, ids) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    names = {e.name for e in os.scandir(src)} if src.is_dir() else set()
    for image_id in ids:
        for color in COLORS:
            for ext in IMAGE_EXTENSIONS:
                name = f"{image_id}_{color}{ext}"
                if name in names:
                    (dst / name).symlink_to(src / name)
                    break


def validate(staging: Path) -> None:
    """hpa.data.validate_layout on both splits: one clear DataError naming the bad file or Id."""
    from hpa.data import validate_layout

    validate_layout(staging, "train")
    if (staging / "sample_submission.csv").is_file():
        validate_layout(staging, "test")


def _image_size(staging: Path) -> int | None:
    from PIL import Image

    first = next(iter(sorted((staging / "train").iterdir())), None)
    if first is None:
        return None
    with Image.open(first) as im:
        return im.size[0]


# -- publishing -----------------------------------------------------------------------------------
def publish_dataset(store: Store, staging: Path, meta: dict, workers: int = 8) -> list[dict]:
    """Upload `staging` idempotently and commit its manifest last; returns the entries."""
    files = [(p.relative_to(staging).as_posix(), p) for p in sorted(staging.rglob("*")) if p.is_file()]
    hashes = {key: sha256_file(p) for key, p in files}
    try:
        previous = {o["key"]: o["sha256"] for o in store.read_manifest()["objects"]}
    except StoreError as exc:
        if "not a committed dataset" not in str(exc):
            raise
        previous = None
    if previous is not None and previous != hashes:
        log.warning("%s holds a different committed dataset: uncommitting it before overwriting", store.uri)
        store.delete(MANIFEST)
    entries = store.upload_files(files, workers=workers, hashes=hashes, desc="upload dataset")
    store.commit_manifest(entries, meta)
    return entries


def _user_paths(message: str, source: str, work: Path, root: Path | None) -> str:
    """`message` with download()'s temporary paths (gone when the user reads it) replaced by what the
    user gave: their directory, or the shown source; a file inside an archive reads `<url>!/hpa/train.csv`."""
    shown = shown_source(source)
    raw = work / "raw"
    raw_shown, raw_join = (shown.rstrip("/"), "/") if source.startswith("s3://") else (shown, "!/")
    if "://" not in source and source != "synthetic" and not source.startswith(("kaggle:", "hpav18:")):
        staged = (source.rstrip("/") or "/", "/")  # a directory: staging mirrors it
    elif root is not None and root.is_relative_to(raw) and root != raw:
        staged = (raw_shown + raw_join + root.relative_to(raw).as_posix(), "/")
    else:
        staged = (raw_shown, raw_join)
    pairs = [(work / "dataset", *staged), (raw, raw_shown, raw_join), (work / "archive", shown, ""),
             (work, shown, "")]
    for path, shown_path, join in pairs:
        for variant in dict.fromkeys((str(path), str(path.resolve()))):
            if join:
                message = message.replace(variant + "/", shown_path + join)
            message = message.replace(variant, shown_path)
    if source != shown:
        message = message.replace(source, shown)
    return redact(message)


def download(source: str, dest: str, *, n_train: int | None = None, n_test: int | None = None, size: int = 64,
             seed: int = 0, montage: str | None = None, sha256: str | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES, allow_http: bool = False, workers: int = 8,
             max_images: int | None = None, merge_with: str | None = None, skip_broken: bool = False) -> dict:
    """Fetch `source`, validate it and commit it under `dest`; returns uri, counts, uploaded, skipped.

    n_train / n_test: images to generate (synthetic; default 600 / 200) or, for other sources, a seeded
    random subset of at most that many (None or 0 = all). hpav18:<csv> only: max_images (fetch at most
    that many v18 images), merge_with (a Kaggle-layout dataset to merge with), skip_broken (leave out
    images that fail after retries instead of failing): hpa.hpav18.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and value < 0:
            raise ConfigError(f"download: {name} must be >= 0, got {value}")
    start = time.monotonic()
    store = open_store(dest, create_bucket=True)
    synthetic = source == "synthetic"
    if synthetic:
        n_train = n_train or SYNTHETIC_DEFAULTS[0]
        n_test = SYNTHETIC_DEFAULTS[1] if n_test is None else n_test
    with tempfile.TemporaryDirectory(prefix="hpa-download-") as tmp:
        work = Path(tmp)
        staging, root = work / "dataset", None
        try:
            root = acquire(source, work, n_train=n_train, n_test=n_test, size=size, seed=seed, sha256=sha256,
                           max_bytes=max_bytes, allow_http=allow_http, workers=workers, max_images=max_images,
                           merge_with=merge_with, skip_broken=skip_broken)
            counts = stage(root, staging, None if synthetic else n_train, None if synthetic else n_test, seed)
            validate(staging)
            meta = {"source": shown_source(source), **counts, "n_test": counts.get("n_test", 0),
                    "size": size if synthetic else _image_size(staging), "seed": seed}
            entries = publish_dataset(store, staging, meta, workers)
        except HPAError as exc:
            # The temporary directory is gone when the user reads this: name their file or URL instead.
            raise type(exc)(_user_paths(str(exc), source, work, root)) from None
    uploaded = sum(e["uploaded"] for e in entries)
    result = {"uri": store.uri, "data_uri": store.uri, **{k: meta[k] for k in ("n_train", "n_test", "size")},
              "objects": len(entries), "uploaded": uploaded, "skipped": len(entries) - uploaded,
              "bytes": sum(e["size"] for e in entries), "seconds": round(time.monotonic() - start, 2)}
    if montage:
        from hpa.montage import render_montage

        result["montage"] = render_montage(store.uri, montage, seed=seed)
    log.info("download: %s", result)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa download",
                                     description="Fetch a dataset in Kaggle layout, validate it and commit it "
                                                 "to the store (idempotent).")
    parser.add_argument("--source", required=True,
                        help=f"synthetic | DIR | s3://bucket/prefix | https://.../archive.zip | "
                             f"kaggle:{KAGGLE_COMPETITION} | hpav18:HPAv18RBGY_wodpl.csv (HPA v18 images from "
                             "HPA_V18_BASE_URL, default https://v18.proteinatlas.org/images/; cached for resume "
                             "in HPA_V18_CACHE, default ~/.cache/hpa/hpav18)")
    parser.add_argument("--dest", required=True, help="dataset URI: s3://bucket/prefix or a directory")
    parser.add_argument("--n-train", type=int, default=None,
                        help="synthetic: images to generate (600); other sources: random subset (default all)")
    parser.add_argument("--n-test", type=int, default=None, help="as --n-train, for the test split (200)")
    parser.add_argument("--size", type=int, default=64, help="synthetic and hpav18: image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--montage", default=None, help="also render a sample montage to this PNG (path or URI)")
    parser.add_argument("--sha256", default=None, help="expected sha256 of an https:// archive")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="size limit of an archive")
    parser.add_argument("--allow-http", action="store_true",
                        help="accept plain http:// from 127.0.0.1 (tests only)")
    parser.add_argument("--workers", type=int, default=8, help="parallel uploads (and hpav18 downloads)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="hpav18: fetch at most N v18 images (a seeded random subset; default all)")
    parser.add_argument("--merge-with", default=None,
                        help="hpav18: a Kaggle-layout dataset (DIR or s3://...) whose train/test images join the "
                             "v18 ones; train.csv then holds both")
    parser.add_argument("--skip-broken", action="store_true",
                        help="hpav18: leave out images that still fail after retries (default: fail, re-run resumes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    result = download(args.source, args.dest, n_train=args.n_train, n_test=args.n_test, size=args.size,
                      seed=args.seed, montage=args.montage, sha256=args.sha256, max_bytes=args.max_bytes,
                      allow_http=args.allow_http, workers=args.workers, max_images=args.max_images,
                      merge_with=args.merge_with, skip_broken=args.skip_broken)
    print(f"committed {result['uri']}: {result['n_train']} train + {result['n_test']} test images, "
          f"{result['objects']} objects ({result['uploaded']} uploaded, {result['skipped']} already there)")
    return 0
