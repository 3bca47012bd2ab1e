"""Comparison plots for any number of training runs: PNGs, a self-contained report.html, summary.md.

Each run directory (local or s3://) holds what `hpa train` writes: `history.csv` (epoch, train_loss,
val_loss, val_macro_f1, val_macro_f1_in_sample, val_macro_f1_at_05, lr, ...), `val_predictions.npz`,
`metrics.json` and `config.json`. Scores are out-of-sample (hpa.crossfit: each part of the validation
fold scored with thresholds fitted on the others); the in-sample figure stands beside them, with the gap.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hpa.crossfit import crossfit_binarize, crossfit_groups, policy_fitter  # noqa: E402
from hpa.errors import DataError  # noqa: E402
from hpa.evaluate import DEFAULT_THRESHOLD, binarize, f1_per_class, fit_thresholds, macro_f1  # noqa: E402
from hpa.labels import CLASS_NAMES  # noqa: E402
from hpa.predictions import load_predictions  # noqa: E402
from hpa.store import join_uri, read_bytes, write_bytes  # noqa: E402

log = logging.getLogger(__name__)

# Global thresholds to sweep: 0.01 steps, plus a log-spaced tail below 0.05 where weak or heavily
# imbalanced models have their best cut.
GRID = np.unique(np.round(np.concatenate([np.geomspace(0.001, 0.05, 12), np.linspace(0.01, 0.99, 99)]), 4))
FIGURES = ("loss", "val_macro_f1", "per_class_f1", "f1_vs_threshold", "thresholds")


def load_run(run: str, name: str) -> dict:
    """history, predictions and metrics of one run, plus what the plots derive from them."""
    try:
        history = pd.read_csv(io.BytesIO(read_bytes(join_uri(run, "history.csv"))))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{join_uri(run, 'history.csv')}: not a readable CSV ({exc.__class__.__name__})") from None
    if "epoch" not in history.columns or history.empty:
        raise DataError(f"{join_uri(run, 'history.csv')}: expected an 'epoch' column and at least one row")
    try:
        metrics = json.loads(read_bytes(join_uri(run, "metrics.json")))
    except json.JSONDecodeError as exc:
        raise DataError(f"{join_uri(run, 'metrics.json')}: not valid JSON ({exc})") from None
    preds = load_predictions(join_uri(run, "val_predictions.npz"))
    if preds.targets is None:
        raise DataError(f"{preds.source}: validation predictions have no 'targets'")
    thresholds = fit_thresholds(preds.probs, preds.targets)
    groups = crossfit_groups(preds.ids, preds.targets)
    honest = {mode: crossfit_binarize(preds.probs, preds.targets, groups, policy_fitter(mode))
              for mode in ("fitted", "global")}
    curve = np.array([macro_f1(preds.targets, preds.probs >= t) for t in GRID])
    return {"name": name, "uri": run, "history": history, "metrics": metrics, "preds": preds,
            "thresholds": thresholds, "f1_fitted": f1_per_class(preds.targets, binarize(preds.probs, thresholds)),
            "f1_out_of_sample": f1_per_class(preds.targets, honest["fitted"]),
            "global_out_of_sample": macro_f1(preds.targets, honest["global"]), "threshold_curve": curve}


def run_names(runs: list[str], names: list[str] | None) -> list[str]:
    """Display names: `names`, else each run's "<arch>-fold<k>" from its config.json, else the directory's."""
    if names:
        if len(names) != len(runs):
            raise DataError(f"--names: got {len(names)} names for {len(runs)} runs")
        return list(names)
    base = [config_name(r) or str(r).rstrip("/").split("/")[-1] or str(r) for r in runs]
    return [b if base.count(b) == 1 else f"{b}-{i}" for i, b in enumerate(base)]


def config_name(run: str) -> str | None:
    try:
        config = json.loads(read_bytes(join_uri(run, "config.json")))
        return f"{config['arch']}-fold{config['fold']}"
    except (DataError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _plain_ticks(axis):
    """0.2, 0.5, 1, 2 instead of 2x10^-1 on a log axis."""
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))  # label 0.2, 0.5, 2, 5 only


def _epoch_axis(ax):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _colors(n):
    return plt.get_cmap("tab10")(np.arange(n) % 10)


def plot_loss(runs):
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, color in zip(runs, _colors(len(runs))):
        h = run["history"]
        for col, style, label in (("train_loss", "-", "train"), ("val_loss", "--", "val")):
            if col in h:
                ax.plot(h["epoch"], h[col], style, marker="o", color=color, label=f"{run['name']} {label}")
    ax.set(xlabel="epoch", ylabel="loss", title="Train (solid) and validation (dashed) loss per epoch")
    values = np.concatenate([r["history"][c].to_numpy(float) for r in runs for c in ("train_loss", "val_loss")
                             if c in r["history"]] or [np.ones(1)])
    if values.min() > 0 and values.max() / values.min() > 10:  # one early spike would flatten the rest
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
        _plain_ticks(ax.yaxis)
    _epoch_axis(ax)
    return fig, ax


def plot_val_f1(runs):
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, color in zip(runs, _colors(len(runs))):
        h = run["history"]
        for col, style, label in (("val_macro_f1", "-", "out-of-sample"), ("val_macro_f1_in_sample", "--", "in-sample"),
                                  ("val_macro_f1_at_05", ":", "at 0.5")):
            if col in h:
                ax.plot(h["epoch"], h[col], style, marker="o", color=color, label=f"{run['name']} {label}")
    ax.set(xlabel="epoch", ylabel="validation macro F1",
           title="Validation macro F1 per epoch (solid: out-of-sample, dashed: in-sample, dotted: at 0.5)")
    _epoch_axis(ax)
    ax.set_ylim(bottom=0)
    return fig, ax


def plot_per_class(runs, key, xlabel, title):
    """Horizontal grouped bars, one group per class (names readable), one bar per run."""
    n = len(runs)
    fig, ax = plt.subplots(figsize=(9, 11))
    y = np.arange(len(CLASS_NAMES))
    height = 0.8 / n
    for i, (run, color) in enumerate(zip(runs, _colors(n))):
        ax.barh(y + (i - (n - 1) / 2) * height, run[key], height=height, color=color, label=run["name"])
    support = runs[0]["preds"].targets.sum(0)
    ax.set_yticks(y, [f"{c} {name} (n={s})" for c, (name, s) in enumerate(zip(CLASS_NAMES, support))], fontsize=8)
    ax.set(xlabel=xlabel, title=title, xlim=(0, 1), ylim=(len(y) - 0.5, -0.5))  # class 0 on top
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.05), ncol=min(n, 4), fontsize=9)
    return fig, ax


def plot_threshold_curve(runs):
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, color in zip(runs, _colors(len(runs))):
        curve = run["threshold_curve"]
        best = int(np.argmax(curve))
        ax.plot(GRID, curve, color=color, label=f"{run['name']} (best {curve[best]:.3f} at {GRID[best]:.3g})")
        ax.plot(GRID[best], curve[best], "o", color=color)
    ax.axvline(DEFAULT_THRESHOLD, color="grey", ls=":", lw=1)
    ax.set(xlabel="global threshold (same for every class; log scale)", ylabel="validation macro F1",
           title="Validation macro F1 vs one global threshold (the best point is in-sample)", xscale="log",
           xlim=(GRID[0], 1))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylim(bottom=0)
    return fig, ax


def render(kind: str, runs) -> bytes:
    if kind == "loss":
        fig, ax = plot_loss(runs)
    elif kind == "val_macro_f1":
        fig, ax = plot_val_f1(runs)
    elif kind == "per_class_f1":
        fig, ax = plot_per_class(runs, "f1_out_of_sample", "validation F1 (per-class thresholds fitted on the other "
                                 "parts of the fold)", "Per-class validation F1, out-of-sample")
    elif kind == "f1_vs_threshold":
        fig, ax = plot_threshold_curve(runs)
    else:
        fig, ax = plot_per_class(runs, "thresholds", "fitted threshold", "Per-class thresholds fitted on validation")
    ax.grid(alpha=0.3)
    if ax.get_legend() is None:
        ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def summary_table(runs) -> pd.DataFrame:
    rows = []
    for run in runs:
        h, m, p = run["history"], run["metrics"], run["preds"]
        curve = run["threshold_curve"]
        rows.append({
            "run": run["name"],
            "epochs": int(h["epoch"].max()),
            "best_epoch": m.get("best_epoch", ""),
            "final_train_loss": h["train_loss"].iloc[-1] if "train_loss" in h else np.nan,
            "final_val_loss": h["val_loss"].iloc[-1] if "val_loss" in h else np.nan,
            "best_val_macro_f1": m.get("best_val_macro_f1", np.nan),  # the run's policy, out-of-sample
            "val_f1_at_0.5": macro_f1(p.targets, p.probs >= DEFAULT_THRESHOLD),
            "val_f1_fitted": float(run["f1_out_of_sample"].mean()),
            "val_f1_fitted_in_sample": float(run["f1_fitted"].mean()),
            "in_sample_gap": float(run["f1_fitted"].mean() - run["f1_out_of_sample"].mean()),
            "best_global_threshold": float(GRID[int(np.argmax(curve))]),
            "val_f1_best_global": run["global_out_of_sample"],
        })
    return pd.DataFrame(rows)


def summary_markdown(table: pd.DataFrame) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    note = ("\n\nEvery score is out-of-sample unless named in_sample: best_val_macro_f1 (the run's threshold policy), "
            "val_f1_fitted (per-class thresholds) and val_f1_best_global (one global threshold) score each of 5 "
            "stratified parts of the validation fold with thresholds fitted on the other 4. val_f1_fitted_in_sample "
            "fits and scores on the same images; in_sample_gap is how much that flatters. val_f1_at_0.5 fits "
            "nothing.\n")
    return "# Run comparison\n\n" + "\n".join(lines) + note


def report_html(table: pd.DataFrame, pngs: dict[str, bytes]) -> str:
    images = "\n".join(
        f'<h2>{html.escape(kind.replace("_", " "))}</h2>\n'
        f'<img alt="{html.escape(kind)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for kind, data in pngs.items())
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>HPA run comparison</title>"
            "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%;border:1px solid #ddd}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style>"
            f"</head><body>\n<h1>HPA run comparison</h1>\n{table.to_html(index=False, float_format='%.4f')}\n"
            f"{images}\n</body></html>\n")


def compare_runs(run_dirs_or_uris, out_dir, names=None) -> dict:
    """Write the comparison PNGs, report.html (images embedded) and summary.md under `out_dir`."""
    runs_uris = [str(r) for r in run_dirs_or_uris]
    if not runs_uris:
        raise DataError("--runs: give at least one run directory")
    runs = [load_run(r, n) for r, n in zip(runs_uris, run_names(runs_uris, names))]
    pngs = {kind: render(kind, runs) for kind in FIGURES}
    table = summary_table(runs)
    out = {"pngs": [join_uri(out_dir, f"{kind}.png") for kind in pngs],
           "summary": join_uri(out_dir, "summary.md"), "report": join_uri(out_dir, "report.html")}
    for uri, data in zip(out["pngs"], pngs.values()):
        write_bytes(uri, data)
    write_bytes(out["summary"], summary_markdown(table).encode())
    write_bytes(out["report"], report_html(table, pngs).encode())
    out["runs"] = table.to_dict("records")
    log.info("compared %d runs -> %s", len(runs), out["report"])
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa compare-plots", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories (local or s3://) written by train")
    p.add_argument("--out", required=True, help="output dir or s3:// prefix")
    p.add_argument("--names", nargs="+", help="display names, one per run (default: the directory names)")
    return p


def main(argv: list[str]) -> int:
    a = get_args_parser().parse_args(argv)
    result = compare_runs(a.runs, a.out, a.names)
    for path in [*result["pngs"], result["summary"], result["report"]]:
        print(path)
    return 0
