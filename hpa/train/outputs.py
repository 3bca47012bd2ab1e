"""What a training run prints and writes: the one stdout line per epoch (metric_line, Katib's StdOut format), the
history.csv columns, and Outputs, the files under --out (local, or staged locally and published to s3://)."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import weakref
from pathlib import Path

from hpa.store import TMP_PREFIX, atomic_write, open_store
from hpa.train.config import TrainConfig

# val_macro_f1: the threshold policy's out-of-sample (cross-fitted) score, what the metric line, the best
# epoch and Katib use; val_macro_f1_in_sample: the same thresholds fitted and scored on the whole fold
# (optimistic; shown beside it so the gap is visible).
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_macro_f1", "val_macro_f1_in_sample", "val_macro_f1_at_05",
                  "lr", "seconds")

# --predict-tta's files under --out, by the ids they predict (hpa.predict --ids); val_predictions.npz is the best
# epoch's validation pass without TTA.
PREDICTION_FILES = {"val": "val_predictions_tta.npz", "test": "test_predictions_tta.npz"}


def metric_line(epoch: int, train_loss: float, val_loss: float, val_macro_f1: float, timestamp: bool = False) -> str:
    """The epoch line in Katib's StdOut format; with `timestamp`, led by an RFC3339 UTC time, which Katib's
    collector takes as the observation time (without one, every value gets the zero time)."""
    line = f"epoch={epoch} train_loss={train_loss:.4f} val_loss={val_loss:.4f} val_macro_f1={val_macro_f1:.4f}"
    if timestamp:
        from datetime import datetime, timezone

        line = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ ") + line
    return line


def history_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


class Outputs:
    """Files under --out. Everything is written atomically to a local dir (hpa.store.atomic_write), then, when
    --out is s3://, published with the store's atomic put. Only rank 0 writes."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.uri, self.enabled = cfg.out, enabled
        self.remote = cfg.out.startswith("s3://")
        if self.remote:
            self.dir = Path(cfg.work_dir or tempfile.mkdtemp(prefix="hpa-train-"))
            if not cfg.work_dir:  # a private staging copy of what is published: gone with this object
                from hpa.committed import remove_if_creator

                weakref.finalize(self, remove_if_creator, str(self.dir), os.getpid())
        else:
            self.dir = Path(cfg.out)
        if enabled and self.dir.is_dir():
            for stale in self.dir.glob(f"{TMP_PREFIX}*"):  # left by a process killed mid-write; never a final name
                if stale.is_file():
                    stale.unlink(missing_ok=True)

    def write(self, name: str, data: bytes) -> None:
        if not self.enabled:
            return
        path = self.dir / name
        atomic_write(path, data, fsync=True)
        if self.remote:
            open_store(self.uri).put_file(name, str(path))

    def fetch(self, name: str) -> Path | None:
        """Local path of an existing output (downloaded from s3:// first), or None."""
        path = self.dir / name
        if self.remote:
            store = open_store(self.uri)
            if not store.exists(name):
                return None
            self.dir.mkdir(parents=True, exist_ok=True)
            store.get_file(name, str(path))
        return path if path.exists() else None
