"""The label tables of the HPA v18 source (hpa.hpav18): `hpav18:<name>` for a pinned, checksummed published table,
or `hpav18:<path | s3:// URI | https:// URL>` for one of your own (offline use, tests).

`hpav18:pudae` is the de-duplicated table the 3rd place solution ships (pudae/kaggle-hpa data/HPAv18RBGY_wodpl.csv,
"wodpl": without duplicates), fetched from its raw URL at a fixed commit, refused unless its sha256 is the recorded
one (one DataError line), and kept in the v18 cache so a re-run (or an offline one after the first) reads it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpa import fetch
from hpa.committed import private_dir
from hpa.errors import ConfigError
from hpa.store import atomic_write, sha256_file

PREFIX = "hpav18:"
MAX_CSV_BYTES = 64 << 20


@dataclass(frozen=True)
class PinnedCsv:
    """A published v18 label table: its raw URL at a fixed commit and the sha256 of those bytes."""

    url: str
    sha256: str
    rows: int
    origin: str


# sha256 computed from the file at that commit (git show 3e7888c:data/HPAv18RBGY_wodpl.csv | sha256sum: 1,454,602
# bytes, 74,606 rows, no repeated Id). data/external.csv beside it holds the same rows reordered by its
# make_external_csv.py (the images pudae downloaded).
PINNED_CSVS = {
    "pudae": PinnedCsv(
        url="https://raw.githubusercontent.com/pudae/kaggle-hpa/3e7888cadaa18403231136800bfd1ac324d6db66/"
            "data/HPAv18RBGY_wodpl.csv",
        sha256="d33170f1c1c4ebfdc1475caf9fdee3d9bf6fa8bc6408a8953d21419e91a0c275", rows=74606,
        origin="pudae/kaggle-hpa (3rd place) data/HPAv18RBGY_wodpl.csv at commit 3e7888c"),
}


def csv_spec(source: str) -> str:
    """What follows `hpav18:`: a pinned name (PINNED_CSVS), a path, an s3:// URI or an https:// URL; one ConfigError
    line for an empty one or a bare word that names no pinned table (checked before anything is fetched)."""
    spec = source[len(PREFIX):] if source.startswith(PREFIX) else source
    if not spec:
        raise ConfigError("hpav18 source needs the CSV: hpav18:<pinned name: "
                          f"{', '.join(PINNED_CSVS)}> or hpav18:<path, s3:// or https:// URL of HPAv18RBGY_wodpl.csv>")
    if spec not in PINNED_CSVS and "/" not in spec and "." not in spec:
        raise ConfigError(f"hpav18:{spec}: no pinned v18 table of that name (pinned: {', '.join(PINNED_CSVS)}); "
                          "a CSV of your own is hpav18:<path or URL ending in .csv>")
    return spec


def read_v18_csv(csv: str, work: Path, allow_http: bool, cache_dir: Path | None = None):
    """The v18 labels (read_labels frame) from a pinned name (fetched once, sha256-checked, kept in `cache_dir`),
    a local path, an s3:// URI or an https:// URL."""
    from hpa.data import read_labels

    csv = csv_spec(csv)
    if csv in PINNED_CSVS:
        pinned = PINNED_CSVS[csv]
        cached = private_dir(cache_dir or work) / f"{csv}-{pinned.sha256[:16]}.csv"
        if not (cached.is_file() and sha256_file(cached) == pinned.sha256):
            local = work / "hpav18.csv"
            fetch.fetch_url(pinned.url, local, MAX_CSV_BYTES, sha256=pinned.sha256, allow_http=allow_http)
            atomic_write(cached, local.read_bytes())
        return read_labels(cached, where=f"hpav18:{csv} ({fetch.shown_source(pinned.url)})")
    if csv.startswith(("https://", "http://")):
        local = work / "hpav18.csv"
        fetch.fetch_url(csv, local, MAX_CSV_BYTES, allow_http=allow_http)
        return read_labels(local, where=fetch.shown_source(csv))
    return read_labels(csv)
