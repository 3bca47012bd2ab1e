"""`python -m hpa <stage> ...`: every pipeline stage runs without KFP.

Each stage lives in its own module as `main(argv) -> int`; modules are imported lazily so that
`python -m hpa --help` is instant and light stages never import torch. A stage that is also a pipeline task
has one name throughout: CLI `compare-plots` = KFP task `compare-plots` = components/compare_plots/ =
hpa/compare_plots.py; the README's layout section lists the few that differ.
"""

from __future__ import annotations

import importlib
import logging
import sys

from hpa.errors import HPAError

STAGES: dict[str, tuple[str, str]] = {
    "synth": ("hpa.synthetic:main", "write synthetic HPA-like data in the Kaggle layout"),
    "download": ("hpa.download:main",
                 "fetch a dataset (synthetic, dir, s3, https, kaggle), validate, upload with a manifest"),
    "montage": ("hpa.montage:main", "render a grid of RGB composites with their label names (PNG)"),
    "split": ("hpa.split:main", "iterative multilabel stratified k-fold split -> Id,Target,fold"),
    "pack": ("hpa.pack:main", "pack a committed dataset into WebDataset tar shards at a fixed size"),
    "train": ("hpa.train:main", "train one model on one fold (AMP, resume, DDP under torchrun)"),
    "predict": ("hpa.predict:main", "batched inference with dihedral TTA -> ids + probabilities (.npz)"),
    "compare-plots": ("hpa.compare_plots:main", "comparison plots and an HTML/Markdown report for several runs"),
    "ensemble": ("hpa.ensemble:main", "combine models and folds, fit thresholds, report out-of-sample val macro F1"),
    "submit": ("hpa.submit:main", "write and validate a Kaggle submission, optionally score and upload it"),
    "katib": ("hpa.katib_tune:main", "render, validate, launch or tune (one per model) the Katib Experiment"),
    "sweep": ("hpa.sweep:main", "run a Katib Experiment's search space locally with Optuna"),
    "train-distributed": ("hpa.train_distributed:main", "render or launch a TrainJob / PyTorchJob for multi-node DDP"),
    "tensorboard": ("hpa.tensorboard:main", "create or print a Kubeflow Tensorboard for a run's s3:// event files"),
}


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: python -m hpa <stage> [options]   (python -m hpa <stage> --help for a stage's options)", "",
             "stages:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in STAGES.items()]
    return "\n".join(lines)


def run_stage(name: str, argv: list[str]) -> int:
    target, _ = STAGES[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"error: unknown stage {name!r}; expected one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run_stage(name, rest)
    except HPAError as exc:
        # One clear line for the user; the traceback adds nothing for a bad input.
        print(f"error: {exc}", file=sys.stderr)
        return 2
