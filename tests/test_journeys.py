"""Issue 22: the journeys past the default, each end to end in the backend-strict mode (cluster.backend_rules
strict_local: the driver's input resolution, the launcher's artifact downloads against the cluster's pipeline root,
and, with a cache, KFP's cache hits and DAG bookkeeping, cluster/backend_cache.py).

J1 the same run twice and a third time; J2 a committed s3:// dataset as data_source; and a fast check per item of
the issue on the compiled pipelines. The other journeys live beside the code they exercise: J3 and J4
tests/test_data_journeys.py (J4's check-params part here), J5 tests/test_train_launcher.py, J6
tests/test_train_resume_store.py, J7 tests/test_katib_journey.py, J8 tests/test_journey_multinode.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"n_train": 60, "n_test": 12, "image_size": 32, "epochs": 1, "batch_size": 8, "folds": 3, "tta": 1,
        "plot_samples": False}


def _s3_arguments(bucket: str) -> dict:
    return {"store_uri": bucket + "hpa", "s3_endpoint": os.environ["HPA_S3_ENDPOINT"]}


def _scores(result: dict) -> dict:
    return json.loads(Path(result["metrics"]).read_text())


@pytest.mark.slow
def test_j1_the_same_run_twice_and_a_third_time(s3_bucket, tmp_path, monkeypatch):
    """A second identical run reuses every cacheable task whose inputs are unchanged, as the KFP backend does, and
    still completes: no dsl.OneOf sits over a branch whose only task is a cache hit (issue 22 item 1; on the
    pre-issue-22 pipeline run 2 failed at the katib-defaults OneOf and run 3 at the download one:
    tests/test_backend_cache_launcher.py). download and pack miss once more on run 2 (their expected_* inputs go
    from "absent" to the committed hashes) and hit from run 3 on."""
    monkeypatch.delenv("HPA_IMAGE", raising=False)
    import pipeline

    arguments = {**TINY, **_s3_arguments(s3_bucket)}
    runs = [pipeline.run_local(arguments, tmp_path / "run", cache_dir=tmp_path / "cache") for _ in range(3)]
    first, second, third = (set(run["cache_hits"]) for run in runs)
    assert first == set()
    assert {"split", "katib-tune", "train", "compare-plots", "ensemble"} <= second, second
    assert {"download", "pack"} & second == set()
    assert {"download", "pack", "split", "katib-tune", "train", "compare-plots", "ensemble"} <= third, third
    assert {"dataset-state", "submit"} & (second | third) == set()  # never cached: the store's state, the upload
    assert _scores(runs[0]) == _scores(runs[1]) == _scores(runs[2])
    assert runs[2]["elapsed_s"] < runs[0]["elapsed_s"]


@pytest.mark.slow
def test_j2_a_committed_s3_dataset_is_read_where_it_is(s3_bucket, tmp_path, monkeypatch):
    """data_source = a committed s3:// dataset: the launcher downloads no byte of it into any pod (no task takes it
    as an input artifact: issue 22 item 2), nothing is copied under store_uri/datasets, and the run trains on it."""
    monkeypatch.delenv("HPA_IMAGE", raising=False)
    import pipeline
    from hpa.download import download
    from hpa.store import open_store

    uri = s3_bucket + "shared/kaggle-like"
    download("synthetic", uri, n_train=60, n_test=12, size=32, seed=0)
    arguments = {**TINY, **_s3_arguments(s3_bucket), "data_source": uri, "n_train": 0, "n_test": 0,
                 "models": {"resnet18": 0.002}}
    result = pipeline.run_local(arguments, tmp_path / "run")
    assert not open_store(s3_bucket + "hpa").list("datasets/")
    assert Path(result["submission"]).read_text().startswith("Id,Predicted")
    downloads = result["downloaded_bytes"]
    assert downloads["download"] == downloads["split"] == downloads["pack"] == 0, downloads
    assert 0 < downloads["train"] < 100_000, downloads  # the split CSV, not images


# ------------------------------------------------------------------------------ fast checks of the same journeys
def _compiled(name: str) -> dict:
    import yaml

    return next(yaml.safe_load_all((ROOT / "compiled" / name).read_text()))


def test_item13_the_single_pod_run_form_has_no_num_nodes():
    """The single-pod pipeline trains on one pod: its run form does not offer num_nodes (issue 22 item 13);
    the multi-node pipeline does, with its own default."""
    single = _compiled("hpa_pipeline.yaml")["root"]["inputDefinitions"]["parameters"]
    multi = _compiled("hpa_pipeline_multinode.yaml")["root"]["inputDefinitions"]["parameters"]
    assert "num_nodes" not in single and multi["num_nodes"]["defaultValue"] == 2


def test_item1_no_oneof_and_no_condition_over_a_lone_cacheable_task():
    """Neither pipeline joins condition branches with dsl.OneOf (a lone cache hit leaves its branch RUNNING and the
    OneOf fails, 2.16.0/2.17.0 resolve.go GetProducerTask), and the only condition left guards a task nobody reads."""
    for name in ("hpa_pipeline.yaml", "hpa_pipeline_multinode.yaml"):
        spec = _compiled(name)
        dags = [spec["root"]] + [c for c in spec["components"].values() if "dag" in c]
        oneofs = [k for d in dags for k, v in d["dag"].get("outputs", {}).get("parameters", {}).items()
                  if "valueFromOneof" in v]
        assert not oneofs, (name, oneofs)
        assert not any(len(v.get("artifactSelectors", [])) > 1 for d in dags
                       for v in d["dag"].get("outputs", {}).get("artifacts", {}).values()), name


def test_item2_no_task_takes_the_dataset_as_an_artifact():
    """The dataset travels as a string URI: no importer, no input artifact the launcher would download
    (2.16.0/2.17.0 backend/src/v2/component/launcher_v2.go downloadArtifacts, fetchNonDefaultBuckets)."""
    for name in ("hpa_pipeline.yaml", "hpa_pipeline_multinode.yaml"):
        spec = _compiled(name)
        assert not any("importer" in executor for executor in spec["deploymentSpec"]["executors"].values()), name


def test_item3_hpav18_without_merge_with_is_refused_up_front():
    """data_source=hpav18:<csv> has no test split: refused by the run parameters' check (check-params, and
    run --local before anything starts), not at pack after the v18 download."""
    from hpa.config import PipelineConfig
    from hpa.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^merge_with: .*no test split"):
        PipelineConfig(data_source="hpav18:pudae").validate()
    cfg = PipelineConfig(data_source="hpav18:pudae", merge_with="s3://bucket/datasets/kaggle", n_train=0).validate()
    assert cfg.merge_with == "s3://bucket/datasets/kaggle"


def test_item4_each_training_task_gets_its_own_models_weights(tmp_path):
    """weights is per model: check-params puts each model's own source in its plan items, and a file that does not
    fit its model is refused by check-params, before any download (issue 22 item 4)."""
    import torch

    from hpa.config import check_params_task
    from hpa.errors import ConfigError
    from hpa.models import ARCHS

    r18 = tmp_path / "r18.pt"
    torch.save(ARCHS["resnet18"].build().state_dict(), r18)  # a 3-channel ImageNet-shaped resnet18 state dict
    base = {"weights": json.dumps({"resnet18": str(r18), "se_resnet18": "imagenet"}), "n_train": 600}
    out = check_params_task(base, multi_node=False, cpu_image="cpu", cuda_image="cuda", namespace="team-a")
    assert sorted((item["arch"], item["weights"]) for item in out["train_plan"]) == [
        ("resnet18", str(r18)), ("se_resnet18", "imagenet")]
    with pytest.raises(ConfigError, match=r"^weights: .*se_resnet18"):
        check_params_task({**base, "weights": json.dumps({"se_resnet18": str(r18)})}, multi_node=False,
                          cpu_image="cpu", cuda_image="cuda", namespace="team-a")


def test_item11_compile_out_leaves_the_committed_files_alone(tmp_path, monkeypatch):
    """`python pipeline.py compile --out DIR` with a registry of one's own writes the whole layout under DIR and
    changes no committed file (issue 22 item 11)."""
    before = {p: p.read_bytes() for p in [*(ROOT / "compiled").glob("*.yaml"), *(ROOT / "components").glob(
        "*/component.yaml")]}
    env = {**os.environ, "HPA_IMAGE": "registry.example/hpa:9", "HPA_CUDA_IMAGE": "registry.example/hpa:9-cuda"}
    subprocess.run([sys.executable, "pipeline.py", "compile", "--out", str(tmp_path)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    assert {p: p.read_bytes() for p in before} == before
    written = (tmp_path / "compiled" / "hpa_pipeline.yaml").read_text()
    assert "registry.example/hpa:9-cuda" in written and "ghcr.io/hpa-kfp" not in written
    assert (tmp_path / "components" / "train" / "component.yaml").exists()
