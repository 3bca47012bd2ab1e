"""Issue 22, the data side of the journeys, at library level (the lead wires them into the pipeline):

- J3 / item 3: `data_source=hpav18:<csv>` + `merge_with=<committed Kaggle-layout dataset>` is ONE committed dataset
  (Kaggle train + v18 train, rows marked by `source`; Kaggle test as test); v18 images that are exact or near copies
  of Kaggle images land in the fold of their twin; pack works on it (it has a test split); hpav18 alone is refused
  before any request; the pinned v18 table is sha256-checked.
- J4 / item 4: `weights` per model: two models each from its own local file load; swapping the files is refused up
  front (before any download) with one line naming model and file.
- Item 10: re-downloading a changed dataset and re-packing into an existing prefix succeed without any DELETE.
  SeaweedFS's identities cannot express "Write without Delete" (its S3 router authorises DeleteObject with the
  same `Write` action as PutObject: weed/s3api/s3api_server.go), so "no delete" is modelled by a store that refuses
  every delete with AccessDenied, the answer a KFP 2.15/2.16 profile key gets (pipelines-profile-controller/sync.py
  grants s3:Put*, s3:Get*, s3:List* only: 2.15.0 lines 364-367, 2.16.0 lines 396-399).

The v18 host is the loopback stand-in of tests/test_hpav18.py (colourised JPGs under /images/<dir>/<rest>_<color>.jpg).
"""

from __future__ import annotations

import hashlib
import json
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hpa import download as dl
from hpa import hpav18, hpav18_csv, pack, shards
from hpa.committed import dataset_state, manifest_sha256, open_dataset
from hpa.data import read_labels
from hpa.errors import ConfigError, DataError, StoreError
from hpa.labels import COLORS
from hpa.localstore import LocalStore
from hpa.models import ARCHS, create_model
from hpa.s3store import S3Store
from hpa.split import split_dataset
from hpa.store import MANIFEST, open_store
from hpa.weights_check import check_weights

sys.path.insert(0, str(Path(__file__).parent))
from loopback import LoopbackServer  # noqa: E402
from test_hpav18 import SOURCE_SIDE, Site, jpg, v18_path, write_csv  # noqa: E402

SIZE = 32
V18_OWN = ["10580_1610_C1_1", "1183_50_A11_1", "3064_1198_C4_1", "42720_491_G8_1"]
EXACT, NEAR = "99999_1_A1_1", "99999_2_B2_1"  # v18 Ids serving copies of two Kaggle train images


def _planes(root: Path, image_id: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(root / "train" / f"{image_id}_{c}.png")) for c in COLORS]


def _site_files(kaggle: Path, kaggle_ids: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The v18 host: V18_OWN as unrelated synthetic images, EXACT an upscaled copy of a Kaggle image, NEAR a
    brightened, noised, recompressed copy of another one."""
    from hpa.synthetic import render_image, sample_labels

    rng = np.random.default_rng(7)
    files, targets = {}, {}
    for k, (image_id, labels) in enumerate(zip(V18_OWN, sample_labels(len(V18_OWN), rng))):
        for color, plane in zip(COLORS, render_image(labels, SOURCE_SIDE, np.random.default_rng([7, k]))):
            files[v18_path(image_id, color)] = jpg(plane, color)
        targets[image_id] = " ".join(map(str, labels))
    kaggle_targets = read_labels(kaggle / "train.csv").set_index("Id")["Target"]
    for twin, copy_id, near in ((kaggle_ids[0], EXACT, False), (kaggle_ids[1], NEAR, True)):
        for color, plane in zip(COLORS, _planes(kaggle, twin)):
            big = np.asarray(Image.fromarray(plane).resize((SOURCE_SIDE, SOURCE_SIDE), Image.Resampling.BICUBIC))
            if near:
                noise = np.random.default_rng(3).normal(0, 2.0, big.shape)
                big = np.clip(big * 1.08 + noise + 0.5, 0, 255).astype(np.uint8)
            files[v18_path(copy_id, color)] = jpg(big, color, quality=70 if near else 90)
        targets[copy_id] = kaggle_targets[twin]
    return files, targets


@pytest.fixture
def v18_env(monkeypatch, tmp_path):
    monkeypatch.setenv(hpav18.CACHE_ENV, str(tmp_path / "v18-cache"))
    monkeypatch.setenv(hpav18.BACKOFF_ENV, "0.01")


def test_j3_hpav18_merged_with_a_committed_kaggle_dataset(v18_env, s3_bucket, tmp_path, monkeypatch):
    from hpa.synthetic import generate

    generate(tmp_path / "kaggle", 12, 4, size=SIZE, seed=11)
    kaggle_uri = dl.download(str(tmp_path / "kaggle"), s3_bucket + "datasets/kaggle")["uri"]
    kaggle_ids = list(read_labels(tmp_path / "kaggle" / "train.csv")["Id"])
    files, targets = _site_files(tmp_path / "kaggle", kaggle_ids)
    csv = write_csv(tmp_path / "my_v18.csv", targets)
    store = s3_bucket + "hpa"
    args = dict(source=f"hpav18:{csv}", store_uri=store, n_train=0, n_test=0, image_size=SIZE, seed=0)
    with Site(files) as site:
        monkeypatch.setenv(hpav18.BASE_URL_ENV, site.base)
        # hpav18 alone has no test split: refused before any request, in one line
        with pytest.raises(ConfigError, match=r"^merge_with: data_source=hpav18:.*needs merge_with=.*no test split$"):
            dl.download_task(**args, allow_http=True)
        assert site.requests == []
        out = dl.download_task(**args, merge_with=kaggle_uri, allow_http=True)
        assert len(site.requests) == 4 * len(targets)

    data_uri = out["data_uri"]
    assert data_uri == dl.dataset_uri(store, args["source"], 0, 0, SIZE, 0, merge_with=kaggle_uri)
    assert "+" in data_uri.rsplit("/", 1)[-1] and data_uri != dl.dataset_uri(store, args["source"], 0, 0, SIZE, 0)
    state = dataset_state(**args, merge_with=kaggle_uri)  # what check-params sees before the run: the same prefix
    assert (state["data_uri"], state["manifest_sha256"]) == (data_uri, out["manifest_sha256"])
    ds = open_dataset(data_uri)
    train = read_labels(ds.store.join("train.csv"))
    assert list(train["Id"]) == kaggle_ids + list(targets)
    assert train.set_index("Id")["source"].to_dict() == {**{i: "kaggle" for i in kaggle_ids},
                                                         **{i: "hpav18" for i in targets}}
    assert (out["metadata"]["n_train"], out["metadata"]["n_test"]) == (12 + 6, 4)
    assert ds.read_bytes("sample_submission.csv") == (tmp_path / "kaggle" / "sample_submission.csv").read_bytes()
    assert ds.manifest["meta"]["merge_with"] == kaggle_uri

    summary = split_dataset(data_uri, folds=3, seed=0, out=str(tmp_path / "split.csv"))
    assert summary["duplicate_groups"] >= 2
    fold = pd.read_csv(tmp_path / "split.csv", dtype={"Id": str}).set_index("Id")["fold"]
    assert fold[kaggle_ids[0]] == fold[EXACT] and fold[kaggle_ids[1]] == fold[NEAR]

    for split in ("train", "test"):  # the merged dataset has a test split: pack works on both
        packed = pack.pack(data_uri, data_uri + f"/shards-{SIZE}px", SIZE, split=split, samples_per_shard=8)
        assert packed["num_samples"] == {"train": 18, "test": 4}[split]
    assert len(shards.ShardSet(data_uri + f"/shards-{SIZE}px/test").ids) == 4


def test_source_checks_come_before_any_fetch(tmp_path):
    with pytest.raises(ConfigError, match=r"^merge_with: applies to data_source=hpav18:<csv> only"):
        dl.download_task("synthetic", str(tmp_path), 4, 2, SIZE, 0, merge_with="synthetic")
    with pytest.raises(ConfigError, match=r"^merge_with: hpav18:pudae is another hpav18 source"):
        dl.check_sources("hpav18:pudae", "hpav18:pudae")
    with pytest.raises(ConfigError, match=r"^hpav18:pudea: no pinned v18 table of that name \(pinned: pudae\)"):
        dl.check_sources("hpav18:pudea", "synthetic", require_test=True)
    dl.check_sources("hpav18:pudae", "s3://bucket/datasets/kaggle", require_test=True)
    dl.check_sources("hpav18:/data/own.csv")  # the CLI may build a v18-only dataset (no test split)


def test_pinned_v18_table_is_sha256_checked(tmp_path, monkeypatch):
    """`hpav18:<name>` fetches the pinned table and refuses other bytes (one line); a good copy is kept and reused."""
    body = b"Id,Target\n10580_1610_C1_1,13 25 0 2 21\n10580_1610_C1_2,0\n"
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    pinned = hpav18_csv.PINNED_CSVS["pudae"]
    assert pinned.url.startswith("https://raw.githubusercontent.com/pudae/kaggle-hpa/3e7888c")
    assert len(pinned.sha256) == 64 and pinned.rows == 74606
    with LoopbackServer(Handler, lifetime=60) as server:
        url = server.url + "/HPAv18RBGY_wodpl.csv"
        wrong = hpav18_csv.PinnedCsv(url, "0" * 64, 2, "test")
        monkeypatch.setitem(hpav18_csv.PINNED_CSVS, "pudae", wrong)
        (tmp_path / "w").mkdir()
        with pytest.raises(DataError, match=r"^http://127\.0\.0\.1:\d+/HPAv18RBGY_wodpl\.csv: sha256 [0-9a-f]{64} "
                                            r"does not match the expected 0{64}$"):
            hpav18_csv.read_v18_csv("hpav18:pudae", tmp_path / "w", allow_http=True, cache_dir=tmp_path / "c")
        good = hpav18_csv.PinnedCsv(url, hashlib.sha256(body).hexdigest(), 2, "test")
        monkeypatch.setitem(hpav18_csv.PINNED_CSVS, "pudae", good)
        for _ in range(2):
            table = hpav18_csv.read_v18_csv("hpav18:pudae", tmp_path / "w", allow_http=True, cache_dir=tmp_path / "c")
            assert list(table["Id"]) == ["10580_1610_C1_1", "10580_1610_C1_2"]
        assert len(hits) == 2  # the refused fetch and the first good one; the second read used the kept copy


# -- J4: weights per model -----------------------------------------------------------------------------------------
def _weights_file(arch: str, path: Path, seed: int) -> Path:
    """A 3-channel ImageNet-shaped state dict of `arch` made by hpa.models (what `weights` expects)."""
    torch.manual_seed(seed)
    torch.save(ARCHS[arch].build().state_dict(), path)
    return path


def test_j4_two_models_each_from_its_own_weights_file(tmp_path):
    r18 = _weights_file("resnet18", tmp_path / "r18.pt", 1)
    se18 = _weights_file("se_resnet18", tmp_path / "se18.pt", 2)
    models = ["resnet18", "se_resnet18"]
    value = json.dumps({"resnet18": str(r18), "se_resnet18": str(se18)})
    assert check_weights(value, models) == {"resnet18": str(r18), "se_resnet18": str(se18)}
    for arch, path in (("resnet18", r18), ("se_resnet18", se18)):
        model = create_model(arch, in_chans=4, weights=str(path))  # what each training task then does
        state = torch.load(path, weights_only=True)
        assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    swapped = json.dumps({"resnet18": str(se18), "se_resnet18": str(r18)})
    with pytest.raises(ConfigError) as err:
        check_weights(swapped, models)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"weights: {se18} does not match resnet18:")
    assert check_weights(json.dumps({"se_resnet18": str(se18)}), models) == {"resnet18": "", "se_resnet18": str(se18)}
    assert check_weights("", models) == check_weights("{}", models) == {"resnet18": "", "se_resnet18": ""}


def test_weights_run_parameter_refusals(tmp_path):
    models = ["resnet18", "se_resnet18"]
    cases = [
        (str(tmp_path / "r18.pt"), "is one source for every model; expected a JSON object model -> source"),
        ('{"resnet50": "imagenet"}', r"model 'resnet50' is not one of this run's models \(resnet18, se_resnet18\)"),
        ('{"resnet18": "gs://b/r18.pt"}', r"weights\[resnet18\]: unsupported URI scheme gs://"),
        ('{"resnet18": 3}', r"weights\[resnet18\]: expected a string"),
        ('["imagenet"]', "expected a JSON object model -> source, got a JSON list"),
        (json.dumps({"se_resnet18": str(tmp_path / "missing.pt")}), "missing.pt does not exist"),
    ]
    for value, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_weights(value, models)
    assert check_weights("imagenet", models) == {"resnet18": "imagenet", "se_resnet18": "imagenet"}


def test_s3_weights_are_checked_through_the_store(s3_bucket, tmp_path):
    r18 = _weights_file("resnet18", tmp_path / "r18.pt", 1)
    uri = s3_bucket + "weights/r18.pt"
    open_store(s3_bucket + "weights").put_file("r18.pt", r18)
    assert check_weights(json.dumps({"resnet18": uri}), ["resnet18", "se_resnet18"])["resnet18"] == uri
    with pytest.raises(ConfigError, match=rf"^weights: {uri} does not match se_resnet18: "):
        check_weights(json.dumps({"se_resnet18": uri}), ["resnet18", "se_resnet18"])


# -- item 10: no delete on the write paths ------------------------------------------------------------------------
@pytest.fixture
def no_delete(monkeypatch):
    """Every store delete answers AccessDenied, as a KFP 2.15/2.16 profile key's would; the attempts are counted."""
    attempts = []

    def refuse(self, key):
        attempts.append(self.join(key))
        raise StoreError(f"access denied (AccessDenied) deleting {self.join(key)}: this key may Put, Get and List only")

    monkeypatch.setattr(S3Store, "delete", refuse)
    monkeypatch.setattr(LocalStore, "delete", refuse)
    return attempts


def test_redownload_and_repack_a_changed_dataset_without_any_delete(s3_bucket, tmp_path, no_delete):
    from hpa.synthetic import generate

    data_uri = s3_bucket + "hpa/datasets/mine"
    shards_uri = data_uri + f"/shards-{SIZE}px"
    generate(tmp_path / "v1", 10, 3, size=SIZE, seed=1)
    dl.download(str(tmp_path / "v1"), data_uri)
    first = pack.pack(data_uri, shards_uri, SIZE, samples_per_shard=4)
    old_names = {s["name"] for s in json.loads(open_store(shards_uri + "/train").get_bytes("shards.json"))["shards"]}

    generate(tmp_path / "v2", 6, 2, size=SIZE, seed=2)  # the user's data changed: same prefix, other content
    result = dl.download(str(tmp_path / "v2"), data_uri)
    assert result["n_train"] == 6 and open_store(data_uri).verify() == result["objects"]
    second = pack.pack(data_uri, shards_uri, SIZE, samples_per_shard=4)
    assert (first["num_shards"], second["num_shards"]) == (3, 2) and second["skipped_shards"] == 0
    assert no_delete == []
    assert set(shards.ShardSet(shards_uri).ids) == set(read_labels(tmp_path / "v2" / "train.csv")["Id"])
    stored = set(open_store(shards_uri + "/train").list())
    assert old_names <= stored  # the earlier set is left unreferenced, never overwritten nor deleted
    assert pack.pack(data_uri, shards_uri, SIZE, samples_per_shard=4)["skipped_shards"] == 2  # resumable


def test_an_interrupted_redownload_leaves_the_dataset_uncommitted(s3_bucket, tmp_path, no_delete, monkeypatch):
    from hpa.synthetic import generate

    data_uri = s3_bucket + "hpa/datasets/mine"
    generate(tmp_path / "v1", 6, 2, size=SIZE, seed=1)
    dl.download(str(tmp_path / "v1"), data_uri)
    assert manifest_sha256(data_uri)
    generate(tmp_path / "v2", 6, 2, size=SIZE, seed=2)

    def killed(*args, **kwargs):
        raise StoreError("connection reset while uploading")

    monkeypatch.setattr(S3Store, "upload_files", killed)
    with pytest.raises(StoreError, match="connection reset"):
        dl.download(str(tmp_path / "v2"), data_uri)
    assert no_delete == [] and manifest_sha256(data_uri) == ""  # "no dataset": the next run downloads again
    with pytest.raises(StoreError, match=rf"^not a committed dataset: {data_uri}/{MANIFEST} marks it uncommitted"):
        open_dataset(data_uri)
    with pytest.raises(StoreError, match="marks it uncommitted"):
        open_store(data_uri).read_manifest()
