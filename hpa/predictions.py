"""The predictions file: one model's (or an ensemble's) probabilities per image as a .npz with keys `ids` (N,) str,
`probs` (N, 28) float32 in [0, 1], `model` and, when known, `targets` (N, 28) 0/1 and `tta`, the number of dihedral
transforms averaged (1 = none; absent in files written before it was recorded: unknown). Thresholds fitted on
predictions of one TTA count do not carry over to another (averaging transforms shrinks the probabilities toward
their mean), so hpa.ensemble refuses to mix them. Written byte-reproducibly and
atomically (hpa.store), validated on every read and write (one DataError line naming the file and the field)."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpa.errors import DataError
from hpa.labels import NUM_CLASSES
from hpa.store import read_bytes, write_bytes


@dataclass
class Predictions:
    """One model's predictions: `ids` (N,) str, `probs` (N, 28) float32, `targets` (N, 28) uint8 or None."""

    ids: np.ndarray
    probs: np.ndarray
    targets: np.ndarray | None = None
    model: str = ""
    source: str = ""
    tta: int | None = None  # dihedral transforms averaged; None = not recorded

    def reindex(self, ids: np.ndarray) -> "Predictions":
        """The same predictions in the order of `ids` (which must be a permutation of self.ids)."""
        pos = {i: k for k, i in enumerate(self.ids)}
        order = np.array([pos[i] for i in ids], dtype=np.int64)
        targets = None if self.targets is None else self.targets[order]
        return Predictions(self.ids[order], self.probs[order], targets, self.model, self.source, self.tta)


def validate_predictions(ids, probs, targets, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check and normalise arrays; every problem is one DataError line naming `where` and the field."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "U":
        raise DataError(f"{where}: 'ids' must be a 1-d array of str, got dtype {ids.dtype} shape {ids.shape}")
    if ids.size == 0:
        raise DataError(f"{where}: no predictions (0 ids)")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{where}: 'ids' has duplicates, e.g. {str(uniq[counts > 1][0])!r} "
                        f"({int((counts > 1).sum())} repeated)")
    probs = np.asarray(probs)
    if probs.shape != (ids.size, NUM_CLASSES) or probs.dtype.kind != "f":
        raise DataError(f"{where}: 'probs' must be float ({ids.size}, {NUM_CLASSES}), got {probs.dtype} {probs.shape}")
    finite = np.isfinite(probs)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise DataError(f"{where}: 'probs' has {int((~finite).sum())} NaN/inf values, "
                        f"first at id {str(ids[r])!r} class {c}")
    if probs.min() < 0 or probs.max() > 1:
        raise DataError(f"{where}: 'probs' must be probabilities in [0, 1], "
                        f"found range [{probs.min():.4g}, {probs.max():.4g}]")
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != probs.shape or not np.isin(targets, (0, 1)).all():
            raise DataError(f"{where}: 'targets' must be 0/1 of shape {probs.shape}, "
                            f"got {targets.dtype} {targets.shape}")
        targets = targets.astype(np.uint8)
    return ids, probs.astype(np.float32), targets


def check_tta(tta, where: str) -> int | None:
    """A TTA count: a positive int, or None (not recorded)."""
    if tta is None:
        return None
    if isinstance(tta, bool) or not isinstance(tta, (int, np.integer)) or tta < 1:
        raise DataError(f"{where}: 'tta' must be a positive integer (dihedral transforms averaged), got {tta!r}")
    return int(tta)


def predictions_bytes(ids, probs, targets=None, model: str = "", where: str = "predictions",
                      tta: int | None = None) -> bytes:
    ids, probs, targets = validate_predictions(np.asarray(ids).astype(str), probs, targets, where)
    arrays = {"ids": ids, "probs": probs, "model": np.array(str(model))}
    if targets is not None:
        arrays["targets"] = targets
    if check_tta(tta, where) is not None:
        arrays["tta"] = np.array(tta, dtype=np.int64)
    return npz_bytes(arrays)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """`np.savez_compressed` with fixed zip timestamps: the same arrays give the same bytes (and sha256),
    so a re-run after a crash reproduces its outputs exactly."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def save_predictions(path_or_uri, ids, probs, targets=None, model: str = "", tta: int | None = None) -> str:
    """Validate and atomically write a predictions .npz (keys ids, probs, model, targets and tta if known); returns
    where."""
    write_bytes(path_or_uri, predictions_bytes(ids, probs, targets, model, where=str(path_or_uri), tta=tta))
    return str(path_or_uri)


def load_predictions(path_or_uri) -> Predictions:
    """Read and validate a predictions .npz; a bad file is one DataError line naming it."""
    where = str(path_or_uri)
    data = read_bytes(path_or_uri)
    if not data:
        raise DataError(f"{where}: empty file (0 bytes), expected a predictions .npz")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where}: not a readable .npz ({exc.__class__.__name__}: {exc})") from None
    for key in ("ids", "probs"):
        if key not in arrays:
            raise DataError(f"{where}: missing key {key!r} (has {sorted(arrays)})")
    ids, probs, targets = validate_predictions(arrays["ids"], arrays["probs"], arrays.get("targets"), where)
    model = str(arrays["model"]) if "model" in arrays else Path(where).stem
    tta = arrays.get("tta")
    if tta is not None and (tta.shape != () or tta.dtype.kind not in "iu"):
        raise DataError(f"{where}: 'tta' must be one integer, got {tta.dtype} {tta.shape}")
    return Predictions(ids, probs, targets, model, where, check_tta(None if tta is None else int(tta), where))
