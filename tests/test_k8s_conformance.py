"""Static conformance of every Kubernetes object the project renders or posts, against upstream rules.

Objects: the Katib Experiment (Job and PyTorchJob trials, GPU and CPU), the TrainJob for each Trainer API
(podTemplateOverrides for Trainer 2.1, runtimePatches for 2.2 and 2.3), the PyTorchJob, the committed
katib/experiment.yaml and manifests/*.yaml, the CLI's renders made in a subprocess whose environment sets
HPA_IMAGE / HPA_CUDA_IMAGE to non-default images, and the objects as the launchers POST them from a KFP
pod (to the loopback stand-in API server, tests/k8s_fake_api.py).

Each rule is a small function that returns its violations and cites the upstream file it encodes. The
last tests build objects the way the project did before issue 11 and show the rules fail on them for
the reasons the issue gives (Istio sidecars on TrainJob pods, an image resolved in the pod, a store and
an endpoint a profile cannot use, a TrainJob field Kubeflow 1.11's Trainer does not have).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hpa import config, k8s, k8s_manifests, katib, katib_tune, train_distributed
from hpa.errors import ConfigError
from hpa.train_distributed import DistributedConfig
from k8s_fake_api import FakeKubeAPI, unknown_fields

ROOT = Path(__file__).resolve().parents[1]
NS = "team-a"
CPU_IMAGE = "registry.example/conformance/hpa:cpu-7"
CUDA_IMAGE = "registry.example/conformance/hpa:cuda-7"
DEFAULT_TAG = "ghcr.io/hpa-kfp/hpa-kfp:0.2.0"  # the prefix of both default images
PLACED = dict(node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
              tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
POD = {"apiVersion": "v1", "kind": "Pod", "name": "hpa-run-7-system-container-impl-1234",
       "uid": "5d1f2c9e-0000-4a4a-9b9b-0123456789ab"}
SUPPORTED_TRAINER_RELEASES = ("v2.1.0", "v2.2.0", "v2.3.0")  # Kubeflow 1.11 ships v2.1.0; manifests master v2.2.0


@dataclass
class Case:
    """One object under test: what image it must run, the namespace whose store prefix it may use, the
    Trainer releases it targets (TrainJobs), and the KFP pod that must own it (None: must have no owner)."""

    name: str
    obj: dict
    image: str
    namespace: str
    releases: tuple[str, ...] = ()
    owner: dict | None = None

    @property
    def text(self) -> str:
        return json.dumps(self.obj)


# ---------------------------------------------------------------- walking the objects

def pod_templates(obj: dict) -> list[tuple[str, dict, bool]]:
    """(where, pod template {metadata, spec}, complete) for every pod the object makes; a TrainJob's
    entries are its pod *patches* (merged into the runtime's pod by the Trainer), so not complete."""
    kind, spec = obj.get("kind"), obj.get("spec", {})
    if kind == "Experiment":
        trial = spec["trialTemplate"]["trialSpec"]
        return [(f"trialSpec {where}", pod, full) for where, pod, full in pod_templates(trial)]
    if kind == "Job":
        return [("spec.template", spec["template"], True)]
    if kind == "PyTorchJob":
        return [(f"pytorchReplicaSpecs.{role}", replica["template"], True)
                for role, replica in spec["pytorchReplicaSpecs"].items()]
    if kind == "TrainJob":
        found = [(f"podTemplateOverrides[{i}]", {"metadata": o.get("metadata", {}), "spec": o.get("spec", {})}, False)
                 for i, o in enumerate(spec.get("podTemplateOverrides", []))]
        for i, patch in enumerate(spec.get("runtimePatches", [])):
            for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                found.append((f"runtimePatches[{i}].{rjob['name']}", rjob["template"]["spec"]["template"], False))
        return found
    raise AssertionError(f"unknown kind {kind}")


def run_containers(obj: dict) -> list[tuple[str, dict]]:
    """The containers that run the project's code (a TrainJob's is `spec.trainer`)."""
    if obj["kind"] == "TrainJob":
        return [("spec.trainer", obj["spec"]["trainer"])]
    return [(f"{where}.{c['name']}", c) for where, pod, _ in pod_templates(obj) for c in pod["spec"]["containers"]]


def _patch_container_properties(release: str) -> dict:
    """The properties a TrainJob pod patch's container may have in `release`'s CRD."""
    schema = k8s_manifests.crd_schema(k8s_manifests.TRAINJOB_CRDS[release], "v1alpha1")
    spec = schema["properties"]["spec"]["properties"]
    if "runtimePatches" in spec:
        runtime = spec["runtimePatches"]["items"]["properties"]["trainingRuntimeSpec"]["properties"]
        rjob = runtime["template"]["properties"]["spec"]["properties"]["replicatedJobs"]["items"]
        pod = rjob["properties"]["template"]["properties"]["spec"]["properties"]["template"]["properties"]["spec"]
    else:
        pod = spec["podTemplateOverrides"]["items"]["properties"]["spec"]
    return pod["properties"]["containers"]["items"]["properties"]


# ---------------------------------------------------------------- the rules

def rule_schema(case: Case) -> list[str]:
    """Valid against the vendored schemas, strictly (hpa/schemas/README.md): Katib v0.19.0 api/openapi-spec/
    swagger.json v1beta1.Experiment (+ the trial's Job pod template / PyTorchJob CRD), the Training Operator
    v1.9.4 PyTorchJob CRD, and the TrainJob CRD of *each* Trainer release the object targets."""
    try:
        if case.obj["kind"] == "Experiment":
            katib.validate_experiment(case.obj)
        else:
            train_distributed.validate_manifest(case.obj, trainer_versions=case.releases or None)
    except ConfigError as exc:
        return [str(exc)]
    return []


def rule_trainer_fields(case: Case) -> list[str]:
    """Every TrainJob field is declared in the CRD of each release it targets, as the API server's strict
    field validation checks (kubernetes staging/src/k8s.io/apiextensions-apiserver/pkg/apiserver/
    customresource_handler.go: `unknown field "spec.x"`); without Strict the field is silently pruned.
    Trainer v2.1.0 has spec.podTemplateOverrides, v2.2.0 and v2.3.0 spec.runtimePatches (their
    manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml)."""
    if case.obj["kind"] != "TrainJob":
        return []
    return [f"Trainer {release}: {path} is not in its TrainJob CRD" for release in case.releases
            for path in unknown_fields(case.obj,
                                       k8s_manifests.crd_schema(k8s_manifests.TRAINJOB_CRDS[release], "v1alpha1"))]


def rule_trainer_webhook(case: Case) -> list[str]:
    """Trainer's jobset plugin validation (pkg/runtime/framework/plugins/jobset/jobset.go, v2.1.0 and
    v2.2.0): a patch may target only the runtime's jobs and containers (torch-distributed: `node`,
    manifests/base/runtimes/torch_distributed.yaml), must not set env on `node` (trainer.env does), and a
    runtimePatches manager must be a domain-prefixed path (validation.IsDomainPrefixedPath)."""
    if case.obj["kind"] != "TrainJob":
        return []
    problems = []
    for i, patch in enumerate(case.obj["spec"].get("runtimePatches", [])):
        host, _, path = patch["manager"].partition("/")
        if not (path and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", host)):
            problems.append(f"runtimePatches[{i}].manager {patch['manager']!r} is not a domain-prefixed path")
    for where, pod, _ in pod_templates(case.obj):
        if not where.endswith(".node") and where.startswith("runtimePatches"):
            problems.append(f"{where}: targets a job the runtime does not have")
        for container in pod["spec"].get("containers", []):
            if container["name"] != "node" or container.get("env"):
                problems.append(f"{where}: container {container['name']!r} with env {container.get('env')}")
    for i, override in enumerate(case.obj["spec"].get("podTemplateOverrides", [])):
        if [t["name"] for t in override["targetJobs"]] != ["node"]:
            problems.append(f"podTemplateOverrides[{i}] targets {override['targetJobs']}")
    return problems


def rule_no_istio_sidecar(case: Case) -> list[str]:
    """Every pod opts out of the Istio sidecar: Kubeflow profile namespaces are labelled istio-injection
    (kubeflow/dashboard components/profile-controller/controllers/profile_controller.go, istioInjectionLabel),
    and a sidecar keeps a finished trial or training pod running, so its Job/TrainJob never completes.
    Katib's own Kubeflow Pipelines examples set it on trial pods (kubeflow/katib v0.19.0
    examples/v1beta1/kubeflow-pipelines/*.ipynb)."""
    return [f"{where}: no sidecar.istio.io/inject: 'false'" for where, pod, _ in pod_templates(case.obj)
            if (pod.get("metadata") or {}).get("annotations", {}).get(k8s_manifests.ISTIO_INJECT) != "false"]


def rule_non_root(case: Case) -> list[str]:
    """Every container refuses root and privilege escalation, as KFP's own executors do (kubeflow/pipelines
    2.17.0 manifests/kustomize/third-party/argo/base/workflow-controller-configmap-patch.yaml: runAsNonRoot,
    allowPrivilegeEscalation false); the project images run as uid 1000 (images/Dockerfile*). A TrainJob
    patch carries it wherever the targeted release's CRD lets a patch container have a securityContext
    (v2.2.0, v2.3.0; v2.1.0's podTemplateOverrides containers have only name, env and volumeMounts)."""
    problems = []
    for where, pod, complete in pod_templates(case.obj):
        can = complete or all("securityContext" in _patch_container_properties(r) for r in case.releases)
        for container in pod["spec"].get("containers", []):
            if can and container.get("securityContext") != k8s_manifests.CONTAINER_SECURITY:
                problems.append(f"{where}.{container['name']}: securityContext {container.get('securityContext')}")
    return problems


def rule_katib_metrics_collector(case: Case) -> list[str]:
    """What Katib's StdOut collector needs (kubeflow/katib v0.19.0 pkg/webhook/v1beta1/pod/): the primary
    container exists in the trial pod (inject_webhook.go, errPrimaryContainerNotFound) and has an explicit
    command, else the webhook pulls the image's config from its registry (utils.go getContainerCommand);
    command and args are joined with spaces into `sh -c ... 1>metrics.log 2>&1` (wrapWorkerContainer), so
    no argument may hold whitespace or shell syntax; PyTorchJob trials collect from the master pod only
    (primaryPodLabels, isPrimaryPod); the filters are joined with ';' for the collector (getMetricsCollectorArgs)
    and each needs two groups; the objective and additional metrics come out of the training's metric line."""
    if case.obj["kind"] != "Experiment":
        return []
    from hpa.train import metric_line

    spec, problems = case.obj["spec"], []
    template = spec["trialTemplate"]
    primary = template["primaryContainerName"]
    pods = pod_templates(case.obj)
    if template["trialSpec"]["kind"] == "PyTorchJob":
        if template.get("primaryPodLabels") != {"training.kubeflow.org/job-role": "master"}:
            problems.append(f"primaryPodLabels {template.get('primaryPodLabels')}: metrics must come from the "
                            "master only")
        pods = [p for p in pods if p[0].endswith("Master")]
    for where, pod, _ in pods:
        named = [c for c in pod["spec"]["containers"] if c["name"] == primary]
        if not named:
            problems.append(f"{where}: no primary container {primary!r}")
            continue
        if not named[0].get("command"):
            problems.append(f"{where}: primary container has no command")
        for arg in named[0].get("command", []) + named[0].get("args", []):
            if not re.fullmatch(r"[A-Za-z0-9_./:=@+,%-]*", re.sub(r"\$\{trialParameters\.[A-Za-z]+\}", "x", arg)):
                problems.append(f"{where}: argument {arg!r} breaks Katib's sh -c wrapping")
    filters = spec["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]
    if spec["metricsCollectorSpec"]["collector"]["kind"] != "StdOut":
        problems.append("collector is not StdOut")
    problems += [f"filter {f!r}: needs two groups and no ';'" for f in filters if ";" in f or re.compile(f).groups < 2]
    line = metric_line(3, 0.1234, 0.1345, 0.4567, timestamp=True)
    seen = {m.group(1) for f in filters for m in re.finditer(f, line)}
    wanted = {spec["objective"]["objectiveMetricName"], *spec["objective"].get("additionalMetricNames", [])}
    if not wanted <= seen:
        problems.append(f"metrics {sorted(wanted - seen)} are not extracted from the training line {line!r}")
    return problems


def rule_owner_reference(case: Case) -> list[str]:
    """When the launcher's pod identity is known (KFP_POD_NAME / KFP_POD_UID, from the downward API in
    kubeflow/pipelines 2.17.0 backend/src/v2/compiler/argocompiler/common.go commonEnvs, on the executor
    container in container.go), the created object is owned by exactly that Pod, in its namespace and
    without blockOwnerDeletion (which needs delete rights on the owner), so the garbage collector deletes
    it with the run's pods. A rendered manifest carries no owner."""
    refs = case.obj.get("metadata", {}).get("ownerReferences")
    if case.owner is None:
        return [f"unexpected ownerReferences {refs}"] if refs else []
    if refs != [case.owner]:
        return [f"ownerReferences {refs}: expected [{case.owner}]"]
    if case.obj["metadata"].get("namespace") != case.namespace:
        return ["owner in another namespace"]
    return []


def rule_no_secret_values(case: Case) -> list[str]:
    """Credentials reach the pods only as secretKeyRefs to mlpipeline-minio-artifact, the secret every
    profile gets (kubeflow/pipelines 2.17.0 manifests/kustomize/base/installs/multi-user/
    pipelines-profile-controller/sync.py); no env entry with a credential-like name has a literal value."""
    problems = []
    for where, container in run_containers(case.obj):
        for entry in container.get("env", []):
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", entry["name"]):
                ref = (entry.get("valueFrom") or {}).get("secretKeyRef", {})
                if "value" in entry or ref.get("name") != config.S3_SECRET_NAME:
                    problems.append(f"{where}: {entry['name']} is not a secretKeyRef to {config.S3_SECRET_NAME}")
    return problems


def rule_image(case: Case) -> list[str]:
    """Every container runs the image given when the object was rendered (the pipeline fixes it at compile
    time); none picks it inside the pod, so the default tag appears only when it was the one given."""
    problems = [f"{where}: image {c.get('image')!r}, expected {case.image!r}" for where, c in run_containers(case.obj)
                if c.get("image") != case.image]
    if not case.image.startswith(DEFAULT_TAG) and DEFAULT_TAG in case.text:
        problems.append(f"the default image tag {DEFAULT_TAG} appears in the object")
    return problems


def rule_store_in_profile(case: Case) -> list[str]:
    """Every s3:// URI the pods use lies where the namespace's own mlpipeline-minio-artifact keys may
    write: mlpipeline/private/<ns>/, private-artifacts/<ns>/, artifacts/ or shared/ (sync.py, the
    profile's SeaweedFS policy, kubeflow/pipelines 2.17.0)."""
    allowed = [f"s3://mlpipeline/{p}" for p in (f"private/{case.namespace}/", f"private-artifacts/{case.namespace}/",
                                                "artifacts/", "shared/")]
    uris = set(re.findall(r"s3://[^\s\"',]+", case.text))
    return [f"store URI {uri} is outside the profile's prefixes" for uri in sorted(uris)
            if not uri.startswith(tuple(allowed))]


def rule_store_endpoint(case: Case) -> list[str]:
    """The S3 endpoint exists on KFP 2.16 and 2.17: minio-service was removed ("Remove minio",
    kubeflow/pipelines#12613); SeaweedFS serves S3 at seaweedfs.kubeflow:9000 (kubeflow/pipelines 2.16.0
    manifests/kustomize/third-party/seaweedfs/base/seaweedfs/seaweedfs-service.yaml)."""
    endpoints = {e.get("value") for _, c in run_containers(case.obj) for e in c.get("env", [])
                 if e["name"] == "HPA_S3_ENDPOINT"}
    problems = [] if endpoints else ["no HPA_S3_ENDPOINT in the containers"]
    return problems + [f"HPA_S3_ENDPOINT {e!r}: minio-service is gone since KFP 2.16" for e in endpoints
                       if "minio-service" in (e or "")]


RULES = [rule_schema, rule_trainer_fields, rule_trainer_webhook, rule_no_istio_sidecar, rule_non_root,
         rule_katib_metrics_collector, rule_owner_reference, rule_no_secret_values, rule_image,
         rule_store_in_profile, rule_store_endpoint]


def violations(case: Case) -> dict[str, list[str]]:
    return {rule.__name__: found for rule in RULES if (found := rule(case))}


# ---------------------------------------------------------------- the objects

def _releases(job: dict) -> tuple[str, ...]:
    if job["kind"] != "TrainJob":
        return ()
    return train_distributed.TRAINER_API_VERSIONS[train_distributed.trainjob_api(job)]


def rendered_cases() -> list[Case]:
    cases = []
    for trial_kind, algorithm, gpus in [("job", "tpe", 1), ("pytorchjob", "grid", 2), ("job", "random", 0)]:
        image = CUDA_IMAGE if gpus else CPU_IMAGE
        cfg = katib.KatibConfig(namespace=NS, dataset="d", image=image, trial_kind=trial_kind, algorithm=algorithm,
                                gpus=gpus, num_nodes=2, max_trials=6, **PLACED)
        cases.append(Case(f"experiment-{trial_kind}-{algorithm}-gpus{gpus}", katib.render_experiment(cfg), image, NS))
    for kind, api in [("trainjob", "podTemplateOverrides"), ("trainjob", "runtimePatches"),
                      ("pytorchjob", "runtimePatches")]:
        job = train_distributed.render(DistributedConfig(kind=kind, trainer_api=api, namespace=NS, image=CUDA_IMAGE,
                                                         num_nodes=3, **PLACED))
        cases.append(Case(f"{kind}-{api}" if kind == "trainjob" else kind, job, CUDA_IMAGE, NS, _releases(job)))
    return cases


def committed_cases() -> list[Case]:
    """The committed files were rendered with no HPA_* image set: the default CUDA image, namespace kubeflow."""
    paths = [ROOT / "katib" / "experiment.yaml", *sorted((ROOT / "manifests").glob("*.yaml"))]
    assert len(paths) == 4
    return [Case(str(p.relative_to(ROOT)), (obj := _applied(k8s_manifests.load_yaml(p))), config.DEFAULT_CUDA_IMAGE,
                 obj["metadata"]["namespace"], _releases(obj))
            for p in paths]


def _applied(obj: dict, namespace: str = NS) -> dict:
    """A file that names no namespace as `kubectl apply -n namespace` creates it (kubernetes/cli-runtime
    pkg/resource/visitor.go RequireNamespace), Katib's ${trialSpec.Namespace} filled in as the trial will have it
    (kubeflow/katib v0.19.0 pkg/controller.v1beta1/experiment/manifest/generator.go applyParameters)."""
    if obj["metadata"].get("namespace"):
        return obj
    params = obj["spec"]["trialTemplate"]["trialParameters"]
    names = [p["name"] for p in params if p["reference"] == "${trialSpec.Namespace}"]
    obj["spec"]["trialTemplate"]["trialParameters"] = [p for p in params if p["name"] not in names]
    text = json.dumps(obj)
    for name in names:
        text = text.replace("${trialParameters.%s}" % name, namespace)
    return {**json.loads(text), "metadata": {**obj["metadata"], "namespace": namespace}}


def cli_cases(tmp_path: Path) -> list[Case]:
    """The CLI renders in a subprocess whose environment sets both images to non-default values."""
    env = {**os.environ, "HPA_IMAGE": CPU_IMAGE, "HPA_CUDA_IMAGE": CUDA_IMAGE}
    runs = {
        "cli-katib-gpu": (["katib", "render", "--dataset", "d", "--namespace", NS], CUDA_IMAGE),
        "cli-katib-cpu": (["katib", "render", "--dataset", "d", "--namespace", NS, "--gpus", "0", "--trial-kind",
                           "pytorchjob", "--num-nodes", "2"], CPU_IMAGE),
        "cli-trainjob-v2.1": (["train-distributed", "render", "--namespace", NS, "--trainer-api",
                               "podTemplateOverrides"], CUDA_IMAGE),
        "cli-trainjob-cpu": (["train-distributed", "render", "--namespace", NS, "--gpus-per-node", "0"], CPU_IMAGE),
        "cli-pytorchjob": (["train-distributed", "render", "--namespace", NS, "--kind", "pytorchjob"], CUDA_IMAGE),
    }
    cases = []
    for name, (argv, image) in runs.items():
        out = subprocess.run([sys.executable, "-m", "hpa", *argv], env=env, capture_output=True, text=True, timeout=120,
                             check=True).stdout
        assert DEFAULT_TAG not in out, f"{name}: a default image tag in {argv}"
        obj = yaml.safe_load(out)
        cases.append(Case(name, obj, image, NS, _releases(obj)))
    return cases


def posted_cases(tmp_path: Path, monkeypatch) -> list[Case]:
    """What the launchers POST from a KFP pod (pod identity in the env): to the stand-in API server."""
    (tmp_path / "namespace").write_text(NS)
    monkeypatch.setattr(k8s, "SERVICEACCOUNT_NAMESPACE", str(tmp_path / "namespace"))
    monkeypatch.setenv("KFP_POD_NAME", POD["name"])
    monkeypatch.setenv("KFP_POD_UID", POD["uid"])
    cases = []
    for release in SUPPORTED_TRAINER_RELEASES:
        with FakeKubeAPI(polls=1, trainer_version=release, crd_readable=release != "v2.3.0") as api:
            api.add_pod(NS, POD["name"], POD["uid"])
            client = api.api_client()
            train_distributed.launch_config(DistributedConfig(namespace=NS, name="ddp", image=CUDA_IMAGE,
                                                              trainer_api="auto", **PLACED),
                                            timeout=5, poll=0.05, api_client=client)
            if release == "v2.1.0":
                exp = katib.render_experiment(katib.KatibConfig(namespace=NS, dataset="d", image=CUDA_IMAGE, **PLACED))
                katib_tune.launch(exp, timeout=5, poll=0.05, api_client=client)
                train_distributed.launch_config(DistributedConfig(kind="pytorchjob", namespace=NS, name="ptj",
                                                                  image=CUDA_IMAGE),
                                                timeout=5, poll=0.05, api_client=client)
            for obj in api.posted:
                cases.append(Case(f"posted-{obj['kind']}-trainer-{release}", obj, CUDA_IMAGE, NS,
                                  (release,) if obj["kind"] == "TrainJob" else (), owner=POD))
    return cases


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("case", rendered_cases(), ids=lambda c: c.name)
def test_rendered_objects_conform(case):
    assert violations(case) == {}


@pytest.mark.parametrize("case", committed_cases(), ids=lambda c: c.name)
def test_committed_files_conform(case):
    assert violations(case) == {}


def test_cli_renders_with_images_from_the_environment_conform(tmp_path):
    cases = cli_cases(tmp_path)
    assert {c.name: violations(c) for c in cases} == {c.name: {} for c in cases}


def test_posted_objects_conform_and_are_owned_by_the_kfp_pod(tmp_path, monkeypatch):
    cases = posted_cases(tmp_path, monkeypatch)
    assert sorted(c.name for c in cases) == ["posted-Experiment-trainer-v2.1.0", "posted-PyTorchJob-trainer-v2.1.0",
                                             "posted-TrainJob-trainer-v2.1.0", "posted-TrainJob-trainer-v2.2.0",
                                             "posted-TrainJob-trainer-v2.3.0"]
    assert [train_distributed.trainjob_api(c.obj) for c in cases if c.obj["kind"] == "TrainJob"] == \
        ["podTemplateOverrides", "runtimePatches", "runtimePatches"]
    assert {c.name: violations(c) for c in cases} == {c.name: {} for c in cases}


def test_every_supported_trainer_release_gets_a_trainjob_it_accepts():
    """For each supported Trainer release, one of the renderer's APIs validates against its CRD and the
    other does not: the choice matters and is made per release."""
    for release in SUPPORTED_TRAINER_RELEASES:
        accepted = []
        for api in ("podTemplateOverrides", "runtimePatches"):
            job = train_distributed.render(DistributedConfig(trainer_api=api, namespace=NS, image=CUDA_IMAGE))
            case = Case(api, job, CUDA_IMAGE, NS, (release,))
            if not rule_schema(case) and not rule_trainer_fields(case):
                accepted.append(api)
        assert accepted == [("podTemplateOverrides" if release == "v2.1.0" else "runtimePatches")], release
        assert release in train_distributed.TRAINER_API_VERSIONS[accepted[0]]


# ---------------------------------------------------------------- the rules fail on objects built the old way

def _old_trainjob() -> dict:
    """The TrainJob as the renderer wrote it before issue 11 (identical to manifests/trainjob.yaml at
    commit 9713572, checked when this test was written): runtimePatches only, manager `hpa-kfp`, no pod annotation
    or placement, the default image (resolved inside the pod from an unset HPA_CUDA_IMAGE), minio-service, and
    the store prefix s3://mlpipeline/hpa-kfp outside every profile's allowed prefixes."""
    job = train_distributed.render(DistributedConfig(image=config.DEFAULT_CUDA_IMAGE, trainer_api="runtimePatches"))
    patch = job["spec"]["runtimePatches"][0]
    patch["manager"] = "hpa-kfp"
    replicated = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    del replicated[0]["template"]["spec"]["template"]["metadata"]
    trainer = job["spec"]["trainer"]
    trainer["args"] = [a.replace("s3://mlpipeline/private/kubeflow/hpa-kfp", "s3://mlpipeline/hpa-kfp")
                       for a in trainer["args"]]
    trainer["env"][0]["value"] = "minio-service.kubeflow:9000"
    return job


def test_old_trainjob_fails_for_the_reasons_of_the_issue():
    old = _old_trainjob()
    on_kubeflow_111 = violations(Case("old-trainjob on Trainer 2.1", old, CUDA_IMAGE, "kubeflow", ("v2.1.0",)))
    assert set(on_kubeflow_111) == {"rule_schema", "rule_trainer_fields", "rule_trainer_webhook",
                                    "rule_no_istio_sidecar", "rule_image", "rule_store_in_profile",
                                    "rule_store_endpoint"}
    assert on_kubeflow_111["rule_trainer_fields"] == ["Trainer v2.1.0: spec.runtimePatches is not in its TrainJob CRD"]
    assert on_kubeflow_111["rule_no_istio_sidecar"] == ["runtimePatches[0].node: no sidecar.istio.io/inject: 'false'"]
    assert on_kubeflow_111["rule_trainer_webhook"] == [
        "runtimePatches[0].manager 'hpa-kfp' is not a domain-prefixed path"]
    assert on_kubeflow_111["rule_image"][0] == \
        f"spec.trainer: image {config.DEFAULT_CUDA_IMAGE!r}, expected {CUDA_IMAGE!r}"
    assert on_kubeflow_111["rule_store_endpoint"] == [
        "HPA_S3_ENDPOINT 'minio-service.kubeflow:9000': minio-service is gone since KFP 2.16"]
    assert all("s3://mlpipeline/hpa-kfp/" in v for v in on_kubeflow_111["rule_store_in_profile"])
    # even on a Trainer 2.3 cluster that accepts its fields, the pods get sidecars and the webhook refuses the manager
    on_trainer_23 = violations(Case("old-trainjob on Trainer 2.3", old, config.DEFAULT_CUDA_IMAGE, "kubeflow",
                                    ("v2.3.0",)))
    assert {"rule_no_istio_sidecar", "rule_trainer_webhook"} <= set(on_trainer_23) and \
        "rule_trainer_fields" not in on_trainer_23


def test_rules_catch_a_trial_pod_with_a_sidecar_root_or_a_wrapped_argument():
    """The Katib rules are not vacuous: each mutation of a conforming Experiment trips its rule."""
    base = rendered_cases()[0]
    assert violations(base) == {}

    def mutated(change) -> dict[str, list[str]]:
        obj = json.loads(base.text)
        change(obj["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"])
        return violations(Case(base.name, obj, base.image, base.namespace))

    assert set(mutated(lambda pod: pod["metadata"].pop("annotations"))) == {"rule_no_istio_sidecar"}
    assert set(mutated(lambda pod: pod["spec"]["containers"][0].pop("securityContext"))) == {"rule_non_root"}
    assert set(mutated(lambda pod: pod["spec"]["containers"][0].pop("command"))) == {"rule_katib_metrics_collector"}
    assert set(mutated(lambda pod: pod["spec"]["containers"][0]["args"].append("--note=a b"))) == \
        {"rule_katib_metrics_collector"}
    assert "rule_owner_reference" in violations(Case(base.name, base.obj, base.image, base.namespace, owner=POD))
