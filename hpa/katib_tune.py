"""Launching the Katib Experiments of `hpa.katib` (what the `katib-tune` component runs) and the
`python -m hpa katib` CLI (render, validate, launch, tune).

`launch` creates one Experiment through the Kubernetes API, waits for it and returns the best trial's
values. An Experiment tunes one architecture (its trial command fixes `--arch`); `tune_models` renders one
per model of a `{arch: lr}` list, runs them together (`launch_all`) and returns each model's best `lr` with
the threshold policy of the best Experiment (the ensemble applies one policy to every model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import uuid
from dataclasses import replace
from pathlib import Path

from hpa import committed, config, k8s, k8s_manifests, store
from hpa.errors import ConfigError
from hpa.evaluate import THRESHOLD_MODES
from hpa.katib import (NOT_SEARCHED, OBJECTIVE, PLURAL, POLICY_VALUES, KatibConfig, in_namespace, render_experiment,
                       render_yaml, resolve_inputs, validate_experiment)
from hpa.options import add_options, from_args, help_of, require

log = logging.getLogger(__name__)


def best_trial(experiment: dict) -> dict:
    """lr, threshold_mode, threshold, shrink_strength (+ trial name and objective) from
    status.currentOptimalTrial. A policy value the Experiment did not search (no chosen policy reads it)
    is NOT_SEARCHED's; one it searched but the optimal trial lacks is a ClusterError."""
    optimal = (experiment.get("status") or {}).get("currentOptimalTrial") or {}
    assigned = {a["name"]: a["value"] for a in optimal.get("parameterAssignments") or []}
    name = experiment["metadata"]["name"]
    parameters = (experiment.get("spec") or {}).get("parameters")
    searched = {p["name"] for p in parameters} if parameters is not None else \
        {"lr", "threshold_mode", *POLICY_VALUES}
    missing = ({"lr", "threshold_mode"} | (searched & set(POLICY_VALUES))) - set(assigned)
    if missing:
        raise k8s.ClusterError(f"Experiment {name}: status.currentOptimalTrial lacks {sorted(missing)}")
    metrics = {m["name"]: m for m in (optimal.get("observation") or {}).get("metrics") or []}
    objective = metrics.get(OBJECTIVE, {})
    values = {key: float(assigned.get(key, default)) for key, default in NOT_SEARCHED.items()}
    return {
        "lr": float(assigned["lr"]), "threshold": values["threshold"], "threshold_mode": assigned["threshold_mode"],
        "shrink_strength": values["shrink_strength"], "trial": optimal.get("bestTrialName", ""),
        OBJECTIVE: float(objective.get("max", objective.get("latest", "nan"))),
    }


def experiment_outcome(obj: dict) -> str | None:
    return k8s.condition_outcome(obj, success="Succeeded", failure="Failed")


def launch(experiment: dict, namespace: str | None = None, timeout: float = 6 * 3600, poll: float = 10.0,
           unique_name: bool = False, api_client=None) -> dict:
    """Create the Experiment, wait until Succeeded (Failed or the timeout raise ClusterError), return best_trial().
    The Experiment (and so its trials) is deleted if the wait fails or times out or the process gets
    SIGTERM/SIGINT, and is owned by the KFP task's Pod when that is known (k8s.create_and_wait)."""
    experiment = json.loads(json.dumps(experiment))
    meta = experiment["metadata"]
    meta["namespace"] = namespace or meta.get("namespace") or "default"
    if unique_name:  # pipeline re-runs must not collide with an earlier Experiment
        meta["name"] = f"{meta['name'][:33]}-{uuid.uuid4().hex[:6]}"
    validate_experiment(experiment)
    api = k8s.custom_objects_api(api_client)
    final = k8s.create_and_wait(api, experiment, PLURAL, meta["namespace"], experiment_outcome, timeout, poll)
    best = best_trial(final)
    log.info("experiment %s/%s succeeded; best trial %s: %s", meta["namespace"], meta["name"], best["trial"], best)
    return best


# ---------------------------------------------------------------- a model list: one Experiment per architecture

NAME_MAX = 40  # validate_config's limit on an Experiment name


def arch_label(arch: str) -> str:
    """A DNS-safe form of a model name for Experiment names: se_resnet18 -> se-resnet18."""
    return re.sub(r"[^a-z0-9]+", "-", arch.lower()).strip("-")


def model_experiments(cfg: KatibConfig, models: dict) -> dict[str, dict]:
    """One rendered Experiment per model of `models` ({create_model name: lr}), in its order, named
    `<cfg.name>-<arch label>` (cfg.name shortened to fit). The lr values are the untuned defaults
    (what `untuned` passes through); each Experiment searches [lr_min, lr_max] for its own model. `cfg.weights` is
    the per-model weights run parameter (JSON model -> source, hpa.weights.weights_by_model); each model's trials
    start from its own source (a plain source is taken for a single model)."""
    from hpa.models import MODEL_NAMES
    from hpa.weights import weights_by_model

    require(isinstance(models, dict) and bool(models),
            f"katib models {models!r}: expected a non-empty JSON object of model name -> learning rate")
    unknown = [arch for arch in models if arch not in MODEL_NAMES]
    require(not unknown, f"katib models: unknown model {', '.join(map(repr, unknown))}; expected names from "
            f"{', '.join(MODEL_NAMES)}")
    plain = len(models) == 1 and not cfg.weights.lstrip().startswith("{")
    weights = {arch: cfg.weights for arch in models} if plain else weights_by_model(cfg.weights, list(models))
    experiments, names = {}, {}
    for arch in models:
        label = arch_label(arch)
        name = f"{cfg.name[:NAME_MAX - len(label) - 1].rstrip('-')}-{label}"
        require(name not in names, f"katib models {names.get(name)!r} and {arch!r} give the same Experiment name "
                f"{name!r}: use a shorter name")
        names[name] = arch
        experiments[arch] = render_experiment(replace(cfg, name=name, arch=arch, weights=weights[arch]))
    return experiments


def launch_all(experiments: list[dict], namespace: str | None = None, timeout: float = 6 * 3600, poll: float = 10.0,
               api_client=None) -> list[dict]:
    """`launch` for several Experiments that run at the same time: create them all, wait for all,
    return best_trial() of each in order. One failing (or refused, or timing out) deletes the others
    that have not succeeded, and SIGTERM/SIGINT deletes them all (k8s.create_all_and_wait)."""
    require(bool(experiments), "launch_all: no Experiments given")
    experiments = [json.loads(json.dumps(exp)) for exp in experiments]
    namespace = namespace or experiments[0]["metadata"].get("namespace") or "default"
    for exp in experiments:
        exp["metadata"]["namespace"] = namespace
        validate_experiment(exp)
    api = k8s.custom_objects_api(api_client)
    finals = k8s.create_all_and_wait(api, experiments, PLURAL, namespace, experiment_outcome, timeout, poll)
    bests = [best_trial(final) for final in finals]
    for final, best in zip(finals, bests):
        log.info("experiment %s/%s succeeded; best trial %s: %s", namespace, final["metadata"]["name"], best["trial"],
                 best)
    return bests


def combine_best(best_by_model: dict[str, dict]) -> dict:
    """Each model's best lr, and the threshold policy of the Experiment with the highest objective (the
    ensemble applies one policy to every model; ties go to the first model)."""
    def score(arch: str) -> float:
        value = best_by_model[arch][OBJECTIVE]
        return -math.inf if math.isnan(value) else value

    best_model = max(best_by_model, key=score)  # max keeps the first of equal scores
    best = best_by_model[best_model]
    return {
        "models": {arch: b["lr"] for arch, b in best_by_model.items()},
        "threshold": best["threshold"], "threshold_mode": best["threshold_mode"],
        "shrink_strength": best["shrink_strength"],
        OBJECTIVE: best[OBJECTIVE], "policy_from": best_model, "trials": best_by_model,
    }


def tune_models(cfg: KatibConfig, models: dict, timeout: float = 6 * 3600, poll: float = 10.0,
                unique_name: bool = False, api_client=None, save_to: str | Path | None = None) -> dict:
    """Tune a model list: one Experiment per model (model_experiments), all created and awaited together
    (launch_all), combined by combine_best into {"models": {arch: best lr}, "threshold", "threshold_mode",
    "shrink_strength", "val_macro_f1", "policy_from": the model whose Experiment gave the policy,
    "trials": {arch: its best_trial()}, "experiments": {arch: Experiment name}}.
    `unique_name` adds a random part to cfg.name (re-runs must not collide); `save_to` gets the rendered
    Experiments (one YAML document each) before they are created."""
    if unique_name:
        cfg = replace(cfg, name=f"{cfg.name[:20].rstrip('-')}-{uuid.uuid4().hex[:6]}")
    experiments = model_experiments(cfg, models)
    if save_to is not None:
        Path(save_to).write_text("---\n".join(k8s_manifests.dump_yaml(exp) for exp in experiments.values()))
    bests = launch_all(list(experiments.values()), cfg.namespace, timeout, poll, api_client)
    return {**combine_best(dict(zip(experiments, bests))),
            "experiments": {arch: exp["metadata"]["name"] for arch, exp in experiments.items()}}


def katib_tune_inputs(params: dict) -> KatibConfig:
    """The KatibConfig of the katib-tune component's inputs (`params`: input name -> value): the run's data,
    search space and trial pods; image_size, val_fold and trial_image are the config's size, fold and image."""
    from hpa.config import S3_DEFAULT_ENDPOINT

    renamed = {"image_size": "size", "val_fold": "fold", "trial_image": "image"}
    fields = {f.name for f in dataclasses.fields(KatibConfig)} - {"data", "s3_endpoint", "threshold_modes"}
    return KatibConfig(**{renamed.get(k, k): v for k, v in params.items() if renamed.get(k, k) in fields},
                       data=params["shards_uri"] or params["data_uri"],
                       threshold_modes=tuple(params["threshold_modes"]),
                       s3_endpoint=params["s3_endpoint"] or S3_DEFAULT_ENDPOINT)


def untuned(*, models: dict, threshold: float, threshold_mode: str, shrink_strength: float,
            experiments_out: str) -> dict:
    """The katib-tune task of a run without tuning: katib_tune_task's result shape with the run parameters
    unchanged (val_macro_f1 -1.0: nothing was tuned); `experiments_out` says that no Experiment was created."""
    Path(experiments_out).write_text("# tune=false: no Katib Experiment was created; the run parameters were used.\n")
    return {"models": dict(models), "threshold": float(threshold), "threshold_mode": threshold_mode,
            "shrink_strength": float(shrink_strength), "val_macro_f1": -1.0}

def katib_tune_task(cfg: KatibConfig, models: dict, split_csv: str, store_uri: str, experiments_out: str,
                    timeout: float = 6 * 3600, poll: float = 10.0) -> dict:
    """The katib-tune pipeline task: `cfg` (the run's data, search space and trial pods; namespace empty = this
    task's own) under a fresh name hpa-tune-<random>, the split copied to <store_uri>/katib/<name>/ where the
    trials read it (and write their outputs), then tune_models, its Experiments saved to `experiments_out`.
    Returns tune_models' result with the namespace."""
    if not cfg.image.strip():
        raise ConfigError(f"katib-tune trial_image={cfg.image!r}: expected the trial image fixed at compile time "
                          "(pipeline.py passes the CUDA image when gpus > 0, else the CPU image)")
    namespace = cfg.namespace or k8s.current_namespace()
    name = f"hpa-tune-{uuid.uuid4().hex[:8]}"  # each model's Experiment: <name>-<model>
    prefix = f"{config.expand_store_uri(store_uri, namespace).rstrip('/')}/katib/{name}"  # trial i: <prefix>/<trial>
    cfg = replace(cfg, name=name, namespace=namespace, split=f"{prefix}/split.csv", out_prefix=prefix)
    model_experiments(cfg, models)  # a bad search space or model list fails before the store is touched
    store.publish(split_csv, cfg.split)
    return {"namespace": namespace, **tune_models(cfg, models, timeout, poll, save_to=experiments_out)}


def verify_inputs(cfg: KatibConfig) -> KatibConfig:
    """What the trials will read, checked with this machine's store keys before anything is created: `data` is a
    committed dataset (its manifest.json) or packed shards (their shards.json), and `split` exists. Returns the
    resolved config; a missing object is one ConfigError line saying how to make it."""
    cfg = in_namespace(resolve_inputs(cfg))
    for name in ("data", "split"):
        require("${" not in getattr(cfg, name), f"katib --verify: {name} {getattr(cfg, name)} depends on the trial's "
                "namespace; give --namespace NS to check the objects of that namespace")
    require(bool(committed.manifest_sha256(cfg.data) or committed.shards_sha256(cfg.data)),
            f"katib data {cfg.data}: no committed dataset there (no manifest.json) nor packed shards; expected a "
            "dataset a finished run wrote, <store_uri>/datasets/<name> (the run's download task logs its data_uri)")
    named = re.match(r".*/datasets/[^/]+", cfg.data)  # shards live inside their dataset's prefix
    require(store.exists_uri(cfg.split), f"katib split {cfg.split}: does not exist; write it with python -m hpa split "
            f"--data {named.group(0) if named else cfg.data} --folds {cfg.folds} --seed {cfg.seed} --out {cfg.split}")
    return cfg


# ---------------------------------------------------------------- CLI

def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold-modes", nargs="+", default=list(THRESHOLD_MODES),
                        help=help_of(KatibConfig, "threshold_modes"))
    add_options(parser, KatibConfig, skip=("threshold_modes",), overrides=k8s_manifests.IMAGE_OPTION)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpa katib",
                                     description="Render, validate, launch or tune the Katib Experiment")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="write the Experiment YAML from hpa.katib.KatibConfig")
    render.add_argument("--out", dest="out_file", default="-", help="output file (default stdout)")
    render.add_argument("--verify", action="store_true", help="check first that the data is a committed dataset and "
                        "the split exists (reads the store with this machine's keys; needs --namespace)")
    _add_config_options(render)
    check = sub.add_parser("validate", help="validate an Experiment YAML against the schemas")
    check.add_argument("file", nargs="?", default="katib/experiment.yaml", help="the Experiment YAML")
    run = sub.add_parser("launch", help="create the Experiment in a cluster, wait, print the best trial (JSON)")
    run.add_argument("--file", default="katib/experiment.yaml", help="the Experiment YAML")
    run.add_argument("--namespace", default=None, help="namespace to create it in (default: the file's, else default)")
    run.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the Experiment")
    run.add_argument("--poll", type=float, default=10.0, help="seconds between status reads")
    run.add_argument("--unique-name", action="store_true", help="append a random suffix to the name")
    tune = sub.add_parser("tune", help="one Experiment per model of --models, run together; print each model's "
                                       "best lr and the best Experiment's threshold policy (JSON)")
    tune.add_argument("--models", type=json.loads, default=dict(config.DEFAULT_MODELS),
                      help=f"JSON object of model name -> lr (default {json.dumps(config.DEFAULT_MODELS)})")
    tune.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the Experiments")
    tune.add_argument("--poll", type=float, default=10.0, help="seconds between status reads")
    tune.add_argument("--unique-name", action="store_true", help="add a random part to the names")
    tune.add_argument("--save", default=None, help="also write the rendered Experiments to this file")
    _add_config_options(tune)
    return parser


def _config_from_args(args) -> KatibConfig:
    args.threshold_modes = tuple(args.threshold_modes)
    args.image = k8s_manifests.default_image(args.image, args.gpus)
    return from_args(KatibConfig, args)


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "render":
        cfg = _config_from_args(args)
        if args.verify:
            verify_inputs(cfg)
        k8s_manifests.write_manifest(render_yaml(cfg), args.out_file)
        return 0
    if args.command == "validate":
        validate_experiment(k8s_manifests.load_yaml(args.file), what=args.file)
        print(f"{args.file}: valid")
        return 0
    if args.command == "tune":
        args.namespace = args.namespace or k8s.pod_namespace()
        require(bool(args.namespace), "katib tune --namespace: not set; expected the profile namespace the "
                "Experiments run in (their store URIs follow it)")
        result = tune_models(_config_from_args(args), args.models, args.timeout, args.poll, args.unique_name,
                             save_to=args.save)
    else:
        result = launch(k8s_manifests.load_yaml(args.file), args.namespace, args.timeout, args.poll, args.unique_name)
    print(json.dumps(result))
    return 0
