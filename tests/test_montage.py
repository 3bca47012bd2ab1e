import numpy as np
import pytest
from PIL import Image

from hpa.montage import composite, main, render_montage
from hpa.synthetic import generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, 12, 2, size=32, seed=1)
    return root


def test_composite_adds_yellow_to_red_and_green():
    image = np.zeros((4, 1, 2), np.uint8)
    image[0, 0, 0], image[3, 0, 0] = 100, 80     # red + yellow
    image[1, 0, 1], image[3, 0, 1] = 250, 100    # green saturates
    rgb = composite(image)
    assert rgb.shape == (1, 2, 3)
    assert rgb[0, 0].tolist() == [140, 40, 0] and rgb[0, 1].tolist() == [50, 255, 0]


def test_montage_of_synthetic_data(synth, tmp_path):
    path = render_montage(synth, tmp_path / "montage.png", n=9, seed=0)
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 400
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert pixels.std() > 20
    assert (pixels[..., 2] > pixels[..., 0] + 60).sum() > 100  # blue nuclei are visible
    assert not list(tmp_path.glob("*.tmp"))


def test_montage_is_deterministic_and_caps_n(synth, tmp_path):
    a = render_montage(synth, tmp_path / "a.png", n=40, seed=3)  # only 12 images exist
    b = render_montage(synth, tmp_path / "b.png", n=40, seed=3)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes() and a != b


def test_cli(synth, tmp_path, capsys):
    assert main(["--data", str(synth), "--out", str(tmp_path / "m.png"), "--n", "4"]) == 0
    assert "wrote montage of 4 images" in capsys.readouterr().out and (tmp_path / "m.png").exists()


def test_montage_from_s3_downloads_only_what_it_shows(synth, s3_bucket, tmp_path):
    from hpa.store import open_store, read_bytes

    store = open_store(s3_bucket + "data")
    store.commit_manifest(store.upload_tree(synth), {})  # s3 data is read only when committed
    fetched = []
    original = type(store).get_bytes

    def counting(self, key, *args, **kwargs):
        fetched.append(key)
        return original(self, key, *args, **kwargs)

    type(store).get_bytes = counting
    try:
        render_montage(s3_bucket + "data", s3_bucket + "plots/montage.png", n=3, seed=0)
    finally:
        type(store).get_bytes = original
    assert read_bytes(s3_bucket + "plots/montage.png")[:4] == b"\x89PNG"
    images = [k for k in fetched if k.endswith(".png") and "/" in k]
    assert "train.csv" in fetched and len(images) == 3 * 4
