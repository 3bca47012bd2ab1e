"""Kaggle-layout reader: label CSVs, RGBY image loading, layout validation, the torch Datasets.

Layout: `<root>/train.csv` (Id,Target), `<root>/train/<Id>_<color>.png` for color in red, green,
blue, yellow; `<root>/sample_submission.csv` (Id,Predicted) and `<root>/test/<Id>_<color>.png`.
The HPA v18 external set stores `<Id>_<color>.jpg` instead; both are read.

Pixel rules for channel files (one documented rule each, so careless inputs still load the same way
everywhere; anything else is a DataError naming the file):

- 8-bit grayscale ("L"): used as is.
- 16-bit or 32-bit integer grayscale ("I;16", "I"): scaled from the 16-bit range, round(v / 257),
  clipped to 0..255.
- Color (RGB, RGBA, palette, or a JPEG — HPA v18 stores channels as RGB JPEGs): the plane that
  matches the file's color: red -> R, green -> G, blue -> B, yellow -> (R + G) / 2. A gray image
  saved as RGB (R = G = B) therefore loads unchanged.
- Gray with alpha ("LA"), bilevel ("1"): converted to "L" (alpha dropped, 1 -> 255).
- The decoder is chosen by content, not by extension: a JPEG renamed `.png` loads as a JPEG.
- Images with a side below MIN_SIDE pixels (a 1-pixel image is a placeholder, not a micrograph) and
  images that declare more than MAX_PIXELS pixels (decompression bombs) are refused.
- The four channels of one image must have the same size; `size=` then resizes them with
  `hpa.inputs.resize_image` (bilinear, antialiased) when the stored size differs from the requested one.

`PNGDataset` yields what every source yields (uint8 R,G,B,Y at the requested size, see hpa.inputs);
`HPADataset` finishes its items for a model on the CPU (float, colour mode) and has a transform hook.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from hpa.errors import DataError
from hpa.labels import COLORS, NUM_CLASSES, parse_target, to_matrix

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000      # per channel; real HPA images are at most 3072 x 3072 (9.4 M)
MIN_SIDE = 8
EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_PLANE = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}


def check_id(image_id: object, where: str) -> str:
    """An Id must be a plain file-name stem: no path separators, no '..', only [A-Za-z0-9_-]."""
    if not isinstance(image_id, str) or not ID_PATTERN.fullmatch(image_id):
        raise DataError(f"{where}: Id {image_id!r} is not allowed (expected only letters, digits, '_' and '-')")
    return image_id


def _read_csv(csv_path, where: str | None, required: tuple[str, ...]) -> tuple[pd.DataFrame, str]:
    is_file_object = hasattr(csv_path, "read")
    name = where or ("<csv>" if is_file_object else os.fspath(csv_path))
    try:
        if is_file_object:
            raw = csv_path.read()
        elif str(csv_path).startswith("s3://"):
            from hpa.store import read_bytes

            raw = read_bytes(str(csv_path))
        else:
            raw = Path(csv_path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    try:
        text = raw.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text, expected a CSV with columns {','.join(required)}") from None
    if not text.strip():
        raise DataError(f"{name}: empty file, expected a CSV with columns {','.join(required)}")
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.ParserError as exc:
        raise DataError(f"{name}: malformed CSV ({str(exc).splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{name}: missing column(s) {', '.join(missing)}; expected {','.join(required)}, "
                        f"found {','.join(df.columns) or 'none'}")
    if df.empty:
        raise DataError(f"{name}: no rows, expected at least one image")
    df["Id"] = df["Id"].str.strip()
    for row, image_id in enumerate(df["Id"], start=2):
        check_id(image_id, f"{name} row {row}")
    duplicated = df["Id"].duplicated(keep=False)
    if duplicated.any():
        rows = (np.flatnonzero(duplicated.to_numpy()) + 2).tolist()
        raise DataError(f"{name}: duplicate Id {df['Id'][duplicated].iloc[0]!r} (rows {', '.join(map(str, rows[:5]))})")
    return df, name


def read_labels(csv_path, where: str | None = None) -> pd.DataFrame:
    """Read an `Id,Target` CSV (local path, s3:// URI or file object) -> DataFrame Id, Target, labels.

    `labels` holds the sorted class ids (list[int]); Target is rewritten in canonical form ("0 25").

    Extra columns are kept; a BOM and CRLF line ends are fine. `where` names the file in errors
    (for example its s3:// URI).
    """
    df, name = _read_csv(csv_path, where, ("Id", "Target"))
    labels = [parse_target(t, f"{name} row {row} (Id {i})")
              for row, (i, t) in enumerate(zip(df["Id"], df["Target"]), 2)]
    df["labels"] = labels
    df["Target"] = [" ".join(map(str, x)) for x in labels]
    return df.reset_index(drop=True)


def read_sample_submission(csv_path, where: str | None = None) -> pd.DataFrame:
    """Read an `Id,Predicted` CSV (Kaggle's sample_submission.csv; path, URI or file object)."""
    df, _ = _read_csv(csv_path, where, ("Id", "Predicted"))
    return df.reset_index(drop=True)


def targets_matrix(df: pd.DataFrame) -> np.ndarray:
    """(N, 28) uint8 multi-hot targets of a read_labels() frame."""
    return to_matrix(df["labels"].tolist())


# ---------------------------------------------------------------------------------------------
# Images


def channel_path(root, image_id: str, color: str, split: str = "train") -> Path:
    """The stored file for one channel (.png preferred, then .jpg/.jpeg); DataError if none exists."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    check_id(image_id, f"{root}/{split}")
    folder = Path(root) / split
    for ext in EXTENSIONS:
        path = folder / f"{image_id}_{color}{ext}"
        if path.is_file():
            return path
    raise DataError(f"{folder}: missing {color} channel for Id {image_id} (expected {image_id}_{color}.png or .jpg)")


def decode_channel(data_or_path, color: str, name: str) -> np.ndarray:
    """Decode one channel image (bytes or path) to uint8 (H, W), following the module's pixel rules."""
    is_bytes = isinstance(data_or_path, (bytes, bytearray))
    try:
        empty = len(data_or_path) == 0 if is_bytes else os.path.getsize(data_or_path) == 0
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    if empty:
        raise DataError(f"{name}: corrupt or truncated image (empty file, 0 bytes)")
    source = io.BytesIO(data_or_path) if is_bytes else data_or_path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise DataError(f"{name}: declares {width}x{height} pixels, over the limit of {MAX_PIXELS} "
                                    "(decompression bomb?)")
                if min(width, height) < MIN_SIDE:
                    raise DataError(f"{name}: image is {width}x{height} pixels, smaller than the minimum "
                                    f"{MIN_SIDE}x{MIN_SIDE}")
                im.load()
                return _to_plane(im, color, name)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"declares {declared.group(1)} pixels" if declared else "declares too many pixels"
        raise DataError(f"{name}: {what}, over the limit of {MAX_PIXELS} (decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: corrupt or truncated image (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or damaged data found while decoding.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name}: corrupt or truncated image ({reason})") from None


def _to_plane(im: Image.Image, color: str, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.float64)
        return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    if mode in ("LA", "1"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("RGB", "RGBA", "P", "PA", "RGBX"):
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint16)
        planes = _PLANE[color]
        return ((rgb[..., list(planes)].sum(-1) + len(planes) // 2) // len(planes)).astype(np.uint8)
    raise DataError(f"{name}: unsupported pixel mode {mode!r}; expected 8-bit grayscale (or 16-bit gray / RGB)")


def load_image(root, image_id: str, split: str = "train", size: int | None = None,
               color_mode: str = "rgby") -> np.ndarray:
    """Load one image -> uint8 (C, H, W) at `size` (or as stored): channels R, G, B, Y for rgby, or a picture in
    the to_rgb() mapping (rounded to uint8) for rgb; models get `hpa.inputs.prepare`'s float mapping instead."""
    from hpa.inputs import COLOR_MODES, resize_image, to_rgb

    if color_mode not in COLOR_MODES:
        raise DataError(f"color_mode {color_mode!r} is not one of {', '.join(COLOR_MODES)}")
    if size is not None and not (isinstance(size, int) and size >= MIN_SIDE):
        raise DataError(f"size must be an integer >= {MIN_SIDE}, got {size!r}")
    planes = []
    for color in COLORS:
        path = channel_path(root, image_id, color, split)
        planes.append(decode_channel(path, color, str(path)))
    shapes = {c: p.shape for c, p in zip(COLORS, planes)}
    if len(set(shapes.values())) > 1:
        sizes = ", ".join(f"{c} {s[1]}x{s[0]}" for c, s in shapes.items())
        raise DataError(f"{Path(root) / split}: channels of Id {image_id} have different sizes ({sizes})")
    image = np.stack(planes)
    if size is not None:
        image = resize_image(image, size)
    return to_rgb(image) if color_mode == "rgb" else image


# ---------------------------------------------------------------------------------------------
# Layout validation


def _labels_file(root: Path, split: str) -> tuple[pd.DataFrame, Path]:
    if split == "train":
        path = root / "train.csv"
        return read_labels(path), path
    if split == "test":
        path = root / "sample_submission.csv"
        return read_sample_submission(path), path
    raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def validate_layout(root, split: str = "train", check_images: bool = True) -> pd.DataFrame:
    """Check a Kaggle-layout split: the CSV, every channel file, and (check_images) every decode.

    Returns the CSV as read (read_labels() for train, read_sample_submission() for test). The first
    problem raises a DataError naming the file, Id or color.
    """
    root = Path(root)
    df, _ = _labels_file(root, split)
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder}: missing image directory for split {split!r}")
    names = {entry.name for entry in os.scandir(folder)}
    for image_id in df["Id"]:
        for color in COLORS:
            if not any(f"{image_id}_{color}{ext}" in names for ext in EXTENSIONS):
                raise DataError(f"{folder}: missing {color} channel for Id {image_id} "
                                f"(expected {image_id}_{color}.png or .jpg)")
    if check_images:
        from tqdm.auto import tqdm

        for image_id in tqdm(df["Id"], desc=f"validate {split}", unit="img", disable=None, leave=False):
            load_image(root, image_id, split)
    return df


# ---------------------------------------------------------------------------------------------
# Torch datasets


class PNGDataset:
    """Map-style torch Dataset over a Kaggle-layout directory (local; an s3:// dataset through a
    `hpa.committed.image_view`).

    Items are (uint8 tensor (4, H, W) R,G,B,Y at `size` (None: as stored), float32 target (28,), id): the
    items of `hpa.shards.ShardDataset`, finished on the device by `hpa.inputs.prepare`. Without targets
    the target is zeros.
    """

    def __init__(self, root, ids, targets=None, split: str = "train", size: int | None = None):
        self.root = Path(root)
        self.ids = [check_id(i, f"{root}/{split}") for i in ids]
        if targets is None:
            targets = np.zeros((len(self.ids), NUM_CLASSES), dtype=np.float32)
        targets = np.asarray(targets, dtype=np.float32)
        if targets.shape != (len(self.ids), NUM_CLASSES):
            raise DataError(f"targets must have shape ({len(self.ids)}, {NUM_CLASSES}), got {targets.shape}")
        self.targets = targets
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        import torch

        image = load_image(self.root, self.ids[index], self.split, self.size)
        return torch.from_numpy(image), torch.from_numpy(self.targets[index].copy()), self.ids[index]


class HPADataset(PNGDataset):
    """PNGDataset items finished for a model on the CPU: (float32 tensor (C, H, W) in [0, 1], float32
    target (28,)), through `hpa.inputs.prepare` in `color_mode`; `transform` (the augmentation hook, e.g.
    `hpa.inputs.RandomDihedral`) receives and returns the float tensor.
    """

    def __init__(self, root, ids, targets=None, split: str = "train", size: int | None = None,
                 color_mode: str = "rgby", transform=None):
        from hpa.inputs import COLOR_MODES

        super().__init__(root, ids, targets, split, size)
        if color_mode not in COLOR_MODES:
            raise DataError(f"color_mode {color_mode!r} is not one of {', '.join(COLOR_MODES)}")
        self.color_mode, self.transform = color_mode, transform

    def __getitem__(self, index: int):
        from hpa.inputs import CHANNELS, prepare

        image, target, _ = super().__getitem__(index)
        x = prepare(image[None], CHANNELS[self.color_mode])[0]
        if self.transform is not None:
            x = self.transform(x)
        return x, target
