"""Comparison report: every figure present and decodable in a self-contained report.html."""

import base64
import html.parser
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa import compare_plots
from hpa.errors import DataError
from hpa.labels import HPA_CLASS_COUNTS, HPA_N_IMAGES, NUM_CLASSES
from hpa.predictions import save_predictions


def write_run(run_dir, seed, noise, epochs=4, n=400):
    """A run directory as `hpa train` writes it (same columns), with HPA-like class frequencies."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    freq = np.maximum(HPA_CLASS_COUNTS / HPA_N_IMAGES, 0.01)
    targets = (rng.random((n, NUM_CLASSES)) < freq).astype(np.uint8)
    logits = 3.0 * targets - 2.5 + rng.normal(0, noise, targets.shape) + np.log(freq) / 2
    probs = 1 / (1 + np.exp(-logits))
    save_predictions(run_dir / "val_predictions.npz", [f"id{i}" for i in range(n)], probs, targets, model=run_dir.name)
    e = np.arange(1, epochs + 1)
    s = 1 + 0.15 * seed
    history = pd.DataFrame({"epoch": e, "train_loss": 0.3 / e / s + 0.05, "val_loss": 0.28 / e / s + 0.08,
                            "val_macro_f1": 0.5 * s - 0.3 / e, "val_macro_f1_at_05": 0.4 * s - 0.3 / e,
                            "val_macro_f1_in_sample": 0.55 * s - 0.3 / e, "lr": 1e-3 / e})
    history.to_csv(run_dir / "history.csv", index=False)
    (run_dir / "metrics.json").write_text(json.dumps({"best_val_macro_f1": 0.425, "best_epoch": epochs,
                                                      "val_loss": 0.15}))
    return run_dir


class ImageCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def test_compare_runs_report(tmp_path):
    runs = [write_run(tmp_path / "resnet18", 0, 1.0), write_run(tmp_path / "se_resnet18", 1, 1.4)]
    out = tmp_path / "report"
    result = compare_plots.compare_runs(runs, out)
    assert len(result["pngs"]) == len(compare_plots.FIGURES)
    for png in result["pngs"]:
        assert Image.open(png).size[0] >= 600
    parser = ImageCollector()
    parser.feed((out / "report.html").read_text())
    assert [i["alt"] for i in parser.images] == list(compare_plots.FIGURES)
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        decoded.load()
        assert decoded.format == "PNG"
    summary = (out / "summary.md").read_text()
    assert "| resnet18 |" in summary and "| se_resnet18 |" in summary and "val_f1_fitted" in summary
    assert [r["run"] for r in result["runs"]] == ["resnet18", "se_resnet18"]
    # out-of-sample beside in-sample, with the gap: fitting and scoring on the same images flatters
    for row in result["runs"]:
        assert row["val_f1_fitted"] < row["val_f1_fitted_in_sample"]
        assert row["in_sample_gap"] == pytest.approx(row["val_f1_fitted_in_sample"] - row["val_f1_fitted"])
    assert "in_sample_gap" in summary and "out-of-sample" in summary


def test_run_names_come_from_each_runs_config(tmp_path):
    runs = [write_run(tmp_path / "run", 0, 1.0), write_run(tmp_path / "b" / "run", 1, 1.0)]
    for k, run in enumerate(runs):
        (run / "config.json").write_text(json.dumps({"arch": "resnet18", "fold": k}))
    assert compare_plots.run_names([str(r) for r in runs], None) == ["resnet18-fold0", "resnet18-fold1"]


def test_compare_cli_names_and_errors(tmp_path, capsys):
    run = write_run(tmp_path / "a", 0, 1.0)
    assert compare_plots.main(["--runs", str(run), "--out", str(tmp_path / "o"), "--names", "model A"]) == 0
    assert "| model A |" in (tmp_path / "o" / "summary.md").read_text()
    assert str(tmp_path / "o" / "report.html") in capsys.readouterr().out
    with pytest.raises(DataError, match="history.csv: file not found"):
        compare_plots.compare_runs([tmp_path / "missing"], tmp_path / "o2")
    with pytest.raises(DataError, match="2 names for 1 runs"):
        compare_plots.compare_runs([run], tmp_path / "o3", names=["x", "y"])
