import hashlib
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa.cells import make_cells
from hpa.errors import ConfigError
from hpa.labels import COLORS, HPA_CLASS_COUNTS, HPA_LABELS_PER_IMAGE, HPA_N_IMAGES, NUM_CLASSES
from hpa.synthetic import generate, main, render_image, sample_labels

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _class_counts(labels):
    counts = np.zeros(NUM_CLASSES, dtype=int)
    for row in labels:
        counts[row] += 1
    return counts


def test_label_frequencies_follow_real_hpa_for_5000():
    labels = sample_labels(5000, np.random.default_rng(0))
    counts = _class_counts(labels)
    expected = HPA_CLASS_COUNTS / HPA_N_IMAGES * 5000
    gap = np.abs(counts - expected)
    print(f"\nN=5000 worst class gap {gap.max():.2f} images; Nucleoplasm {counts[0]} vs {expected[0]:.1f}, "
          f"Rods & rings {counts[27]} vs {expected[27]:.1f}")
    assert (gap <= np.maximum(0.02 * expected, 1.5)).all(), list(zip(counts, expected.round(1)))
    sizes = np.bincount([len(row) for row in labels], minlength=6)[1:]
    real = np.array([HPA_LABELS_PER_IMAGE[k] for k in range(1, 6)]) / HPA_N_IMAGES * 5000
    assert (np.abs(sizes - real) <= 1).all(), (sizes, real)
    assert all(len(set(row)) == len(row) and row == sorted(row) for row in labels)


@pytest.mark.parametrize("n", [28, 29, 100, 1000])
def test_every_class_present_when_n_allows(n):
    labels = sample_labels(n, np.random.default_rng(n))
    counts = _class_counts(labels)
    assert (counts >= 1).all(), counts
    assert len(labels) == n and all(1 <= len(row) <= 5 for row in labels)


@pytest.mark.parametrize("n", [0, 1, 5, 27])
def test_tiny_n_still_labels_every_image(n):
    labels = sample_labels(n, np.random.default_rng(0))
    assert len(labels) == n and all(len(row) >= 1 for row in labels)


def test_sample_labels_is_deterministic_and_seed_dependent():
    a = sample_labels(300, np.random.default_rng(3))
    assert a == sample_labels(300, np.random.default_rng(3))
    assert a != sample_labels(300, np.random.default_rng(4))


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_exact_kaggle_layout(tmp_path):
    summary = generate(tmp_path, 12, 5, size=32, seed=1)
    assert summary["n_train"] == 12 and summary["n_test"] == 5 and sum(summary["class_counts"]) >= 12
    top = sorted(p.name for p in tmp_path.iterdir())
    assert top == ["sample_submission.csv", "test", "test_labels.csv", "train", "train.csv"]
    train = pd.read_csv(tmp_path / "train.csv", dtype=str)
    sub = pd.read_csv(tmp_path / "sample_submission.csv", dtype=str)
    test_labels = pd.read_csv(tmp_path / "test_labels.csv", dtype=str)
    assert list(train.columns) == ["Id", "Target"] and list(sub.columns) == ["Id", "Predicted"]
    assert list(test_labels.columns) == ["Id", "Target"] and list(sub["Id"]) == list(test_labels["Id"])
    assert list(train["Id"]) == sorted(train["Id"]) and not set(train["Id"]) & set(sub["Id"])
    assert all(UUID.fullmatch(i) for i in list(train["Id"]) + list(sub["Id"]))
    assert (tmp_path / "train.csv").read_bytes().count(b"\r") == 0
    for split, ids in (("train", train["Id"]), ("test", sub["Id"])):
        expected = sorted(f"{i}_{c}.png" for i in ids for c in COLORS)
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == expected
    with Image.open(tmp_path / "train" / f"{train['Id'][0]}_green.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (32, 32))


def test_no_test_part_when_n_test_is_zero(tmp_path):
    generate(tmp_path, 3, 0, size=32, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "train.csv"]


def test_same_seed_gives_identical_bytes(tmp_path):
    generate(tmp_path / "a", 6, 3, size=32, seed=5)
    generate(tmp_path / "b", 6, 3, size=32, seed=5)
    generate(tmp_path / "c", 6, 3, size=32, seed=6)
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert set(a.values()).isdisjoint(c.values())


def test_generation_speed(tmp_path):
    # CPU time of this process, so that other jobs on a shared machine do not count.
    n = 200
    wall, cpu = time.perf_counter(), time.process_time()
    generate(tmp_path, n, 0, size=64, seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"\nsynth: {n} images (4 PNGs each) at 64 px: {1000 * cpu / n:.1f} ms CPU/image "
          f"({1000 * wall / n:.1f} ms wall) -> 2,000 images in about {2000 * cpu / n:.0f} s of one core")
    assert 2000 * cpu / n < 30  # "well under a minute" on one core


def _mean_green(image, mask):
    return float(image[1][mask].mean())


@pytest.mark.parametrize("cls,inside,outside", [
    (0, "nucleus", "cytoplasm"),        # Nucleoplasm fills the nucleus
    (25, "cytoplasm", "nucleus"),       # Cytosol fills the cell body around it
    (1, "nuclear_rim", "nucleus"),      # Nuclear membrane is a ring on the nuclear rim
    (21, "cell_rim", "cytoplasm"),      # Plasma membrane is a ring on the cell rim
    (11, "cytoplasm", "nucleus"),       # Intermediate filaments stay out of the nucleus
])
def test_green_pattern_sits_where_the_class_says(cls, inside, outside):
    ratios = []
    for seed in range(4):
        cells = make_cells(np.random.default_rng(seed), 64)  # render_image draws the same cells first
        image = render_image([cls], 64, np.random.default_rng(seed)).astype(float)
        masks = {
            "nucleus": (cells.dn < 0.75) & (cells.body > 0.99),
            "nuclear_rim": np.abs(cells.dn - 1.0) < 0.1,
            "cytoplasm": (cells.dn > 1.4) & (cells.dc < 0.8),
            "cell_rim": np.abs(cells.dc - 0.97) < 0.05,
        }
        ratios.append(_mean_green(image, masks[inside]) / max(_mean_green(image, masks[outside]), 1.0))
    assert np.median(ratios) > 1.5, ratios


def test_reference_channels_do_not_depend_on_labels():
    # Blue/red/yellow carry cell structure only; labels show in green (mitosis aside).
    a = render_image([0], 64, np.random.default_rng(2))
    b = render_image([25, 7], 64, np.random.default_rng(2))
    assert np.array_equal(a[[0, 2, 3]], b[[0, 2, 3]])
    assert not np.array_equal(a[1], b[1])


def test_bad_arguments_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="n_train"):
        generate(tmp_path, 0, 1)
    with pytest.raises(ConfigError, match="size"):
        generate(tmp_path, 1, 1, size=4)


def test_cli_writes_the_layout(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n-train", "4", "--n-test", "2", "--size", "32", "--seed", "3"]) == 0
    assert "wrote 4 train and 2 test images" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "train").iterdir())) == 16
