"""The compiled pipeline and components: no drift from the sources, and the graph a cluster will run.

Drift: `python pipeline.py compile` into a temp dir must reproduce compiled/hpa_pipeline.yaml and every
components/*/component.yaml byte for byte (run it and commit when this fails). Graph: stages, order,
the conditional montage, GPU fields bound to run parameters, secrets as env, /dev/shm, parameters with
defaults and descriptions.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ["check-params", "download", "split", "pack", "train-resnet18", "train-se-resnet", "compare-plots", "ensemble",
          "submit"]
TRAINING = ["train-resnet18", "train-se-resnet"]


@pytest.fixture(scope="module")
def pipeline_module(monkeypatch_module):
    monkeypatch_module.delenv("HPA_IMAGE", raising=False)  # the committed YAML uses the default image
    import pipeline

    return pipeline


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def compiled():
    docs = list(yaml.safe_load_all((ROOT / "compiled" / "hpa_pipeline.yaml").read_text()))
    assert len(docs) == 2, "expected the pipeline spec and the kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_files_match_sources(pipeline_module, tmp_path):
    written = pipeline_module.compile_all(tmp_path)
    assert sum(p.name == "component.yaml" for p in written) == len(list((ROOT / "components").glob("*/component.py")))
    stale = [str(p.relative_to(tmp_path)) for p in written
             if p.read_bytes() != (ROOT / p.relative_to(tmp_path)).read_bytes()]
    assert not stale, f"out of date, run `python pipeline.py compile` and commit: {stale}"


def test_component_script_rewrites_its_yaml(tmp_path):
    """`python components/<stage>/component.py` gives the committed YAML (checked for one stage)."""
    scratch = tmp_path / "components" / "split"
    scratch.mkdir(parents=True)
    (scratch / "component.py").write_text((ROOT / "components" / "split" / "component.py").read_text())
    env = {k: v for k, v in __import__("os").environ.items() if k != "HPA_IMAGE"}
    subprocess.run([sys.executable, str(scratch / "component.py")], check=True, env=env, cwd=ROOT)
    assert (scratch / "component.yaml").read_bytes() == (ROOT / "components" / "split" / "component.yaml").read_bytes()


def all_tasks(spec) -> dict:
    """Every task, in the root DAG or nested in condition DAGs: name -> (task, root-level task holding it)."""
    found = {}

    def walk(dag, holder):
        for name, task in dag["tasks"].items():
            found[name] = (task, holder or name)
            inner = spec["components"].get(task["componentRef"]["name"], {}).get("dag")
            if inner:
                walk(inner, holder or name)

    walk(spec["root"]["dag"], None)
    return found


def test_stages_and_order(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    nested = all_tasks(spec)
    for stage in STAGES:
        assert stage in nested, f"stage {stage} missing from the pipeline ({sorted(nested)})"
    holder = {stage: nested[stage][1] for stage in STAGES}  # the root-level task that runs each stage
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps["check-params"] == set()
    assert "check-params" in deps["download"]
    assert "download" in deps["split"] and "download" in deps["pack"]
    for train in TRAINING:
        assert {"download", "split", "pack"} <= deps[holder[train]]
        own = set(nested[train][0].get("dependentTasks", []))
        assert not (set(TRAINING) - {train}) & own, "the two models must train in parallel"
        assert holder[train] in deps["compare-plots"] and holder[train] in deps["ensemble"]
    assert "ensemble" in deps["submit"]


def test_montage_only_when_plot_samples(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    conditions = {n: t for n, t in tasks.items() if "triggerPolicy" in t}
    assert len(conditions) == 1
    (name, cond), = conditions.items()
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--plot_samples'] == true"
    assert "download" in cond["dependentTasks"]
    inner = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["montage"]
    assert "montage" not in tasks


def test_gpu_fields_bound_to_run_parameters(compiled):
    spec, _ = compiled
    tasks = {name: task for name, (task, _) in all_tasks(spec).items()}
    for train in TRAINING:
        executor = spec["deploymentSpec"]["executors"][tasks[train]["componentRef"]["name"].replace("comp-", "exec-")]
        accel = executor["container"]["resources"]["accelerator"]
        assert accel["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
        assert accel["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"
        params = tasks[train]["inputs"]["parameters"]
        # In a condition DAG a run parameter arrives as that DAG's input "pipelinechannel--<name>".
        assert params["pipelinechannel--gpus"]["componentInputParameter"] in ("gpus", "pipelinechannel--gpus")
        assert params["pipelinechannel--accelerator_type"]["componentInputParameter"] in (
            "accelerator_type", "pipelinechannel--accelerator_type")
        assert executor["container"]["resources"]["resourceCpuRequest"]
        assert executor["container"]["resources"]["resourceMemoryRequest"]


def test_kubernetes_settings(compiled):
    spec, k8s = compiled
    from hpa.config import KAGGLE_SECRET_KEYS, KAGGLE_SECRET_NAME, S3_SECRET_KEYS, S3_SECRET_NAME

    def secret_env(executor):
        return {(s["secretName"], e["secretKey"], e["envVar"]) for s in executor.get("secretAsEnv", [])
                for e in s["keyToEnv"]}

    s3 = {(S3_SECRET_NAME, key, env) for key, env in S3_SECRET_KEYS.items()}
    for name in ["exec-download", "exec-montage", "exec-split", "exec-pack", "exec-train-resnet18", "exec-train-se-resnet",
                 "exec-submit"]:
        assert s3 <= secret_env(k8s[name]), f"{name} lacks the S3 secret env"
    kaggle = {(KAGGLE_SECRET_NAME, key, env) for key, env in KAGGLE_SECRET_KEYS.items()}
    assert kaggle <= secret_env(k8s["exec-submit"])
    assert all(not (kaggle & secret_env(e)) for n, e in k8s.items() if n != "exec-submit"), "Kaggle keys only for submit"
    for train in TRAINING:
        executor = k8s[f"exec-{train}"]
        shm = [m for m in executor["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and shm[0]["medium"] == "Memory"
        assert executor["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] in (
            "node_selector", "pipelinechannel--node_selector")
        assert executor["tolerations"][0]["tolerationJson"]["componentInputParameter"] in (
            "tolerations", "pipelinechannel--tolerations")
    tasks = {name: task for name, (task, _) in all_tasks(spec).items()}
    assert tasks["download"]["retryPolicy"]["maxRetryCount"] >= 1
    assert tasks["submit"]["cachingOptions"].get("enableCache", False) is False
    for stage in ["download", "split", "pack", "train-resnet18", "train-se-resnet", "ensemble", "compare-plots"]:
        assert tasks[stage]["cachingOptions"]["enableCache"] is True


def test_every_parameter_has_default_and_description(compiled, pipeline_module):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(pipeline_module.parameter_names())
    for name, p in params.items():
        assert "defaultValue" in p, f"parameter {name} has no default"
        assert len(p.get("description", "")) > 10, f"parameter {name} has no description"
    from hpa.config import PipelineConfig

    defaults = PipelineConfig()
    for f in dataclasses.fields(PipelineConfig):
        if f.name in params:
            assert params[f.name]["defaultValue"] == getattr(defaults, f.name), f.name


def test_components_use_the_project_image():
    from hpa.config import DEFAULT_IMAGE

    for path in sorted((ROOT / "components").glob("*/component.yaml")):
        spec = yaml.safe_load(path.read_text())
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert images == {DEFAULT_IMAGE}, path
        assert (path.parent / "README.md").exists(), f"{path.parent} has no README.md"


def test_cluster_doc_lists_every_parameter_and_the_graph(compiled):
    spec, _ = compiled
    doc = (ROOT / "docs" / "cluster.md").read_text()
    missing = [p for p in spec["root"]["inputDefinitions"]["parameters"] if f"| `{p}` |" not in doc]
    assert not missing, f"docs/cluster.md parameter table lacks {missing}"
    assert "](pipeline.png)" in doc and (ROOT / "docs" / "pipeline.png").stat().st_size > 10_000
    assert "```mermaid" in doc and "kubectl create secret generic mlpipeline-minio-artifact" in doc
    assert "kubectl create secret generic kaggle-credentials" in doc


def test_submit_creates_a_run_with_kfp_client(pipeline_module, monkeypatch, capsys):
    """`python pipeline.py submit` (no cluster here: kfp.Client is replaced by a recorder)."""
    import kfp

    calls = {}

    class FakeClient:
        def __init__(self, host, namespace=None):
            calls["host"], calls["namespace"] = host, namespace

        def create_run_from_pipeline_package(self, package, arguments, run_name, experiment_name, namespace):
            spec = next(yaml.safe_load_all(Path(package).read_text()))
            calls.update(arguments=arguments, experiment=experiment_name, tasks=sorted(all_tasks(spec)))
            return type("Run", (), {"run_id": "r-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    code = pipeline_module.main(["submit", "--host", "http://kfp.example:8080", "--experiment", "hpa",
                                 "epochs=3", "gpus=1", "kaggle_submit=true",
                                 'tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}]'])
    assert code == 0
    assert calls["host"] == "http://kfp.example:8080" and calls["experiment"] == "hpa"
    assert calls["arguments"] == {"epochs": 3, "gpus": 1, "kaggle_submit": True,
                                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}
    assert "train-resnet18" in calls["tasks"]
    assert "runs/details/r-123" in capsys.readouterr().out
