"""What a local sweep (`hpa.sweep`) reads from a Katib Experiment, and Katib's behaviour it reproduces: the
Experiment as a `SweepSpec`, its search space as Optuna samplers and suggestions (Katib's grid conversion
included), the trial command with `${trialParameters.*}` filled in, and the StdOut collector's metric parsing.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpa.errors import ConfigError
from hpa.katib import KATIB_DEFAULT_FILTER
from hpa.k8s_manifests import load_yaml

LOCAL_ALGORITHMS = ("tpe", "random", "grid", "cmaes")


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
    namespace: str = ""  # what ${trialSpec.Namespace} is: metadata.namespace, or `sweep --namespace`
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
    exp = load_yaml(path)
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
        namespace=exp["metadata"].get("namespace") or "",
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
        return trial.suggest_int(name, int(space["min"]), int(space["max"]), step=int(space.get("step") or 1),
                                 log=log_scale)
    if kind == "double":
        step = float(space["step"]) if space.get("step") and not log_scale else None
        return trial.suggest_float(name, float(space["min"]), float(space["max"]), step=step, log=log_scale)
    raise ConfigError(f"parameter {name}: parameterType {kind!r} not supported (int, double, categorical, discrete)")


# ---------------------------------------------------------------- trial command and metrics

def format_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def trial_command(spec: SweepSpec, assignment: dict, trial_name: str, overrides: dict[str, str],
                  out_prefix: str) -> list[str]:
    """The trial template's command with ${trialParameters.x} substituted and local overrides applied.

    `--set key=value` replaces the value after `--key` (appends `--key value` when absent); `--out`
    always becomes <out_prefix>/<trial name>. `python` is this interpreter. Placeholders are filled as Katib
    does (kubeflow/katib v0.19.0 pkg/controller.v1beta1/experiment/manifest/generator.go applyParameters), after
    the overrides: an overridden value (e.g. --data of another namespace) needs no namespace."""
    cmd = [sys.executable if i == 0 and part == "python" else part for i, part in enumerate(spec.command)]
    for key, value in {**overrides, "out": f"{out_prefix}/{trial_name}"}.items():
        flag = "--" + key.replace("_", "-")
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    for i, part in enumerate(cmd):
        names = [n for n in re.findall(r"\$\{trialParameters\.([^}]+)\}", part)
                 if spec.trial_parameters.get(n) == "${trialSpec.Namespace}"]
        if names and not spec.namespace:
            raise ConfigError(f"{cmd[i - 1] if i else 'command'} {part}: the trial's namespace, and {spec.name} names "
                              "none; give --namespace NS (whose store prefix the trials read) or --set that option")
    return [re.sub(r"\$\{trialParameters\.([^}]+)\}", lambda m: _fill(spec, m.group(1), assignment, trial_name), part)
            for part in cmd]


def _fill(spec: SweepSpec, name: str, assignment: dict, trial_name: str) -> str:
    ref = spec.trial_parameters.get(name, "")
    if ref == "${trialSpec.Name}":
        return trial_name
    if ref == "${trialSpec.Namespace}":
        return spec.namespace
    if ref in assignment:
        return format_value(assignment[ref])
    raise ConfigError(f"trial parameter {name} references {ref!r}, which the local sweep cannot fill")


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
