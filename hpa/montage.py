"""Sample montage: a grid of RGB composites of random images with their label names (PNG).

Composite: R = red + yellow/2, G = green + yellow/2, B = blue (yellow, the ER, shows as yellow on top
of the red microtubules and green protein), clipped to 255. For an s3:// dataset only the CSV and
the channel files of the n chosen images are downloaded.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from hpa.data import EXTENSIONS, decode_channel, load_image, read_labels
from hpa.errors import DataError
from hpa.labels import CLASS_NAMES, COLORS
from hpa.store import write_bytes

log = logging.getLogger(__name__)


def composite(image: np.ndarray) -> np.ndarray:
    """RGBY uint8 (4, H, W) -> displayable RGB uint8 (H, W, 3)."""
    r, g, b, y = image.astype(np.uint16)
    rgb = np.stack([r + y // 2, g + y // 2, b], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _is_uri(path) -> bool:
    return str(path).startswith("s3://")


def _load_from_store(ds, image_id: str, split: str = "train") -> np.ndarray:
    """One image of a committed dataset (hpa.committed), every channel verified against its manifest."""
    planes = []
    for color in COLORS:
        key = ds.find(f"{split}/{image_id}_{color}", EXTENSIONS)
        if key is None:
            raise DataError(f"{ds.store.join(split)}: missing {color} channel for Id {image_id}")
        planes.append(decode_channel(ds.read_bytes(key), color, ds.store.join(key)))
    if len({p.shape for p in planes}) > 1:
        raise DataError(f"{ds.store.join(split)}: channels of Id {image_id} have different sizes")
    return np.stack(planes)


def _sample(data, n: int, seed: int):
    """(ids, label lists, image loader) for n images chosen deterministically by seed."""
    if _is_uri(data):
        from hpa.committed import open_dataset

        ds = open_dataset(str(data))
        df = read_labels(io.BytesIO(ds.read_bytes("train.csv")), where=ds.store.join("train.csv"))
        loader = lambda image_id: _load_from_store(ds, image_id)  # noqa: E731
    else:
        df = read_labels(Path(data) / "train.csv")
        loader = lambda image_id: load_image(data, image_id)  # noqa: E731
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(df), size=min(n, len(df)), replace=False))
    return df["Id"].iloc[rows].tolist(), df["labels"].iloc[rows].tolist(), loader


def _title(labels: list[int], width: int = 26) -> str:
    names = ", ".join(CLASS_NAMES[c] for c in labels)
    return "\n".join(textwrap.wrap(names, width)[:3])


def render_montage(data_root_or_uri, png_path, n: int = 16, seed: int = 0) -> str:
    """Render n random train images of a dataset (directory or s3:// URI) into a PNG grid; returns png_path.

    png_path may itself be an s3:// URI. Titles are the label names (train.csv).
    """
    if n < 1:
        raise DataError(f"montage: n must be >= 1, got {n}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids, labels, loader = _sample(data_root_or_uri, n, seed)
    cols = int(np.ceil(np.sqrt(len(ids))))
    rows = int(np.ceil(len(ids) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image_id, target in zip(axes.flat, ids, labels):
        ax.imshow(composite(loader(image_id)), interpolation="nearest")
        ax.set_title(_title(target), fontsize=7)
    fig.suptitle(f"{len(ids)} samples from {data_root_or_uri}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes(str(png_path), buffer.getvalue())  # atomic, local path or s3:// URI
    log.info("montage: wrote %d images to %s", len(ids), png_path)
    return str(png_path)


# The KFP UI cuts Markdown after this many characters ("This markdown is too large to render completely"):
# kubeflow/pipelines 2.17.0 frontend/src/components/viewers/MarkdownViewer.tsx, MAX_MARKDOWN_STR_LENGTH = 50 * 1000 * 8.
KFP_MARKDOWN_LIMIT = 400_000
MARKDOWN_BUDGET = 300_000  # what montage_markdown aims for: a margin for the text around the image


def montage_markdown(png: bytes, title: str, full_image: str | None = None, budget: int = MARKDOWN_BUDGET) -> str:
    """Markdown with the montage embedded as a data URI, always under `budget` characters: the PNG itself when
    it fits, else a JPEG thumbnail shrunk until it does (each try 0.8x the width), with a line naming the
    full-size image (`full_image`, e.g. the artifact's s3:// URI)."""
    from PIL import Image

    head = f"### {title}\n\n"
    text = head + f"![montage](data:image/png;base64,{base64.b64encode(png).decode('ascii')})\n"
    if len(text) <= budget:
        return text
    with Image.open(io.BytesIO(png)) as im:
        image = im.convert("RGB")
    width = image.width
    while width >= 64:
        height = max(1, round(image.height * width / image.width))
        buffer = io.BytesIO()
        image.resize((width, height), Image.LANCZOS).save(buffer, format="JPEG", quality=85, optimize=True)
        note = (f"Thumbnail, {width}x{height} px JPEG, of the {image.width}x{image.height} px montage"
                + (f"; full size: `{full_image}`" if full_image else "") + ".\n\n")
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        text = head + note + f"![montage](data:image/jpeg;base64,{encoded})\n"
        if len(text) <= budget:
            return text
        width = int(width * 0.8)
    raise DataError(f"montage: no thumbnail of {title!r} fits in {budget} characters of Markdown")


def montage_task(data_uri: str, png_out, image_uri: str | None = None, n: int = 16, seed: int = 0) -> str:
    """The montage pipeline task: render_montage of n images, the full-size PNG copied to `png_out`; returns the
    Markdown that shows it in the KFP UI (montage_markdown; `image_uri` is where png_out is stored)."""
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "montage.png")
        render_montage(data_uri, png, n=n, seed=seed)
        with open(png, "rb") as f:
            text = montage_markdown(f.read(), f"Sample images from `{data_uri}`", image_uri)
        shutil.copyfile(png, png_out)
    return text


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa montage", description="Render a sample montage (PNG).")
    parser.add_argument("--data", required=True, help="dataset directory or s3:// URI (Kaggle layout)")
    parser.add_argument("--out", required=True, help="output PNG path or s3:// URI")
    parser.add_argument("--n", type=int, default=16, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    path = render_montage(args.data, args.out, args.n, args.seed)
    print(f"wrote montage of {args.n} images to {path}")
    return 0
