"""TensorBoard event files of a training run, and where a pipeline's training task puts them.

`EventLog` (rank 0 of `python -m hpa train`) writes scalars with torch's SummaryWriter into a local directory
and, when the logs live in an object store, uploads each event file with the store's put (a whole-object PUT:
a reader never sees a torn file) at every epoch end, at most every `publish_seconds` during an epoch, and at
the end, so the curves reach the store while training runs.

Where (`run_logs_uri`): a pipeline's training tasks all get the same logs prefix, `<store_uri>/tensorboard`
(hpa.tensorboard.store_logs_uri: no run id, so the input is the same in every run and a training task stays a
KFP cache hit), and each writes under `<arch>-fold<k>-<digest>`, the digest of the task's own inputs
(`training_digest`: its parameter values and its split file). The KFP cache key of a task is its parameter
values, its input artifacts' names, its image and command (kubeflow/pipelines 2.16.0 and 2.17.0
backend/src/v2/cacheutils/cache.go, GenerateCacheKey), so a cache hit's curves are in the folder that the
training it reuses wrote, and two trainings that differ in any input never share a folder.

Trained again into a folder that already holds event files (the same inputs with caching off, or a retried
task that had no checkpoint yet), a run tells TensorBoard to drop the earlier curves (a SessionLog START at
step 1, SummaryWriter's purge_step; TensorBoard reads a folder's event files in name order, and a name starts
with its creation time), so each step shows once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from hpa.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

EVENTS_PREFIX = "events.out.tfevents."
DIGEST_CHARS = 10  # hex characters of the training digest in a folder name (40 bits)
# Inputs that say where the curves go, not what is trained: left out of the digest.
NOT_DEFINING = ("tensorboard_uri",)


def is_event_file(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(EVENTS_PREFIX)


class EventLog:
    """Scalars of one training run as TensorBoard event files, written by rank 0.

    Every `every_steps` optimizer steps: train/loss (mean batch loss of this rank since the last write),
    train/lr, train/images_per_second (this rank's images x world size over the wall time since the last
    write; DDP steps run in lock-step). Every epoch, at the global step that ends it: epoch/<history.csv
    column> (val_macro_f1 is the out-of-sample score of the metric line), and val_f1_per_class/<class name>,
    the same out-of-sample predictions per class (their mean is val_macro_f1).

    `purge_step` (a resumed run: the checkpoint's step + 1) makes TensorBoard hide what the interrupted run
    logged after its checkpoint, which the resumed run logs again (SummaryWriter's SessionLog START). Without
    it, a run whose target (`local_dir`, or `publish_to`) already holds event files purges from step 1: it
    trains from the start, so the earlier curves are replaced, not interleaved with its own.
    """

    def __init__(self, local_dir: str | Path, publish_to: str | None = None, every_steps: int = 10,
                 world_size: int = 1, purge_step: int | None = None, publish_seconds: float = 60.0):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(local_dir)
        self.publish_to = publish_to
        if purge_step is None and self._has_earlier_events():
            purge_step = 1
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)
        self.every_steps, self.world_size, self.publish_seconds = every_steps, world_size, publish_seconds
        self.published: dict[str, int] = {}  # event file name -> size uploaded
        self.last_publish = time.monotonic()
        self.upload_failures = 0
        self.start_window()

    def _has_earlier_events(self) -> bool:
        if self.dir.is_dir() and any(self.dir.glob(f"{EVENTS_PREFIX}*")):
            return True
        if not self.publish_to:
            return False
        from hpa.store import open_store

        try:
            return any(is_event_file(k) for k in open_store(self.publish_to).list())
        except StoreError as exc:  # the viewer's copy must not stop a training run
            log.warning("tensorboard: cannot list %s (%s); earlier curves there, if any, are not purged",
                        self.publish_to, exc)
            return False

    def start_window(self) -> None:
        """Start a throughput window (the training loop calls it when an epoch starts, so evaluation and
        checkpoint time between epochs do not count)."""
        self._loss, self._images, self._t0 = 0.0, 0, time.perf_counter()

    def train_step(self, step: int, loss, images: int, lr: float) -> None:
        """After optimizer step `step` (1-based): `loss` is the batch's mean loss (a tensor; it is read, which
        waits for the device, only every `every_steps` steps)."""
        self._loss = self._loss + loss.detach().double() * images
        self._images += images
        if step % self.every_steps:
            return
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        self.writer.add_scalar("train/loss", float(self._loss) / self._images, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_second", self._images * self.world_size / seconds, step)
        self.start_window()
        if self.publish_to and time.monotonic() - self.last_publish >= self.publish_seconds:
            self.publish()

    def epoch_end(self, step: int, row: dict, f1_per_class) -> None:
        """One history row (hpa.train.HISTORY_FIELDS) and the per-class out-of-sample F1, then publish."""
        from hpa.labels import CLASS_NAMES

        for key, value in row.items():
            self.writer.add_scalar(f"epoch/{key}", value, step)
        for name, value in zip(CLASS_NAMES, f1_per_class):
            self.writer.add_scalar(f"val_f1_per_class/{name}", float(value), step)
        self.publish()

    def publish(self) -> None:
        """Flush, then upload every event file that grew since its last upload. A failed upload is logged
        and retried at the next publish: the copy for the viewer must not end a training run."""
        self.writer.flush()
        self.last_publish = time.monotonic()
        if not self.publish_to:
            return
        from hpa.store import open_store

        store = open_store(self.publish_to)
        for path in sorted(self.dir.glob(f"{EVENTS_PREFIX}*")):
            size = path.stat().st_size
            if self.published.get(path.name) == size:
                continue
            try:
                store.put_file(path.name, path)
            except StoreError as exc:
                self.upload_failures += 1
                log.warning("tensorboard: uploading %s to %s failed (%s); retrying at the next epoch",
                            path.name, self.publish_to, exc)
                continue
            self.published[path.name] = size

    def close(self) -> None:
        self.writer.close()
        self.publish()


def training_digest(inputs: Mapping, split: str | Path | None = None) -> str:
    """DIGEST_CHARS hex characters that tell one training from another: the sha256 of its parameter inputs
    (a training component's `params`, less NOT_DEFINING) as sorted JSON, and of the split file's content.
    The same inputs give the same digest in every run (what a KFP cache hit needs); any other value, another
    digest."""
    if not isinstance(inputs, Mapping):
        raise ConfigError(f"tensorboard inputs {type(inputs).__name__}: expected the training task's inputs by name")
    defining = {str(k): v for k, v in inputs.items() if k not in NOT_DEFINING}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str, separators=(",", ":")).encode())
    if split is not None:
        try:
            digest.update(b"\0split\0" + hashlib.sha256(Path(split).read_bytes()).digest())
        except OSError as exc:
            raise ConfigError(f"tensorboard split {str(split)!r}: cannot read the split file ({exc.strerror})") \
                from None
    return digest.hexdigest()[:DIGEST_CHARS]


def run_logs_uri(logs_uri: str, arch: str, fold: int, inputs: Mapping | None = None,
                 split: str | Path | None = None) -> str:
    """Where one training task writes its event files: `<logs_uri>/<arch>-fold<fold>-<training_digest>` with
    `inputs` (the task's parameter inputs) and `split` (its split file), `<logs_uri>/<arch>-fold<fold>` without.
    TensorBoard shows every folder with event files under its --logdir as one run."""
    if not isinstance(logs_uri, str) or not logs_uri.strip():
        raise ConfigError(f"tensorboard_uri {logs_uri!r}: expected the logs prefix (the tensorboard task's logs_uri)")
    if not isinstance(arch, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", arch):
        raise ConfigError(f"tensorboard arch {arch!r}: expected a model name (letters, digits, '_', '.', '-')")
    name = f"{arch}-fold{int(fold)}"
    if inputs is not None:
        name = f"{name}-{training_digest(inputs, split)}"
    return f"{logs_uri.strip().rstrip('/')}/{name}"


def restart_marker() -> bytes:
    """An event file that holds only a SessionLog START at step 1: placed before a training's own files, it
    makes TensorBoard drop the earlier curves of the same folder (what EventLog's purge_step does)."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory(prefix="hpa-tb-") as tmp:
        SummaryWriter(tmp, purge_step=1).close()
        (path,) = Path(tmp).glob(f"{EVENTS_PREFIX}*")
        return path.read_bytes()


def copy_event_files(src_uri: str, dst_uri: str) -> int:
    """Copy the event files under `src_uri` (a run's <out>/tensorboard, local or s3://) to `dst_uri`; returns
    how many. For a training job that cannot be told where else to write (the multi-node job's pods). When
    `dst_uri` already holds event files of another training (not these: a retried copy overwrites them), a
    restart marker named to sort between those and these goes first."""
    from hpa.store import open_store

    src, dst = open_store(src_uri), open_store(dst_uri)
    keys = [k for k in src.list() if is_event_file(k)]
    earlier = [k for k in dst.list() if is_event_file(k) and k not in keys]
    if keys and earlier:
        created = [int(m[1]) for k in keys if (m := re.match(rf"{re.escape(EVENTS_PREFIX)}(\d+)\.", Path(k).name))]
        if created:
            # After every file made before that second ('~' sorts after a host name), before the new ones.
            dst.put_bytes(f"{EVENTS_PREFIX}{min(created) - 1}.~hpa-restart", restart_marker())
        else:
            log.warning("tensorboard: event file names in %s carry no time; the earlier curves in %s stay beside "
                        "them", src_uri, dst_uri)
    with tempfile.TemporaryDirectory(prefix="hpa-tb-") as tmp:
        for i, key in enumerate(keys):
            local = Path(tmp) / str(i)
            src.get_file(key, local)
            dst.put_file(key, local)
    return len(keys)
