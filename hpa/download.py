"""`python -m hpa download`: fetch a dataset in the Kaggle layout, validate it, commit it to the store.

Sources (hpa.fetch): `synthetic` (hpa.synthetic), a local directory in Kaggle layout, an `s3://` prefix, an
`https://` zip/tar archive (size limit, optional sha256, safe extraction: hpa.archives),
`kaggle:<competition>` (needs the optional `kaggle` package and KAGGLE_USERNAME / KAGGLE_KEY), and
`hpav18:<csv>` (the HPA v18 external images, resumable, with perceptual hashes in phash.csv: hpa.hpav18; `<csv>` a
pinned checksummed table such as `hpav18:pudae`, or a CSV of your own), merged with `merge_with`, any other source
in Kaggle layout with a test split (the v18 images have none; the pipeline's download_task requires the merge).

The dataset lands exactly under `dest` (`<dest>/train.csv`, `train/<Id>_<color>.png`, ...) and is
committed by `<dest>/manifest.json`, written last. A re-run uploads only objects whose sha256 is not
already stored; if the new content differs from a committed dataset, the old manifest is first overwritten by
the uncommitted marker (hpa.store.UNCOMMITTED), so readers never see a manifest that disagrees with the objects. No
step deletes an object: on KFP 2.15/2.16 a profile's S3 keys may Put, Get and List only (hpa.store). Every option
is declared once, on `DownloadOptions`, which also generates the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from hpa.archives import DEFAULT_MAX_BYTES
from hpa.errors import ConfigError, DataError, HPAError, StoreError
from hpa.fetch import KAGGLE_COMPETITION, acquire, find_layout_root, shown_source, url_parts
from hpa.hpav18_csv import PREFIX as HPAV18_PREFIX
from hpa.hpav18_csv import csv_spec
from hpa.labels import COLORS
from hpa.options import opt, parser_for
from hpa.store import MANIFEST, UNCOMMITTED, Store, open_store, redact, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

SYNTHETIC_DEFAULTS = (600, 200)
SPLIT_CSV = {"train": "train.csv", "test": "sample_submission.csv"}


@dataclass
class DownloadOptions:
    """What `download` fetches and how: the keyword arguments of `download` and the options of its command."""

    source: str = opt("", f"synthetic | DIR | s3://bucket/prefix | https://.../archive.zip | "
                          f"kaggle:{KAGGLE_COMPETITION} | hpav18:HPAv18RBGY_wodpl.csv (HPA v18 images from "
                          "HPA_V18_BASE_URL, default https://v18.proteinatlas.org/images/; cached for resume "
                          "in HPA_V18_CACHE, default ~/.cache/hpa/hpav18)")
    dest: str = opt("", "dataset URI: s3://bucket/prefix or a directory")
    n_train: int | None = opt(None, f"synthetic: images to generate ({SYNTHETIC_DEFAULTS[0]}); other sources: "
                                    "random subset (default all)")
    n_test: int | None = opt(None, f"as --n-train, for the test split ({SYNTHETIC_DEFAULTS[1]})")
    size: int = opt(64, "synthetic and hpav18: image side in pixels")
    seed: int = opt(0, "seed of the synthetic generator and of the random subsets")
    montage: str | None = opt(None, "also render a sample montage to this PNG (path or URI)")
    sha256: str | None = opt(None, "expected sha256 of an https:// archive")
    max_bytes: int = opt(DEFAULT_MAX_BYTES, "size limit of an archive")
    allow_http: bool = opt(False, "accept plain http:// from 127.0.0.1 (tests only)")
    workers: int = opt(8, "parallel uploads (and hpav18 downloads)")
    max_images: int | None = opt(None, "hpav18: fetch at most N v18 images (a seeded random subset; default all)")
    merge_with: str | None = opt(None, "hpav18: a dataset in Kaggle layout with a test split (any other source: "
                                       "s3://..., DIR, kaggle:..., https://..., synthetic) whose train/test images "
                                       "join the v18 ones; train.csv then holds both, marked by its source column; "
                                       "--n-train/--n-test then apply to it")
    skip_broken: bool = opt(False, "hpav18: leave out images that still fail after retries (off: fail, and a "
                                   "re-run resumes)")


def _name_part(source: str) -> str:
    parts = url_parts(source)
    if parts is not None:
        where = parts.netloc.rpartition("@")[2] + parts.path
    else:
        where = shown_source(source).split("://")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", where).strip("-.")[-60:] or "source"


def dataset_name(source: str, n_train: int | None, n_test: int | None, image_size: int, seed: int,
                 merge_with: str = "") -> str:
    """The store name of a dataset (`<store>/datasets/<name>`): one per distinct source, merge and counts (and size,
    for the sources converted to it: synthetic and hpav18).

    Built from the sources' host and path only: userinfo, query string and fragment (where signed URLs
    carry their credentials) never become part of an object key, an output or a log line.
    """
    if source == "synthetic":
        return f"synthetic-{n_train}x{n_test}-{image_size}px-seed{seed}"
    name = _name_part(source)
    if merge_with:
        name += "+" + (f"synthetic-{image_size}px" if merge_with == "synthetic" else _name_part(merge_with))
    if source.startswith(HPAV18_PREFIX):
        return f"{name}-{n_train or 'all'}x{n_test or 'all'}-{image_size}px-seed{seed}"
    return f"{name}-{n_train or 'all'}x{n_test or 'all'}-seed{seed}"


def dataset_uri(store_uri: str, source: str, n_train: int | None, n_test: int | None, image_size: int,
                seed: int, merge_with: str = "") -> str:
    """Where `download` commits a source's dataset: `<store_uri>/datasets/<dataset_name>`."""
    return store_uri.rstrip("/") + "/datasets/" + dataset_name(source, n_train, n_test, image_size, seed, merge_with)


def check_sources(source: str, merge_with: str = "", require_test: bool = False) -> None:
    """Refuse, before anything is fetched, a source / merge_with pair that cannot give a dataset (one ConfigError
    line): merge_with with a source other than hpav18:<csv>, an hpav18 merge_with, an unknown pinned v18 table, and
    with `require_test` (the pipeline, whose pack and evaluation need a test split) hpav18:<csv> without merge_with.
    """
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("data_source: expected synthetic, a directory, s3://..., https://..., kaggle:<competition> "
                          "or hpav18:<csv>, got an empty value")
    if merge_with and not source.startswith(HPAV18_PREFIX):
        raise ConfigError("merge_with: applies to data_source=hpav18:<csv> only, got data_source="
                          f"{shown_source(source)} (leave merge_with empty)")
    if merge_with.startswith(HPAV18_PREFIX):
        raise ConfigError(f"merge_with: {shown_source(merge_with)} is another hpav18 source; expected a Kaggle-layout "
                          "dataset with a test split (s3://..., a directory, kaggle:..., https://... or synthetic)")
    if source.startswith(HPAV18_PREFIX):
        csv_spec(source)
        if require_test and not merge_with:
            raise ConfigError(f"merge_with: data_source={shown_source(source)} needs merge_with=<a Kaggle-layout "
                              "dataset: a committed s3:// dataset, kaggle:..., synthetic, ...>, because the HPA v18 "
                              "images have no test split")


# -- staging: exactly the files that form the dataset ---------------------------------------------
def _read_table(csv_path: Path, kind: str):
    """A Kaggle CSV through the one real CSV parser (hpa.data): quoting, BOM, CRLF, embedded newlines."""
    from hpa.data import read_labels, read_sample_submission

    if kind == "Predicted":
        return read_sample_submission(csv_path)
    return read_labels(csv_path).drop(columns="labels")


def write_table(df, dst: Path, kind: str) -> None:
    """Write a CSV in the one stored dialect: UTF-8 without BOM, LF, minimal quoting; Id, `kind` first, then
    any extra columns in their original order."""
    import csv

    columns = ["Id", kind] + [c for c in df.columns if c not in ("Id", kind)]
    df[columns].to_csv(dst, index=False, encoding="utf-8", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


def stage(root: Path, staging: Path, n_train: int | None, n_test: int | None, seed: int) -> dict[str, int]:
    """Build `staging`: the CSVs (a seeded subset when n_* is smaller) and links to the chosen images.

    The CSVs are parsed and written back canonically (write_table), rows in their original order.
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
        write_table(df, staging / csv.name, kind)
        if split == "test" and (root / "test_labels.csv").is_file():
            labels = _read_table(root / "test_labels.csv", "Target")
            write_table(labels[labels["Id"].isin(set(df["Id"]))], staging / "test_labels.csv", "Target")
        _link_images(root / split, staging / split, df["Id"])
    if (root / "phash.csv").is_file():  # perceptual hashes (hpa.phash) of the train images that were kept
        from hpa.phash import read_phash, write_phash

        hashes = read_phash(root / "phash.csv")
        kept = set(_read_table(staging / "train.csv", "Target")["Id"])
        write_phash(hashes[hashes["Id"].isin(kept)], staging / "phash.csv")
    return counts


def _link_images(src: Path, dst: Path, ids) -> None:
    from hpa.data import EXTENSIONS

    dst.mkdir(parents=True, exist_ok=True)
    names = {e.name for e in os.scandir(src)} if src.is_dir() else set()
    for image_id in ids:
        for color in COLORS:
            for ext in EXTENSIONS:
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
        store.put_bytes(MANIFEST, UNCOMMITTED)  # a PUT, not a delete: KFP 2.15/2.16 keys cannot delete (hpa.store)
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


def _acquire_merge(o: DownloadOptions, work: Path) -> Path:
    """`o.merge_with` as a local Kaggle-layout root: n_train / n_test are its generation counts (synthetic) or a
    seeded subset of its train / test splits."""
    sub = replace(o, source=o.merge_with, merge_with=None, max_images=None, skip_broken=False, montage=None,
                  sha256=None)
    (work / "merge").mkdir()
    root = find_layout_root(acquire(sub, work / "merge"))
    if o.merge_with == "synthetic":
        return root
    stage(root, work / "merge-dataset", o.n_train, o.n_test, o.seed)
    return work / "merge-dataset"


def download(source: str, dest: str, **options) -> dict:
    """Fetch `source`, validate it and commit it under `dest`; returns uri, counts, uploaded, skipped.

    `options`: the other fields of DownloadOptions. n_train / n_test: images to generate (synthetic; default
    600 / 200) or, for other sources, a seeded random subset of at most that many (None or 0 = all); with
    merge_with, they apply to the merged dataset, and max_images caps the v18 images.
    hpav18:<csv> only: max_images, merge_with, skip_broken (hpa.hpav18).
    """
    o = DownloadOptions(source, dest, **options)
    for name in ("n_train", "n_test"):
        value = getattr(o, name)
        if value is not None and value < 0:
            raise ConfigError(f"download: {name} must be >= 0, got {value}")
    check_sources(source, o.merge_with or "")
    start = time.monotonic()
    store = open_store(dest, create_bucket=True)
    synthetic = source == "synthetic"
    if synthetic or o.merge_with == "synthetic":
        o.n_train = o.n_train or SYNTHETIC_DEFAULTS[0]
        o.n_test = SYNTHETIC_DEFAULTS[1] if o.n_test is None else o.n_test
    subset = not (synthetic or o.merge_with)  # a merge took its subset already (_acquire_merge)
    with tempfile.TemporaryDirectory(prefix="hpa-download-") as tmp:
        work = Path(tmp)
        staging, root = work / "dataset", None
        try:
            merge_root = _acquire_merge(o, work) if o.merge_with else None
            root = acquire(o, work, merge_root=merge_root)
            counts = stage(root, staging, o.n_train if subset else None, o.n_test if subset else None, o.seed)
            validate(staging)
            meta = {"source": shown_source(source), **counts, "n_test": counts.get("n_test", 0),
                    "size": o.size if synthetic else _image_size(staging), "seed": o.seed}
            if o.merge_with:
                meta["merge_with"] = shown_source(o.merge_with)
            entries = publish_dataset(store, staging, meta, o.workers)
        except HPAError as exc:
            # The temporary directory is gone when the user reads this: name their file or URL instead.
            raise type(exc)(_user_paths(str(exc), source, work, root)) from None
    uploaded = sum(e["uploaded"] for e in entries)
    result = {"uri": store.uri, "data_uri": store.uri, **{k: meta[k] for k in ("n_train", "n_test", "size")},
              "objects": len(entries), "uploaded": uploaded, "skipped": len(entries) - uploaded,
              "bytes": sum(e["size"] for e in entries), "seconds": round(time.monotonic() - start, 2)}
    if o.montage:
        from hpa.montage import render_montage

        result["montage"] = render_montage(store.uri, o.montage, seed=o.seed)
    log.info("download: %s", result)
    return result


def download_task(source: str, store_uri: str, n_train: int, n_test: int, image_size: int, seed: int,
                  expected_manifest: str = "", merge_with: str = "", allow_http: bool = False) -> dict:
    """The download pipeline task: the source's dataset at dataset_uri(store_uri, ..., merge_with) (one prefix per
    distinct dataset: a changed parameter never overwrites another run's data), fetched and committed unless it is
    still committed as the run found it (hpa.committed.intact with `expected_manifest`). `merge_with` (hpav18:<csv>
    only, and required there: the v18 images have no test split) is the Kaggle-layout dataset merged in, e.g. a
    committed s3:// dataset; checked up front (check_sources). `allow_http`: plain http to 127.0.0.1 (tests' stand-in
    v18 host; not a pipeline input). A `source` that is itself a committed s3:// dataset is used where it is
    (hpa.committed.use_dataset: its manifest checked against `expected_manifest`), never copied. Returns data_uri,
    the committed manifest.json (parsed) and its sha256, and the scalar fields of download's result ("metadata")."""
    from hpa.committed import intact, is_committed_dataset, use_dataset

    check_sources(source, merge_with, require_test=True)
    in_place = is_committed_dataset(source)  # the user's own committed dataset: every task reads it where it is
    data_uri = source.rstrip("/") if in_place else dataset_uri(store_uri, source, n_train, n_test, image_size, seed,
                                                               merge_with)
    if in_place:
        info = {**use_dataset(data_uri, expected_manifest), "committed_source": 1}
    elif intact(data_uri, expected_manifest):  # committed as this run found it: nothing to fetch again
        info = {"data_uri": data_uri, "skipped_fetch": 1}
    else:
        info = download(source, data_uri, n_train=n_train or None, n_test=n_test or None, size=image_size, seed=seed,
                        merge_with=merge_with or None, allow_http=allow_http)
    raw = open_store(data_uri).get_bytes(MANIFEST)
    return {"data_uri": data_uri, "manifest": json.loads(raw), "manifest_sha256": sha256_bytes(raw),
            "metadata": {k: v for k, v in info.items() if isinstance(v, (int, float, str))}}


def get_args_parser() -> argparse.ArgumentParser:
    return parser_for(DownloadOptions, "python -m hpa download", "Fetch a dataset in Kaggle layout, validate it "
                      "and commit it to the store (idempotent).", required=("source", "dest"))


def main(argv: list[str] | None = None) -> int:
    result = download(**vars(get_args_parser().parse_args(argv)))
    print(f"committed {result['uri']}: {result['n_train']} train + {result['n_test']} test images, "
          f"{result['objects']} objects ({result['uploaded']} uploaded, {result['skipped']} already there)")
    return 0
