"""The whole pipeline, for real, with kfp.local through the embedded S3 server (SeaweedFS).

2 models x 2 folds (the ParallelFor over check-params' training plan, dsl.Collected into ensemble and
compare-plots), smaller than `python pipeline.py run --local`'s defaults (120 train images at 32 px,
1 epoch) so that it stays a few minutes on a shared 2-core machine; the defaults' time is printed by
`run --local` itself.
"""

import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {"n_train": 120, "n_test": 40, "image_size": 32, "epochs": 1, "batch_size": 16, "folds": 3, "tta": 1,
         "train_folds": 2, "threshold_mode": "shrunk"}


@pytest.mark.slow
def test_whole_pipeline_through_embedded_s3(tmp_path, monkeypatch):
    monkeypatch.delenv("HPA_IMAGE", raising=False)
    import pipeline

    start = time.monotonic()
    result = pipeline.run_local(dict(SMALL, pos_weight="sqrt"), tmp_path / "run")
    print(f"\nkfp.local pipeline run ({SMALL}, pos_weight=sqrt): {time.monotonic() - start:.1f} s")
    assert "embedded S3" in result["store_uri"] and result["store_uri"].startswith("s3://")

    # The run resolved its inputs as the KFP backend driver does (cluster.backend_rules.strict_local): the
    # training pods got the CPU image and no accelerator limit (gpus=0 -> gpu_limit ""), from check-params.
    from hpa.config import DEFAULT_IMAGE

    # A run parameter declared train_option=True (pos_weight) reached every training task through check-params'
    # train_options: each run's config.json (its TrainConfig) has it.
    configs = sorted(Path(result["pipeline_root"]).rglob("config.json"))
    assert len(configs) == 4 and all(json.loads(c.read_text())["pos_weight"] == "sqrt" for c in configs), configs

    pod = result["pods"]["train"]
    assert pod["image"] == DEFAULT_IMAGE and pod["limits"] == {}, pod
    assert pod["requests"] == {"cpu": pipeline.TRAIN["cpu"], "memory": pipeline.TRAIN["memory"]}, pod

    # submission.csv: Kaggle format, every test Id exactly once, labels 0..27.
    with open(result["submission"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Id", "Predicted"]
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == SMALL["n_test"] == len(set(ids))
    for _, predicted in rows[1:]:
        labels = [int(x) for x in predicted.split()]
        assert all(0 <= x < 28 for x in labels) and len(labels) == len(set(labels))

    report = Path(result["report"]).read_text()
    assert "<html" in report.lower() and report.count("data:image/png;base64,") >= 3

    metrics = json.loads(Path(result["metrics"]).read_text())
    ens = metrics["ensemble_val"]
    for key in ("val_macro_f1", "val_macro_f1_in_sample", "resnet18_val_macro_f1", "se_resnet18_val_macro_f1",
                "resnet18_test_macro_f1", "se_resnet18_test_macro_f1", "test_macro_f1_all_classes"):
        assert 0.0 <= ens[key] <= 1.0, key
    # out-of-fold: 2 folds of 3 per model, every image of those folds predicted once per model
    assert ens["n_models"] == 2 and ens["folds_per_model"] == 2 and ens["n_val"] > SMALL["n_train"] / 2
    assert 0.0 <= metrics["submission"]["test_macro_f1"] <= 1.0  # synthetic data has test labels
    assert metrics["submission"]["test_macro_f1"] == ens["test_macro_f1"]  # the ensemble scores what is submitted
    assert metrics["submission"]["test_macro_f1_all_classes"] == ens["test_macro_f1_all_classes"]
    assert metrics["submission"]["rows"] == SMALL["n_test"]
    assert list(Path(result["plots"]).glob("*.png")), "comparison PNGs next to the report"

    # Every stage ran, the montage too (plot_samples defaults to true), and the training outputs are small.
    run_dir = next(Path(result["pipeline_root"]).iterdir())
    for stage in ("check-params", "download", "montage", "split", "pack", "compare-plots", "ensemble", "submit"):
        assert (run_dir / stage).is_dir(), stage
    assert "data:image/png;base64," in (run_dir / "montage" / "montage").read_text()
    trained = sorted(run_dir.glob("for-loop-*-iteration-*/train"))
    configs = [json.loads((t / "run" / "config.json").read_text()) for t in trained]
    assert sorted((c["arch"], c["fold"]) for c in configs) == [("resnet18", 0), ("resnet18", 1), ("se_resnet18", 0),
                                                              ("se_resnet18", 1)]
    assert all(c["threshold_mode"] == "shrunk" for c in configs)
    for t in trained:
        run_bytes = sum(p.stat().st_size for p in (t / "run").rglob("*") if p.is_file())
        assert run_bytes < 5_000_000, "the run artifact must not carry the image cache"
    summary = (run_dir / "compare-plots" / "summary").read_text()
    assert all(f"| {arch}-fold{k} |" in summary for arch in ("resnet18", "se_resnet18") for k in (0, 1))

    # What `run --local` prints ends with the TensorBoard command; its logdir holds every training task's event
    # files, each readable by TensorBoard's own reader (issue 16; per-step scalars: tests/test_tensorboard.py, this
    # run has 5 steps, fewer than the 10 between two of them).
    lines = pipeline.run_lines(result, ["resnet18", "se_resnet18"])
    curves = next(line for line in lines if line.startswith("curves:"))
    assert curves.split()[1:4] == ["tensorboard", "--logdir", result["pipeline_root"]]
    events = sorted(Path(result["pipeline_root"]).rglob("events.out.tfevents.*"))
    assert len(events) == 4, events  # 2 models x 2 folds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(events[0].parent)).Reload()
    assert len(board.Scalars("epoch/val_macro_f1")) == SMALL["epochs"]


def test_print_is_restored_after_overlapping_kfp_local_tasks():
    """Two parallel tasks of one DAG interleave kfp.local's per-task print indentation
    (logging_utils.indented_print); left alone, print stays indented for the rest of the process (seen in
    CI: every later CLI line began with four spaces). run_local's guard puts the original back."""
    import builtins

    from kfp.local import logging_utils

    import pipeline

    original = builtins.print
    first, second = logging_utils.indented_print(), logging_utils.indented_print()
    with pipeline.print_restored():
        first.__enter__()   # task A starts
        second.__enter__()  # task B starts, saving A's indenting print
        first.__exit__(None, None, None)   # A ends: the original back
        second.__exit__(None, None, None)  # B ends: A's indenting print back
        assert builtins.print is not original  # the leak this guards against
    assert builtins.print is original


def test_run_local_splits_the_cores_between_parallel_training_tasks(tmp_path, monkeypatch):
    """kfp.local runs two ParallelFor iterations at once; each training task's OpenMP pool gets half the cores
    (left alone, both pools take every core and spin against each other: 8x slower per epoch, measured).
    The environment is restored after the run, and a user's own OMP_NUM_THREADS is kept."""
    import kfp.local

    import pipeline

    seen = []

    def stop_at_init(**kwargs):
        seen.append(os.environ.get("OMP_NUM_THREADS"))
        raise RuntimeError("stop before any task")

    monkeypatch.setattr(kfp.local, "init", stop_at_init)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(RuntimeError, match="stop before any task"):
        pipeline.run_local({}, tmp_path / "a", store_dir=tmp_path / "store")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with pytest.raises(RuntimeError, match="stop before any task"):
        pipeline.run_local({}, tmp_path / "b", store_dir=tmp_path / "store")
    assert seen == [str(8 // pipeline.LOCAL_PARALLEL_TASKS), "3"] and os.environ["OMP_NUM_THREADS"] == "3"


def test_run_local_prints_the_honest_scores_the_baseline_and_the_cardinality():
    """What `run --local` prints after a run, from its metrics.json (here a hand-made one)."""
    import pipeline

    scores = {"ensemble_val": {"val_macro_f1": 0.2151, "val_macro_f1_in_sample": 0.2192,
                               "resnet18_val_macro_f1": 0.2161, "se_resnet18_val_macro_f1": 0.1932,
                               "resnet18_test_macro_f1": 0.2021, "se_resnet18_test_macro_f1": 0.1858,
                               "val_true_labels_per_image": 1.6},
              "submission": {"test_macro_f1": 0.2367, "test_macro_f1_all_classes": 0.1005, "labels_per_image": 1.73,
                             "true_labels_per_image": 1.64}}
    lines = pipeline.score_lines(scores, {"resnet18": 0.002, "se_resnet18": 0.002})
    assert lines == [
        "val macro F1:  0.2151 ensemble, out-of-sample (0.2192 in-sample); single models: resnet18 0.2161, "
        "se_resnet18 0.1932",
        "test macro F1: 0.2367 submission; predicting all 28 classes: 0.1005; single models: resnet18 0.2021, "
        "se_resnet18 0.1858",
        "labels/image:  1.73 predicted, 1.64 true (test)"]
    unlabelled = {"ensemble_val": scores["ensemble_val"], "submission": {"labels_per_image": 1.8}}
    assert pipeline.score_lines(unlabelled, {"resnet18": 0.002})[-1] == \
        "labels/image:  1.80 predicted (test), 1.60 true on val"
