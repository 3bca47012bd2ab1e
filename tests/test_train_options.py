"""A run parameter declared `train_option=True` in hpa.config reaches every training run: check-params hands it to
the train task (TrainConfig), the multi-node job's and the Katib trials' `python -m hpa train` args, and nothing else
needs a new input (CONTRIBUTING.md, "Adding a training run parameter"). pos_weight is the first such parameter."""

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpa.config import PipelineConfig, option_args, train_options  # noqa: E402
from hpa.errors import ConfigError  # noqa: E402
from hpa.options import help_of  # noqa: E402

TRAINING_COMPONENTS = ("train", "train_distributed", "katib_tune")


def declared() -> list[str]:
    return [f.name for f in dataclasses.fields(PipelineConfig) if f.metadata.get("train_option")]


def test_declared_train_options_are_training_options_with_a_description():
    from hpa.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert declared(), "no run parameter is declared train_option=True"
    for name in declared():
        assert name in names, f"{name}: declared train_option but python -m hpa train has no --{name}"
        assert len(help_of(PipelineConfig, name)) > 20, f"{name}: the UI shows no description"
    assert train_options(PipelineConfig()) == {name: getattr(PipelineConfig(), name) for name in declared()}


def test_pos_weight_is_a_run_parameter_checked_before_any_work():
    assert train_options(PipelineConfig(pos_weight="sqrt"))["pos_weight"] == "sqrt"
    with pytest.raises(ConfigError, match=r"^pipeline parameter pos_weight='x': expected 'none' or 'sqrt'$"):
        PipelineConfig(pos_weight="x").validate()


def test_check_params_returns_the_train_options():
    from components.check_params.component import check_params

    inputs = set(check_params.component_spec.inputs)
    missing = [name for name in declared() if name not in inputs]
    assert not missing, f"components/check_params lacks the inputs {missing}"
    assert "train_options" in check_params.component_spec.outputs
    base = {k: v for k, v in dataclasses.asdict(PipelineConfig()).items() if k in inputs}
    out = check_params.python_func(**{**base, "pos_weight": "sqrt"}, cpu_image="cpu:1", cuda_image="cuda:1")
    assert out.train_options == {**train_options(PipelineConfig()), "pos_weight": "sqrt"}
    with pytest.raises(ConfigError, match="pos_weight"):
        check_params.python_func(**{**base, "pos_weight": "cube"}, cpu_image="cpu:1", cuda_image="cuda:1")


@pytest.mark.parametrize("compiled", ["hpa_pipeline.yaml", "hpa_pipeline_multinode.yaml"])
def test_every_training_task_gets_check_params_train_options(compiled):
    docs = list(yaml.safe_load_all((ROOT / "compiled" / compiled).read_text()))
    spec = docs[0]
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert all(name in root and root[name].get("description") for name in declared())
    users = []

    def walk(tasks: dict) -> None:
        for name, task in tasks.items():
            params = task.get("inputs", {}).get("parameters", {})
            if name.startswith(("train", "katib-tune")) and "train_options" in params:
                source = params["train_options"]
                assert source.get("taskOutputParameter", {}).get("outputParameterKey") == "train_options" or \
                    source.get("componentInputParameter", "").endswith("train_options"), (name, source)
                users.append(name)
            component = spec["components"].get(task.get("componentRef", {}).get("name", ""), {})
            walk(component.get("dag", {}).get("tasks", {}))

    walk(spec["root"]["dag"]["tasks"])
    assert any(u.startswith("train") for u in users) and any(u.startswith("katib-tune") for u in users), users


def test_training_components_take_train_options():
    import importlib

    for folder in TRAINING_COMPONENTS:
        component = getattr(importlib.import_module(f"components.{folder}.component"), folder)
        assert "train_options" in component.component_spec.inputs, folder


def test_train_task_applies_train_options_and_refuses_unknown_ones():
    from hpa.train_task import train_config

    params = {"image_size": 64, "color_mode": "rgb", "epochs": 1, "batch_size": 4, "loss": "focal",
              "threshold_mode": "fitted", "threshold": 0.3, "shrink_strength": 5.0, "seed": 3, "weights": "",
              "train_options": {"pos_weight": "sqrt"}}
    cfg = train_config(params, data="d", split="s", out="o")
    assert (cfg.pos_weight, cfg.size, cfg.color_mode, cfg.loss, cfg.seed) == ("sqrt", 64, "rgb", "focal", 3)
    with pytest.raises(ConfigError, match=r"train_options: \['cube_weight'\] are not options of python -m hpa train"):
        train_config({**params, "train_options": {"cube_weight": 1}}, data="d", split="s", out="o")
    # one value per option: what the task sets (plan item, inputs) is not also taken from train_options
    with pytest.raises(ConfigError, match=r"train_options: \['epochs', 'lr'\] are set by the training task itself"):
        train_config({**params, "train_options": {"lr": 0.1, "epochs": 3}}, data="d", split="s", out="o")


def test_declared_train_options_are_not_set_by_the_task():
    from hpa.train_task import TASK_FIELDS

    assert not set(declared()) & set(TASK_FIELDS)


def test_jobs_and_trials_pass_train_options_as_train_flags():
    from hpa import katib, train_distributed
    from hpa.train import get_args_parser

    assert option_args({"pos_weight": "sqrt", "augment": False}) == ["--no-augment", "--pos-weight", "sqrt"]
    job = train_distributed.DistributedConfig(image="registry.example/hpa:cuda", train_options={"pos_weight": "sqrt"})
    args = train_distributed.train_args(job)
    assert args[args.index("--pos-weight") + 1] == "sqrt"
    trial = katib.trial_job(katib.KatibConfig(image="registry.example/hpa:cuda", train_options={"pos_weight": "sqrt"}))
    assert "--pos-weight" in yaml.safe_dump(trial)
    argv = ["--data", "d", "--split", "s", "--out", "o", *option_args({"pos_weight": "sqrt"})]
    parsed = get_args_parser().parse_args(argv)
    assert parsed.pos_weight == "sqrt"


def test_component_defaults_agree_with_the_declarations():
    """Where a component repeats a run parameter's default (an optional KFP input), it is the declared one."""
    import importlib

    from hpa.options import default_of

    for folder in ("check_params", *TRAINING_COMPONENTS):
        component = getattr(importlib.import_module(f"components.{folder}.component"), folder)
        for name, spec in component.component_spec.inputs.items():
            if name in PipelineConfig.__dataclass_fields__ and spec.default is not None and folder == "check_params":
                assert spec.default == default_of(PipelineConfig, name), (folder, name, spec.default)


def test_trial_train_options_cannot_split_the_shell_command():
    from hpa import katib

    cfg = katib.KatibConfig(image="registry.example/hpa:cuda", train_options={"weights": "a b"})
    with pytest.raises(ConfigError, match=r"katib train_options weights='a b': no whitespace allowed"):
        katib.validate_config(cfg)
