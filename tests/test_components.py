"""A component run alone with kfp.local gives the same result as the `python -m hpa` stage it wraps.

split (through the S3 test server: same CSV bytes), ensemble (same probabilities and thresholds) and
submit (same submission.csv bytes). The components run as kfp.local subprocesses that inherit the
S3 variables from the test's environment, as a pod gets them from the secret.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def hpa_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hpa", *args], check=True, cwd=ROOT, env=dict(os.environ),
                   stdout=subprocess.DEVNULL)


@pytest.fixture
def local_kfp(tmp_path):
    import kfp.local

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))


@pytest.fixture
def dataset(s3_bucket):
    from hpa.download import download

    uri = s3_bucket + "data"
    download("synthetic", uri, n_train=60, n_test=20, size=32, seed=0)
    return uri


def fake_predictions(tmp_path: Path, dataset: str) -> dict:
    """Two models' val/test predictions with the dataset's test ids (no training needed)."""
    from hpa.predictions import save_predictions
    from hpa.submit import read_sample

    test_ids = read_sample(dataset + "/sample_submission.csv")["Id"].to_numpy()
    rng = np.random.default_rng(0)
    val_ids = np.array([f"v{i:03d}" for i in range(50)])
    targets = (rng.random((50, 28)) < 0.15).astype(np.uint8)
    files = {}
    for name, noise in (("a", 0.3), ("b", 0.5)):
        val = np.clip(targets * 0.6 + rng.random((50, 28)) * noise, 0, 1).astype(np.float32)
        test = rng.random((len(test_ids), 28)).astype(np.float32)
        files[f"val_{name}"] = save_predictions(str(tmp_path / f"val_{name}.npz"), val_ids, val, targets, name)
        files[f"test_{name}"] = save_predictions(str(tmp_path / f"test_{name}.npz"), test_ids, test, None, name)
    return files


def test_split_component_equals_cli(dataset, local_kfp, tmp_path):
    from components.split.component import split

    task = split(data_uri=dataset, folds=3, seed=0, s3_endpoint="")
    hpa_cli("split", "--data", dataset, "--folds", "3", "--seed", "0", "--out", str(tmp_path / "cli.csv"))
    component_csv = Path(task.outputs["split_csv"].path).read_bytes()
    assert component_csv == (tmp_path / "cli.csv").read_bytes()
    assert component_csv.startswith(b"Id,Target,fold\n") and component_csv.count(b"\n") == 61
    assert "data:image/png;base64," in Path(task.outputs["fold_plot"].path).read_text()


def test_ensemble_and_submit_components_equal_cli(dataset, local_kfp, tmp_path):
    from kfp import dsl

    from components.ensemble.component import ensemble
    from components.submit.component import submit
    from kfp_lists import stage_pairs

    files = fake_predictions(tmp_path, dataset)

    @dsl.pipeline(name="ensemble-submit")
    def ensemble_submit(data_uri: str):
        # Artifacts reach a component through a pipeline: a ParallelFor stages the local files, dsl.Collected
        # hands them over as lists, as the training loop does in the pipeline.
        val, test = stage_pairs([{"val": files["val_a"], "test": files["test_a"]},
                                 {"val": files["val_b"], "test": files["test_b"]}])
        combined = ensemble(val_predictions=val, test_predictions=test, method="mean", threshold_mode="fitted")
        submit(data_uri=data_uri, predictions=combined.outputs["ensemble_test"],
               thresholds=combined.outputs["thresholds"], kaggle_submit=False)

    ensemble_submit(data_uri=dataset)
    run_dir = next((tmp_path / "kfp").iterdir())

    cli = tmp_path / "cli"
    hpa_cli("ensemble", "--val", files["val_a"], files["val_b"], "--test", files["test_a"], files["test_b"],
            "--method", "mean", "--threshold-mode", "fitted", "--out", str(cli))
    hpa_cli("submit", "--predictions", str(cli / "ensemble_test.npz"), "--thresholds", str(cli / "thresholds.json"),
            "--sample-submission", dataset + "/sample_submission.csv", "--out", str(cli / "submission.csv"))

    assert json.loads((run_dir / "ensemble" / "thresholds").read_text()) == \
        json.loads((cli / "thresholds.json").read_text())
    with np.load(run_dir / "ensemble" / "ensemble_test") as got, np.load(cli / "ensemble_test.npz") as want:
        assert list(got["ids"]) == list(want["ids"])
        np.testing.assert_array_equal(got["probs"], want["probs"])
    assert (run_dir / "submit" / "submission").read_bytes() == (cli / "submission.csv").read_bytes()
    metrics = json.loads((run_dir / "submit" / "executor_output.json").read_text())
    assert "test_macro_f1" in json.dumps(metrics), "synthetic test labels must be scored"
