"""TrainJob / PyTorchJob manifests: no drift, CRD schema validation (per Trainer release), clear errors,
the pod patch in both Trainer APIs (podTemplateOverrides for 2.1, runtimePatches for >= 2.2), the
launcher against the loopback stand-in API server (trainer_api=auto, owner references, deletion on
failure, timeout and SIGTERM), and the manifests' own command run as two "nodes" with the operators' env."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from hpa import k8s, k8s_manifests, train_distributed
from hpa.errors import ConfigError
from hpa.train_distributed import DistributedConfig
from k8s_fake_api import FakeKubeAPI

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = {"trainjob": ROOT / "manifests" / "trainjob.yaml", "pytorchjob": ROOT / "manifests" / "pytorchjob.yaml"}
TRAINJOB_V21 = ROOT / "manifests" / "trainjob-trainer-v2.1.yaml"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PLACED = dict(node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, tolerations=[GPU_TOLERATION])


@pytest.fixture(autouse=True)
def default_images(monkeypatch):
    for name in ("HPA_IMAGE", "HPA_CUDA_IMAGE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("kind", train_distributed.KINDS)
def test_manifests_are_generated_and_validate(kind):
    text = MANIFESTS[kind].read_text()
    assert text == train_distributed.render_yaml(DistributedConfig(kind=kind)), \
        f"{MANIFESTS[kind]} drifted: run " \
        f"`python -m hpa train-distributed render --kind {kind} --manifest-out {MANIFESTS[kind]}`"
    train_distributed.validate_manifest(yaml.safe_load(text))


def test_trainer_v21_manifest_is_generated_and_validates():
    text = TRAINJOB_V21.read_text()
    assert text == train_distributed.render_yaml(DistributedConfig(trainer_api="podTemplateOverrides")), \
        f"{TRAINJOB_V21} drifted: run `python -m hpa train-distributed render --trainer-api podTemplateOverrides " \
        f"--manifest-out {TRAINJOB_V21}`"
    job = yaml.safe_load(text)
    train_distributed.validate_manifest(job, trainer_versions=("v2.1.0",))
    assert "podTemplateOverrides" in job["spec"] and "runtimePatches" not in job["spec"]


def test_cli_renders_the_image_and_placement_given(tmp_path, monkeypatch):
    """CLI renders happen where HPA_IMAGE / HPA_CUDA_IMAGE may be set: the default follows them and the
    GPU count; --image, --node-selector and --tolerations (JSON) go into the manifest."""
    monkeypatch.setenv("HPA_IMAGE", "registry.example/hpa:cpu-1")
    monkeypatch.setenv("HPA_CUDA_IMAGE", "registry.example/hpa:cuda-1")
    out = tmp_path / "job.yaml"
    assert train_distributed.main(["render", "--gpus-per-node", "0", "--manifest-out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["spec"]["trainer"]["image"] == "registry.example/hpa:cpu-1"
    assert train_distributed.main(["render", "--manifest-out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["spec"]["trainer"]["image"] == "registry.example/hpa:cuda-1"
    import json

    assert train_distributed.main(["render", "--kind", "pytorchjob", "--image", "registry.example/other:2",
                                   "--manifest-out", str(out), "--node-selector", json.dumps(PLACED["node_selector"]),
                                   "--tolerations", json.dumps(PLACED["tolerations"])]) == 0
    pod = yaml.safe_load(out.read_text())["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/other:2"
    assert pod["nodeSelector"] == PLACED["node_selector"] and pod["tolerations"] == PLACED["tolerations"]


def test_cli_bad_json_option_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as err:
        train_distributed.main(["render", "--tolerations", '{"key": "x"}'])
    assert err.value.code == 2 and "expected a JSON list" in capsys.readouterr().err


def _pod_patch(job: dict) -> tuple[dict, dict]:
    """(pod metadata, pod spec) of the TrainJob's patch for the `node` job, in either Trainer API."""
    spec = job["spec"]
    if "podTemplateOverrides" in spec:
        (override,) = spec["podTemplateOverrides"]
        assert override["targetJobs"] == [{"name": "node"}]
        return override["metadata"], override["spec"]
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    pod = rjob["template"]["spec"]["template"]
    return pod["metadata"], pod["spec"]


@pytest.mark.parametrize("trainer_api, versions", [("podTemplateOverrides", ("v2.1.0",)),
                                                   ("runtimePatches", ("v2.2.0", "v2.3.0"))])
def test_trainjob_pods_opt_out_of_istio_and_get_placement_and_shm(trainer_api, versions):
    """Both Trainer APIs patch the `node` pods with the Istio opt-out (profile namespaces inject sidecars),
    the node selector and tolerations, and a memory /dev/shm; the env (S3 endpoint, secretKeyRefs) is in
    trainer.env (the Trainer webhook refuses env on the `node` container of a patch). Only runtimePatches
    (Trainer >= 2.2) can carry the container securityContext: the v2.1.0 CRD's override containers have
    name, env and volumeMounts only. Validated against the CRD of every release the API targets."""
    job = train_distributed.render(DistributedConfig(trainer_api=trainer_api, image="registry.example/hpa:7", **PLACED))
    for version in versions:
        train_distributed.validate_manifest(job, trainer_versions=(version,))
    metadata, pod = _pod_patch(job)
    assert metadata == {"annotations": {"sidecar.istio.io/inject": "false"}}
    assert pod["nodeSelector"] == PLACED["node_selector"] and pod["tolerations"] == [GPU_TOLERATION]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    (node,) = pod["containers"]
    assert node["name"] == "node" and node["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}] and \
        "env" not in node
    assert node.get("securityContext") == ({"runAsNonRoot": True, "allowPrivilegeEscalation": False}
                                           if trainer_api == "runtimePatches" else None)
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "registry.example/hpa:7"
    assert {e["name"] for e in trainer["env"]} == {"HPA_S3_ENDPOINT", "PYTHONUNBUFFERED", "HPA_S3_ACCESS_KEY",
                                                   "HPA_S3_SECRET_KEY"}


@pytest.mark.parametrize("trainer_api, other_release, where", [
    ("podTemplateOverrides", "v2.3.0", "podTemplateOverrides"),
    ("runtimePatches", "v2.1.0", "runtimePatches"),
])
def test_each_trainer_api_is_refused_by_the_other_releases_crd(trainer_api, other_release, where):
    """The field availability per release is real: a v2.1 TrainJob does not validate against the v2.3.0
    CRD, nor a v2.2+ one against v2.1.0 (so rendering for the wrong release cannot pass silently)."""
    job = train_distributed.render(DistributedConfig(trainer_api=trainer_api))
    with pytest.raises(ConfigError, match=where):
        train_distributed.validate_manifest(job, trainer_versions=(other_release,))


def test_runtime_patch_manager_must_be_domain_prefixed():
    """Trainer >= 2.2 refuses a runtimePatches manager that is not a domain-prefixed path (v2.2.0
    pkg/runtime/framework/plugins/jobset/jobset.go, validation.IsDomainPrefixedPath); the CRD only says
    minLength 1, so the schema alone would let the bare name the renderer used to write through."""
    job = train_distributed.render(DistributedConfig())
    assert job["spec"]["runtimePatches"][0]["manager"] == train_distributed.PATCH_MANAGER
    job["spec"]["runtimePatches"][0]["manager"] = "hpa-kfp"
    k8s_manifests.validate_crd(job, k8s_manifests.TRAINJOB_CRDS["v2.3.0"], "schema only")  # the schema accepts it
    with pytest.raises(ConfigError, match="must be a domain-prefixed path"):
        train_distributed.validate_manifest(job)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["containers"][0].__setitem__("env", [{"name": "X", "value": "1"}]), "without env"),
    (lambda p: p["containers"].append({"name": "sidecar"}), "may patch only container 'node'"),
])
def test_trainer_webhook_rules_on_the_pod_patch(mutate, message):
    for trainer_api in ("podTemplateOverrides", "runtimePatches"):
        job = train_distributed.render(DistributedConfig(trainer_api=trainer_api))
        mutate(_pod_patch(job)[1])
        with pytest.raises(ConfigError, match=message):
            train_distributed.validate_manifest(job)


@pytest.mark.parametrize("num_nodes", [1, 3])
def test_pytorchjob_pods_get_placement_and_no_istio(num_nodes):
    job = train_distributed.render(DistributedConfig(kind="pytorchjob", num_nodes=num_nodes,
                                                     image="registry.example/hpa:7", **PLACED))
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        template = spec["template"]
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert template["spec"]["nodeSelector"] == PLACED["node_selector"] and \
            template["spec"]["tolerations"] == [GPU_TOLERATION]
        assert template["spec"]["containers"][0]["image"] == "registry.example/hpa:7"


@pytest.mark.parametrize("num_nodes", [1, 2, 4])
@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_trainjob_shape(num_nodes, gpus):
    job = train_distributed.render(DistributedConfig(kind="trainjob", num_nodes=num_nodes, gpus_per_node=gpus))
    trainer = job["spec"]["trainer"]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    assert trainer["numNodes"] == num_nodes and trainer["numProcPerNode"] == max(1, gpus)
    # torch.distributed.run under the image's python3 (the venv's), not a `torchrun` script from PATH (issue 22 #6)
    assert trainer["command"] == ["python3", "-m", "torch.distributed.run", "-m", "hpa", "train"]
    assert "--out" in trainer["args"]
    assert trainer["resourcesPerNode"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert not any(e["name"].startswith("PET_") for e in trainer["env"])  # reserved: the runtime sets them


@pytest.mark.parametrize("num_nodes", [1, 2, 4])
def test_pytorchjob_shape(num_nodes):
    job = train_distributed.render(DistributedConfig(kind="pytorchjob", num_nodes=num_nodes, gpus_per_node=2))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["spec"]["nprocPerNode"] == "2"
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {"replicas": 0})["replicas"] == num_nodes - 1
    for spec in replicas.values():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch" and container["command"] == train_distributed.COMMAND
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"


@pytest.mark.parametrize("changes, message", [
    (dict(kind="mpijob"), "distributed kind 'mpijob': expected trainjob or pytorchjob"),
    (dict(num_nodes=0), "num_nodes=0: expected >= 1"),
    (dict(gpus_per_node=1, procs_per_node=4), "procs_per_node=4 exceeds gpus_per_node=1"),
    (dict(lr=0.0), "lr=0.0: expected (0, 1)"),
    (dict(size=100), "size a multiple of 32"),
    (dict(name="Not_A_Label"), "expected a DNS label"),
    (dict(image=""), "distributed image '': expected the image reference fixed at compile time"),
    (dict(image="a b"), "distributed image 'a b'"),
    (dict(trainer_api="podTemplateOverride"), "distributed trainer_api 'podTemplateOverride': expected auto"),
    (dict(trainer_api="auto"), "auto is resolved when launching"),
    (dict(node_selector=["gpu"]), "distributed node_selector ['gpu']: expected a JSON object"),
    (dict(node_selector={"gpu": 1}), "expected a JSON object of label: value strings"),
    (dict(tolerations={"key": "x"}), "distributed tolerations {'key': 'x'}: expected a JSON list"),
    (dict(tolerations=[{"key": "x", "operater": "Exists"}]), "operater"),
])
def test_bad_config_is_one_clear_error(changes, message):
    with pytest.raises(ConfigError) as err:
        train_distributed.render(replace(DistributedConfig(), **changes))
    assert message in str(err.value)


@pytest.mark.parametrize("kind, mutate, where", [
    ("trainjob", lambda j: j["spec"]["trainer"].__setitem__("numNode", 2), "numNode"),
    ("trainjob", lambda j: j["spec"]["trainer"].__setitem__("numNodes", "2"), "spec/trainer/numNodes"),
    ("trainjob", lambda j: j["spec"].pop("runtimeRef"), "runtimeRef"),
    ("pytorchjob", lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replica", 1), "replica"),
    ("pytorchjob", lambda j: j["spec"].__setitem__("nprocPerNode", 2), "nprocPerNode"),
])
def test_crd_validation_is_strict(kind, mutate, where):
    job = train_distributed.render(DistributedConfig(kind=kind))
    mutate(job)
    with pytest.raises(ConfigError, match=where):
        train_distributed.validate_manifest(job)


@pytest.mark.parametrize("kind", train_distributed.KINDS)
def test_launch_against_stand_in_server(kind):
    job = yaml.safe_load(MANIFESTS[kind].read_text())
    with FakeKubeAPI(polls=2) as api:
        result = train_distributed.launch(job, timeout=20, poll=0.05, unique_name=True, api_client=api.api_client())
        assert len(api.posted) == 1 and api.posted[0]["kind"] == job["kind"]
        assert api.deleted == []  # a job that succeeded is kept (until its owner, the task's pod, goes)
    # the default store prefix is the namespace's own (multi-user profiles may write only under private/<ns>/)
    assert result["out"] == "s3://mlpipeline/private/kubeflow/hpa-kfp/runs/ddp" and \
        result["name"].startswith("hpa-train-ddp-")


def test_launch_failed_job_is_a_clear_error():
    job = yaml.safe_load(MANIFESTS["trainjob"].read_text())
    with FakeKubeAPI(polls=1, outcome="failed") as api:
        with pytest.raises(k8s.ClusterError, match="TrainJob kubeflow/hpa-train-ddp failed: BackoffLimitExceeded"):
            train_distributed.launch(job, timeout=20, poll=0.05, api_client=api.api_client())
        # the failed job is deleted with its pods (Background propagation), not left behind
        assert api.deleted == [{"key": ("trainjobs", "kubeflow", "hpa-train-ddp"), "propagationPolicy": "Background",
                                "by": "client"}]


def test_launch_timeout_deletes_the_job(caplog):
    job = yaml.safe_load(MANIFESTS["pytorchjob"].read_text())
    with FakeKubeAPI(polls=1, outcome="never") as api, caplog.at_level(logging.INFO, logger="hpa.k8s"):
        with pytest.raises(k8s.ClusterError, match=r"did not finish within 0.3 s \(last state: Running\)"):
            train_distributed.launch(job, timeout=0.3, poll=0.05, api_client=api.api_client())
        assert [d["key"] for d in api.deleted] == [("pytorchjobs", "kubeflow", "hpa-train-ddp")]
    assert "deleted PyTorchJob kubeflow/hpa-train-ddp (propagationPolicy=Background): did not finish within 0.3 s" \
        in caplog.text


def test_name_clash_does_not_delete_the_other_job():
    """A 409 means someone else's object has that name: the launcher must not delete it."""
    job = yaml.safe_load(MANIFESTS["trainjob"].read_text())
    with FakeKubeAPI(polls=1) as api:
        train_distributed.launch(job, timeout=5, poll=0.05, api_client=api.api_client())
        with pytest.raises(k8s.ClusterError, match="HTTP 409"):
            train_distributed.launch(job, timeout=5, poll=0.05, api_client=api.api_client())
        assert api.deleted == [] and ("trainjobs", "kubeflow", "hpa-train-ddp") in api.objects


# ---------------------------------------------------------------- trainer_api=auto against each release

@pytest.mark.parametrize("release, expected", [("v2.1.0", "podTemplateOverrides"), ("v2.2.0", "runtimePatches"),
                                               ("v2.3.0", "runtimePatches")])
def test_auto_reads_the_installed_crd(release, expected, caplog):
    cfg = DistributedConfig(trainer_api="auto", name="auto-job")
    with FakeKubeAPI(polls=1, trainer_version=release) as api, \
            caplog.at_level(logging.INFO, logger="hpa.train_distributed"):
        train_distributed.launch_config(cfg, timeout=5, poll=0.05, api_client=api.api_client())
        assert api.crd_reads == 1 and api.rejected == []
        (posted,) = api.posted
    assert train_distributed.trainjob_api(posted) == expected
    assert f"installed TrainJob CRD v1alpha1 has spec.{expected}" in caplog.text


@pytest.mark.parametrize("release, posts", [("v2.1.0", ["podTemplateOverrides"]),
                                            ("v2.3.0", ["podTemplateOverrides", "runtimePatches"])])
def test_auto_without_crd_read_rights_falls_back_with_a_clear_log_line(release, posts, caplog):
    """A profile's service account may not read CRDs (403): auto tries the Trainer 2.1 field (what
    Kubeflow 1.11 ships); on a newer Trainer the API server's strict field validation refuses
    spec.podTemplateOverrides (400, strict decoding error) and the launcher renders runtimePatches."""
    cfg = DistributedConfig(trainer_api="auto", name="auto-job")
    with FakeKubeAPI(polls=1, trainer_version=release, crd_readable=False) as api, caplog.at_level(logging.INFO):
        result = train_distributed.launch_config(cfg, timeout=5, poll=0.05, api_client=api.api_client())
        assert [train_distributed.trainjob_api(p) for p in api.posted] == posts[-1:]
        assert len(api.rejected) == len(posts) - 1
        if len(posts) == 2:
            assert api.rejected[0][0] == 400 and \
                'strict decoding error: unknown field "spec.podTemplateOverrides"' in api.rejected[0][1]
    assert result["name"] == "auto-job"
    assert "HTTP 403" in caplog.text and \
        "trainer_api=auto cannot tell the Trainer release: trying podTemplateOverrides" in caplog.text
    if len(posts) == 2:
        assert "does not know spec.podTemplateOverrides (so Trainer >= 2.2): rendering the TrainJob with " \
               "spec.runtimePatches" in caplog.text


def test_explicit_trainer_api_for_the_wrong_release_is_one_clear_error():
    """fieldValidation=Strict turns a field the installed CRD lacks into an error (without it the API
    server would drop spec.runtimePatches silently and the pods would get Istio sidecars and no /dev/shm)."""
    cfg = DistributedConfig(trainer_api="runtimePatches", name="wrong-api")
    with FakeKubeAPI(polls=1, trainer_version="v2.1.0") as api:
        with pytest.raises(k8s.ClusterError) as err:
            train_distributed.launch_config(cfg, timeout=5, poll=0.05, api_client=api.api_client())
        assert api.posted == [] and api.deleted == []
    text = str(err.value)
    assert 'HTTP 400' in text and 'unknown field "spec.runtimePatches"' in text
    assert text.endswith("(the installed Trainer has no spec.runtimePatches: set trainer_api=podTemplateOverrides "
                         "or auto)")


# ---------------------------------------------------------------- owner references (KFP pod identity)

@pytest.fixture
def kfp_pod(tmp_path, monkeypatch):
    """The env a KFP v2 executor container gets from the downward API (KFP_POD_NAME, KFP_POD_UID) and
    the service-account namespace file, for a pod `run-pod` in namespace `team-a`."""
    ns_file = tmp_path / "namespace"
    ns_file.write_text("team-a")
    monkeypatch.setattr(k8s, "SERVICEACCOUNT_NAMESPACE", str(ns_file))
    monkeypatch.setenv("KFP_POD_NAME", "run-pod")
    monkeypatch.setenv("KFP_POD_UID", "0f6c5a7e-1111-2222-3333-444455556666")
    return {"apiVersion": "v1", "kind": "Pod", "name": "run-pod", "uid": "0f6c5a7e-1111-2222-3333-444455556666"}


def test_job_is_owned_by_the_launcher_pod_and_collected_with_it(kfp_pod):
    """With the pod identity known, the TrainJob's owner is the task's Pod: when the run's pods are
    deleted (KFP's Argo ttlStrategy), Kubernetes' garbage collector deletes the TrainJob (played here)."""
    cfg = DistributedConfig(namespace="team-a", name="owned-job")
    with FakeKubeAPI(polls=1) as api:
        api.add_pod("team-a", "run-pod", kfp_pod["uid"])
        train_distributed.launch_config(cfg, timeout=5, poll=0.05, api_client=api.api_client())
        assert api.posted[0]["metadata"]["ownerReferences"] == [kfp_pod]
        assert ("trainjobs", "team-a", "owned-job") in api.objects
        api.delete_pod("team-a", "run-pod")
        assert ("trainjobs", "team-a", "owned-job") not in api.objects
        assert api.deleted == [{"key": ("trainjobs", "team-a", "owned-job"), "propagationPolicy": "Background",
                                "by": "garbage-collector"}]


def test_no_owner_reference_across_namespaces_or_outside_kfp(kfp_pod, monkeypatch, caplog):
    """Kubernetes treats an owner in another namespace as absent and would delete the job at once: none
    is set then, nor when the pod identity is unknown (a local run); each case says so in the log."""
    with FakeKubeAPI(polls=1) as api, caplog.at_level(logging.INFO, logger="hpa.k8s"):
        api.add_pod("team-a", "run-pod", kfp_pod["uid"])
        train_distributed.launch_config(DistributedConfig(namespace="team-b", name="elsewhere"), timeout=5, poll=0.05,
                                  api_client=api.api_client())
        monkeypatch.delenv("KFP_POD_UID")
        train_distributed.launch_config(DistributedConfig(namespace="team-a", name="local-run"), timeout=5, poll=0.05,
                                  api_client=api.api_client())
        assert [p["metadata"].get("ownerReferences") for p in api.posted] == [None, None]
        assert api.deleted == []
    assert "runs in namespace team-a but the object goes to team-b: no ownerReference" in caplog.text
    assert "KFP_POD_NAME/KFP_POD_UID not set (not a KFP pod): the created object gets no ownerReference" in caplog.text


def test_stand_in_collects_a_job_whose_owner_pod_is_unknown(kfp_pod):
    """The stand-in plays the garbage collector faithfully: a wrong owner uid gets the job deleted."""
    with FakeKubeAPI(polls=1) as api:
        api.add_pod("team-a", "run-pod", "another-uid")
        with pytest.raises(k8s.ClusterError, match="HTTP 404"):
            train_distributed.launch_config(DistributedConfig(namespace="team-a", name="orphan"), timeout=5, poll=0.05,
                                      api_client=api.api_client())
        assert api.deleted[0]["by"] == "garbage-collector"


# ---------------------------------------------------------------- SIGTERM (a cancelled run)

def _launch_until_posted(api: FakeKubeAPI, tmp_path, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": api.write_kubeconfig(tmp_path / "kubeconfig"), "PYTHONUNBUFFERED": "1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen([sys.executable, "-m", "hpa", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not api.posted and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.posted, f"nothing was posted (rc={proc.poll()})"
    time.sleep(0.3)  # well inside the wait loop
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_deletes_the_job_and_exits_non_zero(tmp_path, sig):
    """A cancelled KFP run terminates its pods (Argo's emissary forwards SIGTERM to the main container's
    process group). A real `python -m hpa train-distributed launch` subprocess, waiting on a job that never
    finishes, gets the signal: it deletes the TrainJob (Background propagation) and exits non-zero."""
    with FakeKubeAPI(polls=1, outcome="never") as api:
        proc = _launch_until_posted(api, tmp_path, ["train-distributed", "launch", "--file", str(MANIFESTS["trainjob"]),
                                                    "--timeout", "120", "--poll", "0.1"])
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert api.deleted == [{"key": ("trainjobs", "kubeflow", "hpa-train-ddp"), "propagationPolicy": "Background",
                                "by": "client"}]
    assert proc.returncode == 2, err
    assert out == ""
    name = signal.Signals(sig).name
    assert f"deleted TrainJob kubeflow/hpa-train-ddp (propagationPolicy=Background): cancelled by {name}" in err
    assert err.strip().splitlines()[-1] == \
        f"error: TrainJob kubeflow/hpa-train-ddp: cancelled by {name}; deleted TrainJob kubeflow/hpa-train-ddp"


def local_command(command: list[str], *launcher_options: str) -> list[str]:
    """A manifest's command as this test process runs it: its interpreter for the image's python3, the same
    module, args and options; `launcher_options` go to torch.distributed.run (e.g. --standalone)."""
    assert command[:3] == ["python3", "-m", "torch.distributed.run"], command
    return [sys.executable, *command[1:3], *launcher_options, *command[3:]]


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
    split = make_split(read_labels(data / "train.csv"), folds=2, seed=0)
    split[["Id", "Target", "fold"]].to_csv(tmp_path / "split.csv", index=False)
    job = yaml.safe_load(MANIFESTS["pytorchjob"].read_text())
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    for flag, value in {"--data": str(data), "--split": str(tmp_path / "split.csv"), "--out": str(tmp_path / "out"),
                        "--size": "32", "--epochs": "1", "--batch-size": "8"}.items():
        args[args.index(flag) + 1] = value
    cmd = [*local_command(container["command"]), *args, "--workers", "0", "--threads", "1", "--device", "cpu"]
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
               "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port,
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
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
    Trainer: it runs the posted TrainJob's command (torch.distributed.run -m hpa train ...) locally on CPU. The
    job trains and predicts val and test with TTA into its --out; the component (a 1-CPU pod) only fetches them
    and predicts nothing itself (issue 22 #6: it used to run both TTA predictions in the launcher pod)."""
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
        cmd = [*local_command(trainer["command"], "--standalone", "--nproc-per-node", "1"), *trainer["args"],
               "--workers", "0", "--threads", "1", "--device", "cpu"]
        subprocess.run(cmd, check=True, timeout=400, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    outputs = {name: cls(name=name, uri=str(tmp_path / "outputs" / name)) for name, cls in
               [("model", Model), ("run", Artifact), ("val_predictions", Dataset), ("test_predictions", Dataset),
                ("metrics", Metrics)]}
    (tmp_path / "outputs").mkdir()
    import hpa.predict

    def no_prediction_here(*args, **kwargs):
        raise AssertionError("the launcher task predicted: the job should have")

    monkeypatch.setattr(hpa.predict, "predict_val_and_test", no_prediction_here)
    with FakeKubeAPI(polls=1, on_create=run_trainjob, lifetime=500) as api:
        monkeypatch.setenv("KUBECONFIG", api.write_kubeconfig(tmp_path / "config"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        train_distributed.python_func(data_uri=str(data), split_csv=Dataset(name="split", uri=str(split)),
                                      arch="resnet18", fold=0, models={"resnet18": 1e-3},
                                      store_uri=str(tmp_path / "store"), num_nodes=2, gpus_per_node=0, image_size=32,
                                      epochs=1, batch_size=8, tta=1, timeout_s=450, image="registry.example/hpa:cpu-9",
                                      node_selector={"pool": "cpu"}, **outputs)
        job = api.posted[0]
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 2
    assert job["spec"]["trainer"]["image"] == "registry.example/hpa:cpu-9" and \
        _pod_patch(job)[1]["nodeSelector"] == {"pool": "cpu"}
    assert (tmp_path / "outputs" / "model").stat().st_size > 100_000
    assert (tmp_path / "outputs" / "run" / "metrics.json").exists()
    import numpy as np

    val = np.load(tmp_path / "outputs" / "val_predictions", allow_pickle=False)
    assert val["probs"].shape[1] == 28 and "best_val_macro_f1" in outputs["metrics"].metadata
    args = job["spec"]["trainer"]["args"]
    assert args[args.index("--predict-tta") + 1] == "1" and "--predict-data" not in args  # PNG data: its own CSVs
    test = np.load(tmp_path / "outputs" / "test_predictions", allow_pickle=False)
    assert len(test["ids"]) == 6 and test["probs"].shape == (6, 28)
    # What the job wrote, byte for byte: <store>/runs/<job>/out/{val,test}_predictions_tta.npz
    [out] = (tmp_path / "store" / "runs").glob("*/out")
    assert (out / "test_predictions_tta.npz").read_bytes() == (tmp_path / "outputs" / "test_predictions").read_bytes()
    assert (out / "val_predictions_tta.npz").read_bytes() == (tmp_path / "outputs" / "val_predictions").read_bytes()


def _compiled_pipeline(name: str = "hpa_pipeline.yaml") -> dict:
    return next(yaml.safe_load_all((ROOT / "compiled" / name).read_text()))


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
    """The multi-node pipeline (compiled/hpa_pipeline_multinode.yaml) trains every model x fold with
    train-distributed (TrainJobs) in the models-x-folds loop; the single-pod pipeline has none. The task gets
    num_nodes and gpus from the run parameters, the image chosen at compile time from check-params (not
    resolved inside the pod), the placement parameters, and arch and fold from the loop item."""
    single, multi = _compiled_pipeline(), _compiled_pipeline("hpa_pipeline_multinode.yaml")
    assert not any(name.startswith("comp-train-distributed") for name in single["components"])
    # The single-pod run form has no num_nodes (issue 22 #13: it could only be 1 there).
    assert "num_nodes" not in single["root"]["inputDefinitions"]["parameters"]
    assert single["root"]["inputDefinitions"]["parameters"]["tune"]["defaultValue"] is False
    params = multi["root"]["inputDefinitions"]["parameters"]
    assert params["num_nodes"]["defaultValue"] == 2 and params["tune"]["defaultValue"] is False
    loop = [t for t in multi["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    assert len(loop) == 1 and "triggerPolicy" not in loop[0]
    body = multi["components"][loop[0]["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["train-distributed"]
    inputs, outer = body["train-distributed"]["inputs"]["parameters"], loop[0]["inputs"]["parameters"]
    item = loop[0]["parameterIterator"]["itemInput"]
    assert inputs["arch"]["componentInputParameter"] == inputs["fold"]["componentInputParameter"] == item
    for key, source in (("num_nodes", "num_nodes"), ("gpus_per_node", "gpus"), ("node_selector", "node_selector"),
                        ("tolerations", "tolerations")):
        assert inputs[key] == {"componentInputParameter": f"pipelinechannel--{source}"}
        assert outer[f"pipelinechannel--{source}"] == {"componentInputParameter": source}
    assert inputs["image"] == {"componentInputParameter": "pipelinechannel--check-params-train_image"}
    assert outer["pipelinechannel--check-params-train_image"] == {
        "taskOutputParameter": {"outputParameterKey": "train_image", "producerTask": "check-params"}}
    executor = multi["deploymentSpec"]["executors"]["exec-train-distributed"]["container"]
    assert "train_distributed" in " ".join(executor["command"] + executor.get("args", []))


def test_compiled_pipeline_has_the_optional_katib_stage():
    """One katib-tune task in every run, told by its `tune` input whether to sweep: no condition branch whose only
    task a cache hit would leave unfinished (issue 22 #1: the katib-defaults branch and its dsl.OneOf)."""
    for name in ("hpa_pipeline.yaml", "hpa_pipeline_multinode.yaml"):
        spec = _compiled_pipeline(name)
        assert _conditions(spec, "tune") == {}
        assert [n for n in spec["components"] if "katib" in n] == ["comp-katib-tune"]
        assert spec["root"]["dag"]["tasks"]["katib-tune"]["inputs"]["parameters"]["tune"] == \
            {"componentInputParameter": "tune"}


def test_train_distributed_component_refuses_an_empty_image(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from kfp.dsl import Artifact, Dataset, Metrics, Model

        from components.train_distributed.component import train_distributed
    finally:
        sys.path.remove(str(ROOT))
    outputs = {name: cls(name=name, uri=str(tmp_path / name)) for name, cls in
               [("model", Model), ("run", Artifact), ("val_predictions", Dataset), ("test_predictions", Dataset),
                ("metrics", Metrics)]}
    with pytest.raises(ConfigError) as err:
        train_distributed.python_func(data_uri="s3://b/d", split_csv=Dataset(name="split", uri=str(tmp_path / "s.csv")),
                                      arch="resnet18", fold=0, models={"resnet18": 1e-3},
                                      store_uri=str(tmp_path / "store"), image=" ", **outputs)
    assert str(err.value) == ("train-distributed image=' ': expected the training image fixed at compile time "
                              "(pipeline.py passes the CUDA image when gpus > 0, else the CPU image)")
    assert not (tmp_path / "store").exists()


# The whole multi-node pipeline with num_nodes=2 is journey J8: tests/test_journey_multinode.py (two nodes per
# TrainJob, as Trainer's torch runtime starts them).
