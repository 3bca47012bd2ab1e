"""Synthetic HPA-like data in the exact Kaggle layout: the embedded default dataset.

Labels follow the real HPA train statistics (`hpa.labels`): the number of labels per image and the
per-class counts are scaled to N (largest-remainder rounding), so class frequencies match the real
ones up to rounding, and every class appears at least once when N >= 28.

Images look like immunofluorescence of cells. Each image holds a few cells at random positions
(some cut by the border, hpa.cells): blue = DAPI nuclei (with darker nucleoli), red = radial microtubules,
yellow = reticular ER, both within irregular cell bodies. The green channel (the protein of
interest) is the sum of one spatial pattern per label (hpa.organelles), placed relative to the reference
structures (nucleus, nucleoli, nuclear rim, cell rim, perinuclear region, ...). Similar classes share
similar patterns (nucleoli vs fibrillar centers, MTOC vs centrosome, peroxisomes vs endosomes vs
lysosomes), rare ones are weak, not every cell expresses, and gain and noise vary per image,
so a small CNN learns the task well above a label-frequency baseline but not perfectly.

Geometry is expressed in units of size/64, so a 512 px image looks like a 64 px one at higher
resolution. Each image has its own random stream derived from (seed, split, index): the output is
byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from hpa.cells import cytoplasm, dots, make_cells, microtubules, reticulum, saturate, smooth_noise
from hpa.errors import ConfigError
from hpa.labels import COLORS, HPA_CLASS_COUNTS, HPA_LABELS_PER_IMAGE, NUM_CLASSES, format_target
from hpa.organelles import CLASS_AMPLITUDE, PATTERNS

log = logging.getLogger(__name__)

EXPRESSING_CELL_FRACTION = 0.8  # a cell shows the protein with this probability (at least one does)
PNG_COMPRESS_LEVEL = 1


# ---------------------------------------------------------------------------------------------
# Labels


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` that sum exactly to `total`."""
    quota = weights / weights.sum() * total
    counts = np.floor(quota).astype(np.int64)
    short = total - counts.sum()
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def _class_targets(total_labels: int, n: int) -> np.ndarray:
    targets = _largest_remainder(HPA_CLASS_COUNTS.astype(np.float64), total_labels)
    if n >= NUM_CLASSES:  # every class present: take the missing ones from the largest classes
        for c in np.flatnonzero(targets == 0):
            targets[np.argmax(targets)] -= 1
            targets[c] = 1
    return targets


def _top_k_weighted(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices drawn with probability proportional to weights (Gumbel top-k)."""
    keys = np.full(weights.shape, -np.inf)
    pos = weights > 0
    keys[pos] = np.log(weights[pos]) + rng.gumbel(size=int(pos.sum()))
    if k >= pos.sum():
        return np.flatnonzero(pos)
    return np.argpartition(-keys, k)[:k]


def sample_labels(n: int, rng: np.random.Generator) -> list[list[int]]:
    """Label sets for n images with the real HPA label statistics scaled to n.

    The number of labels per image and the number of images per class are both fixed by scaling
    the real counts to n; classes are then dealt out largest first, each to images chosen with
    probability proportional to their remaining free slots, so no image gets a class twice.
    """
    if n <= 0:
        return []
    sizes = np.array(sorted(HPA_LABELS_PER_IMAGE))
    k = np.repeat(sizes, _largest_remainder(np.array([HPA_LABELS_PER_IMAGE[s] for s in sizes], float), n))
    k = rng.permutation(k)
    targets = _class_targets(int(k.sum()), n)
    free = k.astype(np.float64)
    onehot = np.zeros((n, NUM_CLASSES), dtype=bool)
    for c in np.argsort(-targets, kind="stable"):
        rows = _top_k_weighted(rng, free, int(targets[c]))
        onehot[rows, c] = True
        free[rows] -= 1
    # Slots left over when the dealing ran short: an image must still have at least one label.
    for i in np.flatnonzero(~onehot.any(axis=1)):
        onehot[i, rng.choice(NUM_CLASSES, p=HPA_CLASS_COUNTS / HPA_CLASS_COUNTS.sum())] = True
    return [np.flatnonzero(row).tolist() for row in onehot]


def make_ids(n: int, rng: np.random.Generator) -> list[str]:
    """Kaggle-looking ids (uuid strings), unique, deterministic for the generator state."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        value = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        if value not in seen:
            seen.add(value)
            ids.append(value)
    return ids




def _to_uint8(field: np.ndarray) -> np.ndarray:
    return (np.clip(field, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_image(labels: list[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic RGBY image with the given labels -> uint8 (4, size, size)."""
    cells = make_cells(rng, size)
    shape = (size, size)
    unit = cells.unit
    rays = int(rng.integers(14, 22))
    ctx = {
        "warp": smooth_noise(rng, shape, 3.0 * unit),
        "warp2": smooth_noise(rng, shape, 4.0 * unit),
        "fine": smooth_noise(rng, shape, 1.0 * unit),
        "fine2": smooth_noise(rng, shape, 1.6 * unit),
        "rays": rays,
        "actin_angle": rng.uniform(0, np.pi),
    }
    ctx["tubules"] = microtubules(rng, cells, ctx["warp"], rays)
    ctx["er"] = reticulum(cells, smooth_noise(rng, shape, 1.3 * unit))
    k = len(cells.centers)
    cell_gain = rng.uniform(0.6, 1.0, k).astype(np.float32)[cells.owner]

    nucleus = nucleus_mask = cells.nucleus
    if 17 in labels:  # metaphase: the first cell's chromatin condenses into a plate across the spindle
        plate = np.exp(-(((cells.xx - cells.nuc_centers[0, 1]) * np.cos(cells.nuc_angle[0])
                          + (cells.yy - cells.nuc_centers[0, 0]) * np.sin(cells.nuc_angle[0])) / (1.2 * unit)) ** 2)
        nucleus = np.where(cells.owner == 0, nucleus * (0.25 + 0.9 * plate), nucleus)
    holes = dots(cells, np.concatenate(cells.nucleoli), 1.3 * unit)
    blue = nucleus * (0.8 + 0.12 * ctx["fine"]) * (1 - 0.35 * np.clip(holes, 0, 1)) * cell_gain
    red = (0.55 * ctx["tubules"] + 0.18 * cells.body * (1 + 0.3 * ctx["warp2"])) * cell_gain
    yellow = (0.6 * ctx["er"] + 0.12 * cells.body) * cell_gain

    # The protein patterns draw from their own stream, so the reference channels (and the noise)
    # of an image do not depend on its labels.
    label_rng = rng.spawn(1)[0]
    green = np.zeros(shape, np.float32)
    for c in labels:
        on = [i for i in range(k) if label_rng.random() < EXPRESSING_CELL_FRACTION] or [0]
        if c in (16, 17):  # one dividing cell per image
            on = [0]
        field = saturate(PATTERNS[c](label_rng, cells, on, ctx))
        expressing = np.isin(cells.owner, on) if c not in (16, 17, 22) else np.ones(shape, bool)
        green += CLASS_AMPLITUDE[c] * label_rng.uniform(0.4, 1.0) * field * expressing
    # Unspecific background staining of nucleus and cytoplasm: weak Nucleoplasm/Cytosol look alike.
    haze = rng.uniform(0.0, 0.12) * nucleus_mask + rng.uniform(0.02, 0.12) * cytoplasm(cells)
    green = green * rng.uniform(0.7, 1.2) + haze

    channels = []
    for field, noise in ((red, 0.035), (green, 0.04), (blue, 0.03), (yellow, 0.035)):
        field = gaussian_filter(field.astype(np.float32), 0.5 * unit) if unit > 1 else field
        field = field * rng.uniform(0.8, 1.15) + 0.02 + noise * rng.standard_normal(shape).astype(np.float32)
        channels.append(_to_uint8(field))
    return np.stack(channels)


# ---------------------------------------------------------------------------------------------
# Kaggle layout writer


def _write_png(path: Path, plane: np.ndarray) -> None:
    Image.fromarray(plane).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _write_csv(path: Path, header: str, rows: list[tuple[str, str]]) -> None:
    text = header + "\n" + "".join(f"{a},{b}\n" for a, b in rows)
    path.write_text(text, encoding="utf-8", newline="\n")


def _write_split(out: Path, split: int, name: str, ids, labels, size, seed) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image_id, target) in enumerate(zip(ids, labels)):
        image = render_image(target, size, np.random.default_rng([seed, split, i]))
        for color, plane in zip(COLORS, image):
            _write_png(folder / f"{image_id}_{color}.png", plane)


def generate(out_dir, n_train: int, n_test: int, size: int = 64, seed: int = 0) -> dict:
    """Write a synthetic dataset in the Kaggle layout under out_dir; returns a summary dict.

    train.csv, train/, and (when n_test > 0) sample_submission.csv, test_labels.csv, test/.
    """
    if n_train < 1 or n_test < 0:
        raise ConfigError(f"synth: need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if not 16 <= size <= 4096:
        raise ConfigError(f"synth: size must be in 16..4096 pixels, got {size}")
    if seed < 0:
        raise ConfigError(f"synth: seed must be >= 0, got {seed}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = np.random.default_rng([seed, 7])
    ids = make_ids(n_train + n_test, root)
    train_ids, test_ids = ids[:n_train], ids[n_train:]
    train_labels = sample_labels(n_train, np.random.default_rng([seed, 1]))
    test_labels = sample_labels(n_test, np.random.default_rng([seed, 2]))
    _write_split(out, 0, "train", train_ids, train_labels, size, seed)
    # CSVs after the images (a half-written directory has no train.csv) and sorted by Id, like Kaggle's.
    # With n_test = 0 there is no test part at all (an empty sample_submission.csv would not validate).
    if n_test:
        _write_split(out, 1, "test", test_ids, test_labels, size, seed)
        test_rows = sorted(zip(test_ids, map(format_target, test_labels)))
        _write_csv(out / "test_labels.csv", "Id,Target", test_rows)
        _write_csv(out / "sample_submission.csv", "Id,Predicted", [(i, "0") for i, _ in test_rows])
    _write_csv(out / "train.csv", "Id,Target", sorted(zip(train_ids, map(format_target, train_labels))))
    counts = np.zeros(NUM_CLASSES, dtype=int)
    for labels in train_labels:
        counts[labels] += 1
    seconds = time.perf_counter() - start
    log.info("synth: wrote %d train + %d test images of %d px to %s in %.1f s", n_train, n_test, size, out, seconds)
    return {"out_dir": str(out), "n_train": n_train, "n_test": n_test, "size": size, "seed": seed,
            "class_counts": counts.tolist(), "seconds": round(seconds, 3)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa synth",
                                     description="Write synthetic HPA-like data in the Kaggle layout.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    summary = generate(os.fspath(args.out), args.n_train, args.n_test, args.size, args.seed)
    print(f"wrote {summary['n_train']} train and {summary['n_test']} test images "
          f"({summary['size']} px) to {summary['out_dir']} in {summary['seconds']:.1f} s")
    return 0
