"""`python -m hpa download`: fetch a dataset in the Kaggle layout, validate it, commit it to the store.

Sources: `synthetic` (hpa.synthetic), a local directory in Kaggle layout, an `s3://` prefix, an
`https://` zip/tar archive (size limit, optional sha256, safe extraction), and
`kaggle:<competition>` (needs the optional `kaggle` package and KAGGLE_USERNAME / KAGGLE_KEY).

The dataset lands exactly under `dest` (`<dest>/train.csv`, `train/<Id>_<color>.png`, ...) and is
committed by `<dest>/manifest.json`, written last. A re-run uploads only objects whose sha256 is not
already stored; if the new content differs from a committed dataset, the old manifest is removed
first, so readers never see a manifest that disagrees with the objects.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import re
import stat
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from hpa.errors import ConfigError, DataError, StoreError
from hpa.labels import COLORS
from hpa.store import MANIFEST, Store, open_store, redact, sha256_file

log = logging.getLogger(__name__)

KAGGLE_COMPETITION = "human-protein-atlas-image-classification"
SYNTHETIC_DEFAULTS = (600, 200)
# The real Kaggle archive is ~17 GB; override with --max-bytes / HPA_DOWNLOAD_MAX_BYTES.
DEFAULT_MAX_BYTES = int(os.environ.get("HPA_DOWNLOAD_MAX_BYTES", 32 << 30))
CSV_FILES = ("train.csv", "sample_submission.csv", "test_labels.csv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_CSV = {"train": "train.csv", "test": "sample_submission.csv"}


# -- archives -------------------------------------------------------------------------------------
def fetch_url(url: str, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, sha256: str | None = None,
              allow_http: bool = False, timeout: float = 60.0) -> str:
    """Stream an https:// URL to `path`, refusing more than max_bytes; check sha256 when given."""
    parts = urllib.parse.urlsplit(url)
    shown = shown_source(url)
    if parts.scheme != "https" and not (allow_http and parts.scheme == "http" and _loopback(parts.hostname)):
        raise ConfigError(f"refused source {shown}: only https:// archives (plain http only to 127.0.0.1 "
                          "with --allow-http, for tests)")
    digest = hashlib.sha256()
    total = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(path, "wb") as out:
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise DataError(f"{shown}: archive is {declared} bytes, more than the limit of {max_bytes}")
            for block in iter(lambda: resp.read(1 << 20), b""):
                total += len(block)
                if total > max_bytes:
                    raise DataError(f"{shown}: archive exceeds the limit of {max_bytes} bytes")
                digest.update(block)
                out.write(block)
    except OSError as exc:  # URLError, HTTPError, timeouts
        raise DataError(f"cannot download {shown}: {redact(str(getattr(exc, 'reason', exc)))}") from None
    if sha256 and digest.hexdigest() != sha256.lower():
        raise DataError(f"{shown}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    log.info("downloaded %s (%d bytes)", shown, total)
    return digest.hexdigest()


def shown_source(source: str) -> str:
    """The source as it may appear in logs and manifests: no credentials, no query string (tokens)."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme in ("http", "https") and parts.query:
        source = urllib.parse.urlunsplit(parts._replace(query="…"))
    return redact(source)


def _loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _safe_member(name: str, target: Path, archive: Path) -> Path:
    """The extraction path of an archive member; refuse names that escape `target` (zip-slip)."""
    clean = name.replace("\\", "/")
    out = (target / clean).resolve()
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean) or not out.is_relative_to(target.resolve()):
        raise DataError(f"{archive.name}: refused archive entry {name!r}: it escapes the extraction directory")
    return out


def extract_archive(archive: Path, target: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Extract a zip or tar archive into `target` safely: no escaping paths, links or devices, no bombs."""
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target, max_bytes)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target, max_bytes)
    else:
        raise DataError(f"{archive.name}: not a zip or tar archive")
    return target


def _extract_zip(archive: Path, target: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for m in members:
            _safe_member(m.filename, target, archive)
            if stat.S_ISLNK(m.external_attr >> 16):
                raise DataError(f"{archive.name}: refused archive entry {m.filename!r}: symbolic link")
        if sum(m.file_size for m in members) > max_bytes:
            raise DataError(f"{archive.name}: unpacks to more than the limit of {max_bytes} bytes")
        zf.extractall(target)


def _extract_tar(archive: Path, target: Path, max_bytes: int) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            _safe_member(m.name, target, archive)
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{archive.name}: refused archive entry {m.name!r}: not a regular file or directory")
        if sum(m.size for m in members) > max_bytes:
            raise DataError(f"{archive.name}: unpacks to more than the limit of {max_bytes} bytes")
        tf.extractall(target, filter="data")


def find_layout_root(top: Path) -> Path:
    """The directory holding train.csv: `top` itself or one below it (archives often add a folder)."""
    for candidate in [top, *sorted(p for p in top.glob("*") if p.is_dir()),
                      *sorted(p for p in top.glob("*/*") if p.is_dir())]:
        for split in ("train", "test"):  # Kaggle ships train.zip / test.zip inside the archive
            inner = candidate / f"{split}.zip"
            if (candidate / "train.csv").is_file() and inner.is_file() and not (candidate / split).is_dir():
                extract_archive(inner, candidate / split)
                inner.unlink()
        if (candidate / "train.csv").is_file():
            return candidate
    raise DataError(f"no train.csv found in the downloaded data (looked in {top.name} and two levels below)")


# -- sources --------------------------------------------------------------------------------------
def _kaggle_credentials_present() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file()


def fetch_kaggle(competition: str, raw: Path) -> Path:
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
    for archive in sorted(raw.glob("*.zip")):
        extract_archive(archive, raw)
        archive.unlink()
    return find_layout_root(raw)


def fetch_s3(source: str, raw: Path, workers: int = 8) -> Path:
    """Copy an s3:// prefix in Kaggle layout; a committed one (manifest.json) is verified object by object."""
    store = open_store(source)
    expected = None
    if store.exists(MANIFEST):
        expected = {o["key"]: o["sha256"] for o in store.read_manifest()["objects"]}
    else:
        log.warning("%s has no %s: copying it unverified", source, MANIFEST)
    store.download_tree("", raw, workers=workers, expected=expected)
    (raw / MANIFEST).unlink(missing_ok=True)
    return find_layout_root(raw)


def acquire(source: str, work: Path, *, n_train: int, n_test: int, size: int, seed: int, sha256: str | None,
            max_bytes: int, allow_http: bool, workers: int) -> Path:
    """Bring `source` to a local directory in Kaggle layout; returns its root."""
    raw = work / "raw"
    raw.mkdir()
    if source == "synthetic":
        from hpa.synthetic import generate

        generate(raw, n_train, n_test, size=size, seed=seed)
        return raw
    if source.startswith("kaggle:"):
        return fetch_kaggle(source.split(":", 1)[1] or KAGGLE_COMPETITION, raw)
    if source.startswith("s3://"):
        return fetch_s3(source, raw, workers)
    if source.startswith(("https://", "http://")):
        archive = work / "archive"
        fetch_url(source, archive, max_bytes, sha256, allow_http)
        extract_archive(archive, raw, max_bytes)
        archive.unlink()
        return find_layout_root(raw)
    if "://" in source:
        raise ConfigError(f"unsupported source {shown_source(source)!r}: expected synthetic, a directory, s3://..., "
                          f"https://... or kaggle:{KAGGLE_COMPETITION}")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise DataError(f"source directory {path} does not exist")
    return path.resolve()


# -- staging: exactly the files that form the dataset ---------------------------------------------
def _read_ids(csv_path: Path, split: str):
    import pandas as pd

    try:
        from hpa.data import read_labels, read_sample_submission

        return read_labels(csv_path) if split == "train" else read_sample_submission(csv_path)
    except ImportError:  # pragma: no cover - hpa.data is part of the package
        return pd.read_csv(csv_path, dtype=str)


def stage(root: Path, staging: Path, n_train: int | None, n_test: int | None, seed: int) -> dict[str, int]:
    """Build `staging`: the CSVs (a seeded subset when n_* is smaller) and links to the chosen images."""
    staging.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, limit in (("train", n_train), ("test", n_test)):
        csv = root / SPLIT_CSV[split]
        if not csv.is_file():
            if split == "train":
                raise DataError(f"{csv}: missing (a Kaggle layout needs train.csv)")
            continue
        df = _read_ids(csv, split)
        if limit and limit < len(df):
            df = df.sample(n=limit, random_state=seed).sort_values("Id")
        counts[f"n_{split}"] = len(df)
        _write_subset(csv, staging / csv.name, set(df["Id"]))
        if split == "test" and (root / "test_labels.csv").is_file():
            _write_subset(root / "test_labels.csv", staging / "test_labels.csv", set(df["Id"]))
        _link_images(root / split, staging / split, df["Id"])
    return counts


def _write_subset(src: Path, dst: Path, ids: set[str]) -> None:
    """Copy a CSV keeping only rows whose first field is in ids (bytes of kept rows unchanged)."""
    with open(src, encoding="utf-8-sig", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.split(",", 1)[0].strip() in ids]
    dst.write_text("".join(kept), encoding="utf-8", newline="")


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


def download(source: str, dest: str, *, n_train: int | None = None, n_test: int | None = None, size: int = 64,
             seed: int = 0, montage: str | None = None, sha256: str | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES, allow_http: bool = False, workers: int = 8) -> dict:
    """Fetch `source`, validate it and commit it under `dest`; returns uri, counts, uploaded, skipped.

    n_train / n_test: images to generate (synthetic; default 600 / 200) or, for other sources, a seeded
    random subset of at most that many (None or 0 = all).
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and value < 0:
            raise ConfigError(f"download: {name} must be >= 0, got {value}")
    start = time.monotonic()
    store = open_store(dest, create_bucket=True)
    with tempfile.TemporaryDirectory(prefix="hpa-download-") as tmp:
        work = Path(tmp)
        synthetic = source == "synthetic"
        if synthetic:
            n_train = n_train or SYNTHETIC_DEFAULTS[0]
            n_test = SYNTHETIC_DEFAULTS[1] if n_test is None else n_test
        root = acquire(source, work, n_train=n_train, n_test=n_test, size=size, seed=seed, sha256=sha256,
                       max_bytes=max_bytes, allow_http=allow_http, workers=workers)
        staging = work / "dataset"
        counts = stage(root, staging, None if synthetic else n_train, None if synthetic else n_test, seed)
        validate(staging)
        meta = {"source": shown_source(source), **counts, "n_test": counts.get("n_test", 0),
                "size": size if synthetic else _image_size(staging), "seed": seed}
        entries = publish_dataset(store, staging, meta, workers)
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
                             f"kaggle:{KAGGLE_COMPETITION}")
    parser.add_argument("--dest", required=True, help="dataset URI: s3://bucket/prefix or a directory")
    parser.add_argument("--n-train", type=int, default=None,
                        help="synthetic: images to generate (600); other sources: random subset (default all)")
    parser.add_argument("--n-test", type=int, default=None, help="as --n-train, for the test split (200)")
    parser.add_argument("--size", type=int, default=64, help="synthetic image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--montage", default=None, help="also render a sample montage to this PNG (path or URI)")
    parser.add_argument("--sha256", default=None, help="expected sha256 of an https:// archive")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="size limit of an archive")
    parser.add_argument("--allow-http", action="store_true",
                        help="accept plain http:// from 127.0.0.1 (tests only)")
    parser.add_argument("--workers", type=int, default=8, help="parallel uploads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    result = download(args.source, args.dest, n_train=args.n_train, n_test=args.n_test, size=args.size,
                      seed=args.seed, montage=args.montage, sha256=args.sha256, max_bytes=args.max_bytes,
                      allow_http=args.allow_http, workers=args.workers)
    print(f"committed {result['uri']}: {result['n_train']} train + {result['n_test']} test images, "
          f"{result['objects']} objects ({result['uploaded']} uploaded, {result['skipped']} already there)")
    return 0
