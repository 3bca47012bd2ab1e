"""Issue 16, as issue 22 left it: an existing s3:// dataset is used where it is (the download task checks it and
hands its URI on as a string: no importer, whose artifact the launcher would download), the cache keys of download,
split and pack follow what the store holds, and every task has a display name.

The KFP backend keys its cache on a task's input values (kubeflow/pipelines 2.17.0
backend/src/v2/cacheutils/cache.go GenerateCacheKey: InputParameterValues, input artifact names, output specs,
image, command), never on the store: the uncached `dataset-state` task turns the store's state into input values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpa.committed import ABSENT, dataset_state, shards_prefix  # noqa: E402
from hpa.store import open_store  # noqa: E402

ARGS = dict(source="synthetic", n_train=12, n_test=4, image_size=32, seed=0)
N_OBJECTS = 12 * 4 + 4 * 4 + 3  # the images, train.csv, sample_submission.csv, test_labels.csv


def state_of(store_uri: str) -> dict:
    return dataset_state(store_uri=store_uri, **ARGS)


def delete_prefix(uri: str) -> None:
    store = open_store(uri)
    for key in store.list():
        store.delete(key)


def test_dataset_state_follows_the_store(s3_bucket):
    from hpa.download import download
    from hpa.pack import pack

    store_uri = s3_bucket + "hpa"
    first, again = state_of(store_uri), state_of(store_uri)
    assert not first["existing"] and first["data_uri"] == store_uri + "/datasets/synthetic-12x4-32px-seed0"
    # absent: a token unique to each look, so a task keyed on it is never served from cache
    assert first["manifest_sha256"].startswith(ABSENT) and again["manifest_sha256"] != first["manifest_sha256"]
    assert first["shards_sha256"].startswith(ABSENT)
    download("synthetic", first["data_uri"], n_train=12, n_test=4, size=32, seed=0)
    for split in ("train", "test"):
        pack(first["data_uri"], shards_prefix(first["data_uri"], 32), 32, split=split)
    committed, unchanged = state_of(store_uri), state_of(store_uri)
    assert len(committed["manifest_sha256"]) == 64 and committed == unchanged  # a stable key: a cache hit
    assert len(committed["shards_sha256"]) == 64
    delete_prefix(first["data_uri"])  # someone deletes the dataset (and its shards) from the store
    deleted = state_of(store_uri)
    assert deleted["manifest_sha256"].startswith(ABSENT) and deleted["shards_sha256"].startswith(ABSENT)
    assert deleted["manifest_sha256"] not in (first["manifest_sha256"], committed["manifest_sha256"])


def test_download_skips_an_intact_dataset_and_fetches_a_deleted_one(s3_bucket, tmp_path):
    """The download component with the state's hash: skipped while the dataset is committed as found (a re-run of
    the once-changed key costs a listing, not a fetch); after the prefix is deleted it fetches again."""
    from types import SimpleNamespace

    from components.download.component import download

    store_uri = s3_bucket + "hpa"

    def run(expected: str):
        manifest = SimpleNamespace(path=str(tmp_path / "manifest.json"), metadata={})
        out = download.python_func(source="synthetic", store_uri=store_uri, manifest=manifest, n_train=12, n_test=4,
                                   image_size=32, seed=0, expected_manifest=expected)
        return out, manifest.metadata

    state = state_of(store_uri)
    (uri, sha), meta = run(state["manifest_sha256"])
    assert uri == state["data_uri"] and "skipped_fetch" not in meta and meta["objects"] == N_OBJECTS
    (uri2, sha2), meta2 = run(state_of(store_uri)["manifest_sha256"])
    assert (uri2, sha2) == (uri, sha) and meta2["skipped_fetch"] == 1  # the same committed manifest, untouched
    delete_prefix(uri)
    (uri3, _), meta3 = run(state_of(store_uri)["manifest_sha256"])
    assert "skipped_fetch" not in meta3 and open_store(uri3).exists("manifest.json")  # fetched and committed again


def test_use_dataset_refuses_a_dataset_changed_since_the_run_started(s3_bucket):
    from hpa.committed import use_dataset
    from hpa.download import download
    from hpa.errors import StoreError

    uri = s3_bucket + "shared/kaggle"
    download("synthetic", uri, n_train=12, n_test=4, size=32, seed=0)
    state = dataset_state(source=uri, store_uri=s3_bucket + "hpa", **{k: v for k, v in ARGS.items() if k != "source"})
    assert state["existing"] and state["data_uri"] == uri  # read where it is: imported, not copied
    assert use_dataset(uri, state["manifest_sha256"])["objects"] == N_OBJECTS
    download("synthetic", uri, n_train=12, n_test=4, size=32, seed=1)  # re-committed with other images
    with pytest.raises(StoreError, match="changed during the run"):
        use_dataset(uri, state["manifest_sha256"])


def compiled(name: str) -> dict:
    return next(yaml.safe_load_all((ROOT / "compiled" / name).read_text()))


def every_task(spec: dict):
    for dag in [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]:
        yield from dag["tasks"].items()


@pytest.mark.parametrize("name", ["hpa_pipeline.yaml", "hpa_pipeline_multinode.yaml"])
def test_every_task_and_group_has_a_display_name(name):
    """The UI labels a node with taskInfo.name, which is the task's key unless a display name is set (kfp 2.17
    compiler/pipeline_spec_builder.py: `display_name or name`); condition groups and If/Else branches too."""
    spec = compiled(name)
    unnamed = [key for key, task in every_task(spec) if task["taskInfo"]["name"] == key]
    assert not unnamed, f"tasks without a display name: {unnamed}"
    names = {key: task["taskInfo"]["name"] for key, task in every_task(spec)}
    assert names["dataset-state"] == "dataset in store" and "importer" not in names


def test_cache_keyed_inputs_come_from_the_uncached_state_task():
    spec = compiled("hpa_pipeline.yaml")
    tasks = dict(every_task(spec))
    assert tasks["dataset-state"]["cachingOptions"] == {}  # caching off: it must look at the store every run
    for task in ("download", "pack", "split"):
        assert tasks[task]["cachingOptions"] == {"enableCache": True}, task
    # download runs in every run, in the root DAG (no If/Else, no dsl.OneOf: issue 22 item 1)
    assert "download" in spec["root"]["dag"]["tasks"]
    assert tasks["download"]["inputs"]["parameters"]["expected_manifest"]["taskOutputParameter"] == {
        "outputParameterKey": "manifest_sha256", "producerTask": "dataset-state"}
    assert tasks["pack"]["inputs"]["parameters"]["expected_shards"]["taskOutputParameter"] == {
        "outputParameterKey": "shards_sha256", "producerTask": "dataset-state"}
    for task in ("pack", "split"):  # the committed dataset's manifest hash, from the download task
        assert tasks[task]["inputs"]["parameters"]["data_manifest"]["taskOutputParameter"] == {
            "outputParameterKey": "manifest_sha256", "producerTask": "download"}
    # no task takes the dataset as an input artifact (the launcher would download all of it first)
    for key, task in every_task(spec):
        assert "data_uri" not in task.get("inputs", {}).get("artifacts", {}), key


# The local run on an existing committed dataset is journey J2: tests/test_journeys.py (with the launcher's downloads).
