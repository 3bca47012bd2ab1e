"""Robust per-class thresholds (issue 12, item 2): shrinkage toward a global threshold, prior matching,
and the predicted label cardinality reported beside the true one.

The synthetic setup mimics what the pipeline's small CNNs give after a few epochs: HPA class frequencies
(~1.6 labels per image), scores that are barely calibrated (every class near a low probability) and a
signal that grows with class frequency, so rare classes are nearly indistinguishable from noise.
"""

import json

import numpy as np
import pytest
from kfp.dsl import ClassificationMetrics, Dataset, Metrics

from hpa import ensemble as ens
from hpa import evaluate as ev
from hpa.config import PipelineConfig
from hpa.errors import ConfigError, DataError
from hpa.labels import CLASS_NAMES, HPA_CLASS_COUNTS, NUM_CLASSES
from hpa.predictions import load_predictions, save_predictions

FREQ = HPA_CLASS_COUNTS / HPA_CLASS_COUNTS.sum() * 1.63
RARE = {0: 27, 1: 15, 3: 10}  # validation positives -> class (Rods & rings, Mitochondria... all rare in HPA)


def hpa_labels(n, rng):
    y = (rng.random((n, NUM_CLASSES)) < FREQ).astype(np.uint8)
    empty = ~y.any(1)
    y[np.flatnonzero(empty), rng.choice(NUM_CLASSES, int(empty.sum()), p=HPA_CLASS_COUNTS / HPA_CLASS_COUNTS.sum())] = 1
    return y


def weak_model(y, rng):
    sep = 0.3 + 2.7 * (FREQ / FREQ.max()) ** 0.5
    logit = -2.0 + 0.5 * np.log(FREQ / FREQ.mean()) + sep * y + rng.normal(0, 0.8, y.shape)
    return (1 / (1 + np.exp(-logit))).astype(np.float32)


def rare_case(seed=0, n_train=800, n_val=200, n_test=400):
    """(train labels, val probs, val targets, test probs, test targets) where the classes in RARE have
    exactly 0, 1 and 3 validation positives, scored low among the negatives (the weak model cannot
    tell them apart: exactly what makes a fitted cut collapse)."""
    rng = np.random.default_rng(seed)
    y_train, y_val, y_test = hpa_labels(n_train, rng), hpa_labels(n_val, rng), hpa_labels(n_test, rng)
    for n_pos, c in RARE.items():
        y_val[:, c] = 0
        y_val[rng.choice(n_val, n_pos, replace=False), c] = 1
        y_train[:, c] = 0
        y_train[rng.choice(n_train, 2, replace=False), c] = 1  # rare but present in training
    y_val[~y_val.any(1), 0] = 1
    p_val, p_test = weak_model(y_val, rng), weak_model(y_test, rng)
    for n_pos, c in RARE.items():
        pos = np.flatnonzero(y_val[:, c])
        neg = p_val[y_val[:, c] == 0, c]
        p_val[pos, c] = np.quantile(neg, np.linspace(0.2, 0.4, n_pos)) if n_pos else []
    return y_train, p_val, y_val, p_test, y_test


def test_rare_classes_get_no_degenerate_threshold_and_the_cardinality_stays_sane(capsys):
    y_train, p_val, y_val, p_test, y_test = rare_case()
    assert [int(y_val[:, c].sum()) for c in RARE.values()] == [0, 1, 3]
    true_card = ev.label_cardinality(y_test)
    results = {}
    for mode, kw in [("fitted", {}), ("shrunk", {}), ("prior", {"prior": y_train})]:
        t = ev.thresholds_for_mode(mode, p_val, y_val, **kw)
        predicted = p_test >= t
        results[mode] = t, predicted
        print(f"{mode}: rare thresholds {[round(float(t[c]), 4) for c in RARE.values()]}, test predicted positives "
              f"{[int(predicted[:, c].sum()) for c in RARE.values()]} of {len(p_test)}, labels per image "
              f"{ev.label_cardinality(predicted):.2f} (true {true_card:.2f}), "
              f"test macro F1 {ev.macro_f1(y_test, predicted):.3f}")
    out = capsys.readouterr().out
    assert "labels per image" in out

    # fitted: the 1- and 3-positive classes collapse below 0.05 and flood every test image with them
    t, predicted = results["fitted"]
    for c in (RARE[1], RARE[3]):
        assert t[c] < 0.05
        assert predicted[:, c].mean() > 0.5
    assert ev.label_cardinality(predicted) > true_card + 1.0

    # shrunk: the 0-positive class sits exactly on the global threshold, the others close to it
    t, predicted = results["shrunk"]
    g = ev.fit_global_threshold(p_val.astype(np.float64), y_val)
    assert t[RARE[0]] == g
    for c in RARE.values():
        assert t[c] >= 0.7 * g and predicted[:, c].mean() < 0.05
    # prior: each rare class is predicted about as often as in training (2 of 800 -> 1 of 200 on val)
    t, predicted = results["prior"]
    for c in RARE.values():
        assert (p_val[:, c] >= t[c]).sum() == 1
        assert predicted[:, c].sum() <= 10
    for mode in ("shrunk", "prior"):
        t, predicted = results[mode]
        assert 1.0 <= ev.label_cardinality(predicted) <= 3.0, mode
        assert ((t > 0) & (t < 1)).all(), mode
        assert ev.macro_f1(y_test, predicted) > ev.macro_f1(y_test, results["fitted"][1]), mode


def test_shrink_weights_and_exact_global_for_classes_without_positives():
    np.testing.assert_allclose(ev.shrink_weights([0, 1, 3, 10, 100], 10), [0, 1 / 11, 3 / 13, 0.5, 100 / 110])
    np.testing.assert_array_equal(ev.shrink_weights([0, 4], 0), [0, 1])
    _, p_val, y_val, _, _ = rare_case(seed=1)
    p = p_val.astype(np.float64)
    n_pos = y_val.sum(0)
    for threshold in (None, 0.27):
        g = ev.fit_global_threshold(p, y_val) if threshold is None else threshold
        t = ev.shrunk_thresholds(p_val, y_val, strength=10, threshold=threshold)
        fitted = ev.fit_thresholds(p_val, y_val, fallback=g)
        w = n_pos / (n_pos + 10.0)
        np.testing.assert_allclose(t, np.clip(w * fitted + (1 - w) * g, ev.THRESHOLD_MIN, ev.THRESHOLD_MAX))
        assert (t[n_pos == 0] == g).all() and (n_pos == 0).sum() >= 1
        assert ((t > 0) & (t < 1)).all()
    # strength 0 keeps every fitted cut (where the class has positives); a huge strength gives the global one
    fitted = ev.fit_thresholds(p_val, y_val)
    has = n_pos > 0
    np.testing.assert_allclose(ev.shrunk_thresholds(p_val, y_val, strength=0, threshold=0.3)[has],
                               np.clip(fitted, ev.THRESHOLD_MIN, ev.THRESHOLD_MAX)[has])
    np.testing.assert_allclose(ev.shrunk_thresholds(p_val, y_val, strength=1e9, threshold=0.3), 0.3, atol=1e-5)
    # a class with many positives keeps most of its cut: w >= 100/110 for Nucleoplasm's ~80 of 200
    assert ev.shrink_weights([n_pos[0]], 10)[0] > 0.85


def test_prior_matching_reproduces_the_training_frequencies():
    rng = np.random.default_rng(3)
    y_train, y_val, y_test = hpa_labels(2000, rng), hpa_labels(300, rng), hpa_labels(1000, rng)
    prior = ev.label_prior(y_train)
    np.testing.assert_allclose(prior, y_train.mean(0))
    p_val, p_test = weak_model(y_val, rng), weak_model(y_test, rng)
    t = ev.prior_thresholds(p_val, prior)
    val_rate = (p_val >= t).mean(0)
    expected = np.where(prior > 0, np.maximum(1, np.round(prior * len(p_val))), 0) / len(p_val)
    np.testing.assert_allclose(val_rate, expected, atol=1e-12)  # continuous scores: no ties, exact counts
    assert np.abs(val_rate - prior).max() <= 1 / len(p_val)  # within one image per class
    # on new images of the same model the rate is close to the training frequency too, within the
    # sampling error of a quantile estimated on 300 validation images (4 standard errors)
    test_rate = (p_test >= t).mean(0)
    tolerance = 4 * np.sqrt(prior * (1 - prior) / len(p_val)) + 2 / len(p_val)
    assert (np.abs(test_rate - prior) <= tolerance).all() and np.abs(test_rate - prior).mean() < 0.02
    card = ev.label_cardinality(p_test >= t)
    assert abs(card - ev.label_cardinality(y_train)) < 0.2
    # a class absent from training is never predicted here; its threshold stays below 1
    prior0 = prior.copy()
    prior0[5] = 0.0
    t0 = ev.prior_thresholds(p_val, prior0)
    assert (p_val[:, 5] >= t0[5]).sum() == 0 and t0[5] < 1 and t0[5] > p_val[:, 5].max()
    saturated = p_val.copy()
    saturated[0, 5] = 1.0
    assert ev.prior_thresholds(saturated, prior0)[5] == ev.THRESHOLD_MAX < 1


def test_label_prior_from_a_csv_leaves_the_validation_ids_out(tmp_path):
    csv = tmp_path / "split.csv"
    rows = ["Id,Target,fold", "a,0 5,0", "b,0,1", "c,25,1", "d,5,1"]
    csv.write_text("\n".join(rows) + "\n")
    prior = ev.label_prior(str(csv), exclude_ids=np.array(["a"]))
    assert prior[0] == pytest.approx(1 / 3) and prior[5] == pytest.approx(1 / 3) and prior[25] == pytest.approx(1 / 3)
    assert ev.label_prior(str(csv))[0] == pytest.approx(0.5)
    # out-of-fold predictions cover every row: then all rows are training rows of some fold
    assert ev.label_prior(str(csv), exclude_ids=np.array(list("abcd")))[0] == pytest.approx(0.5)


@pytest.mark.parametrize("call, words", [
    (lambda: ev.check_threshold_mode("best"), "threshold_mode 'best': expected one of fitted, global, shrunk, prior"),
    (lambda: ev.shrink_weights([1], -1), "shrink_strength -1: expected a finite number >= 0"),
    (lambda: ev.shrink_weights([1], "x"), "shrink_strength 'x': expected a number >= 0"),
    (lambda: ev.thresholds_for_mode("prior", np.zeros((4, NUM_CLASSES))), "threshold_mode 'prior': needs the training"),
    (lambda: ev.prior_thresholds(np.zeros((4, NUM_CLASSES)), [0.1] * 5), "prior: expected 28 class frequencies"),
    (lambda: ev.prior_thresholds(np.zeros((4, NUM_CLASSES)), [1.5] * 28),
     "prior: expected 28 class frequencies in [0, 1]"),
    (lambda: ev.label_prior(np.full((3, NUM_CLASSES), 2)),
     "expected training labels as a non-empty (N, 28) 0/1 matrix"),
    (lambda: ev.thresholds_for_mode("shrunk", np.zeros((4, NUM_CLASSES)), None),
     "fitting thresholds needs validation targets"),
    (lambda: ev.thresholds_for_mode("global", np.zeros((4, NUM_CLASSES)), np.zeros((4, NUM_CLASSES)), threshold=1.0),
     "threshold 1.0: expected a number in (0, 1)"),
])
def test_bad_options_fail_with_one_clear_line(call, words):
    with pytest.raises(DataError) as exc:
        call()
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_pipeline_config_accepts_every_mode_and_refuses_others():
    for mode in ev.THRESHOLD_MODES:
        assert PipelineConfig(threshold_mode=mode).validate().threshold_mode == mode
    with pytest.raises(ConfigError) as exc:
        PipelineConfig(threshold_mode="robust").validate()
    assert str(exc.value) == ("pipeline parameter threshold_mode='robust': expected 'fitted', 'global', 'shrunk' "
                              "or 'prior'")


def write_models(tmp_path, seed=0):
    """Two weak models on the rare case, with a training-labels CSV: (val files, test files, split CSV)."""
    y_train, _, y_val, _, y_test = rare_case(seed)
    rng = np.random.default_rng(seed + 10)
    val_ids = np.array([f"v{i:04d}" for i in range(len(y_val))])
    test_ids = np.array([f"t{i:04d}" for i in range(len(y_test))])
    val_files, test_files = [], []
    for m in range(2):
        pv, pt = weak_model(y_val, rng), weak_model(y_test, rng)
        for n_pos, c in RARE.items():
            neg = pv[y_val[:, c] == 0, c]
            pv[np.flatnonzero(y_val[:, c]), c] = np.quantile(neg, np.linspace(0.2, 0.4, n_pos)) if n_pos else []
        vf, tf = tmp_path / f"m{m}_val.npz", tmp_path / f"m{m}_test.npz"
        save_predictions(vf, val_ids, pv, y_val, model=f"m{m}")
        save_predictions(tf, test_ids, pt, y_test, model=f"m{m}")
        val_files.append(str(vf))
        test_files.append(str(tf))
    split = tmp_path / "split.csv"
    train_rows = [f"r{i:04d},{' '.join(map(str, np.flatnonzero(row)))},1" for i, row in enumerate(y_train)]
    val_rows = [f"{i},{' '.join(map(str, np.flatnonzero(row)))},0" for i, row in zip(val_ids, y_val)]
    split.write_text("\n".join(["Id,Target,fold", *train_rows, *val_rows]) + "\n")
    return val_files, test_files, str(split), y_train


@pytest.mark.parametrize("mode", ev.THRESHOLD_MODES)
def test_ensemble_modes_report_the_cardinality(tmp_path, mode):
    val_files, test_files, split, y_train = write_models(tmp_path)
    m = ens.ensemble(val_files, test_files, out_dir=tmp_path / "e", threshold_mode=mode, prior=split,
                    threshold=0.3 if mode in ("global", "shrunk") else None)
    assert m["threshold_mode"] == mode
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    for key in ("val_labels_per_image", "val_true_labels_per_image", "test_labels_per_image",
                "test_true_labels_per_image"):
        assert saved[key] == m[key]
    thresholds = ev.load_thresholds(tmp_path / "e" / "thresholds.json")
    test = load_predictions(tmp_path / "e" / "ensemble_test.npz")
    from hpa.submit import decide  # the submission's labels: an image with none above its cut gets its top class

    assert m["test_labels_per_image"] == pytest.approx(ev.label_cardinality(decide(test.probs, thresholds)[0]))
    assert m["test_true_labels_per_image"] == pytest.approx(ev.label_cardinality(test.targets))
    assert json.loads((tmp_path / "e" / "thresholds.json").read_text())["mode"] == mode
    if mode == "fitted":
        assert m["test_labels_per_image"] > m["test_true_labels_per_image"] + 0.5  # the flood
    else:
        assert 1.0 <= m["test_labels_per_image"] <= 3.0
    if mode == "shrunk":
        assert thresholds[RARE[0]] == 0.3 and m["shrink_strength"] == 10.0
    if mode == "prior":  # the split's validation rows are left out of the prior: 2 of 800 -> 1 of 200
        val = load_predictions(tmp_path / "e" / "ensemble_val.npz")
        assert all(int((val.probs[:, c] >= thresholds[c]).sum()) == 1 for c in RARE.values())


def test_ensemble_refuses_bad_policy_options(tmp_path):
    val_files, test_files, split, _ = write_models(tmp_path)
    cases = [
        (dict(threshold_mode="best"), "threshold_mode 'best': expected one of fitted, global, shrunk, prior"),
        (dict(threshold_mode="shrunk", shrink_strength=-2), "shrink_strength -2"),
        (dict(threshold_mode="prior"), "threshold_mode 'prior': needs the training labels"),
        (dict(threshold_mode="shrunk", thresholds=str(tmp_path / "t.json")),
         "either a thresholds file or threshold_mode"),
    ]
    for kwargs, words in cases:
        with pytest.raises(DataError) as exc:
            ens.ensemble(val_files, test_files, out_dir=tmp_path / "x", **kwargs)
        assert words in str(exc.value) and "\n" not in str(exc.value)
        assert not (tmp_path / "x").exists()


def test_ensemble_cli_with_a_policy(tmp_path, capsys):
    val_files, test_files, split, _ = write_models(tmp_path)
    out = tmp_path / "cli"
    rc = ens.main(["--val", *val_files, "--test", *test_files, "--out", str(out), "--threshold-mode", "prior",
                           "--prior", split])
    printed = capsys.readouterr().out
    assert rc == 0 and "prior thresholds; labels per image: " in printed and "true on val" in printed
    assert "out-of-sample" in printed and "all 28 classes" in printed
    assert json.loads((out / "thresholds.json").read_text())["mode"] == "prior"
    rc = ens.main(["--val", *val_files, "--test", *test_files, "--out", str(tmp_path / "s"),
                           "--threshold-mode", "shrunk", "--shrink-strength", "5"])
    assert rc == 0 and json.loads((tmp_path / "s" / "metrics.json").read_text())["shrink_strength"] == 5.0
    with pytest.raises(SystemExit) as exc:
        ens.main(["--val", *val_files, "--test", *test_files, "--out", str(tmp_path / "b"),
                          "--threshold-mode", "best"])
    assert exc.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err


def component_io(tmp_path, val_files, test_files, prior=None):
    art = lambda name, path: Dataset(name=name, uri=str(path))  # noqa: E731
    return dict(val_predictions=[art(f"val_{i}", f) for i, f in enumerate(val_files)],
                test_predictions=[art(f"test_{i}", f) for i, f in enumerate(test_files)],
                ensemble_test=art("ensemble_test", tmp_path / "out_test"),
                thresholds=art("thresholds", tmp_path / "out_thresholds"),
                metrics=Metrics(name="metrics", uri=str(tmp_path / "m")),
                roc=ClassificationMetrics(name="roc", uri=str(tmp_path / "roc")),
                **({} if prior is None else {"prior_labels": art("prior", prior)}))


@pytest.mark.parametrize("mode", ["shrunk", "prior", "global", "fitted"])
def test_ensemble_component_with_the_policies(tmp_path, mode):
    from components.ensemble.component import ensemble

    val_files, test_files, split, _ = write_models(tmp_path)
    io = component_io(tmp_path, val_files, test_files, prior=split if mode == "prior" else None)
    ensemble.python_func(**io, method="mean", threshold_mode=mode, threshold=0.3, shrink_strength=10.0)
    doc = json.loads((tmp_path / "out_thresholds").read_text())
    assert doc["mode"] == mode and set(doc["thresholds"]) == set(CLASS_NAMES)
    values = np.array(doc["values"])
    logged = io["metrics"].metadata
    for key in ("val_macro_f1", "val_labels_per_image", "val_true_labels_per_image", "test_labels_per_image",
                "test_true_labels_per_image"):
        assert isinstance(logged[key], float), key
    if mode == "global":
        np.testing.assert_array_equal(values, 0.3)
    if mode == "shrunk":  # shrinks toward the run parameter `threshold`: tunable, not fitted on the fold
        assert values[RARE[0]] == 0.3 and io["thresholds"].metadata["shrink_strength"] == 10.0
    if mode in ("shrunk", "prior"):
        assert 1.0 <= logged["test_labels_per_image"] <= 3.0
    else:
        assert logged["val_labels_per_image"] >= 1.0


def test_ensemble_component_refuses_prior_without_labels_and_unknown_modes(tmp_path):
    from components.ensemble.component import ensemble

    val_files, test_files, _, _ = write_models(tmp_path)
    for mode, words in (("prior", "connect prior_labels"), ("robust", "threshold_mode 'robust': expected one of")):
        with pytest.raises(DataError) as exc:
            ensemble.python_func(**component_io(tmp_path, val_files, test_files), threshold_mode=mode)
        assert words in str(exc.value) and "\n" not in str(exc.value)


def test_ensemble_component_in_kfp_local_with_prior_labels_wired(tmp_path):
    """The optional `prior_labels` artifact connected in a real kfp.local run (an importer brings it; the
    prediction lists come through a ParallelFor and dsl.Collected, as in the pipeline)."""
    import kfp.local
    from kfp import dsl

    from components.ensemble.component import ensemble

    val_files, test_files, split, _ = write_models(tmp_path)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    from kfp_lists import stage_pairs

    @dsl.pipeline(name="ensemble-prior")
    def ensemble_prior():
        val, test = stage_pairs([{"val": v, "test": t} for v, t in zip(val_files, test_files)])
        prior = dsl.importer(artifact_uri=split, artifact_class=dsl.Dataset).output
        ensemble(val_predictions=val, test_predictions=test, prior_labels=prior, method="mean", threshold_mode="prior")

    ensemble_prior()
    run_dir = next((tmp_path / "kfp").iterdir())
    got = json.loads((run_dir / "ensemble" / "thresholds").read_text())
    want = ens.ensemble(val_files, test_files, out_dir=tmp_path / "cli", threshold_mode="prior", prior=split)
    assert got["mode"] == "prior" and want["threshold_mode"] == "prior"
    assert got["values"] == json.loads((tmp_path / "cli" / "thresholds.json").read_text())["values"]
