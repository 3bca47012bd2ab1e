from pathlib import Path

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


@pytest.fixture(scope="module")
def synth512(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth512")
    generate(root, 16, 0, size=512, seed=2)
    return root


def test_markdown_stays_under_the_kfp_ui_limit_at_512_px(synth512, tmp_path):
    """The KFP UI cuts Markdown at 400,000 characters (MarkdownViewer.tsx); a 512 px montage's PNG alone is
    over it, so the Markdown embeds a JPEG thumbnail and names the full image (issue 16)."""
    import base64
    import io
    import re
    from types import SimpleNamespace

    from components.montage.component import montage
    from hpa.montage import KFP_MARKDOWN_LIMIT

    md, full = SimpleNamespace(path=str(tmp_path / "montage.md")), SimpleNamespace(
        path=str(tmp_path / "full.png"), uri="s3://mlpipeline/v2/artifacts/run/montage/full_image")
    montage.python_func(data_uri=str(synth512), montage=md, full_image=full, n=16, seed=0)
    text = Path(md.path).read_text()
    full_png = Path(full.path).read_bytes()
    print(f"\n512 px montage: PNG {len(full_png):,} bytes ({len(base64.b64encode(full_png)):,} base64 characters); "
          f"Markdown {len(text):,} characters")
    assert len(base64.b64encode(full_png)) > KFP_MARKDOWN_LIMIT  # embedding it whole would be cut off
    assert len(text) < KFP_MARKDOWN_LIMIT
    assert "full size: `s3://mlpipeline/v2/artifacts/run/montage/full_image`" in text
    payload = re.search(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", text).group(1)
    with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
        assert im.format == "JPEG" and im.width >= 400  # still a readable thumbnail
        assert np.asarray(im.convert("RGB")).std() > 20


def test_small_montage_is_embedded_as_png(synth, tmp_path):
    from hpa.montage import montage_markdown

    png = Path(render_montage(synth, tmp_path / "m.png", n=4)).read_bytes()
    text = montage_markdown(png, "t")
    assert "data:image/png;base64," in text and "Thumbnail" not in text
