"""Local sweep of katib/experiment.yaml: parsing, substitution, Katib's metric regex, Optuna mapping,
median stopping (with a fast fake trial), and a real 4-trial sweep of `python -m hpa train` on CPU."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hpa import katib, sweep, sweep_spec
from hpa.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**changes) -> katib.KatibConfig:
    """A KatibConfig with the data it needs (any dataset name; these sweeps never read it) in a namespace."""
    return katib.KatibConfig(**{"dataset": "d", "namespace": "team-a", **changes})

EXPERIMENT = ROOT / "katib" / "experiment.yaml"

# Katib's default StdOut filter, copied from kubeflow/katib pkg/metricscollector/v1beta1/common/const.go.
KATIB_REGEX = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"

FAKE_TRIAL = textwrap.dedent("""
    import argparse, math, sys, time
    p = argparse.ArgumentParser()
    for name in ("data", "split", "fold", "arch", "size", "batch-size", "threshold", "threshold-mode",
                 "shrink-strength", "out"):
        p.add_argument("--" + name)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--fail-mode", default="")
    a, _ = p.parse_known_args()
    if a.fail_mode and a.threshold_mode == a.fail_mode:
        print("boom", file=sys.stderr)
        sys.exit(3)
    print(f"policy {a.threshold_mode} threshold={a.threshold} shrink_strength={a.shrink_strength}", file=sys.stderr)
    quality = 0.6 - 0.1 * abs(math.log10(a.lr) + 3)   # best near lr = 1e-3
    for epoch in range(1, a.epochs + 1):
        print(f"INFO log line val_macro_f1=0.99 (not a metric line)", file=sys.stderr)
        print(f"epoch={epoch} train_loss={1/epoch:.4f} val_loss={1 - quality:.4f} "
              f"val_macro_f1={quality * epoch / a.epochs:.4f}", flush=True)
        time.sleep(0.05)
""")


def _fake_experiment(tmp_path: Path, **spec_changes) -> Path:
    """katib/experiment.yaml with the trial command swapped for a fast fake that prints metric lines."""
    script = tmp_path / "fake_trial.py"
    script.write_text(FAKE_TRIAL)
    exp = yaml.safe_load(EXPERIMENT.read_text())
    container = exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["python", str(script)]
    exp["spec"].update(spec_changes)
    exp["metadata"]["namespace"] = "team-a"  # the committed file names none: its store URIs follow the trial's
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_read_experiment():
    spec = sweep_spec.read_experiment(EXPERIMENT)
    assert spec.objective == "val_macro_f1" and spec.direction == "maximize" and \
        spec.metrics == ["val_macro_f1", "val_loss"]
    assert spec.strategies == {"val_macro_f1": "max", "val_loss": "latest"}
    assert spec.algorithm == "tpe" and spec.seed == 0 and spec.max_trials == 12 and spec.parallel == 3
    assert (spec.min_trials_required, spec.start_step) == (3, 1)
    assert spec.command[:4] == ["python", "-m", "hpa", "train"] and spec.filters == list(katib.METRIC_FILTERS)


def test_trial_command_substitutes_and_overrides():
    spec = sweep_spec.read_experiment(EXPERIMENT)
    # The committed file names no namespace: its store URIs follow the trial's (${trialSpec.Namespace}).
    assert spec.namespace == "" and spec.trial_parameters["namespace"] == "${trialSpec.Namespace}"
    with pytest.raises(ConfigError, match=r"^--split s3://mlpipeline/private/\$\{trialParameters.namespace\}/hpa-kfp/"
                       r"splits/.*: the trial's namespace, and hpa-lr-threshold names none; give --namespace NS"):
        sweep_spec.trial_command(spec, {"lr": 0.001, "threshold": 0.2, "threshold_mode": "global",
                                        "shrink_strength": 3.0}, "t-000", {"data": "/d"}, "/w/runs")
    spec.namespace = "team-a"  # `python -m hpa sweep --namespace team-a`
    cmd = sweep_spec.trial_command(
        spec, {"lr": 0.00042, "threshold": 0.25, "threshold_mode": "shrunk", "shrink_strength": 12.5},
        "t-001", {"data": "/d", "epochs": "1", "threads": "1"}, "/w/runs")
    assert cmd[0] == sys.executable and "${" not in " ".join(cmd)
    opts, rest = {}, cmd[4:]
    while rest:  # `--flag value` pairs, and bare switches such as --metric-timestamps
        if len(rest) > 1 and not rest[1].startswith("--"):
            opts[rest[0]], rest = rest[1], rest[2:]
        else:
            opts[rest[0]], rest = True, rest[1:]
    assert opts["--metric-timestamps"] is True
    assert opts["--lr"] == "0.00042" and opts["--threshold"] == "0.25" and opts["--threshold-mode"] == "shrunk"
    assert opts["--shrink-strength"] == "12.5"
    assert opts["--data"] == "/d" and opts["--epochs"] == "1" and opts["--threads"] == "1" and \
        opts["--out"] == "/w/runs/t-001"
    assert opts["--split"].startswith("s3://mlpipeline/private/team-a/hpa-kfp/splits/")


def test_parse_metrics_like_katib():
    line = "epoch=2 train_loss=0.5 val_loss=0.25 val_macro_f1=0.4567"
    names = ["val_macro_f1", "val_loss"]
    assert sweep_spec.parse_metrics(line, [KATIB_REGEX], names) == {"val_loss": 0.25, "val_macro_f1": 0.4567}
    assert sweep_spec.parse_metrics(line, list(katib.METRIC_FILTERS), names) == \
        {"val_loss": 0.25, "val_macro_f1": 0.4567}
    assert sweep_spec.parse_metrics("INFO best val_macro_f1=0.9", list(katib.METRIC_FILTERS), names) == {}
    assert sweep_spec.parse_metrics("nothing here", [KATIB_REGEX], names) == {}


def test_grid_values_follow_katib():
    param = {"name": "t", "parameterType": "double", "feasibleSpace": {"min": "0.05", "max": "0.6", "step": "0.183333"}}
    assert [round(v, 4) for v in sweep_spec.grid_values(param)] == [0.05, 0.2333, 0.4167, 0.6]
    exp = katib.render_experiment(_cfg(algorithm="grid", grid_points=3, max_trials=6))
    lr = exp["spec"]["parameters"][0]
    assert lr["parameterType"] == "discrete" and len(sweep_spec.grid_values(lr)) == 3


@pytest.mark.parametrize("algorithm, sampler", [("tpe", "TPESampler"), ("random", "RandomSampler"),
                                                ("cmaes", "CmaEsSampler"), ("grid", "GridSampler")])
def test_algorithm_maps_to_optuna(tmp_path, algorithm, sampler):
    path = tmp_path / "e.yaml"
    path.write_text(katib.render_yaml(_cfg(algorithm=algorithm, max_trials=4, parallel_trials=2)))
    assert type(sweep_spec.make_sampler(sweep_spec.read_experiment(path))).__name__ == sampler


@pytest.mark.parametrize("algorithm", ["bayesianoptimization", "sobol"])
def test_algorithm_without_local_equivalent_is_a_clear_error(tmp_path, algorithm):
    path = tmp_path / "e.yaml"
    path.write_text(katib.render_yaml(_cfg(algorithm=algorithm)))
    with pytest.raises(ConfigError, match=f"algorithm '{algorithm}' has no local Optuna equivalent; "
                                          "local sweeps support tpe, random, grid, cmaes"):
        sweep_spec.make_sampler(sweep_spec.read_experiment(path))


def test_bad_set_option_is_a_clear_error():
    with pytest.raises(ConfigError, match="--set 'epochs': expected key=value"):
        sweep._parse_sets(["epochs"])


def test_median_stopping_kills_poor_trials(tmp_path):
    path = _fake_experiment(tmp_path, earlyStopping={"algorithmName": "medianstop", "algorithmSettings": [
        {"name": "min_trials_required", "value": "2"}, {"name": "start_step", "value": "1"}]})
    best = sweep.run_sweep(path, trials=8, parallel=1, workdir=tmp_path / "w", overrides={"epochs": "5"})
    rows = list(csv.DictReader(open(tmp_path / "w" / "trials.csv")))
    states = [r["state"] for r in rows]
    assert len(rows) == 8 and "PRUNED" in states and best["pruned"] == states.count("PRUNED")
    for row in rows:  # a pruned trial's process was stopped before its last epoch
        assert (int(row["epochs"]) < 5) == (row["state"] == "PRUNED")
    done = [float(r["val_macro_f1"]) for r in rows if r["state"] == "COMPLETE"]
    assert best["val_macro_f1"] == max(done)
    assert best["params"]["lr"] == float(next(r["lr"] for r in rows if r["trial"] == best["trial"]))
    assert (tmp_path / "w" / "objective.png").stat().st_size > 10_000


def test_failed_trials_are_recorded_and_stop_the_sweep(tmp_path):
    path = _fake_experiment(tmp_path, maxFailedTrialCount=0)
    with pytest.raises(sweep.TrialFailed, match="no trial completed"):
        sweep.run_sweep(path, trials=3, parallel=1, workdir=tmp_path / "w",
                        overrides={"epochs": "1", "fail_mode": "fitted", "threshold_mode": "fitted"})
    path = _fake_experiment(tmp_path, maxFailedTrialCount=5)
    # One at a time: the seeded sampler then draws the same policies every run (2 fitted, 3 shrunk, 1 global);
    # with two threads the draw order follows thread timing, and six global draws could fail the whole sweep.
    best = sweep.run_sweep(path, trials=6, parallel=1, workdir=tmp_path / "w2",
                           overrides={"epochs": "1", "fail_mode": "global"})
    rows = list(csv.DictReader(open(tmp_path / "w2" / "trials.csv")))
    failed = [r for r in rows if r["state"] == "FAILED"]
    assert best["failed"] == len(failed) and \
        all(r["threshold_mode"] == "global" and r["returncode"] == "3" for r in failed)
    assert best["params"]["threshold_mode"] != "global"


@pytest.mark.parametrize("algorithm", ["tpe", "grid"])
def test_sweep_draws_every_policy_and_passes_the_shrink_strength(tmp_path, algorithm):
    """The local sweep reads the four-policy space (categorical threshold_mode, uniform threshold,
    log-uniform or grid shrink_strength) and hands each trial the values it drew."""
    path = tmp_path / "e.yaml"
    path.write_text(katib.render_yaml(_cfg(algorithm=algorithm, max_trials=12, parallel_trials=1,
                                                        shrink_strength_min=2.0, shrink_strength_max=40.0)))
    spec = sweep_spec.read_experiment(path)
    assert [p["name"] for p in spec.parameters] == ["lr", "threshold_mode", "threshold", "shrink_strength"]
    script = tmp_path / "fake_trial.py"
    script.write_text(FAKE_TRIAL)
    spec.command[:4] = ["python", str(script)]
    spec.min_trials_required = None
    import optuna

    rec_sweep = sweep.Sweep(spec, tmp_path / "w", {"epochs": "1"}, trial_timeout=60)
    study = optuna.create_study(direction="maximize", sampler=sweep_spec.make_sampler(spec))
    study.optimize(rec_sweep.objective, n_trials=12)
    records = rec_sweep.records
    assert all(r.state == "COMPLETE" for r in records) and len(records) == 12
    assert {r.params["threshold_mode"] for r in records} <= set(katib.THRESHOLD_MODES)
    assert len({r.params["threshold_mode"] for r in records}) >= 3
    for r in records:
        assert 2.0 <= r.params["shrink_strength"] <= 40.0 and 0.05 <= r.params["threshold"] <= 0.6
        line = next(ln for ln in Path(r.log).read_text().splitlines() if ln.startswith("policy "))
        assert line == (f"policy {r.params['threshold_mode']} "
                        f"threshold={sweep_spec.format_value(r.params['threshold'])} "
                        f"shrink_strength={sweep_spec.format_value(r.params['shrink_strength'])}")
    if algorithm == "grid":
        assert {r.params["shrink_strength"] for r in records} <= {2.0, 5.42884, 14.7361, 40.0}


@pytest.mark.slow
def test_real_sweep_of_hpa_train_on_cpu(tmp_path):
    """`python -m hpa sweep katib/experiment.yaml --trials 4` on tiny synthetic data: the real trial
    command (`python -m hpa train`), its stdout parsed with Katib's default regex, best = max."""
    from hpa.cli import main
    from hpa.split import make_split
    from hpa.data import read_labels
    from hpa.synthetic import generate

    data = tmp_path / "data"
    generate(data, n_train=120, n_test=4, size=32, seed=0)
    split = make_split(read_labels(data / "train.csv"), folds=3, seed=0)
    split[["Id", "Target", "fold"]].to_csv(tmp_path / "split.csv", index=False)
    work = tmp_path / "sweep"
    sets = [f"data={data}", f"split={tmp_path / 'split.csv'}", "epochs=2", "size=32", "batch_size=16",
            "workers=0", "threads=1", "device=cpu"]
    argv = ["sweep", str(EXPERIMENT), "--trials", "4", "--parallel", "2", "--workdir", str(work)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0

    rows = list(csv.DictReader(open(work / "trials.csv")))
    best = json.loads((work / "best.json").read_text())
    assert len(rows) == 4 and all(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    scores = [float(r["val_macro_f1"]) for r in rows if not math.isnan(float(r["val_macro_f1"]))]
    assert best["val_macro_f1"] == max(scores) and 0.0 <= best["val_macro_f1"] <= 1.0
    assert set(best["params"]) == {"lr", "threshold_mode", "threshold", "shrink_strength"}
    # Each trial's stdout, parsed with Katib's default regex: val_macro_f1 and val_loss once per epoch.
    for row in rows:
        log = [ln for ln in Path(row["log"]).read_text().splitlines() if "epoch=" in ln]
        # Trials run with --metric-timestamps: every epoch line leads with the RFC3339 time Katib stores.
        stamped = [re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z (epoch=.*)$", ln) for ln in log]
        assert all(stamped), log
        lines = [m.group(1) for m in stamped]
        parsed = [{m.group(1): float(m.group(2)) for m in re.finditer(KATIB_REGEX, ln)} for ln in lines]
        assert len(parsed) == int(row["epochs"]) >= 1
        assert [p["epoch"] for p in parsed] == list(range(1, len(parsed) + 1))
        assert all({"val_macro_f1", "val_loss"} <= set(p) for p in parsed)
        assert max(p["val_macro_f1"] for p in parsed) == float(row["val_macro_f1"])
    assert (work / "objective.png").stat().st_size > 10_000
