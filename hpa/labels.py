"""The 28 HPA classes, the real train-set label statistics, and the `Target` string format."""

from __future__ import annotations

import numpy as np

from hpa.errors import DataError

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm", "Nuclear membrane", "Nucleoli", "Nucleoli fibrillar center",
    "Nuclear speckles", "Nuclear bodies", "Endoplasmic reticulum", "Golgi apparatus",
    "Peroxisomes", "Endosomes", "Lysosomes", "Intermediate filaments", "Actin filaments",
    "Focal adhesion sites", "Microtubules", "Microtubule ends", "Cytokinetic bridge",
    "Mitotic spindle", "Microtubule organizing center", "Centrosome", "Lipid droplets",
    "Plasma membrane", "Cell junctions", "Mitochondria", "Aggresome", "Cytosol",
    "Cytoplasmic bodies", "Rods & rings",
)
NUM_CLASSES = len(CLASS_NAMES)
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")  # tensor channel order R, G, B, Y

# Real HPA train set (31,072 images): images per class, and images per label count 1..5.
HPA_CLASS_COUNTS = np.array([
    12885, 1254, 3621, 1561, 1858, 2513, 1008, 2822, 53, 45, 28, 1093, 688, 537, 1066, 21,
    530, 210, 902, 1482, 172, 3777, 802, 2965, 322, 8228, 328, 11,
])
HPA_N_IMAGES = 31072
HPA_LABELS_PER_IMAGE = {1: 15126, 2: 12485, 3: 3160, 4: 299, 5: 2}


def parse_target(text: object, where: str) -> list[int]:
    """Parse a Kaggle `Target` cell ("0 25 3") into sorted unique class ids.

    `where` names the file and row for the error message.
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty Target, expected space-separated class ids 0..{NUM_CLASSES - 1}")
    labels = []
    for token in text.split():
        try:
            value = int(token)
        except ValueError:
            raise DataError(
                f"{where}: Target token {token!r} is not an integer (expected 0..{NUM_CLASSES - 1})") from None
        if not 0 <= value < NUM_CLASSES:
            raise DataError(f"{where}: label {value} is outside 0..{NUM_CLASSES - 1}")
        if value in labels:
            raise DataError(f"{where}: label {value} is repeated in Target {text!r}")
        labels.append(value)
    return sorted(labels)


def format_target(labels) -> str:
    return " ".join(str(int(c)) for c in sorted(labels))


def to_matrix(targets: list[list[int]]) -> np.ndarray:
    """List of label lists -> (N, 28) uint8 multi-hot matrix."""
    y = np.zeros((len(targets), NUM_CLASSES), dtype=np.uint8)
    for i, labels in enumerate(targets):
        y[i, list(labels)] = 1
    return y
