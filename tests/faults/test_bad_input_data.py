"""Hostile or careless data inputs (issue 8, item 3): each is refused with one line naming the
file / Id / field, or loaded by a documented rule (hpa/data.py docstring), and nothing is written
under a final output name.

REFUSED and CONVERTED are module-level lists so the count is easy to print (test_count_of_cases).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from hpa.cli import main as cli_main
from hpa.data import HPADataset, load_image, read_labels, validate_layout
from hpa.errors import DataError
from hpa.labels import COLORS


# ---------------------------------------------------------------------------------------------
# Builders


def png_bytes(array: np.ndarray, **kw) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=kw.pop("format", "PNG"), **kw)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height 8-bit gray pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dataset(root: Path, image_id: str = "bad", overrides: dict | None = None, size: int = 16,
            csv: str | None = None) -> Path:
    """A one-image Kaggle layout; overrides maps color -> bytes (or None to leave the file out)."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(csv if csv is not None else f"Id,Target\n{image_id},0\n")
    for color in COLORS:
        data = (overrides or {}).get(color, png_bytes(np.full((size, size), 50, np.uint8)))
        if data is not None:
            (root / "train" / f"{image_id}_{color}.png").write_bytes(data)
    return root


def truncated_png() -> bytes:
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), compress_level=0)
    return data[: len(data) // 2]


def labels_case(text: str | bytes) -> Callable[[Path], Callable[[], object]]:
    def build(tmp: Path):
        path = tmp / "train.csv"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return lambda: read_labels(path)
    return build


def image_case(color: str, data: bytes | None, size: int = 16) -> Callable[[Path], Callable[[], object]]:
    def build(tmp: Path):
        root = dataset(tmp, overrides={color: data}, size=size)
        return lambda: load_image(root, "bad")
    return build


@dataclass
class Case:
    name: str
    build: Callable[[Path], Callable[[], object]]   # makes the input, returns the call that must fail
    expect: tuple[str, ...]                         # substrings the one-line message must contain


def _different_sizes(tmp: Path):
    root = dataset(tmp, overrides={"blue": png_bytes(np.zeros((20, 16), np.uint8))})
    return lambda: load_image(root, "bad")


def _validate(csv: str | None, make_dir: bool = True, files: bool = True):
    def build(tmp: Path):
        if csv is not None:
            (tmp / "train.csv").write_text(csv)
        if make_dir:
            (tmp / "train").mkdir()
        return lambda: validate_layout(tmp, "train")
    return build


def _validate_corrupt(tmp: Path):
    root = dataset(tmp, overrides={"red": b""})
    return lambda: validate_layout(root, "train")


def _unsafe_id_load(image_id: str):
    def build(tmp: Path):
        dataset(tmp)
        return lambda: load_image(tmp, image_id)
    return build


def _unsafe_id_dataset(tmp: Path):
    return lambda: HPADataset(tmp, ["ok", "a/../../etc"])


def _cmyk(tmp: Path):
    buffer = __import__("io").BytesIO()
    Image.new("CMYK", (16, 16), (9, 9, 9, 9)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    root = dataset(tmp, overrides={"green": data})
    return lambda: load_image(root, "bad")


REFUSED: list[Case] = [
    # label CSVs
    Case("csv without Target column", labels_case("Id,Label\na,1\n"),
         ("train.csv", "missing column(s) Target", "expected Id,Target")),
    Case("csv without header", labels_case("a,1\nb,2\n"), ("train.csv", "missing column(s) Id, Target")),
    Case("empty csv (zero bytes)", labels_case(""), ("train.csv", "empty file")),
    Case("csv with header only (empty dataset)", labels_case("Id,Target\n"), ("train.csv", "no rows")),
    Case("duplicate Ids", labels_case("Id,Target\na,1\nb,2\na,3\n"), ("train.csv", "duplicate Id 'a'", "rows 2, 4")),
    Case("label 28", labels_case("Id,Target\na,1\nb,28\n"), ("train.csv row 3 (Id b)", "label 28 is outside 0..27")),
    Case("label -1", labels_case("Id,Target\na,-1\n"), ("train.csv row 2 (Id a)", "label -1 is outside 0..27")),
    Case("repeated label '3 3'", labels_case("Id,Target\na,3 3\n"), ("row 2 (Id a)", "label 3 is repeated")),
    Case("empty Target", labels_case("Id,Target\na,\n"), ("row 2 (Id a)", "empty Target")),
    Case("non-integer Target", labels_case("Id,Target\na,1 x\n"), ("row 2 (Id a)", "'x' is not an integer")),
    Case("float Target", labels_case("Id,Target\na,2.5\n"), ("row 2 (Id a)", "'2.5' is not an integer")),
    Case("Id with slash", labels_case("Id,Target\nsub/a,1\n"), ("train.csv row 2", "Id 'sub/a' is not allowed")),
    Case("Id with backslash", labels_case("Id,Target\nsub\\a,1\n"), ("train.csv row 2", "is not allowed")),
    Case("Id '..'", labels_case("Id,Target\n..,1\n"), ("row 2", "Id '..' is not allowed")),
    Case("Id '../../etc/passwd'", labels_case("Id,Target\n../../etc/passwd,1\n"),
         ("row 2", "'../../etc/passwd' is not allowed")),
    Case("Id with space", labels_case('Id,Target\n"a b",1\n'), ("row 2", "'a b' is not allowed")),
    Case("empty Id", labels_case("Id,Target\n,1\n"), ("row 2", "Id '' is not allowed")),
    Case("csv not UTF-8", labels_case(b"Id,Target\n\xff\xfe,1\n"), ("train.csv", "not UTF-8")),
    Case("csv file missing", lambda tmp: (lambda: read_labels(tmp / "nope.csv")), ("nope.csv", "file not found")),
    # channel images
    Case("zero-byte PNG", image_case("red", b""), ("bad_red.png", "corrupt or truncated image")),
    Case("truncated PNG", image_case("green", truncated_png()), ("bad_green.png", "corrupt or truncated image")),
    Case("text file named .png", image_case("blue", b"hello, not an image\n"),
         ("bad_blue.png", "corrupt or truncated image")),
    Case("missing channel file", image_case("yellow", None), ("missing yellow channel for Id bad", "bad_yellow.png")),
    Case("1-pixel image", image_case("red", png_bytes(np.zeros((1, 1), np.uint8))),
         ("bad_red.png", "1x1 pixels", "minimum 8x8")),
    Case("decompression bomb (100000 x 100000 declared)", image_case("green", bomb_png(100_000, 100_000)),
         ("bad_green.png", "decompression bomb")),
    Case("over our pixel limit (7000 x 7000 declared)", image_case("blue", bomb_png(7000, 7000)),
         ("bad_blue.png", "7000x7000", "over the limit", "decompression bomb")),
    Case("CMYK image", _cmyk, ("bad_green.png", "unsupported pixel mode 'CMYK'")),
    Case("channels of different sizes", _different_sizes, ("Id bad", "different sizes", "blue 16x20", "red 16x16")),
    Case("Id with '..' passed to load_image", _unsafe_id_load("../bad"), ("Id '../bad' is not allowed",)),
    Case("Id with '/' passed to HPADataset", _unsafe_id_dataset, ("Id 'a/../../etc' is not allowed",)),
    # whole layouts
    Case("layout without train.csv", _validate(None), ("train.csv", "file not found")),
    Case("layout with empty train.csv (empty dataset)", _validate("Id,Target\n"), ("train.csv", "no rows")),
    Case("layout without train/ directory", _validate("Id,Target\na,0\n", make_dir=False),
         ("train", "missing image directory")),
    Case("layout missing a channel", _validate("Id,Target\na,0\n"), ("missing red channel for Id a",)),
    Case("layout with a zero-byte channel", _validate_corrupt, ("bad_red.png", "corrupt or truncated image")),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_bad_input_is_refused_with_one_clear_line(case, tmp_path):
    call = case.build(tmp_path)
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in case.expect:
        assert needle in message, f"{needle!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------
# Inputs that load by a documented rule (hpa/data.py docstring): checked by their pixel values.


def _converted(color: str, data: bytes, expected: float, tol: float = 0.0):
    return color, data, expected, tol


_rgb = np.zeros((16, 16, 3), np.uint8)
_rgb[..., 0], _rgb[..., 1], _rgb[..., 2] = 200, 100, 40
_palette = Image.fromarray(_rgb).convert("P")

CONVERTED = {
    "csv with UTF-8 BOM, CRLF and extra columns": None,  # checked in its own test below
    "16-bit PNG scaled by 1/257": _converted("red", png_bytes(np.full((16, 16), 51400, np.uint16)), 200),
    "RGB PNG gives the plane of its color (green -> G)": _converted("green", png_bytes(_rgb), 100),
    "RGB PNG for yellow gives (R + G) / 2": _converted("yellow", png_bytes(_rgb), 150),
    "RGBA PNG drops alpha (blue -> B)":
        _converted("blue", png_bytes(np.dstack([_rgb, np.full((16, 16), 7, np.uint8)])), 40),
    "gray+alpha PNG drops alpha": _converted("red", png_bytes(np.dstack([np.full((16, 16), 77, np.uint8)] * 2)), 77),
    "JPEG renamed .png decodes by content":
        _converted("green", png_bytes(np.full((16, 16), 120, np.uint8), format="JPEG", quality=95), 120, 2),
}


@pytest.mark.parametrize("name", [n for n, v in CONVERTED.items() if v is not None])
def test_odd_but_unambiguous_images_load_by_the_documented_rule(name, tmp_path):
    color, data, expected, tol = CONVERTED[name]
    dataset(tmp_path, overrides={color: data})
    image = load_image(tmp_path, "bad")
    plane = image[COLORS.index(color)].astype(float)
    assert image.dtype == np.uint8 and image.shape == (4, 16, 16)
    assert abs(plane.mean() - expected) <= tol + 1e-9, (plane.mean(), expected)


def test_palette_png_uses_its_colors(tmp_path):
    buffer = __import__("io").BytesIO()
    _palette.save(buffer, format="PNG")
    dataset(tmp_path, overrides={"red": buffer.getvalue()})
    assert abs(float(load_image(tmp_path, "bad")[0].mean()) - 200) <= 8


def test_csv_with_bom_crlf_and_extra_columns_is_read(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbfId,Target,Comment\r\nbad,0 5,ok\r\n")
    df = read_labels(path)
    assert df["Id"].tolist() == ["bad"] and df["labels"].tolist() == [[0, 5]]


# ---------------------------------------------------------------------------------------------
# Stages: one error line on stderr, exit 2, nothing under the final output name.


@pytest.mark.parametrize("csv,needle", [("Id,Target\na,28\n", "label 28 is outside 0..27"),
                                        ("Id,Target\n", "no rows"),
                                        ("Id,Target\na/b,1\n", "Id 'a/b' is not allowed")])
def test_split_stage_refuses_bad_labels_and_writes_nothing(tmp_path, capsys, csv, needle):
    (tmp_path / "train.csv").write_text(csv)
    out, plot = tmp_path / "split.csv", tmp_path / "folds.png"
    rc = cli_main(["split", "--labels", str(tmp_path / "train.csv"), "--out", str(out), "--plot", str(plot)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and needle in err[-1] and "train.csv" in err[-1]
    assert not out.exists() and not plot.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]


def test_split_stage_refuses_more_folds_than_images(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("Id,Target\na,0\nb,1\n")
    rc = cli_main(["split", "--labels", str(tmp_path / "train.csv"), "--folds", "5", "--out", str(tmp_path / "s.csv")])
    assert rc == 2 and "2 images cannot fill 5 folds" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_montage_stage_refuses_corrupt_image_and_writes_nothing(tmp_path, capsys):
    dataset(tmp_path / "data", overrides={"green": truncated_png()})
    out = tmp_path / "montage.png"
    rc = cli_main(["montage", "--data", str(tmp_path / "data"), "--out", str(out), "--n", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad_green.png: corrupt or truncated image" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".montage*"))


def test_count_of_cases():
    stage_cases = 3 + 1 + 1
    total = len(REFUSED) + len(CONVERTED) + 1 + stage_cases
    print(f"\nbad data inputs tried: {total} ({len(REFUSED)} refused with a clear line, "
          f"{len(CONVERTED) + 1} loaded by a documented rule, {stage_cases} stage runs that write nothing)")
    assert len(REFUSED) >= 30
