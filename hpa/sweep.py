"""Run a Katib Experiment's search space on this machine, with Optuna, before spending cluster time.

`python -m hpa sweep katib/experiment.yaml --trials 4 --parallel 2 --set data=DIR --set split=CSV`
reads the Experiment (parameters, objective, algorithm, counts, medianstop settings, metric filters),
runs each trial as a subprocess of the trial template's own command with `${trialParameters.*}`
substituted, reads the metric lines from its stdout the way Katib's StdOut collector does, prunes
trials between epochs like medianstop, and writes `trials.csv`, `best.json` and `objective.png`.
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
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpa import k8s
from hpa.errors import ConfigError, HPAError
from hpa.katib import KATIB_DEFAULT_FILTER

log = logging.getLogger(__name__)

LOCAL_ALGORITHMS = ("tpe", "random", "grid", "cmaes")


class TrialFailed(HPAError):
    """A trial's process failed or printed no objective metric."""


@dataclass
class SweepSpec:
    """What a local sweep needs from a Katib Experiment."""

    name: str
    objective: str
    direction: str  # maximize | minimize
    metrics: list[str]  # objective first, then additionalMetricNames
    strategies: dict[str, str]  # metric -> max | min | latest
    algorithm: str
    seed: int | None
    parameters: list[dict]
    max_trials: int
    parallel: int
    max_failed: int
    min_trials_required: int | None  # None: no early stopping
    start_step: int
    command: list[str]
    trial_parameters: dict[str, str]  # trialParameters name -> reference
    filters: list[str] = field(default_factory=lambda: [KATIB_DEFAULT_FILTER])


def _primary_container(node, name: str):
    """The container named `name` anywhere in a trialSpec (Job or PyTorchJob Master)."""
    if isinstance(node, dict):
        if node.get("name") == name and "image" in node:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _primary_container(child, name)
        if found is not None:
            return found
    return None


def _early_stopping(spec: dict) -> tuple[int | None, int]:
    early = spec.get("earlyStopping") or {}
    if not early:
        return None, 1
    if early.get("algorithmName") != "medianstop":
        raise ConfigError(f"earlyStopping {early.get('algorithmName')!r}: only medianstop has a local equivalent")
    settings = {s["name"]: int(s["value"]) for s in early.get("algorithmSettings") or []}
    # Katib's defaults (pkg/earlystopping/v1beta1/medianstop/service.py): 3 trials, step 4.
    return settings.get("min_trials_required", 3), settings.get("start_step", 4)


def read_experiment(path: str | Path) -> SweepSpec:
    """Parse the Experiment YAML into a SweepSpec (ConfigError names what is missing)."""
    exp = k8s.load_yaml(path)
    if exp.get("kind") != "Experiment":
        raise ConfigError(f"{path}: kind {exp.get('kind')!r}, expected a Katib Experiment")
    try:
        spec = exp["spec"]
        objective = spec["objective"]
        template = spec["trialTemplate"]
        primary = template["primaryContainerName"]
    except KeyError as exc:
        raise ConfigError(f"{path}: Experiment lacks spec field {exc.args[0]!r}") from None
    container = _primary_container(template.get("trialSpec"), primary)
    if container is None or not (container.get("command") or container.get("args")):
        raise ConfigError(f"{path}: trialSpec has no container {primary!r} with a command")
    metrics = [objective["objectiveMetricName"], *objective.get("additionalMetricNames", [])]
    default_strategy = "max" if objective["type"] == "maximize" else "min"
    strategies = {m: "latest" for m in metrics} | {metrics[0]: default_strategy}
    strategies |= {s["name"]: s["value"] for s in objective.get("metricStrategies") or []}
    settings = {s["name"]: s["value"] for s in (spec.get("algorithm") or {}).get("algorithmSettings") or []}
    min_trials, start_step = _early_stopping(spec)
    filters = (((spec.get("metricsCollectorSpec") or {}).get("source") or {}).get("filter") or {}).get("metricsFormat")
    return SweepSpec(
        name=exp["metadata"]["name"], objective=metrics[0], direction=objective["type"], metrics=metrics,
        strategies=strategies, algorithm=(spec.get("algorithm") or {}).get("algorithmName", "random"),
        seed=int(settings["random_state"]) if "random_state" in settings else None,
        parameters=spec["parameters"], max_trials=int(spec.get("maxTrialCount", 10)),
        parallel=int(spec.get("parallelTrialCount", 3)), max_failed=int(spec.get("maxFailedTrialCount", 3)),
        min_trials_required=min_trials, start_step=start_step,
        command=list(container.get("command") or []) + list(container.get("args") or []),
        trial_parameters={p["name"]: p["reference"] for p in template.get("trialParameters") or []},
        filters=list(filters) if filters else [KATIB_DEFAULT_FILTER],
    )


# ---------------------------------------------------------------- search space -> Optuna

def grid_values(param: dict) -> list:
    """Katib's grid conversion (pkg/suggestion/v1beta1/internal/search_space.py convert_to_combinations)."""
    import numpy as np

    space, kind = param["feasibleSpace"], param["parameterType"]
    if kind in ("categorical", "discrete"):
        return [_number_or_str(v) for v in space["list"]]
    if not space.get("step"):
        raise ConfigError(f"grid: parameter {param['name']} needs feasibleSpace.step")
    if kind == "int":
        return list(range(int(space["min"]), int(space["max"]) + 1, int(space["step"])))
    lo, hi, step = float(space["min"]), float(space["max"]), float(space["step"])
    values = np.arange(lo, hi + step, step)
    return [float(v) for v in (values[:-1] if values[-1] > hi else values)]


def _number_or_str(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def make_sampler(spec: SweepSpec):
    import optuna

    if spec.algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed)
    if spec.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False)
    if spec.algorithm == "grid":
        return optuna.samplers.GridSampler({p["name"]: grid_values(p) for p in spec.parameters}, seed=spec.seed)
    raise ConfigError(f"algorithm {spec.algorithm!r} has no local Optuna equivalent; local sweeps support "
                      f"{', '.join(LOCAL_ALGORITHMS)} (render with `python -m hpa katib render --algorithm tpe`)")


def suggest(trial, param: dict, algorithm: str):
    """One Optuna suggestion for a Katib ParameterSpec."""
    name, kind, space = param["name"], param["parameterType"], param["feasibleSpace"]
    if kind in ("categorical", "discrete") or algorithm == "grid":
        return trial.suggest_categorical(name, grid_values(param) if algorithm == "grid" else
                                         [_number_or_str(v) for v in space["list"]])
    log_scale = space.get("distribution") in ("logUniform", "logNormal")
    if kind == "int":
        return trial.suggest_int(name, int(space["min"]), int(space["max"]), step=int(space.get("step") or 1), log=log_scale)
    if kind == "double":
        step = float(space["step"]) if space.get("step") and not log_scale else None
        return trial.suggest_float(name, float(space["min"]), float(space["max"]), step=step, log=log_scale)
    raise ConfigError(f"parameter {name}: parameterType {kind!r} not supported (int, double, categorical, discrete)")


# ---------------------------------------------------------------- trial command and metrics

def format_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def trial_command(spec: SweepSpec, assignment: dict, trial_name: str, overrides: dict[str, str], out_prefix: str) -> list[str]:
    """The trial template's command with ${trialParameters.x} substituted and local overrides applied.

    `--set key=value` replaces the value after `--key` (appends `--key value` when absent); `--out`
    always becomes <out_prefix>/<trial name>. `python` is this interpreter."""
    values = {}
    for name, ref in spec.trial_parameters.items():
        if ref == "${trialSpec.Name}":
            values[name] = trial_name
        elif ref in assignment:
            values[name] = format_value(assignment[ref])
        else:
            raise ConfigError(f"trial parameter {name} references {ref!r}, which the local sweep cannot fill")
    cmd = [re.sub(r"\$\{trialParameters\.([^}]+)\}", lambda m: values[m.group(1)], part) for part in spec.command]
    cmd = [sys.executable if i == 0 and part == "python" else part for i, part in enumerate(cmd)]
    for key, value in {**overrides, "out": f"{out_prefix}/{trial_name}"}.items():
        flag = "--" + key.replace("_", "-")
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    return cmd


def parse_metrics(line: str, filters: list[str], names: list[str]) -> dict[str, float]:
    """Katib's text parser (file-metricscollector.go parseLogsInTextFormat): each filter's matches,
    group 1 the name, group 2 the value; only the Experiment's metric names are kept."""
    if not any(name in line for name in names):
        return {}
    found = {}
    for regex in filters:
        for match in re.finditer(regex, line.rstrip("\n")):
            name, value = match.group(1).strip(), match.group(2).strip()
            if name in names:
                try:
                    found[name] = float(value)
                except ValueError:
                    continue
    return found


def aggregate(values: list[float], strategy: str) -> float:
    if not values:
        return math.nan
    return {"max": max, "min": min}.get(strategy, lambda v: v[-1])(values)


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
            log.info("%s: pruned by median stopping after %d epochs", rec.name, len(rec.history.get(spec.objective, [])))
            raise optuna.TrialPruned()
        if rec.returncode != 0 or math.isnan(value):
            rec.state = "FAILED"
            why = f"exit code {rec.returncode}" if rec.returncode != 0 else f"no {spec.objective} line matched the filters"
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


def run_sweep(path: str | Path, trials: int | None = None, parallel: int | None = None, workdir: str | Path = "sweep",
              overrides: dict[str, str] | None = None, trial_timeout: float = 3600.0) -> dict:
    """Run the sweep; returns best.json's content. Writes trials.csv, best.json, objective.png in workdir."""
    import optuna

    spec = read_experiment(path)
    n_trials, n_jobs = trials or spec.max_trials, parallel or spec.parallel
    if n_trials < 1 or n_jobs < 1:
        raise ConfigError(f"--trials {n_trials} and --parallel {n_jobs} must be >= 1")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(spec, workdir, overrides or {}, trial_timeout)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.min_trials_required or 0,
                                         n_warmup_steps=spec.start_step) if spec.min_trials_required else optuna.pruners.NopPruner()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=spec.direction, sampler=make_sampler(spec), pruner=pruner, study_name=spec.name)

    def stop_after_failures(study, frozen):
        failed = sum(r.state == "FAILED" for r in sweep.records)
        if failed > spec.max_failed:
            log.error("%d trials failed (maxFailedTrialCount %d): stopping the sweep", failed, spec.max_failed)
            study.stop()

    log.info("sweep %s: %d trials, %d in parallel, algorithm %s, objective %s (%s)",
             spec.name, n_trials, n_jobs, spec.algorithm, spec.objective, spec.direction)
    study.optimize(sweep.objective, n_trials=n_trials, n_jobs=n_jobs, catch=(TrialFailed,), callbacks=[stop_after_failures])
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
            right.annotate(str(r.number), (len(history), history[-1]), fontsize=7, xytext=(3, 0), textcoords="offset points")
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
    parser = argparse.ArgumentParser(prog="python -m hpa sweep", description="Run a Katib Experiment's search space locally with Optuna")
    parser.add_argument("experiment", help="Katib Experiment YAML, e.g. katib/experiment.yaml")
    parser.add_argument("--trials", type=int, default=None, help="number of trials (default: maxTrialCount)")
    parser.add_argument("--parallel", type=int, default=None, help="trials at once (default: parallelTrialCount)")
    parser.add_argument("--workdir", default="sweep", help="trials.csv, best.json, objective.png, logs/, runs/")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trial argument (--KEY VALUE), e.g. data=DIR split=CSV epochs=1 size=32; out=DIR is a prefix")
    parser.add_argument("--trial-timeout", type=float, default=3600.0, help="seconds before a trial is stopped and failed")
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    best = run_sweep(args.experiment, args.trials, args.parallel, args.workdir, _parse_sets(args.sets), args.trial_timeout)
    print(json.dumps(best))
    return 0
