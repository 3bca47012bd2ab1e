"""Prediction: dihedral TTA (order, invariance), the PNG layout end to end, the CLI."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hpa import predict as pr
from hpa.errors import ConfigError, DataError
from hpa.inputs import dihedral
from hpa.labels import COLORS, NUM_CLASSES, format_target
from hpa.predictions import load_predictions

torch.set_num_threads(1)


class PoolLinear(nn.Module):
    """Global average pool then a linear layer: invariant to every dihedral transform."""

    def __init__(self, in_chans=4):
        super().__init__()
        self.fc = nn.Linear(in_chans, NUM_CLASSES)

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.fc(x.mean((-2, -1)) * 10 - 3)


class FlattenLinear(nn.Module):
    """Position-dependent: different under flips and rotations."""

    def __init__(self, in_chans=4, size=16):
        super().__init__()
        self.fc = nn.Linear(in_chans * size * size, NUM_CLASSES)

    def forward(self, x):
        return self.fc(x.float().flatten(1))


def test_tta8_is_invariant_for_an_invariant_model():
    torch.manual_seed(0)
    model, x = PoolLinear().eval(), torch.rand(5, 4, 16, 16)
    one, eight = pr.predict_batch(model, x, 1), pr.predict_batch(model, x, 8)
    torch.testing.assert_close(one, eight, atol=1e-6, rtol=0)
    rotated = dihedral(x, 4)
    torch.testing.assert_close(pr.predict_batch(model, rotated, 8), eight, atol=1e-6, rtol=0)


def test_tta_changes_a_position_dependent_model_and_averages_sigmoids():
    torch.manual_seed(0)
    model, x = FlattenLinear().eval(), torch.rand(3, 4, 16, 16)
    one, eight = pr.predict_batch(model, x, 1), pr.predict_batch(model, x, 8)
    assert (one - eight).abs().max() > 1e-3
    manual = torch.stack([torch.sigmoid(model(dihedral(x, k))) for k in range(8)]).mean(0)
    torch.testing.assert_close(eight, manual)
    with pytest.raises(ConfigError, match="--tta 3"):
        pr.predict_batch(model, x, 3)


def write_png_layout(root, n_test=12, n_train=16, size=16, seed=0):
    """A minimal Kaggle layout (4 grayscale PNGs per id, CSVs) without depending on hpa.synthetic."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = {}
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True)
        ids = [f"{split}{i:03d}-{rng.integers(1 << 30):08x}" for i in range(n)]
        for image_id in ids:
            for color in COLORS:
                plane = rng.integers(0, 256, (size, size), dtype=np.uint8)
                Image.fromarray(plane).save(root / split / f"{image_id}_{color}.png")
        targets = [format_target(rng.choice(NUM_CLASSES, 2, replace=False)) for _ in ids]
        rows[split] = pd.DataFrame({"Id": ids, "Target": targets})
    rows["train"].to_csv(root / "train.csv", index=False)
    rows["test"].to_csv(root / "test_labels.csv", index=False)
    pd.DataFrame({"Id": rows["test"]["Id"], "Predicted": "0"}).to_csv(root / "sample_submission.csv", index=False)
    split = rows["train"].assign(fold=[i % 2 for i in range(n_train)])
    split.to_csv(root / "split.csv", index=False)
    return rows


@pytest.fixture
def layout(tmp_path, monkeypatch):
    pytest.importorskip("hpa.data")
    rows = write_png_layout(tmp_path / "data")
    models = {"invariant": PoolLinear(), "positional": FlattenLinear()}
    current = {}

    def fake_load_checkpoint(path, map_location="cpu"):  # the model under test, with a real meta
        meta = {"arch": current["name"], "size": 16, "color_mode": "rgby", "in_chans": 4}
        return models[current["name"]].eval(), meta

    import hpa.models

    monkeypatch.setattr(hpa.models, "load_checkpoint", fake_load_checkpoint)
    return tmp_path, rows, current


@pytest.mark.parametrize("model_name,invariant", [("invariant", True), ("positional", False)])
def test_predict_png_layout_tta_saved(layout, model_name, invariant):
    tmp, rows, current = layout
    current["name"] = model_name
    outs = {}
    for tta in (1, 8):
        r = pr.predict("ckpt.pt", tmp / "data", ids="test", tta=tta, out=tmp / f"p{tta}.npz", batch_size=5)
        assert r["n"] == 12 and r["source"] == "png" and r["tta"] == tta
        outs[tta] = load_predictions(tmp / f"p{tta}.npz")
    p1, p8 = outs[1], outs[8]
    assert p1.ids.tolist() == rows["test"]["Id"].tolist() and p8.model == model_name
    assert p1.targets is not None and p1.targets.sum(1).tolist() == [2] * 12
    diff = np.abs(p1.probs - p8.probs).max()
    assert (diff < 1e-5) if invariant else (diff > 1e-3), diff


def test_predict_val_fold_and_cli(layout, capsys):
    tmp, rows, current = layout
    current["name"] = "positional"
    out = tmp / "val.npz"
    rc = pr.main(["--checkpoint", "ckpt.pt", "--data", str(tmp / "data"), "--ids", "val", "--split",
                  str(tmp / "data" / "split.csv"), "--fold", "1", "--tta", "2", "--out", str(out)])
    assert rc == 0 and str(out) in capsys.readouterr().out
    p = load_predictions(out)
    assert p.ids.tolist() == rows["train"]["Id"].tolist()[1::2]
    with pytest.raises(DataError, match="fold 7 does not exist"):
        pr.predict("ckpt.pt", tmp / "data", ids="val", split_csv=tmp / "data" / "split.csv", fold=7, out=out)
    with pytest.raises(ConfigError, match="--split"):
        pr.predict("ckpt.pt", tmp / "data", ids="val", out=out)


def test_predict_from_shards_equals_png(layout):
    from hpa.data import load_image
    from hpa.pack import write_shards

    tmp, rows, current = layout
    current["name"] = "positional"
    records = [(i, None, load_image(tmp / "data", i, split="test")) for i in rows["test"]["Id"]]
    write_shards(str(tmp / "shards" / "test"), records, samples_per_shard=5, split="test")
    png = pr.predict("ckpt.pt", tmp / "data", tta=4, out=tmp / "png.npz", batch_size=4)
    sh = pr.predict("ckpt.pt", tmp / "data", tta=4, out=tmp / "sh.npz", batch_size=4, shards=tmp / "shards")
    assert png["source"] == "png" and sh["source"] == "shards"
    a, b = load_predictions(tmp / "png.npz"), load_predictions(tmp / "sh.npz")
    b = b.reindex(a.ids)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    np.testing.assert_array_equal(a.targets, b.targets)


def test_predict_from_s3_layout(layout, s3_bucket):
    from hpa.store import open_store

    tmp, rows, current = layout
    current["name"] = "positional"
    store = open_store(s3_bucket + "data")
    store.commit_manifest(store.upload_tree(tmp / "data"), {})  # s3 data is read only when committed
    local = pr.predict("ckpt.pt", tmp / "data", tta=2, out=tmp / "local.npz")
    remote = pr.predict("ckpt.pt", s3_bucket + "data", tta=2, out=s3_bucket + "preds/test.npz",
                        cache_dir=tmp / "cache")
    assert remote["n"] == local["n"] == 12
    a, b = load_predictions(tmp / "local.npz"), load_predictions(s3_bucket + "preds/test.npz")
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    cached = [p for p in (tmp / "cache" / "objects").rglob("*") if p.is_file()]  # content cache (hpa.committed)
    assert len(cached) == 12 * 4  # only the needed images were fetched
