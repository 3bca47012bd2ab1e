"""Ensembling (hpa.ensemble): outputs, out-of-sample scores, order invariance, given thresholds, refused inputs,
the CLI, and the files on S3."""

import json
from pathlib import Path

import numpy as np
import pytest

from hpa import ensemble as ens
from hpa import evaluate as ev
from hpa.config import PipelineConfig
from hpa.crossfit import crossfit_binarize, crossfit_groups, policy_fitter
from hpa.errors import DataError
from hpa.labels import NUM_CLASSES
from hpa.predictions import load_predictions, save_predictions

ENSEMBLE_FILES = ["ensemble_test.npz", "ensemble_val.npz", "metrics.json", "thresholds.json"]


def make_models(tmp_path, n_val=200, n_test=80, n_models=2, seed=0):
    """Noisy copies of one signal: each model sees the truth through independent noise."""
    rng = np.random.default_rng(seed)
    y_val = (rng.random((n_val, NUM_CLASSES)) < 0.12).astype(np.uint8)
    y_val[:3, :] = 1  # every class has a positive
    val_ids = np.array([f"v{i:04d}" for i in range(n_val)])
    test_ids = np.array([f"t{i:04d}" for i in range(n_test)])
    val_files, test_files = [], []
    for m in range(n_models):
        noise = lambda shape: rng.normal(0, 1.0, shape)  # noqa: E731
        pv = 1 / (1 + np.exp(-(2.0 * y_val - 1.5 + noise(y_val.shape))))
        pt = rng.random((n_test, NUM_CLASSES))
        order = rng.permutation(n_val) if m else np.arange(n_val)  # different order per model
        vf, tf = tmp_path / f"m{m}_val.npz", tmp_path / f"m{m}_test.npz"
        save_predictions(vf, val_ids[order], pv[order], y_val[order], model=f"m{m}")
        save_predictions(tf, test_ids[::-1] if m else test_ids, pt[::-1] if m else pt, model=f"m{m}")
        val_files.append(str(vf))
        test_files.append(str(tf))
    return val_files, test_files


@pytest.mark.parametrize("method", ens.METHODS)
def test_ensemble_writes_outputs_and_beats_single_models(tmp_path, method):
    val_files, test_files = make_models(tmp_path, n_models=3)
    out = tmp_path / "ens"
    m = ens.ensemble(val_files, test_files, method=method, out_dir=out, threshold_mode="fitted")
    assert sorted(p.name for p in out.iterdir()) == ENSEMBLE_FILES
    assert json.loads((out / "metrics.json").read_text())["val_macro_f1"] == m["val_macro_f1"]
    assert m["val_macro_f1"] > m["best_single_val_macro_f1"]  # independent noise averages out (out-of-sample)
    assert m["val_macro_f1"] < m["val_macro_f1_in_sample"]  # fitted and scored on the same rows flatters
    test = load_predictions(out / "ensemble_test.npz")
    assert test.ids.tolist() == [f"t{i:04d}" for i in range(80)]
    # the predicted label cardinality beside the true one (test files here carry no targets): on val the
    # cross-fitted predictions', on test the submission's (an image with no label gets its top class)
    thresholds = ev.load_thresholds(out / "thresholds.json")
    val = load_predictions(out / "ensemble_val.npz")
    if method != "weighted":  # weighted also re-fits its weights per part
        honest = crossfit_binarize(val.probs, val.targets, crossfit_groups(val.ids, val.targets),
                                   policy_fitter("fitted"))
        assert m["val_labels_per_image"] == pytest.approx(honest.sum(1).mean())
    assert m["val_true_labels_per_image"] == pytest.approx(val.targets.sum(1).mean())
    submitted = (test.probs >= thresholds) | (test.probs == test.probs.max(1, keepdims=True))
    assert m["test_labels_per_image"] == pytest.approx(np.where((test.probs >= thresholds).any(1, keepdims=True),
                                                                test.probs >= thresholds, submitted).sum(1).mean())
    assert "test_true_labels_per_image" not in m
    if method == "weighted":
        assert sum(m["weights"]) == pytest.approx(1.0)


def test_ensemble_is_order_invariant(tmp_path):
    val_files, test_files = make_models(tmp_path)
    a = ens.ensemble(val_files, test_files, out_dir=tmp_path / "a", threshold_mode="fitted")
    b = ens.ensemble(val_files[::-1], test_files[::-1], out_dir=tmp_path / "b", threshold_mode="fitted")
    assert a["val_macro_f1"] == pytest.approx(b["val_macro_f1"], abs=1e-6)


def test_ensemble_given_thresholds(tmp_path):
    val_files, test_files = make_models(tmp_path)
    m = ens.ensemble(val_files, test_files, out_dir=tmp_path / "g", threshold=0.4)
    assert m["threshold_mode"] == "global"
    np.testing.assert_allclose(ev.load_thresholds(tmp_path / "g" / "thresholds.json"), 0.4)
    ev.save_thresholds(tmp_path / "thr.json", np.full(NUM_CLASSES, 0.3))
    m = ens.ensemble(val_files, test_files, out_dir=tmp_path / "f", thresholds=tmp_path / "thr.json")
    assert m["threshold_mode"] == "given"
    # threshold_mode=global without a value: the one threshold that maximises val macro F1
    m = ens.ensemble(val_files, test_files, out_dir=tmp_path / "h", threshold_mode="global")
    values = ev.load_thresholds(tmp_path / "h" / "thresholds.json")
    val = load_predictions(tmp_path / "h" / "ensemble_val.npz")
    assert m["threshold_mode"] == "global" and (values == ev.fit_global_threshold(val.probs, val.targets)).all()
    # No option gives the pipeline's policy (PipelineConfig.threshold_mode, prior), which needs the training labels.
    assert ens.DEFAULT_THRESHOLD_MODE == PipelineConfig().threshold_mode == "prior"
    with pytest.raises(DataError, match="threshold_mode 'prior': needs the training labels"):
        ens.ensemble(val_files, test_files, out_dir=tmp_path / "j")
    prior = np.full(28, 0.05)
    a = ens.ensemble(val_files, test_files, out_dir=tmp_path / "i", threshold_mode="prior", prior=prior)
    b = ens.ensemble(val_files, test_files, out_dir=tmp_path / "j", prior=prior)
    assert a["val_macro_f1"] == b["val_macro_f1"] and a["threshold_mode"] == b["threshold_mode"] == "prior"


def test_ensemble_refuses_mismatched_ids(tmp_path):
    val_files, test_files = make_models(tmp_path)
    p = load_predictions(val_files[1])
    save_predictions(val_files[1], p.ids[:-1], p.probs[:-1], p.targets[:-1])
    with pytest.raises(DataError, match="ids differ") as exc:
        ens.ensemble(val_files, test_files, out_dir=tmp_path / "x", threshold_mode="fitted")
    assert val_files[1] in str(exc.value) and "e.g. 'v" in str(exc.value)
    assert not (tmp_path / "x").exists()


def test_ensemble_cli(tmp_path, capsys):
    val_files, test_files = make_models(tmp_path)
    out = tmp_path / "cli"
    rc = ens.main(["--val", *val_files, "--test", *test_files, "--method", "rank", "--threshold-mode", "fitted",
                   "--out", str(out)])
    assert rc == 0 and (out / "metrics.json").exists()
    assert str(out / "ensemble_test.npz") in capsys.readouterr().out


def test_ensemble_and_files_on_s3(tmp_path, s3_bucket):
    from hpa.store import open_store

    val_files, test_files = make_models(tmp_path)
    store = open_store(s3_bucket + "preds")
    uris = {}
    for path in val_files + test_files:
        store.put_file(Path(path).name, path)
        uris[path] = store.join(Path(path).name)
    out = s3_bucket + "ens/run1"
    m = ens.ensemble([uris[f] for f in val_files], [uris[f] for f in test_files], method="mean", out_dir=out,
                     threshold_mode="fitted")
    local = ens.ensemble(val_files, test_files, method="mean", out_dir=tmp_path / "local", threshold_mode="fitted")
    assert m["val_macro_f1"] == local["val_macro_f1"]
    assert sorted(open_store(out).list()) == sorted(ENSEMBLE_FILES)
    assert load_predictions(out + "/ensemble_test.npz").ids.tolist() == load_predictions(
        tmp_path / "local" / "ensemble_test.npz").ids.tolist()
    np.testing.assert_array_equal(ev.load_thresholds(out + "/thresholds.json"),
                                  ev.load_thresholds(tmp_path / "local" / "thresholds.json"))
    with pytest.raises(DataError, match="missing.npz: file not found"):
        load_predictions(s3_bucket + "preds/missing.npz")
