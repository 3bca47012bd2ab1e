"""Kaggle submission: order, fill-empty, validation at the real test size, refusals, scoring, upload guard."""

import json
import sys
import uuid

import numpy as np
import pandas as pd
import pytest

from hpa import submit as sb
from hpa.errors import ConfigError, DataError
from hpa.evaluate import save_thresholds
from hpa.labels import NUM_CLASSES, format_target
from hpa.predictions import save_predictions

N_TEST = 11_702  # the real competition's test set


def kaggle_ids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [str(uuid.UUID(bytes=rng.bytes(16))) for _ in range(n)]


@pytest.fixture
def case(tmp_path):
    n = N_TEST
    ids = kaggle_ids(n)
    rng = np.random.default_rng(1)
    targets = (rng.random((n, NUM_CLASSES)) < 0.08).astype(np.uint8)
    probs = np.clip(0.5 * targets + 0.6 * rng.random((n, NUM_CLASSES)), 0, 1).astype(np.float32)
    perm = rng.permutation(n)  # predictions in another order than the sample
    save_predictions(tmp_path / "test.npz", np.array(ids)[perm], probs[perm], model="ens")
    save_thresholds(tmp_path / "thr.json", np.full(NUM_CLASSES, 0.55))
    pd.DataFrame({"Id": ids, "Predicted": "0"}).to_csv(tmp_path / "sample_submission.csv", index=False)
    return tmp_path, ids, probs, targets


def test_submission_for_the_real_test_size(case):
    tmp, ids, probs, targets = case
    r = sb.make_submission(tmp / "test.npz", tmp / "thr.json", tmp / "sample_submission.csv", tmp / "submission.csv")
    assert r["rows"] == N_TEST and r["empty_rows"] == 0 and "test_macro_f1" not in r
    df = pd.read_csv(tmp / "submission.csv", dtype=str, keep_default_na=False)
    assert df.columns.tolist() == ["Id", "Predicted"] and df["Id"].tolist() == ids
    expected = probs >= 0.55
    empty = ~expected.any(1)
    expected[np.flatnonzero(empty), probs[empty].argmax(1)] = True
    assert r["filled_empty"] == int(empty.sum()) > 0
    assert df["Predicted"].tolist() == [format_target(np.flatnonzero(row)) for row in expected]
    assert sb.validate_submission((tmp / "submission.csv").read_bytes(), ids, "s") == N_TEST


def test_no_fill_empty_and_scoring_from_labels_beside_the_sample(case, capsys):
    tmp, ids, probs, targets = case
    pd.DataFrame({"Id": ids, "Target": [format_target(np.flatnonzero(t)) or "0" for t in targets]}).to_csv(
        tmp / "test_labels.csv", index=False)
    rc = sb.main(["--predictions", str(tmp / "test.npz"), "--thresholds", "0.55", "--sample-submission",
                  str(tmp / "sample_submission.csv"), "--out", str(tmp / "s.csv"), "--no-fill-empty"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test macro F1: " in out and str(tmp / "s.csv") in out
    df = pd.read_csv(tmp / "s.csv", dtype=str, keep_default_na=False)
    assert (df["Predicted"] == "").sum() == int((~(probs >= 0.55).any(1)).sum()) > 0


def test_submission_reports_predicted_and_true_label_cardinality(case, capsys):
    tmp, ids, probs, targets = case
    r = sb.make_submission(tmp / "test.npz", 0.55, tmp / "sample_submission.csv", tmp / "a.csv")
    expected = probs >= 0.55
    empty = ~expected.any(1)
    expected[np.flatnonzero(empty), probs[empty].argmax(1)] = True  # the file's labels, after the top-class fill
    assert r["labels_per_image"] == round(float(expected.sum(1).mean()), 4)
    assert "true_labels_per_image" not in r  # no test labels: only the predicted cardinality
    truth = targets.copy()
    truth[~truth.any(1), 0] = 1  # an image without a class is written as class 0 below
    pd.DataFrame({"Id": ids, "Target": [format_target(np.flatnonzero(t)) for t in truth]}).to_csv(
        tmp / "test_labels.csv", index=False)
    r = sb.make_submission(tmp / "test.npz", 0.55, tmp / "sample_submission.csv", tmp / "b.csv")
    assert r["true_labels_per_image"] == round(float(truth.sum(1).mean()), 4)
    assert r["true_labels_per_image"] != r["labels_per_image"]
    rc = sb.main(["--predictions", str(tmp / "test.npz"), "--thresholds", "0.55", "--sample-submission",
                  str(tmp / "sample_submission.csv"), "--out", str(tmp / "c.csv")])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"labels per image: {r['labels_per_image']:.2f} predicted vs {r['true_labels_per_image']:.2f} true" in out


def assert_refused(tmp, match, **kwargs):
    args = dict(predictions=tmp / "test.npz", thresholds=tmp / "thr.json",
                sample_submission=tmp / "sample_submission.csv", out=tmp / "submission.csv")
    args.update(kwargs)
    with pytest.raises(DataError, match=match):
        sb.make_submission(**args)
    assert sorted(p.name for p in tmp.iterdir() if "submission" in p.name) == ["sample_submission.csv"]


def test_mismatched_ids_refused(case):
    tmp, ids, probs, _ = case
    save_predictions(tmp / "test.npz", ids[:-1] + ["not-in-sample"], probs)
    assert_refused(tmp, r"ids do not match .*sample_submission.csv .*e\.g\. '")


def test_nan_probabilities_refused(case):
    tmp, ids, probs, _ = case
    probs = probs.copy()
    probs[100, 3] = np.nan
    np.savez(tmp / "test.npz", ids=np.array(ids), probs=probs)
    assert_refused(tmp, r"test.npz: 'probs' has 1 NaN/inf")


def test_thresholds_of_wrong_length_refused(case):
    tmp, *_ = case
    (tmp / "thr.json").write_text(json.dumps({"values": [0.5] * 27}))
    assert_refused(tmp, r"thr.json: expected 28 thresholds")


def test_kaggle_submit_needs_credentials_and_never_prints_the_key(case, monkeypatch, capsys):
    tmp, *_ = case
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    with pytest.raises(ConfigError, match="KAGGLE_USERNAME and KAGGLE_KEY not set"):
        sb.make_submission(tmp / "test.npz", 0.5, tmp / "sample_submission.csv", tmp / "s.csv", kaggle_submit=True)
    secret = "s3cr3t-kaggle-key-0123456789"
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", secret)
    monkeypatch.setitem(sys.modules, "kaggle", None)  # package missing
    monkeypatch.setitem(sys.modules, "kaggle.api", None)
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", None)
    with pytest.raises(ConfigError, match="kaggle package is not installed") as exc:
        sb.make_submission(tmp / "test.npz", 0.5, tmp / "sample_submission.csv", tmp / "s.csv", kaggle_submit=True)
    captured = capsys.readouterr()
    assert secret not in str(exc.value) + captured.out + captured.err


def test_kaggle_upload_uses_the_api_and_redacts_errors(case, monkeypatch):
    import types

    tmp, *_ = case
    secret = "s3cr3t-kaggle-key-0123456789"
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", secret)
    calls = []

    class FakeApi:
        fail = False

        def authenticate(self):
            calls.append("auth")

        def competition_submit(self, path, message, competition):
            if FakeApi.fail:
                raise RuntimeError(f"401 Unauthorized for key {secret}")
            calls.append((open(path).readline().strip(), competition))

    module = types.ModuleType("kaggle.api.kaggle_api_extended")
    module.KaggleApi = FakeApi
    for name in ("kaggle", "kaggle.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", module)
    r = sb.make_submission(tmp / "test.npz", 0.5, tmp / "sample_submission.csv", tmp / "s.csv", kaggle_submit=True)
    assert r["kaggle_submitted"] and calls == ["auth", ("Id,Predicted", sb.COMPETITION)]
    FakeApi.fail = True
    with pytest.raises(ConfigError, match=r"failed: 401 Unauthorized for key \*\*\*") as exc:
        sb.make_submission(tmp / "test.npz", 0.5, tmp / "sample_submission.csv", tmp / "s.csv", kaggle_submit=True)
    assert secret not in str(exc.value)


def test_submission_to_s3(tmp_path, s3_bucket):
    from hpa.store import open_store

    ids = kaggle_ids(50)
    rng = np.random.default_rng(0)
    store = open_store(s3_bucket + "data")
    pd.DataFrame({"Id": ids, "Predicted": "0"}).to_csv(tmp_path / "sample_submission.csv", index=False)
    store.put_file("sample_submission.csv", tmp_path / "sample_submission.csv")
    save_predictions(s3_bucket + "ens/test.npz", np.array(ids), rng.random((50, NUM_CLASSES)))
    save_thresholds(s3_bucket + "ens/thr.json", np.full(NUM_CLASSES, 0.9))
    r = sb.make_submission(s3_bucket + "ens/test.npz", s3_bucket + "ens/thr.json", store.join("sample_submission.csv"),
                           s3_bucket + "out/submission.csv")
    assert r["rows"] == 50 and "test_macro_f1" not in r
    text = open_store(s3_bucket + "out").get_bytes("submission.csv").decode()
    assert sb.validate_submission(text.encode(), ids, "s3") == 50
