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
