"""Safe extraction of downloaded archives: zip and tar(.gz/.bz2/.xz), archives inside them included.

What an archive may unpack to is capped and counted as bytes are written, so lying headers do not help:
entries that escape the target (zip-slip), links and devices, more than a total and a per-file size, a member
that expands more than a ratio (compression bombs), nesting deeper than MAX_ARCHIVE_DEPTH and corrupt data are
refused with one DataError line naming what the user gave. `extract_archive` is the entry point; `unpack` with
one `ArchiveLimits` shares a budget between several archives (the Kaggle competition's files).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from hpa.config import env_int
from hpa.errors import DataError
from hpa.store import redact

# The real Kaggle archive is ~17 GB of PNGs that barely compress (ratio ~1, its train.zip alone ~14 GB), while zip
# bombs expand a thousand times and more. The total (also the size limit of a downloaded archive) is overridden by
# --max-bytes / HPA_DOWNLOAD_MAX_BYTES.
DEFAULT_MAX_BYTES = env_int("HPA_DOWNLOAD_MAX_BYTES", 32 << 30, minimum=1)
DEFAULT_MAX_MEMBER_BYTES = env_int("HPA_DOWNLOAD_MAX_MEMBER_BYTES", 20 << 30, minimum=1)
DEFAULT_MAX_RATIO = 200.0  # uncompressed / compressed: per zip member, over a whole tar archive
RATIO_FLOOR = 1 << 20  # the ratio is checked past this many bytes only (small CSVs compress well)
MAX_ARCHIVE_DEPTH = 2  # an archive and archives inside it (Kaggle ships train.zip in its zip); deeper is refused
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, NotImplementedError,
                   RuntimeError, OSError)


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


def unpack(archive: Path, target: Path, name: str, limits: ArchiveLimits, depth: int = 1) -> None:
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
        unpack(path, folder, inner, limits, depth + 1)
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
    unpack(archive, target, name or str(archive), limits)
    return target
