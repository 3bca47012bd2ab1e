"""The training data of one fold: the split CSV read into train/val ids and targets (read_split), and the
loaders over the PNG layout (PNGDataset) or packed shards (ShardDataset) that DataSource builds for each rank,
resumable mid-epoch (ResumableSampler)."""

from __future__ import annotations

import io
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from hpa import ddp
from hpa.errors import ConfigError, DataError
from hpa.labels import parse_target, to_matrix
from hpa.train.config import TrainConfig


@dataclass
class FoldData:
    train_ids: list[str]
    train_targets: np.ndarray  # (N, 28) uint8
    val_ids: list[str]
    val_targets: np.ndarray


def read_split(uri: str, fold: int, raw: bytes | None = None) -> FoldData:
    """Fold `fold` of the split CSV at `uri` (`raw`: its bytes, when already read) as train/val ids and targets."""
    import pandas as pd

    from hpa.store import read_bytes

    try:
        df = pd.read_csv(io.BytesIO(read_bytes(uri) if raw is None else raw),
                         dtype={"Id": str, "Target": str, "fold": str}, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{uri}: not a readable split CSV ({type(exc).__name__})") from None
    missing = [c for c in ("Id", "Target", "fold") if c not in df.columns]
    if missing:
        raise DataError(f"{uri}: missing column {missing[0]!r}, expected Id,Target,fold")
    fold_of = split_folds(df["fold"], uri)
    folds = sorted(set(fold_of.tolist()))
    if fold not in folds:
        raise ConfigError(f"fold: {fold} is not in {uri} (folds present: {folds})")
    targets = to_matrix([parse_target(t, f"{uri} row {i + 2}") for i, t in enumerate(df["Target"])])
    is_val = fold_of == fold
    if is_val.all():
        raise ConfigError(f"fold: {fold} is the only fold in {uri}; nothing is left to train on")
    ids = df["Id"].astype(str).to_numpy()
    return FoldData(list(ids[~is_val]), targets[~is_val], list(ids[is_val]), targets[is_val])


def split_folds(values, uri: str) -> np.ndarray:
    """A split CSV's fold column (read as strings) as ints. A value that is not a non-negative integer is one
    DataError line naming the file, row (header = row 1) and value; "2.0" is read as 2 (a tool that wrote the
    column as floats meant an integer), "1.5", "-1", "x" and "" are errors."""
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        text = "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()
        if not re.fullmatch(r"\d+(\.0*)?", text):
            raise DataError(f"{uri} row {i + 2}: fold {text!r} is not a non-negative integer")
        out[i] = int(text.split(".")[0])
    return out


def shards_uri(data: str) -> str | None:
    """The packed-shards root for --data, or None when --data is the PNG Kaggle layout."""
    from hpa.store import open_store

    store = open_store(data)
    return data if store.exists("train/shards.json") or store.exists("shards.json") else None


def local_png_root(cfg: TrainConfig, ids: list[str], dist: ddp.DistInfo):
    """A DatasetView (hpa.committed) holding train/<id>_<color>.<ext> for `ids`: --data itself when local
    (verified in place when committed); for s3:// a verified copy fetched by one process per node into a
    private directory (content cache: --cache-dir), which the other ranks of the node read."""
    from hpa.committed import DatasetView, image_view

    view = image_view(cfg.data, "train", ids, cfg.cache_dir) if dist.local_rank == 0 else None
    # every rank learns its node's directory: ranks of a node are numbered consecutively (torchrun)
    roots = ddp.all_gather_objects(view.root if view is not None else None)
    ddp.barrier()
    return view if view is not None else DatasetView(roots[dist.rank - dist.local_rank], owned=False)


class ResumableSampler(Sampler[int]):
    """DistributedSampler's order for one epoch with the first `skip` indices dropped: a mid-epoch
    resume reproduces the remaining batches exactly without storing the permutation."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class DataSource:
    """Train/val loaders over the PNG layout (PNGDataset) or packed shards (ShardDataset); both yield uint8
    R,G,B,Y at cfg.size (hpa.inputs), finished on the device by hpa.inputs.prepare."""

    def __init__(self, cfg: TrainConfig, fold: FoldData, dist: ddp.DistInfo):
        self.cfg, self.fold, self.dist = cfg, fold, dist
        self.shards = shards_uri(cfg.data)
        if self.shards is None:
            from hpa.data import PNGDataset

            self.view = local_png_root(cfg, fold.train_ids + fold.val_ids, dist)  # kept: owns the local copy
            root = self.view.root
            self.train_ds = PNGDataset(root, fold.train_ids, fold.train_targets.astype(np.float32), split="train",
                                       size=cfg.size)
            self.val_ds = PNGDataset(root, fold.val_ids, fold.val_targets.astype(np.float32), split="train",
                                     size=cfg.size)
            # DistributedSampler also serves the single process (1 replica): one code path for both.
            self.sampler = DistributedSampler(self.train_ds, num_replicas=dist.world_size, rank=dist.rank,
                                              shuffle=True, seed=cfg.seed, drop_last=False)
            self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        else:
            from hpa.shards import ShardDataset

            # even=True: every rank streams ceil(N / world) samples, so all run the same number of
            # steps (DDP collectives); each DataLoader worker batches its own part, drop_last per part.
            self.train_ds = ShardDataset(self.shards, ids=fold.train_ids, shuffle=True, seed=cfg.seed,
                                         cache_dir=cfg.cache_dir, rank=dist.rank, world_size=dist.world_size, even=True,
                                         size=cfg.size)
            self.val_ds = ShardDataset(self.shards, ids=fold.val_ids, shuffle=False, seed=cfg.seed,
                                       cache_dir=cfg.cache_dir, rank=dist.rank, world_size=dist.world_size,
                                       size=cfg.size)
            m, w = len(self.train_ds), max(1, cfg.workers)
            self.steps_per_epoch = sum(((k + 1) * m // w - k * m // w) // cfg.batch_size for k in range(w))
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size: {cfg.batch_size} x {dist.world_size} process(es) is larger than the "
                              f"{len(fold.train_ids)} training images of fold {cfg.fold}")

    def _loader_kwargs(self, device: torch.device) -> dict:
        # A private generator: creating a loader iterator must not draw from the global torch RNG, or
        # a resumed run (which creates its iterator at a different point) would diverge.
        return dict(num_workers=self.cfg.workers, pin_memory=device.type == "cuda",
                    generator=torch.Generator().manual_seed(self.cfg.seed),
                    persistent_workers=False)

    def train_batches(self, epoch: int, skip_steps: int, device: torch.device):
        """Batches (x, y) of `epoch` from step `skip_steps` on, `steps_per_epoch` in all."""
        cfg = self.cfg
        if self.shards is None:
            self.sampler.set_epoch(epoch)
            sampler = ResumableSampler(self.sampler, skip_steps * cfg.batch_size)
            loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                **self._loader_kwargs(device))
            return itertools.islice(((b[0], b[1]) for b in loader), self.steps_per_epoch - skip_steps)
        self.train_ds.set_epoch(epoch)
        loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, drop_last=True, **self._loader_kwargs(device))
        # A stream cannot seek: a mid-epoch resume reads and drops the batches already trained on.
        return itertools.islice(((b[0], b[1]) for b in loader), skip_steps, self.steps_per_epoch)

    def val_batches(self, device: torch.device):
        """Yields (index into fold.val_ids, x, y); each rank gets a disjoint part, no padding."""
        cfg = self.cfg
        bs = cfg.val_batch_size or 2 * cfg.batch_size
        if self.shards is None:
            mine = list(range(self.dist.rank, len(self.val_ds), self.dist.world_size))
            loader = DataLoader(self.val_ds, batch_size=bs, sampler=mine, **self._loader_kwargs(device))
            start = 0
            for x, y, _ in loader:
                yield torch.as_tensor(mine[start:start + len(x)]), x, y
                start += len(x)
            return
        position = {i: k for k, i in enumerate(self.fold.val_ids)}
        for x, y, ids in DataLoader(self.val_ds, batch_size=bs, **self._loader_kwargs(device)):
            yield torch.as_tensor([position[i] for i in ids]), x, y
