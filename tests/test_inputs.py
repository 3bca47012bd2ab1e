"""hpa.inputs, the one input path: the same stored image gives the same model tensor through every entry point.

Entry points: the training loaders (hpa.train DataSource validation batches over the PNG layout and over packed
shards, then hpa.inputs.prepare), hpa.predict (tta=1: the tensor the model is called with) over the PNG layout
and over shards, and hpa.data.HPADataset; for rgby and rgb, at the stored size and at another requested size
(shards packed at the stored or at the requested size). Each must equal, bit for bit, the tensor written out
from the spec: PNG planes -> bilinear resize to the requested size -> x / 255 -> G, (R+Y)/2, (B+Y)/2 for rgb.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hpa import store, synthetic
from hpa.errors import DataError
from hpa.inputs import TTA_NAMES, RandomDihedral, dihedral, prepare, resize_image, to_rgb
from hpa.labels import COLORS, NUM_CLASSES

STORED, N = 64, 8
VAL_FOLD = 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A committed synthetic dataset (64 px PNGs), a 2-fold split and its train shards packed at 64 and 32 px."""
    from hpa.pack import pack

    tmp = tmp_path_factory.mktemp("inputs")
    synthetic.generate(tmp / "raw", N, 0, size=STORED, seed=3)
    st = store.open_store(str(tmp / "data"))
    st.commit_manifest(st.upload_tree(tmp / "raw"), {"source": "synthetic"})
    df = pd.read_csv(tmp / "data" / "train.csv", dtype=str)
    df["fold"] = np.arange(len(df)) % 2
    df.to_csv(tmp / "split.csv", index=False)
    shards = {}
    for size in (STORED, 32):
        pack(str(tmp / "data"), str(tmp / f"shards{size}"), size, samples_per_shard=3)
        shards[size] = str(tmp / f"shards{size}")
    return tmp, df[df["fold"] == VAL_FOLD]["Id"].tolist(), shards


def expected(root, image_id: str, size: int, color_mode: str) -> torch.Tensor:
    """The model tensor of one image, written out from the spec (no hpa code)."""
    planes = []
    for color in COLORS:
        with Image.open(root / "train" / f"{image_id}_{color}.png") as im:
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            planes.append(np.asarray(im, dtype=np.uint8))
    r, g, b, y = (p.astype(np.float32) / np.float32(255) for p in planes)
    x = np.stack([r, g, b, y] if color_mode == "rgby" else [g, (r + y) / 2, (b + y) / 2])
    return torch.from_numpy(x)


def training_val_tensors(data: str, split: str, size: int, color_mode: str, cache_dir) -> dict[str, torch.Tensor]:
    """What training's validation feeds the model: DataSource.val_batches, then prepare, by id."""
    from hpa.ddp import DistInfo
    from hpa.train import DataSource, TrainConfig, read_split

    cfg = TrainConfig(data=data, split=split, out="unused", fold=VAL_FOLD, size=size, color_mode=color_mode,
                      batch_size=2, val_batch_size=3, workers=0, cache_dir=str(cache_dir))
    fold = read_split(split, VAL_FOLD)
    source = DataSource(cfg, fold, DistInfo())
    out = {}
    for index, x, _ in source.val_batches(torch.device("cpu")):
        for i, image in zip(index.tolist(), prepare(x, cfg.in_chans, cfg.size)):
            out[fold.val_ids[i]] = image
    return out


class Recorder(torch.nn.Module):
    """A model that keeps the tensors it is called with."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros(len(x), NUM_CLASSES)


def prediction_tensors(monkeypatch, root, work, size: int, color_mode: str, shards=None) -> dict[str, torch.Tensor]:
    """What hpa.predict (tta=1) feeds the model, by id."""
    import hpa.models
    from hpa import predict
    from hpa.predictions import load_predictions

    model = Recorder()
    meta = {"arch": "recorder", "size": size, "color_mode": color_mode, "in_chans": 4 if color_mode == "rgby" else 3}
    monkeypatch.setattr(hpa.models, "load_checkpoint", lambda path, map_location="cpu": (model, meta))
    out = work / f"pred-{size}-{color_mode}-{'shards' if shards else 'png'}.npz"
    predict.predict("ckpt.pt", root / "data", ids="val", split_csv=root / "split.csv", fold=VAL_FOLD, tta=1, out=out,
                    batch_size=3, device="cpu", cache_dir=work / "cache", shards=shards)
    ids = load_predictions(out).ids.tolist()
    return dict(zip(ids, torch.cat(model.seen)))


@pytest.mark.parametrize("color_mode", ["rgby", "rgb"])
@pytest.mark.parametrize("size,packed", [(STORED, STORED), (32, STORED), (32, 32)],
                         ids=["stored-size", "resized-shards-at-stored-size", "resized-shards-at-model-size"])
def test_the_same_image_gives_the_same_tensor_through_every_entry_point(dataset, monkeypatch, tmp_path, size,
                                                                        packed, color_mode):
    from hpa.data import HPADataset

    tmp, val_ids, shards = dataset
    split = str(tmp / "split.csv")
    paths = {
        "train png": training_val_tensors(str(tmp / "data"), split, size, color_mode, tmp_path / "c1"),
        "train shards": training_val_tensors(shards[packed], split, size, color_mode, tmp_path / "c2"),
        "predict png": prediction_tensors(monkeypatch, tmp, tmp_path, size, color_mode),
        "predict shards": prediction_tensors(monkeypatch, tmp, tmp_path, size, color_mode, shards=shards[packed]),
    }
    ds = HPADataset(tmp / "data", val_ids, size=size, color_mode=color_mode)
    paths["HPADataset"] = {image_id: ds[k][0] for k, image_id in enumerate(val_ids)}
    channels = 4 if color_mode == "rgby" else 3
    for image_id in val_ids:
        want = expected(tmp / "data", image_id, size, color_mode)
        assert want.shape == (channels, size, size)
        for name, tensors in paths.items():
            got = tensors[image_id]
            assert got.dtype == torch.float32 and got.shape == want.shape, name
            assert torch.equal(got, want), f"{name}: {image_id} differs by {float((got - want).abs().max())}"


def test_prepare_is_float_colour_mode_and_refuses_another_size():
    x = torch.randint(0, 256, (2, 4, 8, 8), dtype=torch.uint8)
    rgby = prepare(x, 4, 8)
    assert rgby.dtype == torch.float32 and torch.equal(rgby, x.float() / 255)
    assert torch.equal(prepare(x, 3, 8), to_rgb(rgby))
    assert torch.equal(prepare(rgby, 4, 8), rgby)                   # a finished batch passes unchanged
    with pytest.raises(DataError, match="8x8 pixels, the model takes 16x16"):
        prepare(x, 4, 16)


def test_resize_image_is_per_plane_and_a_no_op_at_the_size():
    image = np.random.default_rng(0).integers(0, 256, (4, 20, 20), dtype=np.uint8)
    assert resize_image(image, 20) is image
    small = resize_image(image, 10)
    assert small.shape == (4, 10, 10) and small.dtype == np.uint8
    assert np.array_equal(small[2], resize_image(image[2], 10))


def test_to_rgb_is_the_classic_mapping():
    r, g, b, y = (np.full((1, 1), v, np.uint8) for v in (10, 20, 30, 251))
    assert to_rgb(np.stack([r, g, b, y]))[:, 0, 0].tolist() == [20, (10 + 251 + 1) // 2, (30 + 251 + 1) // 2]


def test_to_rgb_of_floats_is_exact():
    x = torch.tensor([10.0, 20.0, 30.0, 251.0]).view(1, 4, 1, 1) / 255
    assert to_rgb(x).flatten().tolist() == [x[0, 1].item(), ((x[0, 0] + x[0, 3]) / 2).item(),
                                            ((x[0, 2] + x[0, 3]) / 2).item()]


def test_dihedral_covers_the_eight_symmetries():
    x = torch.arange(16.0).reshape(1, 4, 4)
    outs = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8 and torch.equal(dihedral(x, 0), x)
    g = torch.Generator().manual_seed(0)
    assert RandomDihedral(g)(x).shape == x.shape


def test_dihedral_transforms_are_the_eight_distinct_group_elements():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    assert torch.equal(outs[1], x.flip(-1)) and torch.equal(outs[4], torch.rot90(x, 1, (-2, -1)))
    assert len(TTA_NAMES) == 8
