"""The README's "Each stage also runs alone, without KFP" recipe, run as written (tiny), must give a submission
whose labels per image are of the order of the truth (issue 22, item 12: it flooded, 22 labels per image against
1.6 true, because `ensemble` defaulted to `fitted` thresholds, unlike the pipeline's `prior`, and fitted them on
validation predictions made without TTA while applying them to test predictions made with TTA)."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from hpa.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Tiny, so that the recipe runs in seconds on 2 cores: the same commands with smaller numbers.
TINY = {"--n-train": "160", "--n-test": "40", "--size": "32", "--epochs": "1", "--folds": "4"}
CPU = {"train": ["--workers", "0", "--threads", "1", "--device", "cpu"], "predict": ["--device", "cpu"]}


def recipe(text: str) -> list[list[str]]:
    """The `python -m hpa` commands of the bash block after "Each stage also runs alone", in order: continuation
    lines joined, comments dropped, a `for VAR in A B; do ... done` loop unrolled."""
    block = re.search(r"Each stage also runs alone.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines()]
    commands, loop = [], None
    for line in filter(None, lines):
        if match := re.fullmatch(r"for (\w+) in (.+); do", line):
            loop = (match.group(1), match.group(2).split(), [])
        elif line == "done":
            var, values, body = loop
            commands += [[part.replace(f"${var}", value) for part in argv] for value in values for argv in body]
            loop = None
        else:
            assert line.startswith("python -m hpa "), line
            (loop[2] if loop else commands).append(shlex.split(line)[3:])
    return commands


def run_recipe(commands: list[list[str]]) -> None:
    for argv in commands:
        argv = [TINY.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)] + CPU.get(argv[0], [])
        argv = [x for a in argv for x in (sorted(glob.glob(a)) if "*" in a else [a])]  # the shell's glob
        assert main(argv) == 0, argv


def labels_per_image(directory: Path) -> tuple[float, float]:
    submission = pd.read_csv(directory / "submission.csv")
    truth = pd.read_csv(directory / "data" / "test_labels.csv").set_index("Id").loc[submission["Id"]]
    predicted = submission["Predicted"].fillna("").astype(str).str.split().map(len).mean()
    return predicted, truth["Target"].astype(str).str.split().map(len).mean()


@pytest.mark.slow
def test_readme_cli_recipe_gives_a_sane_number_of_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = recipe((ROOT / "README.md").read_text())
    stages = [c[0] for c in commands]
    assert stages[:2] == ["synth", "split"] and stages[-2:] == ["ensemble", "submit"]
    run_recipe(commands)
    predicted, true = labels_per_image(tmp_path)
    assert predicted < 3 * true, f"{predicted:.2f} labels per image predicted against {true:.2f} true"


def test_ensemble_refuses_validation_and_test_predictions_of_different_tta(tmp_path):
    """The old recipe's mix, refused in one line: hpa train's val_predictions.npz (no TTA) with TTA test predictions."""
    import numpy as np

    from hpa.ensemble import ensemble
    from hpa.errors import DataError
    from hpa.predictions import save_predictions

    rng = np.random.default_rng(0)
    ids, probs = np.array([f"i{k}" for k in range(20)]), rng.random((20, 28)).astype(np.float32)
    targets = (rng.random((20, 28)) < 0.1).astype(np.uint8)
    save_predictions(tmp_path / "val.npz", ids, probs, targets, model="m", tta=1)
    save_predictions(tmp_path / "val_unknown.npz", ids, probs, targets, model="m")
    save_predictions(tmp_path / "test.npz", ids, probs, model="m", tta=8)
    for val, shown in (("val.npz", "tta=1"), ("val_unknown.npz", "no tta recorded")):
        with pytest.raises(DataError) as err:
            ensemble([tmp_path / val], [tmp_path / "test.npz"], out_dir=tmp_path / "ens", threshold_mode="fitted")
        assert str(err.value) == (
            f"{tmp_path / val} ({shown}) and {tmp_path / 'test.npz'} (tta=8): validation and test predictions must use "
            "the same TTA; predict the validation fold like the test set (python -m hpa predict --ids val --split "
            "SPLIT --fold F --tta 8)")
    save_predictions(tmp_path / "val8.npz", ids, probs, targets, model="m", tta=8)
    metrics = ensemble([tmp_path / "val8.npz"], [tmp_path / "test.npz"], out_dir=tmp_path / "ens",
                       threshold_mode="fitted")
    assert metrics["threshold_mode"] == "fitted"


def test_ensemble_defaults_to_the_pipelines_threshold_policy(tmp_path, capsys):
    from hpa.config import PipelineConfig
    from hpa.ensemble import resolve_policy

    import numpy as np

    from hpa.predictions import save_predictions

    assert resolve_policy() == PipelineConfig().threshold_mode == "prior"
    ids, probs = np.array(["a", "b", "c"]), np.full((3, 28), 0.5, dtype=np.float32)
    save_predictions(tmp_path / "v.npz", ids, probs, np.eye(3, 28, dtype=np.uint8), model="m", tta=2)
    save_predictions(tmp_path / "t.npz", ids, probs, model="m", tta=2)
    assert main(["ensemble", "--val", str(tmp_path / "v.npz"), "--test", str(tmp_path / "t.npz"),
                 "--out", str(tmp_path / "ens")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: threshold_mode 'prior': needs the training labels (--prior: an Id,Target CSV such as the split CSV, "
        "or 28 frequencies); prior is the default policy, as in the pipeline")
