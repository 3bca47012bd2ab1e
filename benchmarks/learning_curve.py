"""Learning curve of the embedded local run: test macro F1 and wall time against run parameters.

    python benchmarks/learning_curve.py --grid epochs=4,8 n_train=1000,2000          # 4 runs
    python benchmarks/learning_curve.py --grid seed=0,1 --out /tmp/lc                # the defaults, two seeds
    python benchmarks/learning_curve.py --grid threshold_mode=fitted,global,shrunk,prior --set epochs=4

Each point is one `python pipeline.py run --local --out DIR key=value ...` subprocess (sequential, with a
timeout): the command a user runs. From DIR/metrics.json it reads what the run scored, all on the
synthetic test labels or out-of-sample: the ensemble's val macro F1, the submission's test macro F1, each
model's test macro F1 (as if submitted alone, with its own thresholds), the all-classes baseline and the
predicted labels per image; from stdout the run's own elapsed time. The load average before and after
each run is printed too: the wall time depends on what else shares the cores, the scores do not (CPU
training is seeded). The issue-12 goals are checked per row: elapsed <= 300 s, test F1 >= 2x the
all-classes baseline, ensemble >= its best model on test, 1 <= labels per image <= 3.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME_BUDGET_S = 300.0


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"error: --grid {item!r}: expected key=v1,v2")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def run_point(point: dict[str, str], fixed: list[str], out: Path, timeout: float) -> dict:
    args = [f"{k}={v}" for k, v in point.items()] + fixed
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "run", "--local", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    (out / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"point": point, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    elapsed = float(re.search(r"^elapsed:\s+([\d.]+) s", proc.stdout, re.M).group(1))
    scores = json.loads((out / "metrics.json").read_text())
    ens, sub = scores["ensemble_val"], scores["submission"]
    members = {k[: -len("_test_macro_f1")]: v for k, v in ens.items()
               if k.endswith("_test_macro_f1") and k not in ("test_macro_f1", "best_single_test_macro_f1")}
    return {"point": point, "elapsed_s": elapsed, "load": (round(load_before, 1), round(os.getloadavg()[0], 1)),
            "val_f1": ens["val_macro_f1"], "val_f1_in_sample": ens["val_macro_f1_in_sample"],
            "test_f1": sub["test_macro_f1"], "all_classes": sub["test_macro_f1_all_classes"], "members": members,
            "labels_per_image": sub["labels_per_image"], "true_labels_per_image": sub["true_labels_per_image"]}


def goals(row: dict) -> str:
    if "error" in row:
        return "failed"
    checks = {"time": row["elapsed_s"] <= TIME_BUDGET_S, "2x": row["test_f1"] >= 2 * row["all_classes"],
              "ens>=best": row["test_f1"] >= max(row["members"].values(), default=0.0),
              "card": 1.0 <= row["labels_per_image"] <= 3.0}
    return "all met" if all(checks.values()) else "missed: " + ", ".join(k for k, ok in checks.items() if not ok)


def markdown(rows: list[dict]) -> str:
    lines = ["| point | elapsed s (load) | val F1 out-of-sample (in-sample) | test F1 | models' test F1 | all classes "
             "| labels/img (true) | goals |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = " ".join(f"{k}={v}" for k, v in r["point"].items()) or "defaults"
        if "error" in r:
            lines.append(f"| {name} | | | | | | | failed: {r['error']} |")
            continue
        members = ", ".join(f"{m} {v:.3f}" for m, v in r["members"].items())
        lines.append(f"| {name} | {r['elapsed_s']:.0f} ({r['load'][0]}-{r['load'][1]}) | {r['val_f1']:.3f} "
                     f"({r['val_f1_in_sample']:.3f}) | {r['test_f1']:.3f} | {members} | {r['all_classes']:.3f} | "
                     f"{r['labels_per_image']:.2f} ({r['true_labels_per_image']:.2f}) | {goals(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs="*", default=[], metavar="key=v1,v2", help="run parameters to vary (product)")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="run parameters fixed for every point")
    p.add_argument("--out", type=Path, default=Path("local_runs/learning_curve"))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    for i, point in enumerate(parse_grid(args.grid)):
        row = run_point(point, args.set, args.out / f"point-{i}", args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
