"""Out-of-sample scores (hpa.crossfit) and fold ensembles (hpa.ensemble): no row is both fitted and scored."""

import json

import numpy as np
import pytest

from hpa import ensemble as ens
from hpa import evaluate as ev
from hpa.crossfit import crossfit_binarize, crossfit_groups, crossfit_predict, policy_fitter, score_policy
from hpa.errors import DataError
from hpa.labels import NUM_CLASSES
from hpa.predictions import load_predictions, save_predictions


def noisy_case(n=240, seed=0, rate=0.1, signal=1.5):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, NUM_CLASSES)) < rate).astype(np.uint8)
    targets[:, -3:] = 0
    targets[rng.choice(n, 2, replace=False), -1] = 1  # a rare class: 2 positives
    targets[rng.choice(n, 1), -2] = 1                 # 1 positive
    probs = 1 / (1 + np.exp(-(signal * (2.0 * targets - 1) + rng.normal(0, 1.5, targets.shape))))
    return np.array([f"id{i:04d}" for i in range(n)]), probs.astype(np.float32), targets


def test_groups_are_stratified_deterministic_and_order_free():
    ids, _, targets = noisy_case()
    groups = crossfit_groups(ids, targets)
    assert sorted(np.unique(groups)) == [0, 1, 2, 3, 4]
    assert np.bincount(groups).min() >= len(ids) // 5 - 2
    assert len(np.unique(groups[targets[:, -1] == 1])) == 2  # the 2 positives of the rare class are apart
    perm = np.random.default_rng(1).permutation(len(ids))
    np.testing.assert_array_equal(crossfit_groups(ids[perm], targets[perm]), groups[perm])
    with pytest.raises(DataError, match="at least 2"):
        crossfit_groups(ids[:1], targets[:1])


def test_no_row_is_both_fitted_and_scored():
    ids, probs, targets = noisy_case()
    groups = crossfit_groups(ids, targets)
    seen = []

    def spy(rows, held):
        assert not (rows & held).any() and (rows | held).all()
        seen.append(set(ids[held]))
        return probs[held] >= 0.5

    crossfit_predict(groups, spy, probs.shape)
    assert len(seen) == 5 and set().union(*seen) == set(ids) and sum(map(len, seen)) == len(ids)
    # the policy's fit only ever sees the other parts' rows
    fitted_on = []

    def fit(p, t):
        fitted_on.append({tuple(row) for row in p})
        return ev.fit_thresholds(p, t)

    crossfit_binarize(probs, targets, groups, fit)
    for g, rows in enumerate(fitted_on):
        assert not rows & {tuple(row) for row in probs[groups == g].astype(np.float64)}


@pytest.mark.parametrize("mode", ["fitted", "shrunk", "global"])
def test_in_sample_flatters_and_the_honest_score_recomputes(mode):
    ids, probs, targets = noisy_case()
    groups = crossfit_groups(ids, targets)
    s = score_policy(probs, targets, groups, policy_fitter(mode, threshold=0.5 if mode == "shrunk" else None))
    assert s["macro_f1"] < s["macro_f1_in_sample"]
    # by hand: each part's thresholds fitted on the other four parts only
    preds = np.zeros_like(targets, dtype=bool)
    for g in range(5):
        fit_rows = groups != g
        cut = ev.thresholds_for_mode(mode, probs[fit_rows], targets[fit_rows],
                                     threshold=0.5 if mode == "shrunk" else None)
        preds[groups == g] = probs[groups == g] >= cut
    assert s["macro_f1"] == pytest.approx(ev.macro_f1(targets, preds))


def save_fold_files(tmp_path, models=("resnet18", "se_resnet18"), folds=2, n=120, n_test=40, seed=0):
    """Prediction files as the training tasks write them: one val + one test file per model and fold."""
    rng = np.random.default_rng(seed)
    ids, _, targets = noisy_case(n, seed)
    fold = np.arange(n) % folds
    test_ids = np.array([f"t{i:03d}" for i in range(n_test)])
    test_targets = (rng.random((n_test, NUM_CLASSES)) < 0.1).astype(np.uint8)
    val_files, test_files, test_probs = [], [], {}
    for m in models:
        for k in range(folds):
            rows = fold == k
            pv = 1 / (1 + np.exp(-(1.5 * (2.0 * targets[rows] - 1) + rng.normal(0, 1.5, targets[rows].shape))))
            pt = 1 / (1 + np.exp(-(1.5 * (2.0 * test_targets - 1) + rng.normal(0, 1.5, test_targets.shape))))
            vf, tf = tmp_path / f"{m}-{k}-val.npz", tmp_path / f"{m}-{k}-test.npz"
            save_predictions(vf, ids[rows], pv, targets[rows], model=m)
            save_predictions(tf, test_ids, pt, test_targets, model=m)
            test_probs.setdefault(m, []).append(pt.astype(np.float32))
            val_files.append(str(vf))
            test_files.append(str(tf))
    return val_files, test_files, test_probs


def test_fold_ensemble_uses_out_of_fold_predictions(tmp_path):
    val_files, test_files, test_probs = save_fold_files(tmp_path)
    m = ens.ensemble(val_files, test_files, out_dir=tmp_path / "out", threshold_mode="shrunk", threshold=0.4)
    assert m["n_models"] == 2 and m["folds_per_model"] == 2 and m["n_val"] == 120
    assert m["crossfit"].startswith("2 trained folds")
    assert [s["model"] for s in m["models"]] == ["resnet18", "se_resnet18"]
    # test probabilities: the mean over each model's folds, then over the models
    expected = np.mean([np.mean(np.stack(test_probs[k]).astype(np.float64), 0).astype(np.float32)
                        for k in ("resnet18", "se_resnet18")], axis=0)
    got = load_predictions(tmp_path / "out" / "ensemble_test.npz")
    np.testing.assert_allclose(got.probs, expected, atol=1e-6)
    # the reported score recomputed from the saved OOF predictions: each fold scored with thresholds
    # fitted on the other fold only
    val = load_predictions(tmp_path / "out" / "ensemble_val.npz")
    fold = np.array([int(i[2:]) % 2 for i in val.ids])
    honest = crossfit_binarize(val.probs, val.targets, fold, policy_fitter("shrunk", threshold=0.4))
    assert m["val_macro_f1"] == pytest.approx(ev.macro_f1(val.targets, honest))
    assert m["val_macro_f1"] < m["val_macro_f1_in_sample"]
    # labelled test data: the ensemble and each member scored like the submission, and the baseline
    assert {"test_macro_f1", "best_single_test_macro_f1", "test_macro_f1_all_classes"} <= set(m)
    assert all("test_macro_f1" in s for s in m["models"])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["val_macro_f1"] == m["val_macro_f1"]


def test_single_fold_ensemble_score_recomputes_from_saved_predictions(tmp_path):
    val_files, test_files, _ = save_fold_files(tmp_path, folds=1)
    m = ens.ensemble(val_files, test_files, out_dir=tmp_path / "out", threshold_mode="fitted")
    assert m["folds_per_model"] == 1 and m["crossfit"].startswith("5 stratified parts")
    val = load_predictions(tmp_path / "out" / "ensemble_val.npz")
    honest = crossfit_binarize(val.probs, val.targets, crossfit_groups(val.ids, val.targets), policy_fitter("fitted"))
    assert m["val_macro_f1"] == pytest.approx(ev.macro_f1(val.targets, honest))
    assert m["val_labels_per_image"] == pytest.approx(honest.sum(1).mean())


def test_fold_ensemble_refuses_overlapping_or_mismatched_folds(tmp_path):
    val_files, test_files, _ = save_fold_files(tmp_path)
    with pytest.raises(DataError, match="must be disjoint"):
        ens.ensemble(val_files[:1] * 2, test_files[:1] * 2, out_dir=tmp_path / "x")
    # resnet18 trained folds 0 and 1, se_resnet18 only fold 0: the OOF ids differ
    with pytest.raises(DataError, match="ids differ"):
        ens.ensemble(val_files[:3], test_files[:3], out_dir=tmp_path / "y")
    with pytest.raises(DataError, match="does not match"):
        ens.ensemble(val_files, test_files[::-1], out_dir=tmp_path / "z")
    assert not any((tmp_path / d).exists() for d in "xyz")
