"""Run a Katib Experiment's search space on this machine, with Optuna, before spending cluster time.

`python -m hpa sweep katib/experiment.yaml --trials 4 --parallel 2 --set data=DIR --set split=CSV`
reads the Experiment (parameters, objective, algorithm, counts, medianstop settings, metric filters:
`hpa.sweep_spec`), runs each trial as a subprocess of the trial template's own command with
`${trialParameters.*}` substituted, reads the metric lines from its stdout the way Katib's StdOut collector
does, prunes trials between epochs like medianstop, and writes `trials.csv`, `best.json` and `objective.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpa.errors import ConfigError, HPAError
from hpa.sweep_spec import SweepSpec, aggregate, make_sampler, parse_metrics, read_experiment, suggest, trial_command

log = logging.getLogger(__name__)


class TrialFailed(HPAError):
    """A trial's process failed or printed no objective metric."""


# ---------------------------------------------------------------- running trials

@dataclass
class TrialRecord:
    number: int
    name: str
    params: dict
    state: str = "RUNNING"
    history: dict[str, list[float]] = field(default_factory=dict)
    returncode: int | None = None
    seconds: float = 0.0
    log: str = ""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (train checkpoints and exits), SIGKILL if it lingers; only the process we started."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Sweep:
    def __init__(self, spec: SweepSpec, workdir: Path, overrides: dict[str, str], trial_timeout: float):
        self.spec, self.workdir, self.overrides, self.trial_timeout = spec, workdir, dict(overrides), trial_timeout
        self.out_prefix = self.overrides.pop("out", str(workdir / "runs"))
        self.records: list[TrialRecord] = []
        self.lock = threading.Lock()

    def objective(self, trial) -> float:
        import optuna

        spec = self.spec
        params = {p["name"]: suggest(trial, p, spec.algorithm) for p in spec.parameters}
        rec = TrialRecord(trial.number, f"{spec.name}-{trial.number:03d}", params)
        with self.lock:
            self.records.append(rec)
        cmd = trial_command(spec, params, rec.name, self.overrides, self.out_prefix)
        logdir = self.workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        rec.log = str(logdir / f"{rec.name}.log")
        log.info("%s: %s", rec.name, " ".join(cmd))
        start = time.monotonic()
        try:
            pruned = self._run(trial, rec, cmd)
        finally:
            rec.seconds = round(time.monotonic() - start, 2)
        value = aggregate(rec.history.get(spec.objective, []), spec.strategies[spec.objective])
        if pruned:
            rec.state = "PRUNED"
            log.info("%s: pruned by median stopping after %d epochs", rec.name,
                     len(rec.history.get(spec.objective, [])))
            raise optuna.TrialPruned()
        if rec.returncode != 0 or math.isnan(value):
            rec.state = "FAILED"
            why = f"exit code {rec.returncode}" if rec.returncode != 0 else \
                f"no {spec.objective} line matched the filters"
            raise TrialFailed(f"{rec.name}: {why}; see {rec.log}")
        rec.state = "COMPLETE"
        log.info("%s: %s=%.4f (%s)", rec.name, spec.objective, value, params)
        return value

    def _run(self, trial, rec: TrialRecord, cmd: list[str]) -> bool:
        """Stream stdout, report each objective value as an Optuna step; True when pruned."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(rec.log, "w") as logfile:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logfile, text=True, bufsize=1, env=env)
            timer = threading.Timer(self.trial_timeout, _stop, [proc])  # a silent, hung trial ends too
            timer.start()
            try:
                for line in proc.stdout:
                    logfile.write(line)
                    logfile.flush()
                    if self._record(trial, rec, line):
                        _stop(proc)
                        return True
                rec.returncode = proc.wait()
            finally:
                timed_out = not timer.is_alive() and rec.returncode is not None and rec.returncode < 0
                timer.cancel()
                if proc.poll() is None:
                    _stop(proc)
        if timed_out:
            raise TrialFailed(f"{rec.name}: stopped after --trial-timeout {self.trial_timeout:g} s; see {rec.log}")
        return False

    def _record(self, trial, rec: TrialRecord, line: str) -> bool:
        metrics = parse_metrics(line, self.spec.filters, self.spec.metrics)
        for name, value in metrics.items():
            rec.history.setdefault(name, []).append(value)
        if self.spec.objective not in metrics:
            return False
        step = len(rec.history[self.spec.objective])
        trial.report(metrics[self.spec.objective], step)
        return self.spec.min_trials_required is not None and trial.should_prune()


def run_sweep(path: str | Path, trials: int | None = None, parallel: int | None = None,
              workdir: str | Path = "sweep", overrides: dict[str, str] | None = None,
              trial_timeout: float = 3600.0, namespace: str | None = None) -> dict:
    """Run the sweep; returns best.json's content. Writes trials.csv, best.json, objective.png in workdir.
    `namespace` stands for the Experiment's (what ${trialSpec.Namespace} is when the file names none)."""
    import optuna

    spec = read_experiment(path)
    spec.namespace = namespace or spec.namespace
    n_trials, n_jobs = trials or spec.max_trials, parallel or spec.parallel
    if n_trials < 1 or n_jobs < 1:
        raise ConfigError(f"--trials {n_trials} and --parallel {n_jobs} must be >= 1")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(spec, workdir, overrides or {}, trial_timeout)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.min_trials_required or 0,
                                         n_warmup_steps=spec.start_step) if spec.min_trials_required \
        else optuna.pruners.NopPruner()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=spec.direction, sampler=make_sampler(spec), pruner=pruner,
                                study_name=spec.name)

    def stop_after_failures(study, frozen):
        failed = sum(r.state == "FAILED" for r in sweep.records)
        if failed > spec.max_failed:
            log.error("%d trials failed (maxFailedTrialCount %d): stopping the sweep", failed, spec.max_failed)
            study.stop()

    log.info("sweep %s: %d trials, %d in parallel, algorithm %s, objective %s (%s)",
             spec.name, n_trials, n_jobs, spec.algorithm, spec.objective, spec.direction)
    study.optimize(sweep.objective, n_trials=n_trials, n_jobs=n_jobs, catch=(TrialFailed,),
                   callbacks=[stop_after_failures])
    records = sorted(sweep.records, key=lambda r: r.number)
    write_trials_csv(records, spec, workdir / "trials.csv")
    plot_sweep(records, spec, workdir / "objective.png")
    best = best_of(records, spec)
    (workdir / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    return best


def best_of(records: list[TrialRecord], spec: SweepSpec) -> dict:
    done = [r for r in records if r.state == "COMPLETE"]
    if not done:
        raise TrialFailed(f"no trial completed ({len(records)} run); see the logs under the work dir")
    sign = 1 if spec.direction == "maximize" else -1
    best = max(done, key=lambda r: sign * aggregate(r.history[spec.objective], spec.strategies[spec.objective]))
    metrics = {m: aggregate(best.history.get(m, []), spec.strategies[m]) for m in spec.metrics}
    return {"trial": best.name, "params": best.params, "objective": spec.objective, "direction": spec.direction,
            "metrics": metrics, spec.objective: metrics[spec.objective], "trials": len(records),
            "completed": len(done), "pruned": sum(r.state == "PRUNED" for r in records),
            "failed": sum(r.state == "FAILED" for r in records)}


def write_trials_csv(records: list[TrialRecord], spec: SweepSpec, path: Path) -> None:
    names = [p["name"] for p in spec.parameters]
    columns = ["trial", "number", "state", *names, *spec.metrics, "epochs", "seconds", "returncode", "log"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            metrics = [aggregate(r.history.get(m, []), spec.strategies[m]) for m in spec.metrics]
            writer.writerow([r.name, r.number, r.state, *[r.params.get(n) for n in names], *metrics,
                             len(r.history.get(spec.objective, [])), r.seconds, r.returncode, r.log])


def plot_sweep(records: list[TrialRecord], spec: SweepSpec, path: Path) -> None:
    """Left: objective per trial by state, with the running best. Right: objective per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAILED": "tab:red", "RUNNING": "tab:gray"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sign, best, running = (1 if spec.direction == "maximize" else -1), None, []
    for r in records:
        value = aggregate(r.history.get(spec.objective, []), spec.strategies[spec.objective])
        if not math.isnan(value):
            left.scatter(r.number, value, color=colors[r.state], s=40, zorder=3)
        if r.state == "COMPLETE" and (best is None or sign * value > sign * best):
            best = value
        running.append(best if best is not None else math.nan)
        history = r.history.get(spec.objective, [])
        if history:
            right.plot(range(1, len(history) + 1), history, marker="o", color=colors[r.state], alpha=0.7)
            right.annotate(str(r.number), (len(history), history[-1]), fontsize=7, xytext=(3, 0),
                           textcoords="offset points")
    left.step([r.number for r in records], running, where="post", color="black", lw=1, label="best so far")
    for state, color in colors.items():
        if any(r.state == state for r in records):
            left.scatter([], [], color=color, label=state.lower())
    left.set(xlabel="trial", ylabel=f"{spec.objective} ({spec.strategies[spec.objective]} over epochs)",
             title=f"{spec.name}: {spec.algorithm}, {len(records)} trials")
    left.legend(fontsize=8)
    right.set(xlabel="epoch", ylabel=spec.objective, title="per epoch (what median stopping compares)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- CLI

def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z][\w-]*", key):
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set data=/tmp/hpa --set epochs=1")
        out[key.replace("-", "_")] = value
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa sweep",
                                     description="Run a Katib Experiment's search space locally with Optuna")
    parser.add_argument("experiment", help="Katib Experiment YAML, e.g. katib/experiment.yaml")
    parser.add_argument("--trials", type=int, default=None, help="number of trials (default: maxTrialCount)")
    parser.add_argument("--parallel", type=int, default=None, help="trials at once (default: parallelTrialCount)")
    parser.add_argument("--workdir", default="sweep", help="trials.csv, best.json, objective.png, logs/, runs/")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trial argument (--KEY VALUE), e.g. data=DIR split=CSV epochs=1 size=32; "
                             "out=DIR is a prefix")
    parser.add_argument("--trial-timeout", type=float, default=3600.0,
                        help="seconds before a trial is stopped and failed")
    parser.add_argument("--namespace", default=None, help="the namespace the trials stand in for, where the "
                        "Experiment names none and its store URIs follow the trial's (default: the file's)")
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    best = run_sweep(args.experiment, args.trials, args.parallel, args.workdir, _parse_sets(args.sets),
                     args.trial_timeout, args.namespace)
    print(json.dumps(best))
    return 0
