"""TrainJob / PyTorchJob manifests: no drift, CRD schema validation, clear errors, launcher against the
loopback stand-in API server, and the manifests' own command run as two "nodes" with the operators' env."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from hpa import distributed, k8s
from hpa.errors import ConfigError
from k8s_fake_api import FakeKubeAPI

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = {"trainjob": ROOT / "manifests" / "trainjob.yaml", "pytorchjob": ROOT / "manifests" / "pytorchjob.yaml"}

pytestmark = pytest.mark.skipif(k8s.schemas_dir() is None, reason="shared/schemas not found (set HPA_SCHEMAS_DIR)")


@pytest.fixture(autouse=True)
def default_images(monkeypatch):
    for name in ("HPA_IMAGE", "HPA_CUDA_IMAGE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("kind", distributed.KINDS)
def test_manifests_are_generated_and_validate(kind):
    text = MANIFESTS[kind].read_text()
    assert text == distributed.render_yaml(distributed.DistributedConfig(kind=kind)), \
        f"{MANIFESTS[kind]} drifted: run `python -m hpa distributed render --kind {kind} --manifest-out {MANIFESTS[kind]}`"
    distributed.validate_manifest(yaml.safe_load(text))


@pytest.mark.parametrize("num_nodes", [1, 2, 4])
@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_trainjob_shape(num_nodes, gpus):
    job = distributed.render(distributed.DistributedConfig(kind="trainjob", num_nodes=num_nodes, gpus_per_node=gpus))
    trainer = job["spec"]["trainer"]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert trainer["numNodes"] == num_nodes and trainer["numProcPerNode"] == max(1, gpus)
    assert trainer["command"] == ["torchrun", "-m", "hpa", "train"] and "--out" in trainer["args"]
    assert trainer["resourcesPerNode"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert not any(e["name"].startswith("PET_") for e in trainer["env"])  # reserved: the runtime sets them


@pytest.mark.parametrize("num_nodes", [1, 2, 4])
def test_pytorchjob_shape(num_nodes):
    job = distributed.render(distributed.DistributedConfig(kind="pytorchjob", num_nodes=num_nodes, gpus_per_node=2))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["spec"]["nprocPerNode"] == "2"
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {"replicas": 0})["replicas"] == num_nodes - 1
    for spec in replicas.values():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch" and container["command"][0] == "torchrun"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"


@pytest.mark.parametrize("changes, message", [
    (dict(kind="mpijob"), "distributed kind 'mpijob': expected trainjob or pytorchjob"),
    (dict(num_nodes=0), "num_nodes=0: expected >= 1"),
    (dict(gpus_per_node=1, procs_per_node=4), "procs_per_node=4 exceeds gpus_per_node=1"),
    (dict(lr=0.0), "lr=0.0: expected (0, 1)"),
    (dict(size=100), "size a multiple of 32"),
    (dict(name="Not_A_Label"), "expected a DNS label"),
])
def test_bad_config_is_one_clear_error(changes, message):
    with pytest.raises(ConfigError) as err:
        distributed.render(replace(distributed.DistributedConfig(), **changes))
    assert message in str(err.value)


@pytest.mark.parametrize("kind, mutate, where", [
    ("trainjob", lambda j: j["spec"]["trainer"].__setitem__("numNode", 2), "numNode"),
    ("trainjob", lambda j: j["spec"]["trainer"].__setitem__("numNodes", "2"), "spec/trainer/numNodes"),
    ("trainjob", lambda j: j["spec"].pop("runtimeRef"), "runtimeRef"),
    ("pytorchjob", lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replica", 1), "replica"),
    ("pytorchjob", lambda j: j["spec"].__setitem__("nprocPerNode", 2), "nprocPerNode"),
])
def test_crd_validation_is_strict(kind, mutate, where):
    job = distributed.render(distributed.DistributedConfig(kind=kind))
    mutate(job)
    with pytest.raises(ConfigError, match=where):
        distributed.validate_manifest(job)


@pytest.mark.parametrize("kind", distributed.KINDS)
def test_launch_against_stand_in_server(kind):
    job = yaml.safe_load(MANIFESTS[kind].read_text())
    with FakeKubeAPI(polls=2) as api:
        result = distributed.launch(job, timeout=20, poll=0.05, unique_name=True, api_client=api.api_client())
        assert len(api.posted) == 1 and api.posted[0]["kind"] == job["kind"]
    assert result["out"] == "s3://mlpipeline/hpa-kfp/runs/ddp" and result["name"].startswith("hpa-train-ddp-")


def test_launch_failed_job_is_a_clear_error():
    job = yaml.safe_load(MANIFESTS["trainjob"].read_text())
    with FakeKubeAPI(polls=1, outcome="failed") as api:
        with pytest.raises(k8s.ClusterError, match="TrainJob kubeflow/hpa-train-ddp failed: BackoffLimitExceeded"):
            distributed.launch(job, timeout=20, poll=0.05, api_client=api.api_client())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_manifest_command_runs_as_two_nodes_with_operator_env(tmp_path):
    """The PyTorchJob's own command, on two local "nodes" with the env the Training Operator sets
    (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR/PORT, plus its WORLD_SIZE/RANK):
    torchrun rendezvouses, DDP trains with gloo, only rank 0 prints metric lines."""
    from hpa.data import read_labels
    from hpa.split import make_split
    from hpa.synthetic import generate

    data = tmp_path / "data"
    generate(data, n_train=64, n_test=4, size=32, seed=0)
    make_split(read_labels(data / "train.csv"), folds=2, seed=0)[["Id", "Target", "fold"]].to_csv(tmp_path / "split.csv", index=False)
    job = yaml.safe_load(MANIFESTS["pytorchjob"].read_text())
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    for flag, value in {"--data": str(data), "--split": str(tmp_path / "split.csv"), "--out": str(tmp_path / "out"),
                        "--size": "32", "--epochs": "1", "--batch-size": "8"}.items():
        args[args.index(flag) + 1] = value
    cmd = [sys.executable, "-m", "torch.distributed.run", *container["command"][1:], *args,
           "--workers", "0", "--threads", "1", "--device", "cpu"]
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"], "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    metric_lines = [[ln for ln in out.splitlines() if ln.startswith("epoch=")] for out, _ in outputs]
    assert len(metric_lines[0]) == 1 and metric_lines[1] == []
    assert "world size 2" in outputs[0][1]
    assert (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_train_distributed_component_end_to_end(tmp_path, monkeypatch):
    """The component's own function against the stand-in API server, whose `on_create` hook plays the
    Trainer: it runs the posted TrainJob's command (torchrun -m hpa train ...) locally on CPU. The
    component then fetches the run from the store and predicts val and test."""
    monkeypatch.syspath_prepend(str(ROOT))
    from kfp.dsl import Artifact, Dataset, Metrics, Model

    from components.train_distributed.component import train_distributed
    from hpa.data import read_labels
    from hpa.split import make_split
    from hpa.synthetic import generate

    data = tmp_path / "data"
    generate(data, n_train=48, n_test=6, size=32, seed=0)
    split = tmp_path / "split.csv"
    make_split(read_labels(data / "train.csv"), folds=2, seed=0)[["Id", "Target", "fold"]].to_csv(split, index=False)

    def run_trainjob(job):
        trainer = job["spec"]["trainer"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               *trainer["command"][1:], *trainer["args"], "--workers", "0", "--threads", "1", "--device", "cpu"]
        subprocess.run(cmd, check=True, timeout=400, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    outputs = {name: cls(name=name, uri=str(tmp_path / "outputs" / name)) for name, cls in
               [("model", Model), ("run", Artifact), ("val_predictions", Dataset), ("test_predictions", Dataset), ("metrics", Metrics)]}
    (tmp_path / "outputs").mkdir()
    with FakeKubeAPI(polls=1, on_create=run_trainjob, lifetime=500) as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "config"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        train_distributed.python_func(data_uri=str(data), split_csv=Dataset(name="split", uri=str(split)),
                                      store_uri=str(tmp_path / "store"), num_nodes=2, gpus_per_node=0, image_size=32,
                                      epochs=1, batch_size=8, tta=1, timeout_s=450, **outputs)
        job = api.posted[0]
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 2
    assert (tmp_path / "outputs" / "model").stat().st_size > 100_000
    assert (tmp_path / "outputs" / "run" / "metrics.json").exists()
    import numpy as np

    val = np.load(tmp_path / "outputs" / "val_predictions", allow_pickle=False)
    assert val["probs"].shape[1] == 28 and "best_val_macro_f1" in outputs["metrics"].metadata


def _compiled_pipeline() -> dict:
    return next(yaml.safe_load_all((ROOT / "compiled" / "hpa_pipeline.yaml").read_text()))


def _conditions(spec: dict, parameter: str) -> dict[str, list[str]]:
    """condition text -> component names of the tasks it guards, for conditions on a run parameter."""
    found = {}
    for comp in spec["components"].values():
        for task in comp.get("dag", {}).get("tasks", {}).values():
            condition = task.get("triggerPolicy", {}).get("condition", "")
            if f"pipelinechannel--{parameter}'" in condition:
                inner = spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]
                found[condition] = sorted(t["componentRef"]["name"] for t in inner.values())
    return found


def test_compiled_pipeline_has_the_distributed_path():
    """num_nodes > 1 routes both models to train-distributed (TrainJobs); otherwise the single-pod tasks."""
    spec = _compiled_pipeline()
    multi = "int(inputs.parameter_values['pipelinechannel--num_nodes']) > 1"
    assert _conditions(spec, "num_nodes") == {
        multi: ["comp-train-distributed", "comp-train-distributed-2"],
        f"!({multi})": ["comp-train-resnet18", "comp-train-se-resnet"],
    }
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["num_nodes"]["defaultValue"] == 1 and params["tune"]["defaultValue"] is False
    archs = set()
    for name in ("comp-train-distributed", "comp-train-distributed-2"):
        assert spec["components"][name]["executorLabel"].startswith("exec-train-distributed")
    for comp in spec["components"].values():
        for task in comp.get("dag", {}).get("tasks", {}).values():
            if task["componentRef"]["name"].startswith("comp-train-distributed"):
                inputs = task["inputs"]["parameters"]
                archs.add(inputs["arch"]["runtimeValue"]["constant"])
                assert inputs["num_nodes"]["componentInputParameter"].endswith("num_nodes")
                assert inputs["gpus_per_node"]["componentInputParameter"].endswith("gpus")
    assert archs == {"resnet18", "se_resnet18"}
    executor = spec["deploymentSpec"]["executors"]["exec-train-distributed"]["container"]
    assert "train_distributed" in " ".join(executor["command"] + executor.get("args", []))


def test_compiled_pipeline_has_the_optional_katib_stage():
    spec = _compiled_pipeline()
    tune = "inputs.parameter_values['pipelinechannel--tune'] == true"
    assert _conditions(spec, "tune") == {tune: ["comp-katib-tune"], f"!({tune})": ["comp-katib-defaults"]}


@pytest.mark.slow
def test_pipeline_with_num_nodes_2_runs_the_distributed_path(tmp_path, monkeypatch):
    """The whole pipeline under kfp.local with num_nodes=2: both models go through train-distributed,
    whose TrainJobs are posted to the loopback stand-in API server (CRD-validated there) and run by its
    `on_create` hook as the Trainer would (the TrainJob's own command, torchrun standalone on CPU);
    compare, ensemble and submit then consume the distributed branch's outputs through dsl.OneOf."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.delenv("HPA_IMAGE", raising=False)
    import pipeline

    def run_trainjob(job):
        trainer = job["spec"]["trainer"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               *trainer["command"][1:], *trainer["args"], "--workers", "0", "--threads", "1", "--device", "cpu"]
        subprocess.run(cmd, check=True, timeout=600, capture_output=True)

    small = {"n_train": 120, "n_test": 40, "image_size": 32, "epochs": 1, "batch_size": 16, "folds": 3, "tta": 1,
             "num_nodes": 2}
    with FakeKubeAPI(polls=1, on_create=run_trainjob, lifetime=1200, max_requests=5000) as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        result = pipeline.run_local(small, tmp_path / "run")
        posted = [(p["kind"], p["spec"]["trainer"]["numNodes"], p["spec"]["trainer"]["args"]) for p in api.posted]
    assert sorted(args[args.index("--arch") + 1] for _, _, args in posted) == ["resnet18", "se_resnet18"]
    assert all(kind == "TrainJob" and nodes == 2 for kind, nodes, _ in posted)
    rows = Path(result["submission"]).read_text().splitlines()
    assert rows[0] == "Id,Predicted" and len(rows) == 1 + small["n_test"]
