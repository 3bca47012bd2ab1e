"""HPA v18 external source (issue 16): download from a loopback stand-in of v18.proteinatlas.org, conversion
to the Kaggle layout, resume, broken JPGs, --max-images, merge with a Kaggle-layout dataset, perceptual-hash
duplicate groups, and `hpa split` keeping each group in one fold.

The server serves real-format files: one colourised RGB JPG per channel (red -> (v,0,0), green -> (0,v,0),
blue -> (0,0,v), yellow -> (v,v,0)) of HPA-like synthetic images, under /images/<dir>/<rest>_<color>.jpg.
Nothing here reaches the internet: the base URL is the loopback server's.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa import download as dl
from hpa import hpav18
from hpa.hpav18_cache import Cache
from hpa.cli import main as cli_main
from hpa.data import decode_channel, read_labels
from hpa.inputs import resize_image
from hpa.errors import ConfigError, DataError
from hpa.labels import COLORS
from hpa.phash import DEFAULT_THRESHOLD, duplicate_groups, near_pairs, phash_planes, read_phash
from hpa.split import make_split
from hpa.store import open_store
from hpa.synthetic import render_image, sample_labels

sys.path.insert(0, str(Path(__file__).parent))
from loopback import LoopbackServer  # noqa: E402

SOURCE_SIDE = 128  # served JPG side; the dataset is converted to SIZE
SIZE = 64
IDS = ["10580_1610_C1_1", "10580_1610_C1_2", "1183_50_A11_1", "28086_1695_H1_18_cr57d81acbe63b0",
       "3064_1198_C4_1", "42720_491_G8_1", "47864_781_D11_1", "19206_154_C9_2"]
EXACT_COPY = ("10580_1610_C1_1", "1183_50_A11_1")  # the second serves the first's bytes
NEAR_COPY = ("3064_1198_C4_1", "47864_781_D11_1")  # the second: brightened, noised, recompressed


def colourise(plane: np.ndarray, color: str) -> np.ndarray:
    zero = np.zeros_like(plane)
    rgb = {"red": (plane, zero, zero), "green": (zero, plane, zero), "blue": (zero, zero, plane),
           "yellow": (plane, plane, zero)}[color]
    return np.stack(rgb, -1)


def jpg(plane: np.ndarray, color: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(colourise(plane, color)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def v18_path(image_id: str, color: str) -> str:
    folder, _, rest = image_id.partition("_")
    return f"/images/{folder}/{rest}_{color}.jpg"


def build_site(ids, seed: int = 0):
    """{url path: JPG bytes}, labels {Id: Target in v18 order (unsorted)} and the source planes."""
    rng = np.random.default_rng(seed)
    labels = sample_labels(len(ids), rng)
    planes = {i: render_image(lab, SOURCE_SIDE, np.random.default_rng([seed, k])) for k, (i, lab)
              in enumerate(zip(ids, labels))}
    files = {}
    for image_id in ids:
        for color, plane in zip(COLORS, planes[image_id]):
            files[v18_path(image_id, color)] = jpg(plane, color)
    a, b = EXACT_COPY
    if a in planes and b in planes:
        planes[b] = planes[a]
        for color in COLORS:
            files[v18_path(b, color)] = files[v18_path(a, color)]
    a, b = NEAR_COPY
    if a in planes and b in planes:
        noise = np.random.default_rng(9).normal(0, 2.0, planes[a].shape)
        planes[b] = np.clip(planes[a] * 1.08 + noise + 0.5, 0, 255).astype(np.uint8)
        for color, plane in zip(COLORS, planes[b]):
            files[v18_path(b, color)] = jpg(plane, color, quality=70)
    targets = {i: " ".join(str(c) for c in reversed(lab)) for i, lab in zip(ids, labels)}  # v18 lists 13 25 0
    return files, targets, planes


class Site:
    """The loopback v18 image host: counts requests per path; per-path faults."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[str] = []
        self.status: dict[str, int] = {}  # path -> HTTP status to answer instead
        self.hang_after: int | None = None  # requests beyond this count wait until released
        self.reached = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with site.lock:
                    site.requests.append(self.path)
                    n = len(site.requests)
                if site.hang_after is not None and n > site.hang_after:
                    site.reached.set()
                    site.release.wait(30)
                    return
                status = site.status.get(self.path)
                body = site.files.get(self.path)
                if status or body is None:
                    self.send_response(status or 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = LoopbackServer(Handler, lifetime=300)
        self.base = self.server.url + "/images/"

    def count(self, image_id: str) -> int:
        prefix = v18_path(image_id, "")[:-len("_.jpg")]
        return sum(1 for p in self.requests if p.rsplit("_", 1)[0] == prefix)

    def __enter__(self):
        self.server.__enter__()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.__exit__(*exc)


@pytest.fixture(scope="module")
def site_files():
    return build_site(IDS)


@pytest.fixture
def site(site_files, monkeypatch, tmp_path):
    files, _, _ = site_files
    monkeypatch.setenv(hpav18.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(hpav18.BACKOFF_ENV, "0.01")
    with Site(files) as s:
        monkeypatch.setenv(hpav18.BASE_URL_ENV, s.base)
        yield s


def write_csv(path: Path, targets: dict[str, str], ids=None) -> Path:
    ids = list(targets) if ids is None else ids
    path.write_text("Id,Target\n" + "".join(f"{i},{targets[i]}\n" for i in ids), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# URL rule, pHash and grouping


def test_url_pattern_and_host_rule():
    assert hpav18.DEFAULT_BASE_URL == "https://v18.proteinatlas.org/images/"
    assert (hpav18.image_url(hpav18.DEFAULT_BASE_URL, "10580_1610_C1_1", "red")
            == "https://v18.proteinatlas.org/images/10580/1610_C1_1_red.jpg")
    assert (hpav18.image_url("http://h/images", "11651_1732_F3_13_cr580610dc203b9", "yellow")
            == "http://h/images/11651/1732_F3_13_cr580610dc203b9_yellow.jpg")
    with pytest.raises(DataError, match="not <plate>_<position>_<sample>"):
        hpav18.image_url("https://h/", "abcdef", "red")
    assert hpav18.allowed_url("http://v18.proteinatlas.org/images/1/2_red.jpg", allow_http=False)
    assert not hpav18.allowed_url("http://example.org/images/1/2_red.jpg", allow_http=True)
    assert not hpav18.allowed_url("http://127.0.0.1:9/images/", allow_http=False)
    assert hpav18.allowed_url("http://127.0.0.1:9/images/", allow_http=True)


def test_phash_separates_copies_from_other_images(site_files):
    _, _, planes = site_files

    def hashed(image):
        return phash_planes(resize_image(image[1], SIZE), resize_image(image[2], SIZE))

    def bits(a, b):
        return bin(int(a, 16) ^ int(b, 16)).count("1")

    hashes = {i: hashed(p) for i, p in planes.items()}
    assert bits(hashes[EXACT_COPY[0]], hashes[EXACT_COPY[1]]) == 0
    assert bits(hashes[NEAR_COPY[0]], hashes[NEAR_COPY[1]]) <= DEFAULT_THRESHOLD
    others = [bits(hashes[a], hashes[b]) for k, a in enumerate(IDS) for b in IDS[k + 1:]
              if {a, b} not in ({*EXACT_COPY}, {*NEAR_COPY})]
    assert min(others) > 2 * DEFAULT_THRESHOLD
    flat = np.full((SIZE, SIZE), 7, np.uint8)
    assert phash_planes(flat, flat) == ""  # a blank image has no hash (and never joins a group)


def test_duplicate_groups_are_transitive_and_exact():
    a = 0x0F0F_0F0F_0F0F_0F0F
    hashes = [f"{a:016x}", f"{a ^ 0b111:016x}", f"{a ^ 0b111 ^ (0b111 << 20):016x}",  # chain: 3 + 3 bits
              f"{~a & (2**64 - 1):016x}", "", "", f"{a:016x}"]
    groups = duplicate_groups(hashes, threshold=3)
    assert groups.tolist() == [0, 0, 0, 1, 2, 3, 0]  # transitive; rows without a hash stay alone
    assert duplicate_groups(hashes, threshold=0).tolist() == [0, 1, 2, 3, 4, 5, 0]
    with pytest.raises(ConfigError, match="duplicate threshold"):
        duplicate_groups(hashes, threshold=-1)
    rng = np.random.default_rng(0)
    many = np.unique(rng.integers(0, 2**63, 4000, dtype=np.uint64))
    many[1::50] = many[0::50][: len(many[1::50])] ^ np.uint64(0b10110)  # planted pairs 3 bits apart
    many = np.unique(many)
    found = near_pairs(many, 5)
    brute = np.argwhere(np.triu(np.bitwise_count(many[:, None] ^ many[None, :]) <= 5, 1))
    assert np.array_equal(found, brute) and len(found) >= 70


def test_grouped_split_keeps_groups_and_is_ungrouped_without_duplicates():
    from test_split import label_table

    table = label_table(3000, seed=5)
    assert make_split(table, 5, 0, groups=np.arange(3000)[::-1]).equals(make_split(table, 5, 0))
    rng = np.random.default_rng(1)
    groups = np.arange(3000)
    groups[rng.choice(3000, 400, replace=False)] = rng.choice(3000, 400)
    split = make_split(table, 5, 0, groups)
    assert (split.groupby(groups)["fold"].nunique() == 1).all()
    assert np.abs(np.bincount(split["fold"]) - 600).max() <= 12
    shuffled = table.sample(frac=1.0, random_state=2)
    again = make_split(shuffled, 5, 0, groups[shuffled.index.to_numpy()])
    assert again.set_index("Id")["fold"].sort_index().equals(split.set_index("Id")["fold"].sort_index())
    assert not make_split(table, 5, 1, groups)["fold"].equals(split["fold"])


# ---------------------------------------------------------------------------------------------------------
# The download source end to end


def test_download_converts_hashes_and_split_keeps_duplicates_together(site, site_files, tmp_path, capsys):
    _, targets, planes = site_files
    csv = write_csv(tmp_path / "HPAv18RBGY_wodpl.csv", targets)
    out = tmp_path / "v18"
    start = time.perf_counter()
    assert cli_main(["download", "--source", f"hpav18:{csv}", "--dest", str(out), "--size", str(SIZE),
                     "--allow-http", "--workers", "4"]) == 0
    seconds = time.perf_counter() - start
    assert f"{len(IDS)} train + 0 test images" in capsys.readouterr().out
    assert len(site.requests) == 4 * len(IDS)
    labels = read_labels(out / "train.csv")
    assert list(labels["Id"]) == IDS
    assert labels.set_index("Id")["Target"].to_dict() == {
        i: " ".join(sorted(t.split(), key=int)) for i, t in targets.items()}
    for image_id in IDS:
        for k, color in enumerate(COLORS):
            with Image.open(out / "train" / f"{image_id}_{color}.png") as im:
                assert (im.format, im.mode, im.size) == ("PNG", "L", (SIZE, SIZE))
                stored = np.asarray(im).astype(int)
            expected = resize_image(planes[image_id][k], SIZE).astype(int)
            # the matching plane of the colourised JPG (up to JPEG's chroma loss), not its luminance
            assert np.abs(stored - expected).mean() < 6 and np.corrcoef(stored.ravel(), expected.ravel())[0, 1] > 0.9
    manifest = open_store(out).read_manifest()
    assert {o["key"] for o in manifest["objects"]} == {"train.csv", "phash.csv",
                                                       *(f"train/{i}_{c}.png" for i in IDS for c in COLORS)}
    assert manifest["meta"]["size"] == SIZE and manifest["meta"]["source"] == f"hpav18:{csv}"
    hashes = read_phash(out / "phash.csv")
    assert list(hashes["Id"]) == IDS and hashes["phash"].str.fullmatch("[0-9a-f]{16}").all()

    assert cli_main(["split", "--data", str(out), "--folds", "3", "--seed", "0",
                     "--out", str(tmp_path / "split.csv")]) == 0
    assert "2 duplicate groups kept in one fold each" in capsys.readouterr().out
    fold = pd.read_csv(tmp_path / "split.csv", dtype={"Id": str}).set_index("Id")["fold"]
    assert fold[EXACT_COPY[0]] == fold[EXACT_COPY[1]] and fold[NEAR_COPY[0]] == fold[NEAR_COPY[1]]
    assert sorted(set(fold)) == [0, 1, 2]
    print(f"\nhpav18: {len(IDS)} images x 4 channels fetched, converted, hashed and committed in {seconds:.2f} s")

    n = len(site.requests)  # a second run fetches nothing: every Id is in the cache journal
    result = dl.download(f"hpav18:{csv}", str(out), size=SIZE, allow_http=True)
    assert len(site.requests) == n and result["uploaded"] == 0


def test_max_images_is_a_seeded_subset(site, site_files, tmp_path):
    _, targets, _ = site_files
    csv = write_csv(tmp_path / "v18.csv", targets)
    result = dl.download(f"hpav18:{csv}", str(tmp_path / "three"), size=SIZE, allow_http=True, max_images=3)
    chosen = list(read_labels(tmp_path / "three" / "train.csv")["Id"])
    assert result["n_train"] == 3 and len(site.requests) == 12
    assert chosen == [i for i in IDS if i in chosen]  # CSV order kept
    dl.download(f"hpav18:{csv}", str(tmp_path / "five"), size=SIZE, allow_http=True, max_images=5)
    five = list(read_labels(tmp_path / "five" / "train.csv")["Id"])
    assert set(chosen) <= set(five) and len(site.requests) == 20  # a larger cap only adds images
    with pytest.raises(ConfigError, match="hpav18:<csv> source only"):
        dl.download("synthetic", str(tmp_path / "s"), n_train=4, n_test=0, max_images=3)


def test_broken_jpg_is_retried_then_reported_in_one_line(site, site_files, tmp_path, capsys):
    _, targets, _ = site_files
    victim = IDS[2]
    path = v18_path(victim, "green")
    site.files[path] = site.files[path][: len(site.files[path]) // 2]  # truncated JPG, honest Content-Length
    csv = write_csv(tmp_path / "v18.csv", targets)
    rc = cli_main(["download", "--source", f"hpav18:{csv}", "--dest", str(tmp_path / "out"), "--size", str(SIZE),
                   "--allow-http", "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert f"1 of {len(IDS)} images failed" in line and f"Id {victim} green" in line
    assert f"{site.base.rstrip('/')}{path[len('/images'):]}" in line and "corrupt or truncated" in line
    assert "(3 tries)" in line and "--skip-broken" in line
    assert site.requests.count(path) == 3
    assert not (tmp_path / "out" / "manifest.json").exists()

    n = len(site.requests)
    result = dl.download(f"hpav18:{csv}", str(tmp_path / "out"), size=SIZE, allow_http=True, skip_broken=True)
    assert len(site.requests) - n <= 4 and site.requests[n:].count(path) == 3  # only the broken Id again
    assert result["n_train"] == len(IDS) - 1
    assert victim not in set(read_labels(tmp_path / "out" / "train.csv")["Id"])
    assert victim not in set(read_phash(tmp_path / "out" / "phash.csv")["Id"])


def test_missing_image_is_not_retried_and_a_fixed_site_resumes(site, site_files, tmp_path):
    _, targets, _ = site_files
    victim = IDS[5]
    site.status[v18_path(victim, "yellow")] = 404
    site.status[v18_path(IDS[6], "red")] = 503  # transient: retried 3 times
    csv = write_csv(tmp_path / "v18.csv", targets)
    with pytest.raises(DataError, match=rf"2 of {len(IDS)} images failed, first: Id .* HTTP (404|503)") as info:
        dl.download(f"hpav18:{csv}", str(tmp_path / "out"), size=SIZE, allow_http=True, workers=1)
    assert "\n" not in str(info.value) and "re-run to retry only those" in str(info.value)
    assert site.requests.count(v18_path(victim, "yellow")) == 1
    assert site.requests.count(v18_path(IDS[6], "red")) == 3
    site.status.clear()
    before = {i: site.count(i) for i in IDS}
    dl.download(f"hpav18:{csv}", str(tmp_path / "out"), size=SIZE, allow_http=True)
    fetched = {i: site.count(i) - before[i] for i in IDS}
    assert fetched == {i: (4 if i in (victim, IDS[6]) else 0) for i in IDS}
    assert len(read_labels(tmp_path / "out" / "train.csv")) == len(IDS)


def test_killed_download_resumes_with_only_the_rest(site, site_files, tmp_path):
    """A real kill -9 mid-way: Ids journaled before the kill are not fetched again; the Id in flight is fetched
    again in full (a partial file of it never counts); a cached PNG that no longer matches its journal line is
    fetched again."""
    _, targets, _ = site_files
    csv = write_csv(tmp_path / "v18.csv", targets)
    site.hang_after = 10  # Ids 0 and 1 complete (8 requests), Id 2's red arrives, its green hangs
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the killed run's temporary directory stays in tmp_path
    proc = subprocess.Popen([sys.executable, "-m", "hpa", "download", "--source", f"hpav18:{csv}", "--dest",
                             str(tmp_path / "out"), "--size", str(SIZE), "--allow-http", "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert site.reached.wait(60), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()
    site.hang_after = None
    site.release.set()
    cache = Cache(Path(os.environ[hpav18.CACHE_ENV]), SIZE)
    assert set(cache.entries()) == set(IDS[:2])
    assert not any(cache.dir.glob(f"*{IDS[2]}*"))  # the Id in flight left nothing in the cache
    cache.path(IDS[2], "red").write_bytes(cache.path(IDS[1], "red").read_bytes()[:100])  # a partial file
    with open(cache.journal, "a") as f:
        f.write('{"id": "torn')  # a line cut by a kill is ignored
    cache.path(IDS[0], "green").write_bytes(b"garbage")  # no longer what the journal recorded
    before = {i: site.count(i) for i in IDS}
    dl.download(f"hpav18:{csv}", str(tmp_path / "out"), size=SIZE, allow_http=True, workers=2)
    fetched = {i: site.count(i) - before[i] for i in IDS}
    assert fetched == {i: (0 if i == IDS[1] else 4) for i in IDS}
    assert open_store(tmp_path / "out").verify() == 2 + 4 * len(IDS)
    with Image.open(tmp_path / "out" / "train" / f"{IDS[2]}_red.png") as im:
        assert im.size == (SIZE, SIZE)


def test_merge_with_kaggle_dataset_groups_across_sources(site, site_files, tmp_path, capsys):
    from hpa.synthetic import generate

    kaggle = tmp_path / "kaggle"
    generate(kaggle, 10, 3, size=SIZE, seed=4)
    kaggle_labels = read_labels(kaggle / "train.csv")
    twin = kaggle_labels["Id"][0]  # served again by the v18 site under another Id, upscaled, as JPGs
    copy_id = "99999_1_A1_1"
    for color in COLORS:
        plane = np.asarray(Image.open(kaggle / "train" / f"{twin}_{color}.png"))
        big = np.asarray(Image.fromarray(plane).resize((SOURCE_SIDE, SOURCE_SIDE), Image.Resampling.BICUBIC))
        site.files[v18_path(copy_id, color)] = jpg(big, color)
    _, targets, _ = site_files
    targets = {**targets, copy_id: kaggle_labels["Target"][0]}
    csv = write_csv(tmp_path / "v18.csv", targets)

    with pytest.raises(ConfigError, match=f"images are {SIZE}x{SIZE} pixels but --size is 128; pass --size {SIZE}"):
        dl.download(f"hpav18:{csv}", str(tmp_path / "bad"), size=128, allow_http=True, merge_with=str(kaggle))
    assert site.requests == []  # refused before fetching anything
    result = dl.download(f"hpav18:{csv}", str(tmp_path / "merged"), size=SIZE, allow_http=True,
                         merge_with=str(kaggle))
    out = tmp_path / "merged"
    train = read_labels(out / "train.csv")
    assert list(train["Id"]) == list(kaggle_labels["Id"]) + list(targets)
    assert (result["n_train"], result["n_test"]) == (10 + len(targets), 3)
    assert (out / "sample_submission.csv").read_text() == (kaggle / "sample_submission.csv").read_text()
    assert len(list((out / "test").iterdir())) == 12 and (out / "test_labels.csv").is_file()
    hashes = read_phash(out / "phash.csv").set_index("Id")["phash"]
    assert list(hashes.index) == list(train["Id"])

    assert cli_main(["split", "--data", str(out), "--folds", "4", "--out", str(tmp_path / "split.csv")]) == 0
    assert "3 duplicate groups" in capsys.readouterr().out
    fold = pd.read_csv(tmp_path / "split.csv", dtype={"Id": str}).set_index("Id")["fold"]
    assert fold[twin] == fold[copy_id]

    kaggle_only = dl.download(str(kaggle), str(tmp_path / "plain"))  # other sources: unchanged, no phash.csv
    assert kaggle_only["objects"] == 3 + 13 * 4 and not (tmp_path / "plain" / "phash.csv").exists()


def test_refused_hosts_and_bad_csv(tmp_path, monkeypatch):
    monkeypatch.setenv(hpav18.CACHE_ENV, str(tmp_path / "cache"))
    csv = write_csv(tmp_path / "v18.csv", {"10580_1610_C1_1": "0"})
    monkeypatch.setenv(hpav18.BASE_URL_ENV, "http://example.org/images/")
    with pytest.raises(ConfigError, match="refused base URL http://example.org/images/"):
        dl.download(f"hpav18:{csv}", str(tmp_path / "out"), size=SIZE, allow_http=True)
    monkeypatch.setenv(hpav18.BASE_URL_ENV, "http://127.0.0.1:9/images/")
    with pytest.raises(ConfigError, match="refused base URL"):
        dl.download(f"hpav18:{csv}", str(tmp_path / "out"), size=SIZE)  # loopback http needs --allow-http
    bad = write_csv(tmp_path / "bad.csv", {"nounderscore": "0"})
    with pytest.raises(DataError, match="'nounderscore' is not <plate>_<position>_<sample>"):
        dl.download(f"hpav18:{bad}", str(tmp_path / "out"), size=SIZE, allow_http=True)
    with pytest.raises(DataError, match="missing.csv: file not found"):
        dl.download(f"hpav18:{tmp_path / 'missing.csv'}", str(tmp_path / "out"), size=SIZE, allow_http=True)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.png"))


def test_merge_with_committed_s3_dataset_into_s3(site, site_files, tmp_path, s3_bucket):
    """The pipeline's shape: the Kaggle dataset and the merged result both live in S3 (committed, verified)."""
    from hpa.split import split_dataset
    from hpa.store import read_bytes
    from hpa.synthetic import generate

    generate(tmp_path / "kaggle", 6, 2, size=SIZE, seed=5)
    dl.download(str(tmp_path / "kaggle"), s3_bucket + "kaggle")
    _, targets, _ = site_files
    csv = write_csv(tmp_path / "v18.csv", targets, ids=IDS[:4])
    result = dl.download(f"hpav18:{csv}", s3_bucket + "merged", size=SIZE, allow_http=True,
                         merge_with=s3_bucket + "kaggle")
    assert (result["n_train"], result["n_test"]) == (10, 2)
    assert open_store(s3_bucket + "merged").verify() == result["objects"] == 4 + 12 * 4
    summary = split_dataset(s3_bucket + "merged", folds=3, seed=0, out=str(tmp_path / "split.csv"))
    assert summary["rows"] == 10 and summary["duplicate_groups"] == 1  # EXACT_COPY: IDS[0] and IDS[2]
    assert read_bytes(s3_bucket + "merged/phash.csv").decode().startswith("Id,phash\n")


def test_reduced_scale_decode_matches_the_full_decode(site_files):
    _, _, planes = site_files
    plane = np.asarray(Image.fromarray(planes[IDS[0]][3]).resize((512, 512), Image.Resampling.BICUBIC))
    data = jpg(plane, "yellow")
    fast = hpav18.decode_resized(data, "yellow", "x.jpg", 128).astype(int)  # JPEG decoded at 1/4 scale
    full = resize_image(decode_channel(data, "yellow", "x.jpg"), 128).astype(int)
    assert fast.shape == (128, 128) and np.abs(fast - full).mean() < 3
    png = io.BytesIO()
    Image.fromarray(plane).save(png, format="PNG")
    assert np.array_equal(hpav18.decode_resized(png.getvalue(), "yellow", "x.png", 128),
                          resize_image(decode_channel(png.getvalue(), "yellow", "x.png"), 128))
    with pytest.raises(DataError, match=r"x.jpg: corrupt or truncated image"):
        hpav18.decode_resized(data[: len(data) // 2], "yellow", "x.jpg", 128)
