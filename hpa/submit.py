"""Kaggle submission: `Id,Predicted` in the sample's order, validated, optionally scored and uploaded.

Nothing is written under the final name unless the whole file is valid: the CSV is built in memory,
checked against the sample, then written atomically (temporary name, then rename) and read back.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from hpa.errors import ConfigError, DataError
from hpa.evaluate import check_thresholds, load_thresholds, macro_f1
from hpa.labels import NUM_CLASSES, to_matrix
from hpa.predictions import load_predictions
from hpa.store import exists_uri, read_bytes, write_bytes

log = logging.getLogger(__name__)

COMPETITION = "human-protein-atlas-image-classification"
HEADER = "Id,Predicted"


def read_sample(uri):
    from hpa.data import read_sample_submission

    return read_sample_submission(io.BytesIO(read_bytes(uri)), where=str(uri))


def read_test_labels(uri):
    from hpa.data import read_labels

    return read_labels(io.BytesIO(read_bytes(uri)), where=str(uri))


def as_thresholds(thresholds) -> np.ndarray:
    """A thresholds JSON path/URI, a single float, or 28 values -> (28,) array in (0, 1)."""
    if isinstance(thresholds, (str, os.PathLike)):
        return load_thresholds(thresholds)
    if np.ndim(thresholds) == 0:
        return check_thresholds(np.full(NUM_CLASSES, float(thresholds)), "threshold")
    return check_thresholds(thresholds, "thresholds")


def check_same_ids(pred_ids: np.ndarray, sample_ids: list[str], pred_where: str, sample_where: str) -> None:
    pred_set, sample_set = set(pred_ids.tolist()), set(sample_ids)
    if pred_set == sample_set:
        return
    only_sample, only_pred = sorted(sample_set - pred_set), sorted(pred_set - sample_set)
    example = (f"{only_sample[0]!r} is in the sample but has no prediction" if only_sample
               else f"{only_pred[0]!r} is predicted but not in the sample")
    raise DataError(f"{pred_where}: ids do not match {sample_where} ({len(pred_set)} predicted, {len(sample_set)} in "
                    f"the sample, {len(only_sample)} missing, {len(only_pred)} extra), e.g. {example}")


def decide(probs: np.ndarray, thresholds: np.ndarray, fill_empty: bool = True) -> tuple[np.ndarray, int]:
    """Binary labels `probs >= thresholds`; with fill_empty an image with none gets its top class.
    Returns (labels (N, 28) bool, number of images filled)."""
    labels = probs >= thresholds
    empty = ~labels.any(1)
    if fill_empty and empty.any():
        labels[np.flatnonzero(empty), probs[empty].argmax(1)] = True
    return labels, int(empty.sum()) if fill_empty else 0


def submission_csv(ids: list[str], labels: np.ndarray) -> bytes:
    rows = [f"{i},{' '.join(map(str, np.flatnonzero(row)))}" for i, row in zip(ids, labels)]
    return ("\n".join([HEADER, *rows]) + "\n").encode()


def validate_submission(data: bytes, sample_ids: list[str], where: str) -> int:
    """Check a submission against the sample: header, every sample Id once and in order, labels 0..27.
    Returns the number of rows."""
    lines = data.decode().splitlines()
    if not lines or lines[0] != HEADER:
        raise DataError(f"{where}: header {lines[0] if lines else ''!r}, expected {HEADER!r}")
    rows = [line.split(",") for line in lines[1:]]
    if len(rows) != len(sample_ids):
        raise DataError(f"{where}: {len(rows)} rows, the sample has {len(sample_ids)}")
    for n, (row, expected) in enumerate(zip(rows, sample_ids), start=2):
        if len(row) != 2 or row[0] != expected:
            raise DataError(f"{where} line {n}: {','.join(row)!r}, expected Id {expected!r} (the sample's order)")
        tokens = row[1].split()
        if any(not t.isdigit() or int(t) >= NUM_CLASSES for t in tokens) or len(set(tokens)) != len(tokens):
            raise DataError(f"{where} line {n}: Predicted {row[1]!r}, expected distinct class ids 0..{NUM_CLASSES - 1}")
    return len(rows)


def sibling(uri, name: str) -> str:
    """The object `name` in the same directory / prefix as `uri`."""
    head, sep, _ = str(uri).rpartition("/")
    return f"{head}{sep}{name}"


def true_matrix(ids: list[str], labels_uri) -> np.ndarray:
    """(N, 28) test targets in the order of `ids`, from a test_labels.csv."""
    truth = read_test_labels(labels_uri).set_index("Id")
    missing = sorted(set(ids) - set(truth.index))
    if missing:
        raise DataError(f"{labels_uri}: no Target for Id {missing[0]!r} ({len(missing)} missing)")
    return to_matrix(truth.loc[ids, "labels"].tolist())


def score(labels: np.ndarray, ids: list[str], labels_uri) -> float:
    return macro_f1(true_matrix(ids, labels_uri), labels)


def kaggle_upload(path: str, competition: str, message: str) -> None:
    """Upload with the `kaggle` package; credentials only from KAGGLE_USERNAME / KAGGLE_KEY."""
    missing = [k for k in ("KAGGLE_USERNAME", "KAGGLE_KEY") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"--kaggle-submit: {' and '.join(missing)} not set in the environment "
                          "(in the pipeline: the kaggle-credentials secret)")
    key = os.environ["KAGGLE_KEY"]
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise ConfigError("--kaggle-submit: the kaggle package is not installed "
                          "(pip install 'hpa-kfp[kaggle]')") from None
    try:
        api = KaggleApi()
        api.authenticate()
        api.competition_submit(path, message, competition)
    except Exception as exc:  # noqa: BLE001  (any failure: one line, never the key)
        text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ConfigError(f"--kaggle-submit to {competition} failed: {text.replace(key, '***')}") from None


def make_submission(predictions, thresholds, sample_submission, out, fill_empty: bool = True, test_labels=None,
                    kaggle_submit: bool = False, competition: str = COMPETITION) -> dict:
    """Write `out` (local or s3://) from test predictions and thresholds, in the sample's order.

    `thresholds`: a thresholds JSON, a float, or 28 values. Scores the file (macro F1) when `test_labels`
    is given or a `test_labels.csv` sits next to the sample. Returns a summary dict.
    """
    preds = load_predictions(predictions)
    values = as_thresholds(thresholds)
    sample = read_sample(sample_submission)
    ids = sample["Id"].tolist()
    check_same_ids(preds.ids, ids, str(predictions), str(sample_submission))
    preds = preds.reindex(np.asarray(ids))
    labels, filled = decide(preds.probs, values, fill_empty)
    data = submission_csv(ids, labels)
    rows = validate_submission(data, ids, str(out))
    write_bytes(out, data)
    if read_bytes(out) != data:  # what landed is what we validated
        raise DataError(f"{out}: the file read back differs from the one written")
    result = {"out": str(out), "rows": rows, "filled_empty": filled, "empty_rows": int((~labels.any(1)).sum()),
              "labels_per_image": round(float(labels.sum(1).mean()), 4), "kaggle_submitted": False}
    if test_labels is None:
        beside = sibling(sample_submission, "test_labels.csv")
        test_labels = beside if exists_uri(beside) else None
    if test_labels is not None:
        truth = true_matrix(ids, test_labels)
        result["test_macro_f1"] = macro_f1(truth, labels)
        # the baseline a model has to beat: every image gets all 28 classes (0.10 on HPA-like frequencies)
        result["test_macro_f1_all_classes"] = macro_f1(truth, np.ones_like(labels, dtype=bool))
        result["true_labels_per_image"] = round(float(truth.sum(1).mean()), 4)
        log.info("submission scored against %s: macro F1 %.4f, %.2f labels per image predicted vs %.2f true",
                 test_labels, result["test_macro_f1"], result["labels_per_image"], result["true_labels_per_image"])
    if kaggle_submit:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "submission.csv"
            local.write_bytes(data)
            kaggle_upload(str(local), competition, f"hpa-kfp {preds.model}")
        result["kaggle_submitted"] = True
    log.info("wrote %s: %d rows, %d filled with their top class", out, rows, filled)
    return result


def submit_task(predictions, thresholds, data_uri: str, out, kaggle_submit: bool = False) -> tuple[dict, str]:
    """The submit pipeline task: make_submission in the order of the dataset's sample_submission.csv, an image
    without a class given its top one (a test_labels.csv beside the sample is scored); returns the numeric
    fields (the task's Metrics, in key order) and a Markdown table of every scalar field."""
    result = make_submission(predictions, thresholds, data_uri.rstrip("/") + "/sample_submission.csv", out,
                             fill_empty=True, kaggle_submit=kaggle_submit)
    lines, numbers = ["### Submission", "", "| field | value |", "|---|---|"], {}
    for key, value in sorted(result.items()):
        if isinstance(value, (int, float, str, bool)):
            lines.append(f"| {key} | {value} |")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = float(value)
    return numbers, "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa submit", description=__doc__.split("\n")[0])
    p.add_argument("--predictions", required=True, help="test predictions .npz (e.g. ensemble_test.npz)")
    p.add_argument("--thresholds", required=True, help="thresholds JSON, or one number for every class")
    p.add_argument("--sample-submission", required=True, help="sample_submission.csv (Id,Predicted)")
    p.add_argument("--out", required=True, help="submission.csv to write (local or s3://)")
    p.add_argument("--test-labels", help="test_labels.csv to score against (default: next to the sample, if any)")
    p.add_argument("--no-fill-empty", dest="fill_empty", action="store_false",
                   help="leave an image with no class over its threshold empty (default: give it its top class)")
    p.add_argument("--kaggle-submit", action="store_true", help="upload with KAGGLE_USERNAME/KAGGLE_KEY from env")
    p.add_argument("--competition", default=COMPETITION)
    return p


def _threshold_arg(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def main(argv: list[str]) -> int:
    a = get_args_parser().parse_args(argv)
    result = make_submission(a.predictions, _threshold_arg(a.thresholds), a.sample_submission, a.out, a.fill_empty,
                             a.test_labels, a.kaggle_submit, a.competition)
    if "test_macro_f1" in result:
        print(f"test macro F1: {result['test_macro_f1']:.4f}")
    truth = f" vs {result['true_labels_per_image']:.2f} true" if "true_labels_per_image" in result else ""
    print(f"labels per image: {result['labels_per_image']:.2f} predicted{truth}")
    print(result["out"])
    return 0
