import io

import numpy as np
import pytest
import torch
from PIL import Image

from hpa.data import HPADataset, load_image, read_labels, read_sample_submission, targets_matrix, validate_layout
from hpa.errors import DataError
from hpa.inputs import to_rgb
from hpa.labels import COLORS
from hpa.synthetic import generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, 8, 3, size=32, seed=0)
    return root


def write_image(root, image_id, planes, split="train", ext="png"):
    """planes: dict color -> uint8 array (H, W) or (H, W, 3)."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for color, plane in planes.items():
        Image.fromarray(plane).save(folder / f"{image_id}_{color}.{ext}", quality=100 if ext == "jpg" else None)


def gray(value, size=16):
    return np.full((size, size), value, dtype=np.uint8)


def test_read_labels_parses_targets(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("Id,Target\nb,25 0\na,3\n")
    df = read_labels(path)
    assert list(df["Id"]) == ["b", "a"] and df["labels"].tolist() == [[0, 25], [3]]
    assert list(df["Target"]) == ["0 25", "3"]
    assert targets_matrix(df).sum(1).tolist() == [2, 1]


def test_read_labels_tolerates_bom_crlf_and_extra_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbfId,Target,Notes\r\nx1,0 2,hello\r\nx2,27,\r\n")
    df = read_labels(path)
    assert list(df["Id"]) == ["x1", "x2"] and df["labels"].tolist() == [[0, 2], [27]]
    assert "Notes" in df.columns


def test_read_labels_from_file_object_names_the_source():
    with pytest.raises(DataError, match=r"^s3://b/train.csv: missing column\(s\) Target"):
        read_labels(io.BytesIO(b"Id,Label\na,1\n"), where="s3://b/train.csv")


def test_read_sample_submission(synth):
    df = read_sample_submission(synth / "sample_submission.csv")
    assert list(df.columns) == ["Id", "Predicted"] and len(df) == 3


def test_load_image_rgby_and_rgb(synth):
    image_id = read_labels(synth / "train.csv")["Id"][0]
    rgby = load_image(synth, image_id)
    assert rgby.shape == (4, 32, 32) and rgby.dtype == np.uint8
    for c, color in enumerate(COLORS):
        assert np.array_equal(rgby[c], np.asarray(Image.open(synth / "train" / f"{image_id}_{color}.png")))
    rgb = load_image(synth, image_id, color_mode="rgb")
    assert np.array_equal(rgb, to_rgb(rgby))


def test_resize_when_stored_size_differs(synth):
    image_id = read_labels(synth / "train.csv")["Id"][0]
    small = load_image(synth, image_id, size=16)
    big = load_image(synth, image_id, size=48)
    assert small.shape == (4, 16, 16) and big.shape == (4, 48, 48)
    same = load_image(synth, image_id, size=32)
    assert np.array_equal(same, load_image(synth, image_id))
    # Antialiased downsampling keeps the mean brightness.
    assert abs(float(small.mean()) - float(same.mean())) < 3


def test_hpa_v18_jpg_rgb_gives_matching_plane(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 40
    write_image(tmp_path, "10580_1610_C1_1", {c: rgb for c in COLORS}, ext="jpg")
    image = load_image(tmp_path, "10580_1610_C1_1").astype(int)
    expected = [200, 100, 40, 150]  # yellow = (R + G) / 2
    assert np.abs(image.mean(axis=(1, 2)) - expected).max() <= 3, image.mean(axis=(1, 2))


def test_png_preferred_over_jpg_and_mixed_extensions(tmp_path):
    write_image(tmp_path, "m", {"red": gray(10), "green": gray(20)})
    write_image(tmp_path, "m", {"blue": gray(30), "yellow": gray(40)}, ext="jpg")
    write_image(tmp_path, "m", {"red": gray(99)}, ext="jpg")  # the PNG wins
    image = load_image(tmp_path, "m").astype(int)
    assert np.abs(image.mean(axis=(1, 2)) - [10, 20, 30, 40]).max() <= 2


def test_validate_layout_accepts_synthetic_data(synth):
    train = validate_layout(synth, "train")
    test = validate_layout(synth, "test")
    assert len(train) == 8 and len(test) == 3 and "labels" in train


def test_dataset_items_and_transform_hook(synth):
    df = read_labels(synth / "train.csv")
    seen = []

    def transform(x):
        seen.append(x.dtype)
        return x.flip(-1)

    ds = HPADataset(synth, df["Id"], targets_matrix(df), size=16, transform=transform)
    x, y = ds[1]
    assert len(ds) == 8 and seen == [torch.float32]
    assert x.shape == (4, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.float32 and y.shape == (28,) and y.tolist() == targets_matrix(df)[1].tolist()
    raw = torch.from_numpy(load_image(synth, df["Id"][1], size=16)).float() / 255
    assert torch.equal(x, raw.flip(-1))
    x3, y3 = HPADataset(synth, df["Id"], None, color_mode="rgb")[0]
    assert x3.shape == (3, 32, 32) and y3.sum() == 0


def test_dataset_works_with_a_dataloader(synth):
    df = read_labels(synth / "train.csv")
    loader = torch.utils.data.DataLoader(HPADataset(synth, df["Id"], targets_matrix(df)), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 4, 32, 32) and y.shape == (4, 28)


def test_dataset_rejects_mismatched_targets(synth):
    with pytest.raises(DataError, match=r"targets must have shape \(2, 28\)"):
        HPADataset(synth, ["a", "b"], np.zeros((3, 28)))
