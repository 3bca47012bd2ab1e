"""Journey J7 (issue 22, item 9): a Katib sweep by hand, exactly as katib/README.md tells it.

A finished run left a committed dataset in the namespace's store prefix (`<store>/datasets/<name>`, with its
manifest.json). The user writes the run's split next to it with `python -m hpa split`, renders an Experiment
for their namespace and that data with `python -m hpa katib render --namespace NS --dataset NAME --verify`,
applies it with `kubectl apply -n NS`, and tries the same search locally with `python -m hpa sweep`.

What `kubectl apply -n NS -f FILE` does with a file's namespace is kubernetes/cli-runtime's RequireNamespace
(pkg/resource/visitor.go, v0.36.2): an object without one gets NS; one whose namespace differs from NS is
refused with "the namespace from the provided object ... does not match the namespace ...".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from hpa import committed, katib, store
from hpa.cli import main
from hpa.download import dataset_name, download

ROOT = Path(__file__).resolve().parents[1]
NS = "team-a"


def kubectl_apply_namespace(obj: dict, namespace: str) -> str:
    """The namespace `kubectl apply -n namespace` creates `obj` in (cli-runtime RequireNamespace), or its error."""
    given = (obj.get("metadata") or {}).get("namespace") or ""
    if given and given != namespace:
        raise ValueError(f'the namespace from the provided object "{given}" does not match the namespace '
                         f'"{namespace}". You must pass \'--namespace={given}\' to perform this operation.')
    return namespace


def _args(container: dict) -> dict:
    args = container["args"]
    return {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--") and not args[i + 1].startswith("--")}


def test_committed_experiment_applies_in_any_namespace():
    """`kubectl apply -n $NS -f katib/experiment.yaml` (README): no namespace pinned, and the trials read the
    store prefix of the namespace they run in, not kubeflow's."""
    exp = yaml.safe_load((ROOT / "katib" / "experiment.yaml").read_text())
    assert kubectl_apply_namespace(exp, NS) == NS
    container = exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    args = _args(container)
    for flag in ("--data", "--split", "--out"):
        assert args[flag].startswith("s3://mlpipeline/private/${trialParameters.namespace}/hpa-kfp/"), args[flag]
    assert "/datasets/" in args["--data"] and "/splits/" in args["--split"]
    assert {"name": "namespace", "reference": "${trialSpec.Namespace}"}.items() <= \
        next(p for p in exp["spec"]["trialTemplate"]["trialParameters"] if p["name"] == "namespace").items()
    assert "kubeflow/" not in json.dumps(container)


@pytest.mark.slow
def test_katib_by_hand_journey(s3_bucket, tmp_path, capsys):
    # A finished run's data: its download task committed the dataset under the namespace's store prefix.
    store_uri = f"{s3_bucket}private/{{namespace}}/hpa-kfp"  # the run's store_uri run parameter
    store_ns = store_uri.replace("{namespace}", NS)
    name = dataset_name("synthetic", 24, 4, 32, 0)
    data = f"{store_ns}/datasets/{name}"
    download("synthetic", data, n_train=24, n_test=4, size=32, seed=0)
    assert committed.manifest_sha256(data)

    # Rendering before the split exists fails up front, in one line that gives the command to make it.
    render = ["katib", "render", "--namespace", NS, "--store-uri", store_uri, "--dataset", name, "--verify",
              "--folds", "3", "--epochs", "1", "--batch-size", "8", "--max-trials", "2", "--parallel-trials", "1",
              "--max-failed-trials", "0",
              "--out", str(tmp_path / "experiment.yaml")]
    assert main(render) == 2
    split = katib.split_uri(store_ns, name, 3, 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: katib split {split}: does not exist; write it with python -m hpa split --data {data} "
                       f"--folds 3 --seed 0 --out {split}")

    # The README's commands: the split, the render, kubectl apply -n, the local sweep.
    assert main(["split", "--data", data, "--folds", "3", "--seed", "0", "--out", split]) == 0
    assert main(render) == 0
    exp = yaml.safe_load((tmp_path / "experiment.yaml").read_text())
    text = (tmp_path / "experiment.yaml").read_text()
    assert "namespace: kubeflow" not in text and "/kubeflow/" not in text
    assert exp["metadata"]["namespace"] == NS and kubectl_apply_namespace(exp, NS) == NS
    katib.validate_experiment(exp)  # Katib's OpenAPI v1beta1.Experiment, strictly, + the trial Job
    container = exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    args = _args(container)
    assert args["--data"] == data and args["--split"] == split
    assert committed.manifest_sha256(args["--data"]) and store.exists_uri(args["--split"])
    assert args["--out"] == f"{store_ns}/katib/${{trialParameters.trialName}}"

    work = tmp_path / "sweep"
    sets = ["workers=0", "threads=1", "device=cpu"]
    assert main(["sweep", str(tmp_path / "experiment.yaml"), "--workdir", str(work),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    rows = list(csv.DictReader(open(work / "trials.csv")))
    best = json.loads((work / "best.json").read_text())
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows), rows
    scores = [float(r["val_macro_f1"]) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores) and best["val_macro_f1"] == max(scores)
    for row in rows:  # each trial read the committed dataset and the split from the store
        log = Path(row["log"]).read_text()
        assert "val_macro_f1=" in log and int(row["epochs"]) == 1
