"""Pipeline parameters out of range fail with one clear line before any work.

Three layers, each tested: `pipeline.py run --local` / `submit` check client side (no server started,
no directory written); in a cluster the pipeline's first task (`check-params`) runs the same check
(`hpa.config.PipelineConfig.validate`) before `download`; and the stage functions refuse the same
values on their own (hpa.train, hpa.predict, hpa.split) for users who call them directly.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# (override, words the error line must contain)
BAD = [
    ("epochs=-1", "epochs=-1"),
    ("epochs=0", "epochs=0"),
    ('models={"resnet18": 0}', "a learning rate in (0, 1) for each model (resnet18: 0)"),
    ('models={"se_resnet18": -0.1}', "(se_resnet18: -0.1)"),
    ('models={"resnet9000": 0.001}', "('resnet9000' is not one)"),
    ("models={}", "a non-empty JSON object of model name -> learning rate"),
    ('models=["resnet18"]', "models expects a dict"),
    ("train_folds=0", "train_folds=0"),
    ("train_folds=6", "expected an integer in [1, folds=5]"),
    ("shrink_strength=-1", "shrink_strength=-1.0"),
    ("image_size=100", "multiple of 32"),
    ("image_size=0", "image_size=0"),
    ("val_fold=5", "val_fold=5"),
    ("val_fold=-1", "val_fold=-1"),
    ("folds=1", "folds=1"),
    ("batch_size=1", "batch_size=1"),
    ("tta=3", "tta=3"),
    ("threshold=1.5", "threshold=1.5"),
    ("threshold_mode=best", "threshold_mode='best'"),
    ("ensemble_method=max", "ensemble_method='max'"),
    ("color_mode=cmyk", "color_mode='cmyk'"),
    ("loss=mse", "loss='mse'"),
    ("gpus=-1", "gpus=-1"),
    ("n_train=-5", "n_train=-5"),
    ("epochs=two", "epochs expects a int"),
    ("plot_samples=maybe", "plot_samples expects a bool"),
    ("node_selector=[1]", "node_selector expects a dict"),
    ("no_such_param=1", "no_such_param=1"),
    ("epochs", "expected key=value"),
]
# issue 13 item 8: counts that only failed in the first train task (~50 s later, a kfp traceback)
BAD_COUNTS = [
    (("n_train=20",), "pipeline parameter batch_size=32: expected at most 16: n_train=20 in 5 folds leaves 16"),
    (("n_train=9",), "pipeline parameter n_train=9: expected at least 2 images per fold"),
    (("n_train=100", "batch_size=32", "gpus=2", "num_nodes=2"), "at most 20: n_train=100 in 5 folds leaves 80 "
                                                                 "training images per fold for 4 training process"),
    (("data_source=/data/hpa", "n_train=15", "folds=10"), "n_train=15: expected at least 2 images per fold"),
]


@pytest.fixture(scope="module")
def pipeline():
    import pipeline

    return pipeline


@pytest.mark.parametrize("override,words", BAD, ids=[b[0] for b in BAD])
def test_run_local_refuses_before_any_work(pipeline, override, words, tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("hpa.s3server.LocalS3Server.start", lambda self: started.append(self))
    out = tmp_path / "run"
    code = pipeline.main(["run", "--local", "--out", str(out), override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not out.exists() and not started, "nothing may start or be written for a bad parameter"


@pytest.mark.parametrize("overrides,words", BAD_COUNTS, ids=[" ".join(b[0]) for b in BAD_COUNTS])
def test_counts_that_would_fail_later_are_refused_up_front(pipeline, overrides, words, tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("hpa.s3server.LocalS3Server.start", lambda self: started.append(self))
    out = tmp_path / "run"
    code = pipeline.main(["run", "--local", "--out", str(out), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and words in err, err
    assert not out.exists() and not started


def test_counts_that_fit_pass():
    from hpa.config import PipelineConfig

    PipelineConfig(n_train=40, batch_size=32).validate()  # 32 training images per fold: one batch
    PipelineConfig(data_source="/data/hpa", n_train=0, batch_size=64).validate()  # a whole real dataset: later


def test_submit_refuses_before_contacting_the_cluster(pipeline, capsys, monkeypatch):
    import kfp

    monkeypatch.setattr(kfp, "Client", lambda *a, **k: pytest.fail("kfp.Client must not be created"))
    code = pipeline.main(["submit", "--host", "http://127.0.0.1:9", "image_size=100"])
    assert code == 2 and "multiple of 32" in capsys.readouterr().err


def test_bad_parameters_counted(capsys):
    with capsys.disabled():
        print(f"\npipeline parameter faults tried: {len(BAD) + len(BAD_COUNTS)} client side, "
              "+ check-params task, + stage functions")


def test_check_params_task_fails_first_in_the_pipeline(tmp_path, capfd):
    """The cluster path: the first task fails with the same line, and download never runs."""
    import kfp.local

    from components.check_params.component import check_params

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    args = dict(data_source="synthetic", store_uri="s3://b/p", n_train=10, n_test=5, image_size=96, color_mode="rgby",
                folds=5, val_fold=7, epochs=1, batch_size=8, models={"resnet18": 1e-3, "se_resnet18": 1e-3},
                train_folds=2, loss="bce", tta=1, threshold_mode="fitted", threshold=0.3, shrink_strength=10.0,
                ensemble_method="mean", gpus=0,
                accelerator_type="nvidia.com/gpu", seed=0, cpu_image="hpa:cpu", cuda_image="hpa:cuda")
    with pytest.raises(RuntimeError):
        check_params(**args)
    assert "pipeline parameter val_fold=7: expected 0 <= val_fold < folds (5)" in capfd.readouterr().out
    args["val_fold"] = 4
    outputs = check_params(**args).outputs
    assert '"val_fold": 4' in outputs["params"]
    # the training plan: every model on train_folds=2 folds, from val_fold on (wrapping around)
    assert outputs["train_plan"] == [{"arch": "resnet18", "fold": 4, "weights": ""},
                                     {"arch": "resnet18", "fold": 0, "weights": ""},
                                     {"arch": "se_resnet18", "fold": 4, "weights": ""},
                                     {"arch": "se_resnet18", "fold": 0, "weights": ""}]


def test_stage_functions_refuse_the_same_values(tmp_path):
    from hpa.errors import ConfigError, HPAError
    from hpa.train import TrainConfig

    base = dict(data=str(tmp_path), split=str(tmp_path / "split.csv"), out=str(tmp_path / "out"))
    for bad, words in [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"), ({"size": 100}, "multiple of 32"),
                       ({"batch_size": 1}, "batch_size")]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig(**base, **bad).validate()

    # A fold that does not exist (val_fold >= folds): train and predict name the fold and the file.
    split_csv = tmp_path / "split.csv"
    split_csv.write_text("Id,Target,fold\na,0,0\nb,1,1\nc,2,2\n")
    from hpa.predict import select_ids
    from hpa.train import read_split

    with pytest.raises(HPAError, match="fold: 5 is not in"):
        read_split(str(split_csv), 5)
    with pytest.raises(HPAError, match="fold 5 does not exist"):
        select_ids(str(tmp_path), "val", str(split_csv), 5)
    from hpa.predict import predict_batch
    import torch

    with pytest.raises(ConfigError, match="--tta 3"):
        predict_batch(torch.nn.Identity(), torch.zeros(1, 4, 32, 32), tta=3)
