"""The compiled pipeline and components: no drift from the sources, and the graph a cluster will run.

Drift: `python pipeline.py compile` into a temp dir must reproduce compiled/hpa_pipeline.yaml,
compiled/hpa_pipeline_multinode.yaml and every components/*/component.yaml byte for byte (run it and
commit when this fails). Graph: stages, order, the conditional montage, GPU limit and image as
check-params' string outputs, images fixed at compile time, secrets as env, /dev/shm, parameters with
defaults and descriptions. The backend's own rules over the IR are in test_backend_conformance.py.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ["check-params", "download", "split", "pack", "train", "compare-plots", "ensemble", "submit"]
TRAINING = ["train"]  # one task per (model, fold), inside the ParallelFor "models-x-folds"


def training_loop(spec) -> tuple[str, dict]:
    """(root task name, task) of the ParallelFor that trains every model x fold."""
    loops = [(n, t) for n, t in spec["root"]["dag"]["tasks"].items() if "parameterIterator" in t]
    assert len(loops) == 1, f"expected one ParallelFor in the root DAG, got {[n for n, _ in loops]}"
    return loops[0]


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


def load_compiled(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2, "expected the pipeline spec and the kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled():
    return load_compiled(ROOT / "compiled" / "hpa_pipeline.yaml")


@pytest.fixture(scope="module")
def compiled_multinode():
    return load_compiled(ROOT / "compiled" / "hpa_pipeline_multinode.yaml")


def test_compiled_files_match_sources(pipeline_module, tmp_path):
    written = pipeline_module.compile_all(tmp_path)
    assert sum(p.name == "component.yaml" for p in written) == len(list((ROOT / "components").glob("*/component.py")))
    stale = [str(p.relative_to(tmp_path)) for p in written
             if p.read_bytes() != (ROOT / p.relative_to(tmp_path)).read_bytes()]
    assert not stale, f"out of date, run `python pipeline.py compile` and commit: {stale}"


def test_compile_gives_the_same_bytes_in_every_process(tmp_path):
    """kfp 2.17 writes the `models` default into the YAML's comment header through a protobuf Struct whose key
    order changes from process to process (seen as a flaky drift test); compile_all puts it in key order."""
    code = "import sys, pathlib, pipeline; pipeline.compile_all(pathlib.Path(sys.argv[1]))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "HPA_IMAGE"}
    outputs = []
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], check=True, cwd=ROOT,
                       env={**env, "PYTHONHASHSEED": seed})
        outputs.append((tmp_path / seed / "compiled" / "hpa_pipeline.yaml").read_text())
    assert outputs[0] == outputs[1]
    assert "#    models: dict [Default: {'resnet18': 0.002, 'se_resnet18': 0.002}]" in outputs[0]


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
    assert "check-params" in deps["dataset-state"]
    # download runs in every run, at the root (no If/Else joined by dsl.OneOf: issue 22 item 1)
    fetch = holder["download"]
    assert fetch == "download" and "dataset-state" in deps[fetch] and "importer" not in nested
    assert fetch in deps["split"] and fetch in deps["pack"]
    loop, _ = training_loop(spec)
    assert holder["train"] == loop
    assert {fetch, "split", "pack", "check-params"} <= deps[loop]
    assert loop in deps["compare-plots"] and loop in deps["ensemble"]
    assert "ensemble" in deps["submit"]


@pytest.mark.parametrize("which, trainer", [("compiled", "train"), ("compiled_multinode", "train-distributed")])
def test_models_x_folds_parallel_for_and_collected_inputs(which, trainer, request):
    """One ParallelFor over check-params' train_plan (every model x fold), its items read from the loop task's
    own input (R7; kubeflow/pipelines 2.16.0 backend/src/v2/driver/dag.go), the arch and fold of each task
    selected from the item, and the results fanned in with dsl.Collected: ensemble and compare-plots take
    artifact lists (isArtifactList) from the loop DAG's outputs, which the driver gathers over the iterations
    (2.16.0 backend/src/v2/driver/resolve.go resolveUpstreamArtifacts -> CollectInputs)."""
    spec, _ = request.getfixturevalue(which)
    loop, task = training_loop(spec)
    assert task["taskInfo"]["name"] == "models-x-folds"
    items = task["parameterIterator"]["items"]["inputParameter"]
    assert task["inputs"]["parameters"][items]["taskOutputParameter"] == {
        "outputParameterKey": "train_plan", "producerTask": "check-params"}
    plan_type = spec["components"]["comp-check-params"]["outputDefinitions"]["parameters"]["train_plan"]
    assert plan_type["parameterType"] == "LIST"
    body = spec["components"][task["componentRef"]["name"]]["dag"]
    assert list(body["tasks"]) == [trainer]
    params = body["tasks"][trainer]["inputs"]["parameters"]
    item = task["parameterIterator"]["itemInput"]
    for key in ("arch", "fold"):
        assert params[key] == {"componentInputParameter": item,
                               "parameterExpressionSelector": f'parseJson(string_value)["{key}"]'}
    # The UI shows the display name; the driver resolves producers by the DAG task key ("train"), not by it
    # (2.15.0-2.17.0 backend/src/v2/driver/container.go, dag.go: ecfg.TaskName = opts.TaskName, DisplayName apart).
    assert body["tasks"][trainer]["taskInfo"]["name"] == f"{trainer} (model x fold)"
    collected = {"ensemble": ("val_predictions", "test_predictions"), "compare-plots": ("runs",)}
    for consumer, inputs in collected.items():
        comp = spec["components"][f"comp-{consumer}"]["inputDefinitions"]["artifacts"]
        for name in inputs:
            assert comp[name]["isArtifactList"] is True, (consumer, name)
            ref = spec["root"]["dag"]["tasks"][consumer]["inputs"]["artifacts"][name]["taskOutputArtifact"]
            assert ref["producerTask"] == loop, (consumer, name)
            selector = body["outputs"]["artifacts"][ref["outputArtifactKey"]]["artifactSelectors"]
            assert selector == [{"outputArtifactKey": selector[0]["outputArtifactKey"], "producerSubtask": trainer}]


def test_montage_only_when_plot_samples(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    conditions = {n: t for n, t in tasks.items() if "triggerPolicy" in t}
    assert len(conditions) == 1
    (name, cond), = conditions.items()
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--plot_samples'] == true"
    assert all_tasks(spec)["download"][1] in cond["dependentTasks"]  # after the dataset is there
    inner = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["montage"]
    assert "montage" not in tasks


def test_gpu_fields_and_image_come_from_check_params_as_strings(compiled):
    """The accelerator limit and the image are check-params' string outputs, passed in as task inputs.

    The driver reads both from the task's own inputs with GetStringValue() (kubeflow/pipelines 2.17.0
    backend/src/v2/driver/driver.go initPodSpecPatch): an integer parameter there reads as "" and no
    GPU is requested; the accelerator type is registered as a task input (kfp 2.17's
    set_accelerator_type does not do it by itself)."""
    spec, _ = compiled
    nested = all_tasks(spec)
    tasks = {name: task for name, (task, _) in nested.items()}
    outputs = spec["components"]["comp-check-params"]["outputDefinitions"]["parameters"]
    assert outputs["gpu_limit"]["parameterType"] == "STRING" and outputs["train_image"]["parameterType"] == "STRING"
    for train in TRAINING:
        assert nested[train][1] == training_loop(spec)[0], "training tasks sit in the models-x-folds loop"
        executor = spec["deploymentSpec"]["executors"][tasks[train]["componentRef"]["name"].replace("comp-", "exec-")]
        container = executor["container"]
        accel = container["resources"]["accelerator"]
        assert accel["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--check-params-gpu_limit']}}"
        assert accel["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--check-params-train_image']}}"
        params = tasks[train]["inputs"]["parameters"]
        loop_inputs = training_loop(spec)[1]["inputs"]["parameters"]  # the loop DAG passes them in
        for key in ("gpu_limit", "train_image"):
            assert params[f"pipelinechannel--check-params-{key}"]["componentInputParameter"] == \
                f"pipelinechannel--check-params-{key}"
            assert loop_inputs[f"pipelinechannel--check-params-{key}"]["taskOutputParameter"] == {
                "outputParameterKey": key, "producerTask": "check-params"}
        assert params["pipelinechannel--accelerator_type"]["componentInputParameter"] == \
            "pipelinechannel--accelerator_type"
        assert container["resources"]["resourceCpuRequest"]
        assert container["resources"]["resourceMemoryRequest"]


def test_check_params_turns_run_parameters_into_pod_settings(monkeypatch):
    """gpus=0: no accelerator limit and the CPU image; gpus>0: the count as a string and the CUDA image;
    {namespace} in store_uri becomes the task's namespace; num_nodes > 1 only in the multi-node pipeline."""
    from components.check_params.component import check_params
    from hpa import k8s
    from hpa.config import PipelineConfig
    from hpa.errors import ConfigError

    monkeypatch.setattr(k8s, "current_namespace", lambda default="kubeflow": "kubeflow-user-example-com")
    base = {f.name: getattr(PipelineConfig(), f.name) for f in dataclasses.fields(PipelineConfig)
            if f.name in check_params.component_spec.inputs}
    images = dict(cpu_image="registry.example/hpa:cpu", cuda_image="registry.example/hpa:cuda")
    cpu = check_params.python_func(**{**base, "gpus": 0}, **images)
    assert (cpu.gpu_limit, cpu.train_image) == ("", "registry.example/hpa:cpu")
    assert cpu.store_uri == "s3://mlpipeline/private/kubeflow-user-example-com/hpa-kfp"
    gpu = check_params.python_func(**{**base, "gpus": 2}, **images)
    assert (gpu.gpu_limit, gpu.train_image) == ("2", "registry.example/hpa:cuda")
    with pytest.raises(ConfigError, match="num_nodes=2: this is the single-pod pipeline"):
        check_params.python_func(**{**base, "num_nodes": 2}, **images)
    assert check_params.python_func(**{**base, "num_nodes": 2}, multi_node=True, **images).gpu_limit == ""
    with pytest.raises(ConfigError, match="cuda_image='': expected the image reference fixed at compile time"):
        check_params.python_func(**base, cpu_image="registry.example/hpa:cpu", cuda_image="")
    with pytest.raises(ConfigError, match=r"store_uri=.*only placeholder is \{namespace\}"):
        check_params.python_func(**{**base, "store_uri": "s3://mlpipeline/{user}/x"}, **images)


def test_images_given_at_compile_time_replace_every_default(tmp_path):
    """HPA_IMAGE / HPA_CUDA_IMAGE at compile time: neither default tag appears in either compiled pipeline,
    and the training pods, Katib trials and TrainJobs take the image check-params chose from them."""
    from hpa.config import DEFAULT_CUDA_IMAGE, DEFAULT_IMAGE

    env = {**__import__("os").environ, "HPA_IMAGE": "registry.example/team/hpa:1.2", "HPA_CUDA_IMAGE":
           "registry.example/team/hpa:1.2-cuda"}
    code = "import sys, pipeline; pipeline.compile_all(__import__('pathlib').Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=ROOT)
    for name in ("hpa_pipeline.yaml", "hpa_pipeline_multinode.yaml"):
        text = (tmp_path / "compiled" / name).read_text()
        assert DEFAULT_IMAGE not in text and "ghcr.io/hpa-kfp" not in text, name
        spec, _ = load_compiled(tmp_path / "compiled" / name)
        checked = spec["root"]["dag"]["tasks"]["check-params"]["inputs"]["parameters"]
        assert checked["cpu_image"]["runtimeValue"]["constant"] == "registry.example/team/hpa:1.2"
        assert checked["cuda_image"]["runtimeValue"]["constant"] == "registry.example/team/hpa:1.2-cuda"
        tasks = {n: t for n, (t, _) in all_tasks(spec).items()}
        users = {"katib-tune": "trial_image"}
        users.update({t: "image" for t in tasks if t.startswith("train-distributed")})
        for task, key in users.items():
            ref = tasks[task]["inputs"]["parameters"][key]
            # inside the katib-tune condition group the output arrives as the group's input
            assert ref.get("taskOutputParameter", {}).get("outputParameterKey") == "train_image" or \
                ref.get("componentInputParameter") == "pipelinechannel--check-params-train_image", (name, task, ref)
    assert DEFAULT_CUDA_IMAGE.startswith(DEFAULT_IMAGE)  # so the check above covers both tags


def test_multinode_pipeline_trains_with_trainjobs(compiled_multinode):
    """The multi-node pipeline: every model x fold through train-distributed, no condition on num_nodes and no
    artifact dsl.OneOf (which the 2.16 backend cannot resolve); num_nodes defaults to 2 there."""
    spec, _ = compiled_multinode
    tasks = spec["root"]["dag"]["tasks"]
    loop, loop_task = training_loop(spec)
    body = spec["components"][loop_task["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["train-distributed"] and "train" not in all_tasks(spec)
    params = body["train-distributed"]["inputs"]["parameters"]
    for key, run_param in (("num_nodes", "num_nodes"), ("gpus_per_node", "gpus"), ("node_selector", "node_selector"),
                           ("tolerations", "tolerations")):
        assert params[key]["componentInputParameter"] == f"pipelinechannel--{run_param}"
        channel = loop_task["inputs"]["parameters"][f"pipelinechannel--{run_param}"]
        assert channel["componentInputParameter"] == run_param
    assert loop in tasks["compare-plots"]["dependentTasks"] and loop in tasks["ensemble"]["dependentTasks"]
    assert spec["root"]["inputDefinitions"]["parameters"]["num_nodes"]["defaultValue"] == 2
    for comp in spec["components"].values():
        for out in comp.get("dag", {}).get("outputs", {}).get("artifacts", {}).values():
            assert len(out["artifactSelectors"]) == 1, "artifact dsl.OneOf needs KFP backend >= 2.17"


def test_kubernetes_settings(compiled):
    spec, k8s = compiled
    from hpa.config import KAGGLE_SECRET_KEYS, KAGGLE_SECRET_NAME, S3_SECRET_KEYS, S3_SECRET_NAME

    def secret_env(executor):
        return {(s["secretName"], e["secretKey"], e["envVar"]) for s in executor.get("secretAsEnv", [])
                for e in s["keyToEnv"]}

    s3 = {(S3_SECRET_NAME, key, env) for key, env in S3_SECRET_KEYS.items()}
    for name in ["exec-download", "exec-montage", "exec-split", "exec-pack", "exec-train", "exec-submit"]:
        assert s3 <= secret_env(k8s[name]), f"{name} lacks the S3 secret env"
    kaggle = {(KAGGLE_SECRET_NAME, key, env) for key, env in KAGGLE_SECRET_KEYS.items()}
    assert kaggle <= secret_env(k8s["exec-submit"])
    assert all(not (kaggle & secret_env(e)) for n, e in k8s.items() if n != "exec-submit"), \
        "Kaggle keys only for submit"
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
    for stage in ["download", "split", "pack", "train", "ensemble", "compare-plots"]:
        assert tasks[stage]["cachingOptions"]["enableCache"] is True


@pytest.mark.parametrize("which", ["compiled", "compiled_multinode"])
def test_every_parameter_has_default_and_description(which, request, pipeline_module):
    spec, _ = request.getfixturevalue(which)
    params = spec["root"]["inputDefinitions"]["parameters"]
    # the single-pod run form has no num_nodes (issue 22 item 13)
    expected = set(pipeline_module.parameter_names()) - (set() if which == "compiled_multinode" else
                                                         set(pipeline_module.NOT_IN_SINGLE_POD))
    assert set(params) == expected
    for name, p in params.items():
        assert "defaultValue" in p, f"parameter {name} has no default"
        assert len(p.get("description", "")) > 10, f"parameter {name} has no description"
    from hpa.config import PipelineConfig

    defaults = {**dataclasses.asdict(PipelineConfig()),
                **(pipeline_module.MULTINODE_DEFAULTS if which == "compiled_multinode" else {})}
    for name, value in defaults.items():
        if name in params:
            assert params[name]["defaultValue"] == value, name


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


def test_weights_reach_every_training_pod(compiled, compiled_multinode):
    """The `weights` run parameter (per model, issue 22 item 4) is validated by check-params, whose training plan
    gives each training task its own model's source (the loop item's weights); Katib trials (katib-tune) get the
    run parameter and pick their model's; the TrainJobs' `python -m hpa train` args carry the task's."""
    from hpa import katib, train_distributed

    for spec, _ in (compiled, compiled_multinode):
        tasks = {name: task for name, (task, _) in all_tasks(spec).items()}
        users = [n for n in tasks if n.startswith(("train", "katib-tune", "check-params"))]
        assert len(users) == 3, users
        for name in users:
            ref = tasks[name]["inputs"]["parameters"]["weights"]
            if name.startswith("train"):  # the loop item's "weights" field
                assert ref["parameterExpressionSelector"] == 'parseJson(string_value)["weights"]', (name, ref)
            else:
                assert ref["componentInputParameter"] in ("weights", "pipelinechannel--weights"), (name, ref)
    job = train_distributed.render(train_distributed.DistributedConfig(weights="s3://mlpipeline/shared/w/resnet18.pth",
                                                                       image="registry.example/hpa:cuda"))
    args = job["spec"]["trainer"]["args"]
    assert args[args.index("--weights") + 1] == "s3://mlpipeline/shared/w/resnet18.pth"
    config = train_distributed.DistributedConfig(image="registry.example/hpa:cuda")
    assert "--weights" not in train_distributed.train_args(config)
    exp = katib.render_experiment(katib.KatibConfig(weights="imagenet", image="registry.example/hpa:cuda", dataset="d"))
    assert "--weights" in str(exp) and "imagenet" in str(exp)
