"""The HPA v18 external images as a download source: `python -m hpa download --source hpav18:<csv>`.

The 1st and 3rd place solutions of the Kaggle competition trained on ~74k extra images from the Human
Protein Atlas v18 website, listed in the public `HPAv18RBGY_wodpl.csv` (`Id,Target`, Id =
`<plate>_<position>_<sample>` such as `10580_1610_C1_1`). Each channel is one colourised JPG at

    {base}/{dir}/{rest}_{color}.jpg   with Id = {dir}_{rest} split at the first underscore,
    e.g. 10580_1610_C1_1 -> {base}/10580/1610_C1_1_red.jpg, color in red, green, blue, yellow

as in the 3rd place solution's downloader (pudae/kaggle-hpa, tools/download.py, commit 3e7888c:
`i.split('_', 1)`, `'http://v18.proteinatlas.org/images/' + dir + '/' + rest + '_' + color + '.jpg'`;
the CSV is data/HPAv18RBGY_wodpl.csv there) and laichunpongben/kaggle-human-protein-atlas
code/download_hpa.py (`id_.partition('_')`, same URL).

Base URL: `https://v18.proteinatlas.org/images/` (the archived releases are served over https,
"version 16 of the Human Protein Atlas has the url https://v16.proteinatlas.org", proteinatlas.org
about/download), overridden by `HPA_V18_BASE_URL` or `base_url=`. Plain http is accepted for exactly
one public host, v18.proteinatlas.org, which is what the solutions' scripts used: the images are
public, no credential ever travels, and every file must decode completely; a tampering proxy could
still swap an image, which is why https stays the default. Any other plain-http host is refused, except
127.0.0.1 with --allow-http (tests), the rule of every other download source.

Each channel is decoded by hpa.data's rule (the plane matching the file's colour: red -> R, green -> G,
blue -> B, yellow -> (R + G) / 2; large JPEGs at a reduced DCT scale, see decode_resized), resized to
size x size like hpa.data.load_image does, and stored as an 8-bit grayscale PNG, the Kaggle layout:
`train/<Id>_<color>.png` plus `train.csv`.

Resume: converted PNGs live in a cache directory (hpa.hpav18_cache: `HPA_V18_CACHE`, default
~/.cache/hpa/hpav18), one folder per size, written atomically; an Id counts as fetched once all four PNGs
are written and its line (sha256 of each PNG and the pHash) is appended to `journal.jsonl`. A re-run skips
Ids whose journal line matches the files on disk; a killed run loses at most the Ids in flight. A download that
fails (HTTP error, truncated body, undecodable JPG) is retried `tries` times with backoff; 4xx answers
other than 408/429 are not retried. Failures are reported one line each, naming the Id and URL; then
the download stops with a DataError (re-run to retry only those), or, with skip_broken, the failed Ids
are left out of train.csv.

Pinned label tables (`hpav18:<name>`, hpa.hpav18_csv): `hpav18:pudae` is the de-duplicated table the 3rd place
solution ships (pudae/kaggle-hpa data/HPAv18RBGY_wodpl.csv, "wodpl": without duplicates), fetched from its
raw URL at a fixed commit and refused unless its sha256 is the recorded one. Any other CSV is passed as a path,
an s3:// URI or an https:// URL (`hpav18:/data/my_v18.csv`), for offline use and tests.

Merge (`merge_with`): a Kaggle-layout dataset with a test split (any other download source, brought to a local
root by hpa.download) joins the v18 images: train.csv holds its rows then the v18 rows, a `source` column marks
each row (`hpav18`, or the merged dataset's own `source` value, default `kaggle`), its train images, test images
and CSVs are carried over unchanged, and its images must already have the requested size. The v18 images have
no test split: a merged dataset is the only way a v18 run can be evaluated (and packed for its test split).
`phash.csv` (Id,phash, hpa.phash) covers every train image of the result, so `hpa split` keeps duplicate groups
across both sources in one fold.
"""

from __future__ import annotations

import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpa import fetch
from hpa.config import env_float
from hpa.errors import ConfigError, DataError
from hpa.hpav18_cache import Cache
from hpa.hpav18_csv import read_v18_csv
from hpa.labels import COLORS
from hpa.store import retry

log = logging.getLogger(__name__)

V18_HOST = "v18.proteinatlas.org"
DEFAULT_BASE_URL = f"https://{V18_HOST}/images/"
BASE_URL_ENV = "HPA_V18_BASE_URL"
CACHE_ENV = "HPA_V18_CACHE"
BACKOFF_ENV = "HPA_V18_RETRY_DELAY"
MAX_JPG_BYTES = 64 << 20  # a v18 channel JPG is 0.1-3 MB (2048 or 3072 px); far more is not an image
PERMANENT_HTTP = frozenset(range(400, 500)) - {408, 429}
V18_SOURCE, MERGED_SOURCE = "hpav18", "kaggle"  # train.csv `source` values of v18 rows / merged rows without one


def base_url() -> str:
    return os.environ.get(BASE_URL_ENV, "").strip() or DEFAULT_BASE_URL


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV, "").strip():
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hpa" / "hpav18"


def image_url(base: str, image_id: str, color: str) -> str:
    """The v18 URL of one channel: Id `<dir>_<rest>` split at the first underscore."""
    folder, sep, rest = image_id.partition("_")
    if not (sep and folder and rest):
        raise DataError(f"hpav18: Id {image_id!r} is not <plate>_<position>_<sample> (e.g. 10580_1610_C1_1)")
    return f"{base.rstrip('/')}/{folder}/{rest}_{color}.jpg"


def allowed_url(url: str, allow_http: bool) -> bool:
    """https anywhere; plain http to v18.proteinatlas.org (public images, see the module docstring) or to
    loopback with allow_http."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    return fetch.allowed_url(url, allow_http) or (parts.scheme == "http" and host == V18_HOST)


@dataclass
class V18Options:
    """How the v18 images are fetched and converted."""

    size: int = 512
    base_url: str = field(default_factory=base_url)
    cache_dir: Path = field(default_factory=default_cache_dir)
    max_images: int | None = None
    seed: int = 0
    allow_http: bool = False
    skip_broken: bool = False
    workers: int = 8
    tries: int = 3
    # seconds before the 2nd try, doubled before each further one
    backoff: float = field(default_factory=lambda: env_float(BACKOFF_ENV, 1.0, minimum=0.0))
    timeout: float = 60.0


class _Retry(Exception):
    """A failure worth another try (network, 5xx, truncated body, undecodable data)."""


class _Failed(Exception):
    """A channel that could not be fetched; the message names Id, colour, URL and reason."""


def _get(url: str, opts: V18Options) -> bytes:
    """One GET of a JPG, the whole body or an exception (_Retry for what another try may fix)."""
    opener = urllib.request.build_opener(fetch.CheckedRedirects(
        lambda new: allowed_url(new, opts.allow_http),
        lambda new: f"refused redirect to {new} (not https, nor http://{V18_HOST})"))
    try:
        with opener.open(fetch.request(url), timeout=opts.timeout) as resp:
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > MAX_JPG_BYTES:
                raise DataError(f"{url}: {declared} bytes, more than the limit of {MAX_JPG_BYTES} for one channel")
            chunks, total = [], 0
            for block in iter(lambda: resp.read(1 << 20), b""):
                total += len(block)
                if total > MAX_JPG_BYTES:
                    raise DataError(f"{url}: more than the limit of {MAX_JPG_BYTES} bytes for one channel")
                chunks.append(block)
    except DataError:
        raise
    except urllib.error.HTTPError as exc:
        if exc.code in PERMANENT_HTTP:
            raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise _Retry(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, timeouts, resets
        reason = getattr(exc, "reason", None) or exc
        raise _Retry(f"{url}: {reason or type(exc).__name__}") from None
    if declared and total != declared:
        raise _Retry(f"{url}: truncated body ({total} of {declared} bytes)")
    return b"".join(chunks)


def decode_resized(data: bytes, color: str, name: str, size: int) -> np.ndarray:
    """hpa.data.decode_channel's plane, resized to size x size as load_image resizes.

    A JPEG at least twice the size is decoded at a reduced scale (PIL draft: libjpeg's DCT scaling, 1/2 to
    1/8), then the same colour rule (hpa.data._to_plane) and resize apply: a 2048 px v18 channel takes
    14 ms instead of 140 ms, and every entropy-coded byte is still read, so a truncated file still fails.
    Anything else, and any file the fast path cannot read, goes through decode_channel itself, which
    gives the one error message of the project for it.
    """
    import io
    import warnings

    from PIL import Image

    from hpa.data import MAX_PIXELS, _to_plane, decode_channel
    from hpa.inputs import resize_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if im.format == "JPEG" and min(width, height) >= 2 * size and width * height <= MAX_PIXELS:
                    im.draft(im.mode, (size, size))
                    im.load()
                    return resize_image(_to_plane(im, color, name), size)
    except Exception:  # noqa: BLE001 - decode_channel below names the problem
        pass
    return resize_image(decode_channel(data, color, name), size)


def _transient(exc: BaseException) -> bool:
    """What another try may fix: network, 5xx, truncated body, undecodable data (not HTTP 404, too big, a refused
    redirect)."""
    return isinstance(exc, _Retry) or (isinstance(exc, DataError) and "corrupt or truncated" in str(exc))


def fetch_plane(image_id: str, color: str, opts: V18Options) -> np.ndarray:
    """One channel as a uint8 (size, size) plane, retried (hpa.store.retry); _Failed names Id, colour and URL."""
    url = image_url(opts.base_url, image_id, color)
    try:
        return retry(lambda: decode_resized(_get(url, opts), color, url, opts.size), f"hpav18: Id {image_id} {color}",
                     opts.tries, opts.backoff, _transient)
    except (_Retry, DataError) as exc:
        tries = f" ({opts.tries} tries)" if _transient(exc) else ""
        raise _Failed(f"Id {image_id} {color}: {exc}{tries}") from None


# -- the source -------------------------------------------------------------------------------------
def choose(df, max_images: int | None, seed: int):
    """At most max_images rows: a seeded random subset (a prefix of one seeded permutation, so a larger
    cap only adds images), kept in CSV order."""
    if max_images is None or max_images <= 0 or max_images >= len(df):
        return df
    order = np.random.default_rng(seed).permutation(len(df))[:max_images]
    return df.iloc[np.sort(order)].reset_index(drop=True)


def fetch_images(ids: list[str], opts: V18Options) -> tuple[dict[str, str], list[str]]:
    """Bring every Id into the cache; returns ({Id: phash} of the complete ones, failure lines)."""
    from tqdm.auto import tqdm

    from hpa.phash import phash_planes

    cache = Cache(opts.cache_dir, opts.size)
    journal = cache.entries()
    done = {i: journal[i].get("phash", "") for i in ids if cache.verified(i, journal.get(i))}
    todo = [i for i in ids if i not in done]
    log.info("hpav18: %d of %d images already in %s, fetching %d", len(done), len(ids), cache.dir, len(todo))
    failures: list[str] = []

    def one(image_id: str) -> tuple[str, str | None, str | None]:
        try:
            planes = {color: fetch_plane(image_id, color, opts) for color in COLORS}
        except _Failed as exc:
            return image_id, None, str(exc)
        phash = phash_planes(planes["green"], planes["blue"])
        cache.store(image_id, planes, phash)
        return image_id, phash, None

    pool = ThreadPoolExecutor(max(1, opts.workers))
    try:
        for image_id, phash, error in tqdm(pool.map(one, todo), total=len(todo), desc="hpav18", unit="img",
                                           disable=None, leave=False):
            if error is None:
                done[image_id] = phash
            else:
                log.warning("hpav18: %s", error)
                failures.append(error)
    finally:  # on Ctrl-C or an error: finish the Ids in flight (journaled), drop the queued ones
        pool.shutdown(wait=True, cancel_futures=True)
    return done, failures


def _first_image_size(folder: Path) -> int | None:
    from PIL import Image

    from hpa.data import EXTENSIONS

    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(EXTENSIONS):
            with Image.open(entry.path) as im:
                return im.size[0]
    return None


def _hash_kaggle(root: Path, ids: list[str], workers: int) -> dict[str, str]:
    """pHashes of a Kaggle-layout dataset's train images: from its phash.csv where it has one, else computed."""
    from tqdm.auto import tqdm

    from hpa.phash import phash_image, read_phash

    known = {}
    if (root / "phash.csv").is_file():
        table = read_phash(root / "phash.csv")
        known = dict(zip(table["Id"], table["phash"]))
    todo = [i for i in ids if i not in known]
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        hashes = list(tqdm(pool.map(lambda i: phash_image(root, i), todo), total=len(todo), desc="phash",
                           unit="img", disable=None, leave=False))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    known.update(zip(todo, hashes))
    return {i: known[i] for i in ids}


def acquire_hpav18(source: str, raw: Path, work: Path, opts: V18Options, merge_root: Path | None = None,
                   merge_name: str = "") -> Path:
    """Build `raw` in Kaggle layout from the v18 CSV (+ the local Kaggle-layout root `merge_root`, which messages call
    `merge_name`); returns it."""
    import pandas as pd

    from hpa.data import read_labels
    from hpa.download import write_table
    from hpa.phash import write_phash

    if not isinstance(opts.size, int) or not 8 <= opts.size <= 4096:
        raise ConfigError(f"hpav18: --size must be 8..4096 pixels, got {opts.size!r}")
    if not allowed_url(opts.base_url, opts.allow_http):
        raise ConfigError(f"hpav18: refused base URL {fetch.shown_source(opts.base_url)}: https://, http://{V18_HOST}, "
                          "or plain http to 127.0.0.1 with --allow-http (tests)")
    v18 = choose(read_v18_csv(source, work, opts.allow_http, Path(opts.cache_dir)), opts.max_images, opts.seed)
    for image_id in v18["Id"]:
        image_url(opts.base_url, image_id, "red")  # every Id has the <dir>_<rest> form, before any request
    kaggle = None
    if merge_root is not None:
        shown = merge_name or str(merge_root)
        kaggle = read_labels(merge_root / "train.csv")
        kaggle = kaggle[["Id", "Target"]].assign(
            source=kaggle["source"].astype(str) if "source" in kaggle.columns else MERGED_SOURCE)
        if not (merge_root / "sample_submission.csv").is_file():
            raise DataError(f"merge_with {shown}: no sample_submission.csv (test split); the merged dataset takes its "
                            "test split from it, since the v18 images have none")
        clash = sorted(set(kaggle["Id"]) & set(v18["Id"]))
        if clash:
            raise DataError(f"merge_with {shown}: Id {clash[0]!r} is in both its train.csv and the v18 CSV")
        existing = _first_image_size(merge_root / "train")
        if existing is not None and existing != opts.size:
            raise ConfigError(f"merge_with {shown}: its images are {existing}x{existing} pixels but --size is "
                              f"{opts.size}; pass --size {existing} so that the merged dataset has one size")

    hashes, failures = fetch_images(list(v18["Id"]), opts)
    if failures and not opts.skip_broken:
        raise DataError(f"hpav18: {len(failures)} of {len(v18)} images failed, first: {failures[0]}; re-run to "
                        f"retry only those (the others are cached in {Cache(opts.cache_dir, opts.size).dir}), or "
                        "pass --skip-broken to leave them out")
    if failures:
        log.warning("hpav18: leaving out %d image(s) that could not be fetched", len(failures))
    v18 = v18[v18["Id"].isin(hashes)]
    if v18.empty:
        raise DataError("hpav18: no image could be fetched")

    train = raw / "train"
    train.mkdir(parents=True)
    cache = Cache(opts.cache_dir, opts.size)
    for image_id in v18["Id"]:
        for color in COLORS:
            (train / f"{image_id}_{color}.png").symlink_to(cache.path(image_id, color))
    table = v18[["Id", "Target"]].assign(source=V18_SOURCE)
    phash = pd.DataFrame({"Id": v18["Id"], "phash": [hashes[i] for i in v18["Id"]]})
    if kaggle is not None:
        for entry in os.scandir(merge_root / "train"):
            (train / entry.name).symlink_to(entry.path)
        for name in ("sample_submission.csv", "test_labels.csv", "test"):
            if (merge_root / name).exists():
                (raw / name).symlink_to(merge_root / name)
        kaggle_hashes = _hash_kaggle(merge_root, list(kaggle["Id"]), opts.workers)
        table = pd.concat([kaggle, table], ignore_index=True)
        phash = pd.concat([pd.DataFrame({"Id": kaggle["Id"], "phash": [kaggle_hashes[i] for i in kaggle["Id"]]}),
                           phash], ignore_index=True)
    write_table(table, raw / "train.csv", "Target")
    write_phash(phash, raw / "phash.csv")
    log.info("hpav18: %d v18 images%s in Kaggle layout at %d px", len(v18),
             f" + {len(kaggle)} from {merge_name or merge_root}" if kaggle is not None else "", opts.size)
    return raw
