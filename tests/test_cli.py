import importlib
import subprocess
import sys

import pytest

from hpa import cli


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "hpa", "--help"], capture_output=True, text=True, check=True).stdout
    for name in cli.STAGES:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", sorted(cli.STAGES))
def test_every_stage_resolves_to_a_main(name):
    module_name, func_name = cli.STAGES[name][0].split(":")
    assert callable(getattr(importlib.import_module(module_name), func_name))


def test_unknown_stage_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "hpa", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown stage 'trian'; expected one of: " + ", ".join(cli.STAGES)


def test_train_help_documents_every_option():
    """`python -m hpa train --help` shows every TrainConfig field as its option with the field's help text (one
    source per option: the parser is generated from the dataclass)."""
    import dataclasses
    import os

    from hpa.options import help_of, undocumented
    from hpa.train import TrainConfig

    assert undocumented(TrainConfig) == []
    env = {**os.environ, "COLUMNS": "1000"}  # no wrapping: each option's help on one line
    out = subprocess.run([sys.executable, "-m", "hpa", "train", "--help"], capture_output=True, text=True, check=True,
                         env=env).stdout
    text = " ".join(out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(help_of(TrainConfig, f.name).split()) in text, f.name
