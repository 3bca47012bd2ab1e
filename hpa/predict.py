"""Batched inference with dihedral test-time augmentation -> a predictions .npz (ids, probs, targets, model).

TTA order (`--tta N` uses the first N; N in 1, 2, 4, 8):
    0 identity, 1 horizontal flip, 2 vertical flip, 3 rotate 180,
    4 rotate 90, 5 rotate 270, 6 transpose, 7 anti-transpose.
So N=2 adds the horizontal flip, N=4 the flips and 180° (the Klein group), N=8 the whole dihedral group.
Probabilities are averaged after the sigmoid.

Data: `--data` is a dataset root in the Kaggle PNG layout (local or s3://; for s3 the needed images are
downloaded to a cache first). With `--shards URI` (what `hpa pack` wrote) the images come from the shards
instead, streamed in order (shuffle off); the CSVs still come from `--data`. `--ids test` predicts
`sample_submission.csv`'s ids (targets from `test_labels.csv` when it exists); `--ids val` predicts fold `--fold` of
`--split split.csv` (targets from the split's `Target`). Both sources yield uint8 R,G,B,Y at the checkpoint's size,
finished by `hpa.inputs.prepare` (colour mode) on the device, as in training; the transforms are `hpa.inputs.dihedral`.
"""

from __future__ import annotations

import argparse
import io
import logging
import time

import numpy as np
import torch

from hpa.errors import ConfigError, DataError
from hpa.evaluate import DEFAULT_THRESHOLD, binarize, fit_thresholds, macro_f1
from hpa.inputs import CHANNELS, dihedral, prepare
from hpa.labels import NUM_CLASSES, to_matrix
from hpa.predictions import save_predictions
from hpa.store import exists_uri, join_uri, read_bytes

log = logging.getLogger(__name__)

TTA_CHOICES = (1, 2, 4, 8)


@torch.no_grad()
def predict_batch(model: torch.nn.Module, x: torch.Tensor, tta: int = 1) -> torch.Tensor:
    """Mean sigmoid probabilities over the first `tta` dihedral transforms; bf16 autocast on CUDA."""
    if tta not in TTA_CHOICES:
        raise ConfigError(f"--tta {tta}: expected one of {TTA_CHOICES}")
    use_amp = x.device.type == "cuda"
    total = torch.zeros(x.shape[0], NUM_CLASSES, device=x.device)
    for k in range(tta):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(dihedral(x, k))
        total += torch.sigmoid(logits.float())
    return total / tta


def predict_loader(model, loader, device, tta: int, in_chans: int, size: int | None) -> tuple[list[str], np.ndarray]:
    """Run a loader of (uint8 R,G,B,Y image, target, id) batches; returns ids and (N, 28) probs."""
    ids, probs = [], []
    for x, _, batch_ids in loader:
        x = prepare(x.to(device, non_blocking=True), in_chans, size)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        probs.append(predict_batch(model, x, tta).cpu().numpy())
        ids.extend(str(i) for i in batch_ids)
    return ids, np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES), np.float32)


# --- which ids, which targets -------------------------------------------------------------------

def read_csv(uri, kind: str = "labels"):
    """A labels CSV (Id,Target[,fold]) or a sample submission (Id,Predicted), local or s3, validated."""
    from hpa.data import read_labels, read_sample_submission

    reader = read_labels if kind == "labels" else read_sample_submission
    return reader(io.BytesIO(read_bytes(uri)), where=str(uri))


def select_ids(data: str, ids: str, split_csv, fold: int | None) -> tuple[list[str], np.ndarray | None, str]:
    """(ids, targets or None, image split) for `--ids test|val`."""
    if ids == "test":
        sample = read_csv(join_uri(data, "sample_submission.csv"), kind="sample")
        labels_uri = join_uri(data, "test_labels.csv")
        if not exists_uri(labels_uri):  # only synthetic data has test labels
            return sample["Id"].tolist(), None, "test"
        labels = read_csv(labels_uri).set_index("Id")
        missing = sorted(set(sample["Id"]) - set(labels.index))
        if missing:
            raise DataError(f"{labels_uri}: has no Target for Id {missing[0]!r} ({len(missing)} missing)")
        return sample["Id"].tolist(), to_matrix(labels.loc[sample["Id"], "labels"].tolist()), "test"
    if ids != "val":
        raise ConfigError(f"--ids {ids!r}: expected 'test' or 'val'")
    if split_csv is None or fold is None:
        raise ConfigError("--ids val needs --split SPLIT_CSV and --fold K")
    split = read_csv(split_csv)
    if "fold" not in split.columns:
        raise DataError(f"{split_csv}: missing column 'fold'")
    from hpa.train import split_folds

    folds = split_folds(split["fold"].tolist(), str(split_csv))  # a bad fold value: one line naming the row
    rows = split[folds == int(fold)]
    if rows.empty:
        raise DataError(f"{split_csv}: fold {fold} does not exist (folds: {sorted(set(folds.tolist()))})")
    return rows["Id"].tolist(), to_matrix(rows["labels"].tolist()), "train"


# --- loaders -------------------------------------------------------------------------------------

def make_loader(data, split, ids, size, batch_size, workers, cache_dir, shards=None):
    """(DataLoader of (uint8 R,G,B,Y at `size`, target, id) batches, "shards" or "png")."""
    if shards:
        from hpa.shards import ShardDataset

        log.info("reading %s images from shards %s", split, shards)
        dataset = ShardDataset(str(shards), ids=ids, shuffle=False, cache_dir=cache_dir, split=split, rank=0,
                               world_size=1, size=size)
        source = "shards"
    else:
        from hpa.committed import image_view
        from hpa.data import PNGDataset

        view = image_view(data, split, ids, cache_dir)
        dataset = PNGDataset(view.root, ids, None, split=split, size=size)
        dataset.view = view  # the local copy lives as long as the loader's dataset
        source = "png"
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers), source


# --- entry points ----------------------------------------------------------------------------------

def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def predict(checkpoint, data, ids: str = "test", split_csv=None, fold=None, tta: int = 1, out="predictions.npz",
            batch_size: int = 64, device=None, workers: int = 0, cache_dir=None, name: str | None = None,
            shards=None) -> dict:
    """Predict one checkpoint on the test ids or a validation fold and write a predictions .npz."""
    from hpa.models import load_checkpoint

    if tta not in TTA_CHOICES:
        raise ConfigError(f"--tta {tta}: expected one of {TTA_CHOICES}")
    dev = pick_device(device)
    model, meta = load_checkpoint(checkpoint, map_location=dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    wanted, targets, split = select_ids(str(data), ids, split_csv, fold)
    size = meta.get("size")
    loader, source = make_loader(str(data), split, wanted, size, batch_size, workers, cache_dir, shards)
    t0 = time.perf_counter()
    got_ids, probs = predict_loader(model, loader, dev, tta, CHANNELS[meta.get("color_mode", "rgby")], size)
    seconds = time.perf_counter() - t0
    if sorted(got_ids) != sorted(wanted):
        missing = sorted(set(wanted) - set(got_ids))
        raise DataError(f"{data}: {len(missing)} requested ids were not found in the {source} data, e.g. {missing[:1]}")
    if targets is not None:  # the loader's order may differ from the request (shards): realign
        pos = {i: k for k, i in enumerate(wanted)}
        targets = targets[[pos[i] for i in got_ids]]
    model_name = name or meta.get("arch", "model")
    save_predictions(out, got_ids, probs, targets, model=model_name, tta=tta)
    result = {"out": str(out), "n": len(got_ids), "tta": tta, "model": model_name, "source": source,
              "device": str(dev), "seconds": round(seconds, 3),
              "images_per_s": round(len(got_ids) / max(seconds, 1e-9), 1)}
    if targets is not None:
        result["macro_f1_at_05"] = macro_f1(targets, probs >= DEFAULT_THRESHOLD)
        result["macro_f1_fitted"] = macro_f1(targets, binarize(probs, fit_thresholds(probs, targets)))
    log.info("predicted %d %s images with %s (tta=%d) in %.1f s -> %s", len(got_ids), ids, model_name, tta, seconds,
             out)
    return result


def predict_val_and_test(checkpoint, data, split_csv, fold: int, val_out, test_out, **options) -> dict:
    """The training stages' last step: TTA predictions of the validation fold (for thresholds and the
    ensemble) and of the test set, from one checkpoint. `options` go to `predict` (tta, shards, ...)."""
    return {"val": predict(checkpoint, data, "val", split_csv, fold, out=val_out, **options),
            "test": predict(checkpoint, data, "test", out=test_out, **options)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt, local path or s3:// URI")
    p.add_argument("--data", required=True, help="dataset root (Kaggle PNG layout + CSVs), local or s3://")
    p.add_argument("--shards", help="packed shards (`hpa pack` output) to read the images from instead of PNGs")
    p.add_argument("--ids", choices=("test", "val"), default="test")
    p.add_argument("--split", dest="split_csv", help="split CSV (Id,Target,fold) for --ids val")
    p.add_argument("--fold", type=int, help="validation fold for --ids val")
    p.add_argument("--tta", type=int, choices=TTA_CHOICES, default=1, help="number of dihedral transforms")
    p.add_argument("--out", required=True, help="output .npz, local path or s3:// URI")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--cache-dir", help="where s3 images/shards are cached (default: a temp dir)")
    p.add_argument("--name", help="model name stored in the .npz (default: the checkpoint's arch)")
    return p


def main(argv: list[str]) -> int:
    a = get_args_parser().parse_args(argv)
    result = predict(a.checkpoint, a.data, a.ids, a.split_csv, a.fold, a.tta, a.out, a.batch_size, a.device,
                     a.workers, a.cache_dir, a.name, a.shards)
    print(result["out"])
    return 0
