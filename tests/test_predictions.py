"""The predictions file (hpa.predictions): round trip, and hostile files refused in one line naming file and field."""

import numpy as np
import pytest

from hpa.errors import DataError
from hpa.labels import NUM_CLASSES
from hpa.predictions import load_predictions, save_predictions


def random_case(n=300, seed=0, rate=0.15):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, NUM_CLASSES)) < rate).astype(np.uint8)
    probs = np.clip(0.35 * targets + rng.random((n, NUM_CLASSES)) * 0.7, 0, 1).astype(np.float32)
    return probs, targets


def test_predictions_roundtrip(tmp_path):
    probs, targets = random_case(n=20)
    ids = [f"id{i}" for i in range(20)]
    path = tmp_path / "p.npz"
    save_predictions(path, ids, probs, targets, model="resnet18")
    p = load_predictions(path)
    assert p.ids.tolist() == ids and p.model == "resnet18" and p.probs.dtype == np.float32
    np.testing.assert_array_equal(p.targets, targets)
    save_predictions(path, ids, probs)
    assert load_predictions(path).targets is None
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


@pytest.mark.parametrize("field,mutate,msg", [
    ("probs", lambda a: a.__setitem__((3, 4), np.nan), "NaN/inf"),
    ("probs", lambda a: a.__setitem__((0, 0), np.inf), "NaN/inf"),
    ("probs", lambda a: a.__setitem__((0, 0), 1.5), r"\[0, 1\]"),
    ("ids", lambda a: a.__setitem__(1, a[0]), "duplicates"),
])
def test_bad_predictions_are_refused(tmp_path, field, mutate, msg):
    probs, targets = random_case(n=10)
    arrays = {"ids": np.array([f"id{i}" for i in range(10)]), "probs": probs, "targets": targets}
    mutate(arrays[field])
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=msg) as exc:
        load_predictions(path)
    assert str(path) in str(exc.value)
    with pytest.raises(DataError, match=msg):
        save_predictions(tmp_path / "out.npz", arrays["ids"], arrays["probs"])
    assert not (tmp_path / "out.npz").exists()
