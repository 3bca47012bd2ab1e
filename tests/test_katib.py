"""Katib Experiment: rendering (no drift), strict schema validation, bad search spaces, the threshold
policy's parameters, metric filters, the trials' image and placement, and the launchers against a
loopback stand-in for the Kubernetes API server (tests/k8s_fake_api.py): owner references, deletion on
failure, timeout and SIGINT/SIGTERM, for one Experiment and for a model list (one Experiment per model)."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from hpa import config, k8s, katib, katib_tune
from hpa.errors import ConfigError
from hpa.download import dataset_name
from hpa.katib import KatibConfig
from k8s_fake_api import FakeKubeAPI

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "katib" / "experiment.yaml"
LINE = "epoch=3 train_loss=0.1234 val_loss=0.1345 val_macro_f1=0.4567"
# The dataset the default pipeline run commits (hpa.download.dataset_name of PipelineConfig's defaults).
_P = config.PipelineConfig()
DEFAULT_DATASET = dataset_name(_P.data_source, _P.n_train, _P.n_test, _P.image_size, _P.seed)


def Cfg(**changes) -> KatibConfig:
    """A KatibConfig for the default run's dataset in namespace kubeflow (what the launchers' tests expect)."""
    return KatibConfig(**{"dataset": DEFAULT_DATASET, "namespace": "kubeflow", **changes})


@pytest.fixture(autouse=True)
def default_images(monkeypatch):
    for name in ("HPA_IMAGE", "HPA_CUDA_IMAGE"):
        monkeypatch.delenv(name, raising=False)


def test_experiment_yaml_is_generated_not_hand_kept():
    assert EXPERIMENT.read_text() == katib.render_yaml(KatibConfig(dataset=DEFAULT_DATASET)), \
        f"katib/experiment.yaml drifted: run `python -m hpa katib render --dataset {DEFAULT_DATASET} " \
        "--out katib/experiment.yaml`"


def test_committed_experiment_validates_and_has_the_contract():
    exp = yaml.safe_load(EXPERIMENT.read_text())
    katib.validate_experiment(exp)
    spec = exp["spec"]
    assert exp["apiVersion"] == "kubeflow.org/v1beta1" and exp["kind"] == "Experiment"
    assert spec["objective"]["type"] == "maximize" and spec["objective"]["objectiveMetricName"] == "val_macro_f1"
    assert spec["objective"]["additionalMetricNames"] == ["val_loss"]
    assert spec["algorithm"]["algorithmName"] == "tpe" and spec["earlyStopping"]["algorithmName"] == "medianstop"
    params = {p["name"]: p for p in spec["parameters"]}
    assert list(params) == ["lr", "threshold_mode", "threshold", "shrink_strength"]
    assert params["lr"]["feasibleSpace"]["distribution"] == "logUniform"
    assert params["threshold_mode"]["feasibleSpace"]["list"] == ["fitted", "global", "shrunk", "prior"]
    assert params["threshold"]["feasibleSpace"] == {"min": "0.05", "max": "0.6", "distribution": "uniform"}
    assert params["shrink_strength"]["feasibleSpace"] == {"min": "1", "max": "50", "distribution": "logUniform"}
    assert all(isinstance(v, str) for p in params.values() for v in p["feasibleSpace"].values()
               if not isinstance(v, list))
    job = spec["trialTemplate"]["trialSpec"]
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert spec["trialTemplate"]["primaryContainerName"] == container["name"]
    assert container["command"] == ["python", "-m", "hpa", "train"]
    args = " ".join(container["args"])
    for flag, name in (("--lr", "lr"), ("--threshold", "threshold"), ("--threshold-mode", "thresholdMode"),
                       ("--shrink-strength", "shrinkStrength")):
        assert f"{flag} ${{trialParameters.{name}}}" in args
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert refs == {"accesskey", "secretkey"}
    assert pod["spec"]["restartPolicy"] == "Never" and \
        pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["spec"]["volumes"][0]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("algorithm", katib.ALGORITHMS)
@pytest.mark.parametrize("trial_kind", katib.TRIAL_KINDS)
def test_every_algorithm_and_trial_kind_validates(algorithm, trial_kind):
    exp = katib.render_experiment(Cfg(algorithm=algorithm, trial_kind=trial_kind, num_nodes=2))
    assert exp["spec"]["algorithm"]["algorithmName"] == algorithm
    if trial_kind == "pytorchjob":
        job = exp["spec"]["trialTemplate"]["trialSpec"]
        assert job["kind"] == "PyTorchJob" and set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
        assert exp["spec"]["trialTemplate"]["primaryContainerName"] == "pytorch"


@pytest.mark.parametrize("changes, message", [
    (dict(lr_min=0.0), "lr_min=0.0 must be > 0"),
    (dict(lr_min=-1e-3), "must be > 0"),
    (dict(lr_min=1e-2, lr_max=1e-3), "lr_min=0.01 must be < lr_max=0.001"),
    (dict(threshold_min=0.0), "must lie inside (0, 1)"),
    (dict(threshold_max=1.2), "must lie inside (0, 1)"),
    (dict(threshold_min=0.5, threshold_max=0.2), "threshold_min=0.5 must be < threshold_max=0.2"),
    (dict(algorithm="hyperband2"), "katib algorithm 'hyperband2': expected one of tpe, random"),
    (dict(threshold_modes=("fitted", "best")),
     "katib threshold_modes fitted best: expected one or more of fitted, global, shrunk, prior, each once"),
    (dict(threshold_modes=()), "katib threshold_modes (none): expected one or more of"),
    (dict(threshold_modes=("shrunk", "shrunk")), "katib threshold_modes shrunk shrunk: expected"),
    (dict(shrink_strength_min=0.0), "katib shrink_strength range: shrink_strength_min=0.0 must be > 0 (log-uniform)"),
    (dict(shrink_strength_min=-2.0), "shrink_strength_min=-2.0 must be > 0"),
    (dict(shrink_strength_max=math.inf), "shrink_strength_min=1.0 must be > 0 (log-uniform)"),
    (dict(shrink_strength_min=30.0, shrink_strength_max=5.0),
     "katib shrink_strength range: shrink_strength_min=30.0 must be < shrink_strength_max=5.0"),
    (dict(parallel_trials=20, max_trials=5), "parallel_trials=20 must be <= max_trials=5"),
    (dict(start_step=5, epochs=2), "start_step=5 must be in [1, epochs=2]"),
    # grid: 4 values per numeric parameter that some chosen policy reads, times the policies
    # lr, threshold, k: 4**3 * 4
    (dict(algorithm="grid", max_trials=257), "katib grid: max_trials=257 > 256 grid combinations"),
    (dict(algorithm="grid", max_trials=33, threshold_modes=("fitted", "global")),
     "max_trials=33 > 32 grid combinations"),
    (dict(algorithm="grid", max_trials=9, threshold_modes=("fitted", "prior")), "max_trials=9 > 8 grid combinations"),
    (dict(data="s3://bucket/with space"), "no whitespace"),
    (dict(name="Bad_Name"), "DNS label"),
    (dict(image=""), "katib image '': expected the trial image reference fixed at compile time"),
    (dict(namespace="Team_A"), "katib namespace 'Team_A': expected a DNS label"),
    (dict(tolerations=[{"key": "x", "effect": 3}]), "effect"),
    (dict(node_selector="gpu=h100"), "katib node_selector 'gpu=h100': expected a JSON object"),
])
def test_bad_search_space_is_one_clear_error(changes, message):
    with pytest.raises(ConfigError) as err:
        katib.render_experiment(replace(Cfg(), **changes))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mutate, where", [
    (lambda e: e["spec"].__setitem__("maxTrialCont", 3), "maxTrialCont"),
    (lambda e: e["spec"].__setitem__("maxTrialCount", "3"), "spec/maxTrialCount"),
    (lambda e: e["spec"]["parameters"][0]["feasibleSpace"].__setitem__("min", 1e-5), "feasibleSpace/min"),
    (lambda e: _container(e).__setitem__("imagePullPolicy", ["x"]), "containers/0/imagePullPolicy"),
    (lambda e: _container(e).__setitem__("envFrom", [{"secretRef": {"nam": "x"}}]), "envFrom"),
    (lambda e: e["spec"]["trialTemplate"]["trialParameters"].pop(), "undefined trial parameters"),
    (lambda e: e["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"].append("(a);(b)"), "no ';'"),
])
def test_schema_validation_is_strict(mutate, where):
    exp = katib.render_experiment(Cfg())
    mutate(exp)
    with pytest.raises(ConfigError, match=re.escape(where)):
        katib.validate_experiment(exp)


def _container(exp):
    return exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]


PLACED = dict(node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
              tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


@pytest.mark.parametrize("trial_kind", katib.TRIAL_KINDS)
def test_trial_pods_get_the_image_and_placement_given(trial_kind):
    """The trials run the image the renderer is given (the pipeline passes the one chosen at compile
    time), with the node selector, tolerations and Istio opt-out, for Job and PyTorchJob trials."""
    exp = katib.render_experiment(Cfg(image="registry.example/hpa:cuda-7", trial_kind=trial_kind, num_nodes=2,
                                              **PLACED))
    trial = exp["spec"]["trialTemplate"]["trialSpec"]
    templates = ([r["template"] for r in trial["spec"]["pytorchReplicaSpecs"].values()] if trial_kind == "pytorchjob"
                 else [trial["spec"]["template"]])
    assert len(templates) == (2 if trial_kind == "pytorchjob" else 1)
    for template in templates:
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert template["spec"]["nodeSelector"] == PLACED["node_selector"] and \
            template["spec"]["tolerations"] == PLACED["tolerations"]
        assert [c["image"] for c in template["spec"]["containers"]] == ["registry.example/hpa:cuda-7"]


def test_cli_image_default_follows_the_environment_and_gpus(tmp_path, monkeypatch):
    """`katib render` runs on the user's machine: without --image it takes HPA_CUDA_IMAGE for GPU trials
    and HPA_IMAGE for CPU trials (the values set where the render happens)."""
    monkeypatch.setenv("HPA_IMAGE", "registry.example/hpa:cpu-3")
    monkeypatch.setenv("HPA_CUDA_IMAGE", "registry.example/hpa:cuda-3")
    out = tmp_path / "exp.yaml"
    for argv, image in [([], "registry.example/hpa:cuda-3"), (["--gpus", "0"], "registry.example/hpa:cpu-3"),
                        (["--image", "registry.example/mine:1"], "registry.example/mine:1")]:
        assert katib_tune.main(["render", "--dataset", DEFAULT_DATASET, "--out", str(out), *argv]) == 0
        assert _container(yaml.safe_load(out.read_text()))["image"] == image


def _katib_parse(line: str, filters: list[str], names: list[str]) -> dict:
    """Katib's parseLogsInTextFormat in Python: group 1 name, group 2 value, names of the objective only."""
    found = {}
    if any(n in line for n in names):
        for regex in filters:
            for m in re.finditer(regex, line):
                if m.group(1).strip() in names:
                    found[m.group(1).strip()] = float(m.group(2))
    return found


def test_metric_filters_match_exactly_the_training_line():
    names = ["val_macro_f1", "val_loss"]
    filters = list(katib.METRIC_FILTERS)
    assert _katib_parse(LINE, filters, names) == {"val_loss": 0.1345, "val_macro_f1": 0.4567}
    assert _katib_parse(LINE, [katib.KATIB_DEFAULT_FILTER], names) == {"val_loss": 0.1345, "val_macro_f1": 0.4567}
    assert _katib_parse("epoch=1 train_loss=1e-3 val_loss=2.5E-01 val_macro_f1=.5", filters, names) == \
        {"val_loss": 0.25, "val_macro_f1": 0.5}
    # A line that starts with an RFC3339 timestamp (Katib then stores that time with the values).
    assert _katib_parse("2026-11-25T11:05:45.123456Z " + LINE, filters, names) == \
        {"val_loss": 0.1345, "val_macro_f1": 0.4567}
    # Log lines (stderr is redirected into the same file by Katib) must not count as metrics.
    for noise in ["2026-11-25 INFO hpa.train: best val_macro_f1=0.9 so far", "val_macro_f1=0.9",
                  LINE + " extra=1", "epoch=3 train_loss=nan val_loss=nan val_macro_f1=nan"]:
        assert "val_macro_f1" not in _katib_parse(noise, filters, names), noise
    # Katib's validator: two top subexpressions; filters are joined with ';' for the collector.
    assert all(re.fullmatch(r".*\(.*\).*\(.*\).*", f) and ";" not in f for f in filters)


def test_cli_render_and_validate(tmp_path, capsys):
    out = tmp_path / "exp.yaml"
    assert katib_tune.main(["render", "--dataset", DEFAULT_DATASET, "--out", str(out), "--algorithm", "random",
                            "--max-trials", "6", "--lr-max", "0.01"]) == 0
    exp = yaml.safe_load(out.read_text())
    assert exp["spec"]["algorithm"]["algorithmName"] == "random" and exp["spec"]["maxTrialCount"] == 6
    assert katib_tune.main(["validate", str(out)]) == 0
    assert katib_tune.main(["render", "--dataset", DEFAULT_DATASET, "--out", str(tmp_path / "same.yaml")]) == 0
    assert (tmp_path / "same.yaml").read_text() == EXPERIMENT.read_text()


def test_cli_bad_range_exits_2_with_one_line(capsys):
    from hpa.cli import main

    assert main(["katib", "render", "--dataset", DEFAULT_DATASET, "--lr-min", "0.1", "--lr-max", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: katib lr range: lr_min=0.1 must be < lr_max=0.01"


# ---------------------------------------------------------------- the threshold policy's search space

@pytest.mark.parametrize("modes, params, flags", [
    (("fitted",), ["lr", "threshold_mode"], []),
    (("fitted", "prior"), ["lr", "threshold_mode"], []),
    (("prior", "global"), ["lr", "threshold_mode", "threshold"], ["--threshold"]),
    (("shrunk",), ["lr", "threshold_mode", "threshold", "shrink_strength"], ["--threshold", "--shrink-strength"]),
    (katib.THRESHOLD_MODES, ["lr", "threshold_mode", "threshold", "shrink_strength"],
     ["--threshold", "--shrink-strength"]),
])
@pytest.mark.parametrize("trial_kind", katib.TRIAL_KINDS)
def test_search_space_holds_what_the_chosen_policies_read(modes, params, flags, trial_kind):
    """threshold only when global or shrunk is searched, shrink_strength only with shrunk; the trial
    command passes exactly the searched values, and the Experiment validates."""
    exp = katib.render_experiment(Cfg(threshold_modes=modes, trial_kind=trial_kind, num_nodes=2))
    assert [p["name"] for p in exp["spec"]["parameters"]] == params
    assert exp["spec"]["parameters"][1]["feasibleSpace"]["list"] == list(modes)
    args = " ".join(katib.train_args(Cfg(threshold_modes=modes)))
    for flag, name in (("--threshold", "threshold"), ("--shrink-strength", "shrinkStrength")):
        assert (f"{flag} ${{trialParameters.{name}}}" in args) == (flag in flags)
    assert "--threshold-mode ${trialParameters.thresholdMode}" in args and "--lr ${trialParameters.lr}" in args


def test_grid_space_includes_the_shrink_strength():
    exp = katib.render_experiment(Cfg(algorithm="grid", grid_points=3, max_trials=108,
                                                    shrink_strength_min=2.0, shrink_strength_max=32.0))
    params = {p["name"]: p for p in exp["spec"]["parameters"]}
    assert params["shrink_strength"] == {"name": "shrink_strength", "parameterType": "discrete",
                                         "feasibleSpace": {"list": ["2", "8", "32"]}}
    assert params["threshold"]["feasibleSpace"] == {"min": "0.05", "max": "0.6", "step": "0.275"}
    assert len(params["lr"]["feasibleSpace"]["list"]) == 3  # 3 * 3 * 3 values * 4 policies = 108 combinations


def test_cli_render_new_options(tmp_path):
    out = tmp_path / "exp.yaml"
    assert katib_tune.main(["render", "--dataset", DEFAULT_DATASET, "--out", str(out), "--threshold-modes",
                            "shrunk", "prior", "--shrink-strength-min", "3", "--shrink-strength-max", "30"]) == 0
    params = {p["name"]: p["feasibleSpace"] for p in yaml.safe_load(out.read_text())["spec"]["parameters"]}
    assert params["threshold_mode"]["list"] == ["shrunk", "prior"]
    assert params["shrink_strength"] == {"min": "3", "max": "30", "distribution": "logUniform"}


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["threshold_mode"]["feasibleSpace"].__setitem__("list", ["fitted", "best"]),
     "parameter threshold_mode: expected a categorical list of distinct policies from fitted, global, shrunk, prior, "
     "got ['fitted', 'best']"),
    (lambda p: p["threshold_mode"]["feasibleSpace"].__setitem__("list", ["fitted", "fitted"]),
     "parameter threshold_mode: expected a categorical list of distinct policies from fitted, global, shrunk, prior, "
     "got ['fitted', 'fitted']"),
    (lambda p: p["shrink_strength"]["feasibleSpace"].__setitem__("min", "0"),
     "parameter shrink_strength: min='0' must be > 0 (logUniform)"),
    (lambda p: p["shrink_strength"]["feasibleSpace"].__setitem__("max", "-1"),
     "parameter shrink_strength: max='-1' must be a finite number >= 0"),
    (lambda p: p["shrink_strength"]["feasibleSpace"].__setitem__("max", "inf"),
     "parameter shrink_strength: max='inf' must be a finite number >= 0"),
    (lambda p: p["shrink_strength"]["feasibleSpace"].update(min="40", max="5"),
     "parameter shrink_strength: min='40' must be < max='5'"),
    (lambda p: p["threshold"]["feasibleSpace"].__setitem__("max", "1.5"),
     "parameter threshold: max='1.5' must be in (0, 1)"),
    (lambda p: p["threshold"]["feasibleSpace"].__setitem__("min", "low"),
     "parameter threshold: min='low' must be in (0, 1)"),
    (lambda p: p["lr"]["feasibleSpace"].update(min="0.01", max="0.001"),
     "parameter lr: min='0.01' must be < max='0.001'"),
])
def test_hand_edited_search_space_is_one_clear_error(mutate, message):
    """validate_experiment (and so `katib validate`, `katib launch` and the stand-in server) refuses a
    space the trials cannot run, with one line that names the parameter."""
    exp = _experiment()
    mutate({p["name"]: p for p in exp["spec"]["parameters"]})
    with pytest.raises(ConfigError) as err:
        katib.validate_experiment(exp)
    assert str(err.value) == f"Katib Experiment: {message}"


def test_validate_accepts_every_policy_and_a_discrete_shrink_strength():
    exp = katib.render_experiment(Cfg(algorithm="grid", max_trials=20))
    katib.validate_experiment(exp)
    katib.check_search_space([
        {"name": "shrink_strength", "parameterType": "discrete", "feasibleSpace": {"list": ["0", "5"]}},
        {"name": "threshold_mode", "parameterType": "categorical",
         "feasibleSpace": {"list": list(katib.THRESHOLD_MODES)}},
    ])


def _with_optimal(exp: dict, assigned: dict, objective: str = "0.5") -> dict:
    exp = copy.deepcopy(exp)
    exp["status"] = {"currentOptimalTrial": {
        "bestTrialName": "t-1", "parameterAssignments": [{"name": k, "value": v} for k, v in assigned.items()],
        "observation": {"metrics": [{"name": "val_macro_f1", "max": objective, "latest": "0.4"}]}}}
    return exp


def test_best_trial_returns_the_policy_with_its_shrink_strength():
    exp = _with_optimal(_experiment(), {"lr": "0.0004", "threshold_mode": "shrunk", "threshold": "0.22",
                                        "shrink_strength": "17.5"})
    assert katib_tune.best_trial(exp) == {"lr": 0.0004, "threshold": 0.22, "threshold_mode": "shrunk",
                                          "shrink_strength": 17.5, "trial": "t-1", "val_macro_f1": 0.5}


def test_best_trial_reports_defaults_for_values_not_searched():
    """An Experiment over fitted and prior searches neither threshold nor shrink_strength: best_trial
    reports the pipeline defaults (no chosen policy reads them), and does not ask for them."""
    exp = katib.render_experiment(Cfg(threshold_modes=("fitted", "prior")))
    best = katib_tune.best_trial(_with_optimal(exp, {"lr": "0.001", "threshold_mode": "prior"}))
    assert (best["threshold_mode"], best["threshold"], best["shrink_strength"]) == \
        ("prior", 0.3, katib.DEFAULT_SHRINK_STRENGTH)
    exp = katib.render_experiment(Cfg(threshold_modes=("global",)))
    with pytest.raises(k8s.ClusterError, match=r"lacks \['threshold'\]$"):
        katib_tune.best_trial(_with_optimal(exp, {"lr": "0.001", "threshold_mode": "global"}))


# ---------------------------------------------------------------- launch (stand-in API server)

def _experiment():
    """The committed Experiment, placed in namespace kubeflow (the file names none: kubectl apply -n picks it)."""
    exp = yaml.safe_load(EXPERIMENT.read_text())
    exp["metadata"]["namespace"] = "kubeflow"
    return exp


class PerExperimentAPI(FakeKubeAPI):
    """The stand-in with an optimal trial and objective per Experiment, chosen by the name's model suffix
    (results: {suffix: (assignments, objective)}), and Experiments whose name ends with `-<failing>` Failed.
    A subclass here rather than a change to the shared stand-in: it only overrides how a status is made."""

    def __init__(self, results: dict | None = None, failing: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.results, self.failing = results or {}, tuple(f"-{suffix}" for suffix in failing)

    def _status(self, plural: str, obj: dict, failed: bool = False) -> dict:
        name = obj["metadata"]["name"]
        suffix = max((s for s in self.results if name.endswith(f"-{s}")), key=len, default=None)
        self.best = self.results[suffix][0] if suffix else None  # called with the server's lock held
        status = super()._status(plural, obj, failed=failed or name.endswith(self.failing))
        if suffix and "currentOptimalTrial" in status:
            status["currentOptimalTrial"]["observation"]["metrics"][0]["max"] = str(self.results[suffix][1])
        return status


MODELS = {"resnet18": 1e-3, "se_resnet18": 1e-3}


def test_model_experiments_one_per_model_with_dns_safe_names():
    exps = katib_tune.model_experiments(Cfg(), MODELS)
    assert list(exps) == ["resnet18", "se_resnet18"]
    assert [e["metadata"]["name"] for e in exps.values()] == \
        ["hpa-lr-threshold-resnet18", "hpa-lr-threshold-se-resnet18"]
    for arch, exp in exps.items():
        args = _container(exp)["args"]
        assert args[args.index("--arch") + 1] == arch
    long = katib_tune.model_experiments(Cfg(name="a" * 40), {"se_resnet50": 1e-3})
    assert long["se_resnet50"]["metadata"]["name"] == "a" * 28 + "-se-resnet50"
    assert katib_tune.arch_label("Se_ResNet18") == "se-resnet18"


@pytest.mark.parametrize("models, message", [
    ({}, "katib models {}: expected a non-empty JSON object of model name -> learning rate"),
    ([1e-3], "katib models [0.001]: expected a non-empty JSON object"),
    ({"resnet18": 1e-3, "resnet19": 1e-3}, "katib models: unknown model 'resnet19'; expected names from resnet18, "),
])
def test_bad_model_list_is_one_clear_error(models, message):
    with pytest.raises(ConfigError) as err:
        katib_tune.model_experiments(Cfg(), models)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_tune_models_runs_one_experiment_per_model_and_takes_the_best_policy(tmp_path):
    results = {
        "resnet18": ({"lr": "0.0009", "threshold_mode": "fitted", "threshold": "0.4", "shrink_strength": "3"}, 0.52),
        "se-resnet18": ({"lr": "0.0002", "threshold_mode": "shrunk", "threshold": "0.2", "shrink_strength": "25"},
                        0.48),
    }
    with PerExperimentAPI(results, polls=3) as api:
        out = katib_tune.tune_models(Cfg(namespace="team-a"), MODELS, timeout=20, poll=0.05, unique_name=True,
                                     api_client=api.api_client(), save_to=tmp_path / "experiments.yaml")
        names = [p["metadata"]["name"] for p in api.posted]
        assert all(api.gets[("experiments", "team-a", n)] == 3 for n in names) and api.deleted == []
    assert re.fullmatch(r"hpa-lr-threshold-[0-9a-f]{6}-resnet18", names[0]) and \
        names[1] == names[0].replace("-resnet18", "-se-resnet18")
    keys = ("models", "threshold", "threshold_mode", "shrink_strength", "val_macro_f1", "policy_from")
    assert {k: out[k] for k in keys} == {
        "models": {"resnet18": 0.0009, "se_resnet18": 0.0002}, "threshold": 0.4, "threshold_mode": "fitted",
        "shrink_strength": 3.0, "val_macro_f1": 0.52, "policy_from": "resnet18"}
    assert out["experiments"] == dict(zip(MODELS, names)) and out["trials"]["se_resnet18"]["threshold_mode"] == "shrunk"
    assert [d["metadata"]["name"] for d in yaml.safe_load_all((tmp_path / "experiments.yaml").read_text())] == names


def test_combine_best_ignores_nan_and_keeps_the_first_of_a_tie():
    def best(mode, f1):
        return {"lr": 1e-3, "threshold": 0.3, "threshold_mode": mode, "shrink_strength": 10.0, "trial": "t",
                "val_macro_f1": f1}

    assert katib_tune.combine_best({"a": best("prior", math.nan), "b": best("global", 0.1)})["threshold_mode"] == \
        "global"
    assert katib_tune.combine_best({"a": best("prior", 0.4), "b": best("global", 0.4)})["policy_from"] == "a"


def test_one_failed_experiment_deletes_the_others():
    with PerExperimentAPI(failing=("se-resnet18",), polls=2, outcome="never") as api:
        with pytest.raises(k8s.ClusterError,
                           match=r"^Experiment team-a/hpa-lr-threshold-se-resnet18 failed: MaxFailedTrialsReached"):
            katib_tune.tune_models(Cfg(namespace="team-a"), MODELS, timeout=20, poll=0.05,
                                   api_client=api.api_client())
        assert sorted(d["key"][2] for d in api.deleted if d["by"] == "client") == \
            ["hpa-lr-threshold-resnet18", "hpa-lr-threshold-se-resnet18"]
        assert api.objects == {}


def test_timeout_of_a_model_list_deletes_every_experiment():
    with PerExperimentAPI(polls=1, outcome="never") as api:
        with pytest.raises(k8s.ClusterError, match=r"did not finish within 0.5 s \(last state: Running\)"):
            katib_tune.tune_models(Cfg(), MODELS, timeout=0.5, poll=0.05, api_client=api.api_client())
        assert len(api.deleted) == 2 and api.objects == {}


def test_refused_creation_deletes_the_experiments_already_created():
    """The second model's name is taken: the first model's Experiment, already created, is deleted."""
    with PerExperimentAPI(polls=1) as api:
        client = api.api_client()
        clash = katib_tune.model_experiments(Cfg(), {"se_resnet18": 1e-3})["se_resnet18"]
        k8s.create_object(k8s.custom_objects_api(client), clash, "experiments", "kubeflow")
        with pytest.raises(k8s.Rejected, match=r'HTTP 409 experiments "hpa-lr-threshold-se-resnet18" already exists'):
            katib_tune.tune_models(Cfg(), MODELS, timeout=5, poll=0.05, api_client=client)
        assert [d["key"][2] for d in api.deleted] == ["hpa-lr-threshold-resnet18"]
        assert list(api.objects) == [("experiments", "kubeflow", "hpa-lr-threshold-se-resnet18")]


def test_model_list_experiments_are_owned_by_the_kfp_task_pod(tmp_path, monkeypatch):
    (tmp_path / "namespace").write_text("team-a")
    monkeypatch.setattr(k8s, "SERVICEACCOUNT_NAMESPACE", str(tmp_path / "namespace"))
    monkeypatch.setenv("KFP_POD_NAME", "tune-pod")
    monkeypatch.setenv("KFP_POD_UID", "uid-of-tune-pod")
    with PerExperimentAPI(polls=1) as api:
        api.add_pod("team-a", "tune-pod", "uid-of-tune-pod")
        katib_tune.tune_models(Cfg(namespace="team-a"), MODELS, timeout=5, poll=0.05,
                               api_client=api.api_client())
        owner = {"apiVersion": "v1", "kind": "Pod", "name": "tune-pod", "uid": "uid-of-tune-pod"}
        assert all(p["metadata"]["ownerReferences"] == [owner] for p in api.posted) and len(api.posted) == 2
        api.delete_pod("team-a", "tune-pod")
        assert api.objects == {} and [d["by"] for d in api.deleted] == ["garbage-collector"] * 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_tuning_a_model_list_deletes_every_experiment(tmp_path, sig):
    """A real `python -m hpa katib tune` subprocess waiting on two Experiments that never finish gets
    SIGINT/SIGTERM: it deletes both and exits non-zero with one error line."""
    with PerExperimentAPI(polls=1, outcome="never") as api:
        env = {**os.environ, "KUBECONFIG": api.write_kubeconfig(tmp_path / "kubeconfig")}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = subprocess.Popen([sys.executable, "-m", "hpa", "katib", "tune", "--dataset", DEFAULT_DATASET,
                                 "--models", '{"resnet18": 0.001, "se_resnet18": 0.001}',
                                 "--namespace", "ns1", "--timeout", "120", "--poll", "0.1"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while len(api.gets) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(api.gets) == 2, f"the launcher never polled both (rc={proc.poll()})"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        names = ["hpa-lr-threshold-resnet18", "hpa-lr-threshold-se-resnet18"]
        assert api.deleted == [{"key": ("experiments", "ns1", n), "propagationPolicy": "Background", "by": "client"}
                               for n in names]
    both = ", ".join(f"Experiment ns1/{n}" for n in names)
    assert proc.returncode == 2 and out == "", err
    assert err.strip().splitlines()[-1] == f"error: {both}: cancelled by {signal.Signals(sig).name}; deleted {both}"


def test_cli_tune_prints_the_combined_result(tmp_path, monkeypatch, capsys):
    with PerExperimentAPI({"resnet18": ({"lr": "0.002", "threshold_mode": "prior"}, 0.3)}, polls=1) as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "config"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        assert katib_tune.main(["tune", "--dataset", DEFAULT_DATASET, "--models", '{"resnet18": 0.001}',
                                "--namespace", "ns1",
                                "--threshold-modes", "fitted", "prior", "--timeout", "20", "--poll", "0.05",
                                "--save", str(tmp_path / "e.yaml")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["models"] == {"resnet18": 0.002} and result["threshold_mode"] == "prior" and \
        result["val_macro_f1"] == 0.3
    assert (result["threshold"], result["shrink_strength"]) == (0.3, 10.0)  # not searched: the defaults


def test_launch_creates_waits_and_reads_the_optimal_trial():
    best = {"lr": "0.00042", "threshold": "0.27", "threshold_mode": "global"}
    with FakeKubeAPI(polls=3, outcome="succeeded", best=best) as api:
        result = katib_tune.launch(_experiment(), namespace="team-a", timeout=20, poll=0.05,
                                   api_client=api.api_client())
        assert len(api.posted) == 1 and api.posted[0]["metadata"]["namespace"] == "team-a"
        assert api.gets[("experiments", "team-a", "hpa-lr-threshold")] == 3
    assert result == {"lr": 0.00042, "threshold": 0.27, "threshold_mode": "global", "shrink_strength": 1.0,
                      "trial": "hpa-lr-threshold-abc123", "val_macro_f1": 0.43}


def test_launch_failed_experiment_is_a_clear_error():
    with FakeKubeAPI(polls=1, outcome="failed") as api:
        with pytest.raises(k8s.ClusterError, match=r"Experiment kubeflow/hpa-lr-threshold failed: "
                                                   r"MaxFailedTrialsReached: 3 trials failed"):
            katib_tune.launch(_experiment(), timeout=20, poll=0.05, api_client=api.api_client())
        # deleted (and with it its trials and their Jobs, Background propagation), not left behind
        assert api.deleted == [{"key": ("experiments", "kubeflow", "hpa-lr-threshold"),
                                "propagationPolicy": "Background", "by": "client"}]


def test_launch_timeout_is_a_clear_error():
    with FakeKubeAPI(polls=1, outcome="never") as api:
        with pytest.raises(k8s.ClusterError, match=r"did not finish within 0.5 s \(last state: Running\)"):
            katib_tune.launch(_experiment(), timeout=0.5, poll=0.05, api_client=api.api_client())
        assert [d["key"] for d in api.deleted] == [("experiments", "kubeflow", "hpa-lr-threshold")]
        assert api.objects == {}


def test_experiment_is_owned_by_the_kfp_task_pod(tmp_path, monkeypatch):
    """KFP_POD_NAME / KFP_POD_UID (the KFP executor's downward-API env) make the task's Pod the
    Experiment's owner; deleting the pod garbage-collects the Experiment (played by the stand-in)."""
    (tmp_path / "namespace").write_text("team-a")
    monkeypatch.setattr(k8s, "SERVICEACCOUNT_NAMESPACE", str(tmp_path / "namespace"))
    monkeypatch.setenv("KFP_POD_NAME", "tune-pod")
    monkeypatch.setenv("KFP_POD_UID", "uid-of-tune-pod")
    with FakeKubeAPI(polls=1) as api:
        api.add_pod("team-a", "tune-pod", "uid-of-tune-pod")
        katib_tune.launch(_experiment(), namespace="team-a", timeout=5, poll=0.05, api_client=api.api_client())
        assert api.posted[0]["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Pod", "name": "tune-pod", "uid": "uid-of-tune-pod"}]
        api.delete_pod("team-a", "tune-pod")
        assert api.objects == {} and api.deleted[0]["by"] == "garbage-collector"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_waiting_deletes_the_experiment(tmp_path, sig):
    """A real `python -m hpa katib launch` subprocess, waiting on an Experiment that never finishes,
    gets SIGINT/SIGTERM: it deletes the Experiment and exits non-zero with one error line."""
    with FakeKubeAPI(polls=1, outcome="never") as api:
        env = {**os.environ, "KUBECONFIG": api.write_kubeconfig(tmp_path / "kubeconfig")}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = subprocess.Popen([sys.executable, "-m", "hpa", "katib", "launch", "--file", str(EXPERIMENT),
                                 "--namespace", "ns1", "--timeout", "120", "--poll", "0.1"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not api.gets and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.gets, f"the launcher never polled (rc={proc.poll()})"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert api.deleted == [{"key": ("experiments", "ns1", "hpa-lr-threshold"), "propagationPolicy": "Background",
                                "by": "client"}]
    assert proc.returncode == 2 and out == "", err
    assert err.strip().splitlines()[-1] == (f"error: Experiment ns1/hpa-lr-threshold: cancelled by "
                                            f"{signal.Signals(sig).name}; deleted Experiment ns1/hpa-lr-threshold")


def test_launch_duplicate_and_unique_names():
    with FakeKubeAPI(polls=1) as api:
        client = api.api_client()
        katib_tune.launch(_experiment(), timeout=5, poll=0.05, api_client=client)
        with pytest.raises(k8s.ClusterError, match=r"HTTP 409 experiments \"hpa-lr-threshold\" already exists"):
            katib_tune.launch(_experiment(), timeout=5, poll=0.05, api_client=client)
        katib_tune.launch(_experiment(), timeout=5, poll=0.05, unique_name=True, api_client=client)
        names = [p["metadata"]["name"] for p in api.posted]
    assert names[0] == "hpa-lr-threshold" and re.fullmatch(r"hpa-lr-threshold-[0-9a-f]{6}", names[1])


def test_stand_in_server_rejects_an_invalid_object():
    bad = _experiment()
    _container(bad)["imag"] = "typo"
    with FakeKubeAPI() as api:
        k8s_api = k8s.custom_objects_api(api.api_client())
        with pytest.raises(k8s.ClusterError,
                           match=r"HTTP 422 posted Experiment trialSpec spec.template does not match"):
            k8s.create_object(k8s_api, bad, "experiments", "kubeflow")
        assert api.posted == []


def test_cli_launch_with_kubeconfig(tmp_path, monkeypatch, capsys):
    with FakeKubeAPI(polls=2, best={"lr": "0.001", "threshold": "0.3", "threshold_mode": "fitted"}) as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "config"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        assert katib_tune.main(["launch", "--file", str(EXPERIMENT), "--namespace", "ns1", "--timeout", "20",
                                "--poll", "0.05"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 0.001' in out and '"threshold_mode": "fitted"' in out


def test_katib_tune_component_against_stand_in(tmp_path, monkeypatch):
    """The KFP component's own function with two models: split copied to the store once, one Experiment
    per model created, each model's best lr and the best Experiment's policy returned."""
    monkeypatch.syspath_prepend(str(ROOT))
    from kfp.dsl import Artifact, Dataset

    from components.katib_tune.component import katib_tune

    split = tmp_path / "split.csv"
    split.write_text("Id,Target,fold\na,0,0\n")
    experiment = Artifact(name="experiment", uri=str(tmp_path / "experiment.yaml"))
    results = {
        "resnet18": ({"lr": "0.0007", "threshold": "0.2", "threshold_mode": "global", "shrink_strength": "7"}, 0.41),
        "se-resnet18": ({"lr": "0.0003", "threshold": "0.25", "threshold_mode": "shrunk", "shrink_strength": "12.5"},
                        0.47),
    }
    with PerExperimentAPI(results, polls=2) as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "config"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        out = katib_tune.python_func(tune=True, threshold=0.3, threshold_mode="shrunk", shrink_strength=10.0,
                                     data_uri="s3://bucket/data", split_csv=Dataset(name="split", uri=str(split)),
                                     store_uri=str(tmp_path / "store"), experiment=experiment, namespace="team",
                                     trial_image="registry.example/hpa:cuda-5",
                                     models={"resnet18": 1e-3, "se_resnet18": 2e-3},
                                     max_trials=4, parallel_trials=2, threshold_modes=["global", "shrunk"],
                                     shrink_strength_min=2.0, shrink_strength_max=20.0, poll_s=0.05, timeout_s=20,
                                     **PLACED)
        posted = list(api.posted)
    assert out._fields == ("models", "threshold", "threshold_mode", "shrink_strength", "val_macro_f1")
    assert tuple(out) == ({"resnet18": 0.0007, "se_resnet18": 0.0003}, 0.25, "shrunk", 12.5, 0.47)
    names = [p["metadata"]["name"] for p in posted]
    base = names[0].removesuffix("-resnet18")
    assert re.fullmatch(r"hpa-tune-[0-9a-f]{8}", base) and names == [f"{base}-resnet18", f"{base}-se-resnet18"]
    assert (tmp_path / "store" / "katib" / base / "split.csv").read_text() == split.read_text()
    for exp, arch in zip(posted, ("resnet18", "se_resnet18")):
        args = _container(exp)["args"]
        assert args[args.index("--arch") + 1] == arch
        assert args[args.index("--split") + 1] == f"{tmp_path}/store/katib/{base}/split.csv"
        assert args[args.index("--data") + 1] == "s3://bucket/data" and exp["spec"]["maxTrialCount"] == 4
        assert _container(exp)["image"] == "registry.example/hpa:cuda-5"
        params = {p["name"]: p["feasibleSpace"] for p in exp["spec"]["parameters"]}
        assert params["threshold_mode"]["list"] == ["global", "shrunk"] and params["shrink_strength"]["min"] == "2"
        pod_spec = exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
        assert pod_spec["nodeSelector"] == PLACED["node_selector"] and pod_spec["tolerations"] == PLACED["tolerations"]
    assert [d["metadata"]["name"] for d in yaml.safe_load_all((tmp_path / "experiment.yaml").read_text())] == names
    assert experiment.metadata["policy_from"] == "se_resnet18" and \
        experiment.metadata["experiments"]["resnet18"] == names[0]
    assert experiment.metadata["trials"]["resnet18"]["val_macro_f1"] == 0.41
    # tune=false: nothing created, the run parameters returned unchanged in the same shape.
    defaults = katib_tune.python_func(tune=False, data_uri="s3://bucket/data",
                                      split_csv=Dataset(name="split", uri=str(split)), store_uri=str(tmp_path / "s2"),
                                      experiment=Artifact(name="e2", uri=str(tmp_path / "e2.yaml")),
                                      trial_image="registry.example/hpa:cuda-5",
                                      models={"resnet18": 1e-3, "se_resnet18": 2e-3}, threshold=0.3,
                                      threshold_mode="shrunk", shrink_strength=10.0)
    assert defaults._fields == out._fields
    assert tuple(defaults) == ({"resnet18": 1e-3, "se_resnet18": 2e-3}, 0.3, "shrunk", 10.0, -1.0)


def test_katib_tune_component_refuses_a_bad_model_list_before_touching_the_store(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from kfp.dsl import Artifact, Dataset

    from components.katib_tune.component import katib_tune

    with pytest.raises(ConfigError) as err:
        katib_tune.python_func(tune=True, threshold=0.3, threshold_mode="prior", shrink_strength=10.0,
                               data_uri="s3://bucket/data",
                               split_csv=Dataset(name="split", uri=str(tmp_path / "s.csv")),
                               store_uri=str(tmp_path / "store"),
                               experiment=Artifact(name="e", uri=str(tmp_path / "e.yaml")),
                               trial_image="registry.example/hpa:cuda-5", models={"resnet19": 1e-3}, namespace="team")
    assert str(err.value).startswith("katib models: unknown model 'resnet19'; expected names from resnet18,")
    assert not (tmp_path / "store").exists()


def test_katib_tune_component_refuses_an_empty_trial_image(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from kfp.dsl import Artifact, Dataset

    from components.katib_tune.component import katib_tune

    with pytest.raises(ConfigError) as err:
        katib_tune.python_func(tune=True, threshold=0.3, threshold_mode="prior", shrink_strength=10.0,
                               data_uri="s3://bucket/data",
                               split_csv=Dataset(name="split", uri=str(tmp_path / "s.csv")),
                               store_uri=str(tmp_path / "store"),
                               experiment=Artifact(name="e", uri=str(tmp_path / "e.yaml")),
                               trial_image="", models={"resnet18": 1e-3})
    assert str(err.value) == ("katib-tune trial_image='': expected the trial image fixed at compile time "
                              "(pipeline.py passes the CUDA image when gpus > 0, else the CPU image)")
    assert not (tmp_path / "store").exists()


def test_best_trial_without_assignments_is_a_clear_error():
    exp = copy.deepcopy(_experiment())
    exp["status"] = {"currentOptimalTrial": {"parameterAssignments": [{"name": "lr", "value": "0.1"}]}}
    with pytest.raises(k8s.ClusterError, match=r"lacks \['shrink_strength', 'threshold', 'threshold_mode'\]"):
        katib_tune.best_trial(exp)


def test_timestamped_metric_line_gives_katib_its_time_and_the_same_metrics():
    """Trials print `<RFC3339 UTC> epoch=...`: Katib's collector takes the first token as the observation
    time; the filters still extract exactly val_loss and val_macro_f1, and the default regex sees no extra
    name=value in the timestamp."""
    from datetime import datetime

    from hpa.train import metric_line

    line = metric_line(3, 0.1234, 0.1345, 0.4567, timestamp=True)
    stamp, rest = line.split(" ", 1)
    assert rest == metric_line(3, 0.1234, 0.1345, 0.4567) == \
        "epoch=3 train_loss=0.1234 val_loss=0.1345 val_macro_f1=0.4567"
    datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    found = {m.group(1): float(m.group(2)) for regex in katib.METRIC_FILTERS for m in re.finditer(regex, line)}
    assert found == {"val_loss": 0.1345, "val_macro_f1": 0.4567}
    assert [m.group(1) for m in re.finditer(katib.KATIB_DEFAULT_FILTER, line)] == [
        "epoch", "train_loss", "val_loss", "val_macro_f1"]
    assert "--metric-timestamps" in katib.train_args(Cfg())


# ---------------------------------------------------------------- what the trials read (issue 22, item 9)

def test_render_without_data_or_split_is_one_line_saying_how_to_get_them(capsys):
    """No silent `<store>/data`: the trials read a finished run's committed dataset and a split in the store,
    and rendering without them stops before anything is written."""
    from hpa.cli import main

    assert main(["katib", "render", "--namespace", "team-a"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: katib data: not set; expected --dataset NAME (a dataset a finished run committed to "
        "s3://mlpipeline/private/{namespace}/hpa-kfp/datasets/NAME, with its manifest.json) or --data URI")
    assert main(["katib", "render", "--data", "s3://b/own/data"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: katib split: not set for --data s3://b/own/data; expected --split URI of a split CSV in the store "
        "(python -m hpa split --data s3://b/own/data --folds 5 --seed 0 --out URI writes one)")


def test_a_dataset_name_gives_the_data_and_split_of_that_namespace():
    exp = katib.render_experiment(KatibConfig(namespace="team-a", dataset="own-all", folds=3, seed=2))
    args = _container(exp)["args"]
    store = "s3://mlpipeline/private/team-a/hpa-kfp"
    assert exp["metadata"] == {"name": "hpa-lr-threshold", "namespace": "team-a"}
    assert args[args.index("--data") + 1] == f"{store}/datasets/own-all"
    assert args[args.index("--split") + 1] == f"{store}/splits/own-all/3folds-seed2.csv"
    assert "namespace" not in {p["name"] for p in exp["spec"]["trialTemplate"]["trialParameters"]}
    # Packed shards of a committed dataset: the split follows the dataset's name.
    exp = katib.render_experiment(KatibConfig(namespace="team-a", data=f"{store}/datasets/own-all/shards-32px"))
    args = _container(exp)["args"]
    assert args[args.index("--split") + 1] == f"{store}/splits/own-all/5folds-seed0.csv"


def test_without_a_namespace_the_store_uris_follow_the_trial(tmp_path):
    """No metadata.namespace (kubectl apply -n picks it) and {namespace} = Katib's ${trialSpec.Namespace}; a
    PyTorchJob trial too. A concrete store URI needs no trial parameter."""
    for kind in katib.TRIAL_KINDS:
        exp = katib.render_experiment(KatibConfig(dataset="d", trial_kind=kind, num_nodes=2))
        assert "namespace" not in exp["metadata"]
        params = {p["name"]: p["reference"] for p in exp["spec"]["trialTemplate"]["trialParameters"]}
        assert params["namespace"] == "${trialSpec.Namespace}"
        args = _container(exp)["args"] if kind == "job" else \
            exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
                "containers"][0]["args"]
        assert args[args.index("--data") + 1] == "s3://mlpipeline/private/${trialParameters.namespace}/hpa-kfp/datasets/d"
    exp = katib.render_experiment(KatibConfig(store_uri="s3://shared/hpa", dataset="d"))
    assert "namespace" not in {p["name"] for p in exp["spec"]["trialTemplate"]["trialParameters"]}


def test_verify_refuses_a_dataset_that_is_not_committed(tmp_path):
    (tmp_path / "datasets" / "d").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^katib data .*/datasets/d: no committed dataset there \(no manifest"):
        katib_tune.verify_inputs(KatibConfig(namespace="team-a", store_uri=str(tmp_path), dataset="d"))
    with pytest.raises(ConfigError, match=r"katib --verify: data .*\$\{trialParameters.namespace\}.* give --namespace"):
        katib_tune.verify_inputs(KatibConfig(dataset="d"))
