"""Static conformance of compiled pipelines with the KFP backend (cluster.backend_rules).

Each rule was read from kubeflow/pipelines at 2.15.0, 2.16.0 and 2.17.0; the rule's citation names the file
(e.g. R1: backend/src/v2/driver/resolve.go resolveInputParameter, "parent DAG does not have input parameter").
What is checked here:

- the copy of the pipeline as compiled before issue 11 (tests/fixtures/hpa_pipeline_pre_issue11.yaml, commit
  9713572) fails for the reasons issue 11 reported: R1 (the `single-pod` group does not receive gpus and
  accelerator_type), R2 (integer gpus is read with GetStringValue()), R3 at 2.16.0 (artifact dsl.OneOf);
- every compiled/*.yaml passes at 2.16.0 and 2.17.0;
- the "Supported versions" table of docs/cluster.md states a KFP backend minimum that really suffices;
- each rule fires on a small spec that breaks it and stays silent on one that does not.
"""

import copy
import functools
import re
import sys
import tempfile
from pathlib import Path

import pytest
from kfp import compiler, dsl, kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster import RULES, Violation, check_pipeline_spec, load_pipeline_spec, min_backend_version  # noqa: E402

PRE_FIX = ROOT / "tests" / "fixtures" / "hpa_pipeline_pre_issue11.yaml"
COMPILED = sorted((ROOT / "compiled").glob("*.yaml"))
IMAGE = "python:3.11"


def _rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def _summary(violations: list[Violation]) -> set[tuple[str, str, str]]:
    return {(v.rule, v.task_name, v.parameter) for v in violations}


# ------------------------------------------------------------------------------------------ the old YAML
def test_pre_issue11_pipeline_fails_for_the_reported_reasons():
    """Break 1 (R1), break 2 (R2) and break 5's artifact OneOf (R3) of issue 11, found in the old YAML."""
    at_216 = check_pipeline_spec(PRE_FIX, backend="2.16.0")
    trainers = ("train-resnet18", "train-se-resnet")
    expected = (
        {("R1", t, p) for t in trainers for p in ("pipelinechannel--gpus", "pipelinechannel--accelerator_type")}
        | {("R2", t, "pipelinechannel--gpus") for t in trainers}
        | {("R3", "condition-branches-5", f"pipelinechannel--condition-branches-5-oneof-{i}") for i in range(1, 7)}
    )
    assert _summary(at_216) == expected, "\n".join(map(str, at_216))

    for v in at_216:
        if v.rule in ("R1", "R2"):
            # the training tasks sit in the `single-pod` condition group (condition-7) of condition-branches-5
            assert v.task == f"condition-branches-5/condition-7/{v.task_name}"
            assert "resolve.go" in v.citation and v.since is None
        if v.rule == "R1":
            assert f"parent DAG does not have input parameter {v.parameter}" in v.message
            assert "'single-pod'" in v.message
        if v.rule == "R2":
            assert "GetStringValue()" in v.message and "NUMBER_INTEGER" in v.message
            assert "resources.accelerator.resourceCount" in v.message
        if v.rule == "R3":
            assert v.since == "2.17.0" and "13436" in v.citation

    # 2.17.0 resolves artifact OneOf: only R1 and R2 remain.
    at_217 = check_pipeline_spec(PRE_FIX, backend="2.17.0")
    assert _summary(at_217) == {s for s in expected if s[0] != "R3"}
    with pytest.raises(ValueError, match="runs on no KFP backend release"):
        min_backend_version(PRE_FIX)


# ------------------------------------------------------------------------------------------ compiled/
def test_there_are_compiled_pipelines():
    assert (ROOT / "compiled" / "hpa_pipeline.yaml") in COMPILED


@pytest.mark.parametrize("backend", ["2.16.0", "2.17.0"])
@pytest.mark.parametrize("path", COMPILED, ids=[p.name for p in COMPILED])
def test_compiled_pipeline_conforms(path, backend):
    violations = check_pipeline_spec(path, backend=backend)
    assert not violations, f"{path.name} on KFP backend {backend}:\n" + "\n".join(map(str, violations))


def _supported_versions() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "cluster.md").read_text()
    section = re.search(r"^## Supported versions\s*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    if section is None:
        pytest.fail("docs/cluster.md has no '## Supported versions' section (a table with the header "
                    "'| component | minimum | tested against | notes |')")
    lines = [ln.strip() for ln in section.group(1).splitlines() if ln.strip().startswith("|")]
    if not lines or [c.strip() for c in lines[0].strip("|").split("|")] != ["component", "minimum",
                                                                              "tested against", "notes"]:
        pytest.fail("docs/cluster.md '## Supported versions': expected a table whose header is "
                    f"'| component | minimum | tested against | notes |', got {lines[:1]}")
    rows = {}
    for line in lines[2:]:  # header, separator
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = {"minimum": cells[1], "tested against": cells[2] if len(cells) > 2 else ""}
    return rows


def _versions_in(cell: str) -> list[str]:
    return re.findall(r"\d+\.\d+(?:\.\d+)?", cell)


def test_supported_versions_table_is_well_formed():
    rows = _supported_versions()
    known = {"KFP backend", "Kubeflow Trainer", "Training Operator", "Katib", "Kubeflow Platform"}
    assert "KFP backend" in rows, f"no 'KFP backend' row in the table (rows: {sorted(rows)})"
    assert set(rows) <= known, f"unexpected rows {sorted(set(rows) - known)}; expected some of {sorted(known)}"
    for name, row in rows.items():
        assert len(_versions_in(row["minimum"])) == 1, f"{name}: minimum {row['minimum']!r} is not one version"
        assert _versions_in(row["tested against"]), f"{name}: 'tested against' {row['tested against']!r} has no version"


def test_stated_kfp_backend_minimum_suffices_for_every_compiled_pipeline():
    """The table's KFP backend minimum runs every compiled pipeline: no feature it uses is newer."""
    row = _supported_versions()["KFP backend"]
    (minimum,) = _versions_in(row["minimum"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", minimum), f"KFP backend minimum {minimum!r}: expected X.Y.Z"
    for path in COMPILED:
        needed = min_backend_version(path)
        assert tuple(map(int, needed.split("."))) <= tuple(map(int, minimum.split("."))), (
            f"{path.name} needs KFP backend {needed}, but docs/cluster.md states {minimum}")
        assert check_pipeline_spec(path, backend=minimum) == []
    for tested in _versions_in(row["tested against"]):
        for path in COMPILED:
            assert check_pipeline_spec(path, backend=tested) == [], f"{path.name} at {tested}"


def test_submit_refuses_what_the_table_does_not_support():
    """`pipeline.py submit` refuses a KFP backend older than the table's minimum (default s3_endpoint), or
    than what the compiled YAML itself needs when the user brings an s3_endpoint (then 2.15.0 works)."""
    import pipeline

    (minimum,) = _versions_in(_supported_versions()["KFP backend"]["minimum"])
    assert pipeline.MIN_KFP_BACKEND == minimum
    needed = max((min_backend_version(p) for p in COMPILED), key=lambda v: tuple(map(int, v.split("."))))
    assert pipeline.MIN_KFP_BACKEND_OWN_ENDPOINT == needed


def test_table_names_the_trainer_katib_and_training_operator_releases_the_schemas_come_from():
    """The Trainer, Katib and Training Operator rows state exactly the releases whose CRDs / OpenAPI the
    rendered objects are validated against (hpa/schemas, tests/test_k8s_conformance.py)."""
    from hpa import k8s_manifests, train_distributed

    rows = _supported_versions()
    trainer = sorted(v.lstrip("v") for versions in train_distributed.TRAINER_API_VERSIONS.values() for v in versions)
    assert sorted(_versions_in(rows["Kubeflow Trainer"]["tested against"])) == sorted(
        v.lstrip("v") for v in k8s_manifests.TRAINJOB_CRDS) == trainer
    assert _versions_in(rows["Kubeflow Trainer"]["minimum"]) == [
        min(trainer, key=lambda v: tuple(map(int, v.split("."))))]
    vendored = (ROOT / "hpa" / "schemas" / "README.md").read_text()
    for row, schema in (("Katib", "katib/openapi-spec.swagger.json"),
                        ("Training Operator", "training-operator/kubeflow.org_pytorchjobs.yaml")):
        (tag,) = re.findall(rf"\| `{re.escape(schema)}` \|[^\n]*?tag `v([\d.]+)`", vendored)
        assert _versions_in(rows[row]["tested against"]) == [tag] == _versions_in(rows[row]["minimum"]), row


# ------------------------------------------------------------------------------------------ small specs
@dsl.component(base_image=IMAGE, install_kfp_package=False)
def add(x: int) -> int:
    return x + 1


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def take_int(gpus: int, acc: str) -> str:
    return f"{gpus} {acc}"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def make_model(model: dsl.Output[dsl.Model]):
    with open(model.path, "w") as f:
        f.write("m")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def use_model(model: dsl.Input[dsl.Model]) -> str:
    return model.path


@dsl.pipeline(name="unregistered")
def unregistered(gpus: int = 1, acc: str = "nvidia.com/gpu", flag: bool = True):
    """Break 1 in small: the outer group receives gpus/acc (take_int's arguments), the inner one does not."""
    with dsl.If(flag == True, name="outer"):  # noqa: E712 - a KFP condition, not a Python comparison
        take_int(gpus=gpus, acc=acc)
        with dsl.If(flag == True, name="gpu-group"):  # noqa: E712
            add(x=1).set_accelerator_type(acc).set_accelerator_limit(gpus)


@dsl.pipeline(name="registered-int")
def registered_int(gpus: int = 1, acc: str = "nvidia.com/gpu", flag: bool = True):
    with dsl.If(flag == True, name="gpu-group"):  # noqa: E712
        task = add(x=1).set_accelerator_type(acc).set_accelerator_limit(gpus)
        task.register_pipeline_channels([gpus, acc])


@dsl.pipeline(name="registered-str")
def registered_str(gpus: str = "1", acc: str = "nvidia.com/gpu", flag: bool = True, cpu: str = "500m",
                   image: str = "python:3.12"):
    with dsl.If(flag == True, name="gpu-group"):  # noqa: E712
        task = add(x=1).set_accelerator_type(acc).set_accelerator_limit(gpus).set_cpu_limit(cpu)
        task.set_container_image(image)
        task.register_pipeline_channels([gpus, acc, cpu])


@dsl.pipeline(name="artifact-oneof")
def artifact_oneof(flag: bool = True):
    with dsl.If(flag == True):  # noqa: E712
        a = make_model()
    with dsl.Else():
        b = make_model()
    use_model(model=dsl.OneOf(a.outputs["model"], b.outputs["model"]))


@dsl.pipeline(name="param-oneof")
def param_oneof(flag: bool = True):
    with dsl.If(flag == True):  # noqa: E712
        a = add(x=1)
    with dsl.Else():
        b = add(x=2)
    add(x=dsl.OneOf(a.output, b.output))


@dsl.pipeline(name="with-k8s")
def with_k8s(selector: dict = {}, tolerations: list = [], flag: bool = True):
    with dsl.If(flag == True, name="grp"):  # noqa: E712
        task = add(x=1)
        kubernetes.add_node_selector_json(task, selector)
        kubernetes.add_toleration_json(task, tolerations)
        kubernetes.use_secret_as_env(task, secret_name="s3-credentials",
                                     secret_key_to_env={"accesskey": "HPA_S3_ACCESS_KEY"})


@dsl.pipeline(name="chain")
def chain(x: int = 1):
    first = add(x=x)
    add(x=first.output)


@dsl.pipeline(name="security-context")
def security_context():
    kubernetes.set_security_context(add(x=1), run_as_user=1000)


@dsl.pipeline(name="create-pvc")
def create_pvc():
    pvc = kubernetes.CreatePVC(pvc_name_suffix="-data", access_modes=["ReadWriteOnce"], size="1Gi",
                               storage_class_name="standard",
                               data_source={"kind": "VolumeSnapshot", "name": "snapshot"})
    kubernetes.mount_pvc(add(x=1), pvc_name=pvc.outputs["name"], mount_path="/data")


@functools.lru_cache(maxsize=None)
def _compile(pipeline) -> tuple[dict, dict | None]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        return load_pipeline_spec(path)


def spec_of(pipeline) -> list[dict]:
    """[pipeline spec, platform spec] of a compiled pipeline, a fresh copy to edit."""
    return [d for d in copy.deepcopy(_compile(pipeline)) if d is not None]


def _task(docs: list[dict], component: str, task: str) -> dict:
    comp = docs[0]["root"] if component == "root" else docs[0]["components"][component]
    return comp["dag"]["tasks"][task]


def _group(docs: list[dict], display: str) -> str:
    """The component name of the DAG whose task is called `display` (a dsl.If name)."""
    def find(dag: dict) -> str | None:
        for t in dag["dag"]["tasks"].values():
            comp = docs[0]["components"][t["componentRef"]["name"]]
            if t["taskInfo"]["name"] == display:
                return t["componentRef"]["name"]
            if "dag" in comp and (hit := find(comp)):
                return hit
        return None
    return find(docs[0]["root"])


# Each rule: (a spec that breaks it, a spec that does not, the backend to check at).
def _r1_bad():
    return spec_of(unregistered)


def _r1_good():
    return spec_of(registered_str)


def _r2_bad():
    return spec_of(registered_int)


def _r3_bad():
    return spec_of(artifact_oneof)


def _r4_bad():
    docs = spec_of(chain)
    docs[0]["root"]["dag"]["tasks"]["add"]["retryPolicyy"] = {"maxRetryCount": 2}  # misspelt field
    return docs


def _r5_bad():
    docs = spec_of(chain)
    _task(docs, "root", "add-2")["inputs"]["parameters"]["x"]["taskOutputParameter"]["producerTask"] = "nowhere"
    return docs


def _r6_bad():
    docs = spec_of(chain)
    docs[0]["deploymentSpec"]["executors"]["exec-add"]["container"]["env"] = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"}]
    return docs


def _r7_bad():
    docs = spec_of(registered_str)
    task = next(t for t in docs[0]["root"]["dag"]["tasks"].values() if "triggerPolicy" in t)
    # a condition on a pipeline parameter the group task does not receive (only `flag` is passed to it)
    task["triggerPolicy"]["condition"] = "inputs.parameter_values['pipelinechannel--mode'] == 'fast'"
    return docs


def _r8_bad():
    docs = spec_of(chain)
    _task(docs, "root", "add")["artifactIterator"] = {"items": {"inputArtifact": "models"}, "itemInput": "model"}
    return docs


def _r9_bad():
    docs = spec_of(chain)
    docs[0]["root"]["inputDefinitions"]["parameters"]["x"]["literals"] = [1, 2]
    return docs


def _r10_bad():
    docs = spec_of(chain)
    del _task(docs, "root", "add-2")["inputs"]["parameters"]["x"]
    return docs


def _r11_bad():
    docs = spec_of(with_k8s)
    group = _group(docs, "grp")
    docs[0]["components"][group]["inputDefinitions"]["parameters"]["pipelinechannel--selector"]["parameterType"] = \
        "STRING"
    return docs


RULE_CASES = {
    "R1": (_r1_bad, _r1_good, "2.16.0"),
    "R2": (_r2_bad, _r1_good, "2.16.0"),
    "R3": (_r3_bad, lambda: spec_of(param_oneof), "2.16.0"),
    "R4": (_r4_bad, lambda: spec_of(chain), "2.16.0"),
    "R5": (_r5_bad, lambda: spec_of(chain), "2.16.0"),
    "R6": (_r6_bad, lambda: spec_of(with_k8s), "2.16.0"),
    "R7": (_r7_bad, _r1_good, "2.16.0"),
    "R8": (_r8_bad, lambda: spec_of(chain), "2.17.0"),
    "R9": (_r9_bad, lambda: spec_of(chain), "2.15.0"),
    "R10": (_r10_bad, lambda: spec_of(chain), "2.16.0"),
    "R11": (_r11_bad, lambda: spec_of(with_k8s), "2.16.0"),
}


def test_every_rule_has_a_case():
    assert set(RULE_CASES) == set(RULES)
    for rule in RULES.values():
        assert "kubeflow/pipelines" in rule.citation and ("@ 2." in rule.citation or "2.16.0" in rule.citation), rule


@pytest.mark.parametrize("rule", sorted(RULE_CASES, key=lambda r: int(r[1:])))
def test_rule_fires_on_a_breaking_spec_and_not_on_a_good_one(rule):
    bad, good, backend = RULE_CASES[rule]
    fired = check_pipeline_spec(bad(), backend=backend)
    assert rule in _rules(fired), f"{rule} did not fire:\n" + "\n".join(map(str, fired))
    clean = check_pipeline_spec(good(), backend=backend)
    assert rule not in _rules(clean), "\n".join(map(str, clean))


# ------------------------------------------------------------------------------------------ rule details
def test_r1_names_the_task_its_group_and_both_channels():
    violations = [v for v in check_pipeline_spec(spec_of(unregistered)) if v.rule == "R1"]
    assert {(v.task_name, v.parameter) for v in violations} == {
        ("add", "pipelinechannel--gpus"), ("add", "pipelinechannel--acc")}
    assert all(v.task.endswith("/add") and v.task.count("/") == 2 for v in violations)  # outer/inner/add
    assert all("'gpu-group'" in v.message for v in violations)


def test_r1_covers_artifacts_resource_placeholders_and_platform_config():
    docs = spec_of(with_k8s)
    group = _group(docs, "grp")
    del docs[0]["components"][group]["inputDefinitions"]["parameters"]["pipelinechannel--selector"]
    v = [v for v in check_pipeline_spec(docs) if v.rule == "R1"]
    assert any("nodeSelector.nodeSelectorJson" in x.message and x.parameter == "pipelinechannel--selector" for x in v)

    docs = spec_of(registered_str)
    group = _group(docs, "gpu-group")
    del docs[0]["components"][group]["dag"]["tasks"]["add"]["inputs"]["parameters"]["pipelinechannel--image"]
    v = [v for v in check_pipeline_spec(docs) if v.rule == "R1"]
    assert [x.parameter for x in v] == ["pipelinechannel--image"]
    assert "executorInput did not contain container Image input parameter" in v[0].message

    docs = spec_of(artifact_oneof)
    use = _task(docs, "root", "use-model")
    use["inputs"]["artifacts"]["model"] = {"componentInputArtifact": "not-there"}
    v = [v for v in check_pipeline_spec(docs, backend="2.17.0") if v.rule == "R1"]
    assert [x.parameter for x in v] == ["not-there"] and "parent DAG does not have input artifact" in v[0].message


def test_r2_string_typed_runtime_values():
    v = [v for v in check_pipeline_spec(spec_of(registered_int)) if v.rule == "R2"]
    assert [(x.task_name, x.parameter) for x in v] == [("add", "pipelinechannel--gpus")]
    assert "NUMBER_INTEGER" in v[0].message and "no accelerator" in v[0].message
    # cpu, image and accelerator placeholders fed by strings: nothing to report
    assert check_pipeline_spec(spec_of(registered_str)) == []

    # a secret name from an integer parameter: resolveInputParameterStr fails ("Expected a string")
    docs = spec_of(with_k8s)
    docs[0]["root"]["inputDefinitions"]["parameters"]["n"] = {"parameterType": "NUMBER_INTEGER", "defaultValue": 1}
    group = _group(docs, "grp")
    docs[0]["components"][group]["inputDefinitions"]["parameters"]["n"] = {"parameterType": "NUMBER_INTEGER"}
    secret = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-add"]["secretAsEnv"][0]
    secret["secretNameParameter"] = {"componentInputParameter": "n"}
    v = [v for v in check_pipeline_spec(docs) if v.rule == "R2"]
    assert [x.parameter for x in v] == ["n"] and "resolveInputParameterStr" in v[0].message


def test_r3_only_before_2_17_and_min_backend_version():
    docs = spec_of(artifact_oneof)
    assert _rules(check_pipeline_spec(docs, backend="2.16.0")) == {"R3"}
    assert check_pipeline_spec(docs, backend="2.17.0") == []
    assert min_backend_version(docs) == "2.17.0"
    assert min_backend_version(spec_of(param_oneof)) == "2.15.0"  # parameter OneOf resolves in every release


def test_r4_reports_the_parse_error_and_the_schema_version():
    v = check_pipeline_spec(_r4_bad())
    assert [x.rule for x in v] == ["R4"] and "retryPolicyy" in v[0].message
    docs = spec_of(chain)
    docs[0]["schemaVersion"] = "2.0.0"
    assert any("schema version 2.1.0" in x.message for x in check_pipeline_spec(docs))
    docs = spec_of(with_k8s)
    docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-add"]["nodeSelectorr"] = {}
    v = check_pipeline_spec(docs)
    assert [x.task for x in v] == ["executors/exec-add"] and "failed to unmarshal kubernetes config" in v[0].message


def test_r5_sibling_outputs():
    v = check_pipeline_spec(_r5_bad())
    assert {(x.rule, x.task_name) for x in v} == {("R5", "add-2")} and "unknown producer task" in v[0].message
    docs = spec_of(chain)
    _task(docs, "root", "add-2")["inputs"]["parameters"]["x"]["taskOutputParameter"]["outputParameterKey"] = "Nope"
    v = check_pipeline_spec(docs)
    assert [(x.rule, x.parameter) for x in v] == [("R5", "Nope")]


def test_r6_references_and_secrets():
    v = check_pipeline_spec(_r6_bad())
    assert [(x.rule, x.parameter) for x in v] == [("R6", "AWS_SECRET_ACCESS_KEY")]
    assert "wJalrXUtnFEMI" not in str(v[0]), "the report must not repeat the secret"

    docs = spec_of(chain)
    docs[0]["root"]["inputDefinitions"]["parameters"]["api_token"] = {"parameterType": "STRING",
                                                                      "defaultValue": "abc123"}
    docs[0]["root"]["inputDefinitions"]["parameters"]["secret_name"] = {"parameterType": "STRING",
                                                                        "defaultValue": "s3-credentials"}
    docs[0]["root"]["inputDefinitions"]["parameters"]["tokenizer"] = {"parameterType": "STRING",
                                                                      "defaultValue": "bert-base"}
    assert [(x.rule, x.parameter) for x in check_pipeline_spec(docs)] == [("R6", "api_token")]
    docs = spec_of(chain)
    docs[0]["deploymentSpec"]["executors"]["exec-add"]["container"]["env"] = [
        {"name": "KAGGLE_KEY", "value": "0123abcd"}, {"name": "KAGGLE_SECRET_NAME", "value": "kaggle"},
        {"name": "MAX_TOKENS", "value": "512"}]
    assert [(x.rule, x.parameter) for x in check_pipeline_spec(docs)] == [("R6", "KAGGLE_KEY")]

    docs = spec_of(with_k8s)
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors["exec-gone"] = {"nodeSelector": {"labels": {"a": "b"}}}
    del executors["exec-add"]["secretAsEnv"][0]["secretName"]
    del executors["exec-add"]["secretAsEnv"][0]["secretNameParameter"]
    got = {(x.rule, x.task, x.parameter) for x in check_pipeline_spec(docs)}
    assert got == {("R6", "executors/exec-gone", "exec-gone"), ("R6", "executors/exec-add", "secretAsEnv[0]")}

    docs = spec_of(chain)
    docs[0]["components"]["comp-add"]["executorLabel"] = "exec-missing"
    assert ("R6", "exec-missing") in {(x.rule, x.parameter) for x in check_pipeline_spec(docs)}
    docs = spec_of(chain)
    _task(docs, "root", "add")["componentRef"]["name"] = "comp-missing"
    assert ("R6", "comp-missing") in {(x.rule, x.parameter) for x in check_pipeline_spec(docs)}


def test_r7_condition_and_items_read_the_tasks_own_inputs():
    v = check_pipeline_spec(_r7_bad())
    assert [(x.rule, x.parameter) for x in v] == [("R7", "pipelinechannel--mode")]
    assert "not an input of the task" in v[0].message
    docs = spec_of(chain)
    _task(docs, "root", "add")["parameterIterator"] = {"items": {"inputParameter": "pipelinechannel--xs"},
                                                       "itemInput": "pipelinechannel--xs-loop-item"}
    assert ("R7", "pipelinechannel--xs") in {(x.rule, x.parameter) for x in check_pipeline_spec(docs)}


def test_r8_no_backend_release_runs_artifact_iterators():
    for backend in ("2.15.0", "2.16.0", "2.17.0"):
        assert _rules(check_pipeline_spec(_r8_bad(), backend=backend)) == {"R8"}
    with pytest.raises(ValueError, match="R8"):
        min_backend_version(_r8_bad())


def test_r9_fields_newer_than_the_backend():
    assert _rules(check_pipeline_spec(_r9_bad(), backend="2.15.0")) == {"R9"}
    assert check_pipeline_spec(_r9_bad(), backend="2.16.0") == []
    assert min_backend_version(_r9_bad()) == "2.16.0"

    docs = spec_of(security_context)
    assert {(x.rule, x.parameter) for x in check_pipeline_spec(docs, "2.15.0")} == {("R9", "securityContext")}
    assert min_backend_version(docs) == "2.16.0"

    docs = spec_of(create_pvc)
    assert {(x.rule, x.parameter) for x in check_pipeline_spec(docs, "2.16.0")} == {("R9", "data_source")}
    assert min_backend_version(docs) == "2.17.0"

    docs = spec_of(chain) + [{"platforms": {"kubernetes": {"pipelineConfig": {"activeDeadlineSeconds": 60}}}}]
    assert {(x.rule, x.parameter) for x in check_pipeline_spec(docs, "2.16.0")} == {
        ("R9", "pipelineConfig.activeDeadlineSeconds")}
    assert check_pipeline_spec(docs, "2.17.0") == []


def test_r10_required_inputs():
    v = check_pipeline_spec(_r10_bad())
    assert [(x.rule, x.task_name, x.parameter) for x in v] == [("R10", "add-2", "x")]
    assert "neither value nor default value provided for non-optional parameter" in v[0].message


def test_r11_kubernetes_json_parameter_types():
    v = check_pipeline_spec(_r11_bad())
    assert [(x.rule, x.parameter) for x in v] == [("R11", "pipelinechannel--selector")]
    assert "STRUCT" in v[0].message


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="backend: expected a KFP release like '2.16.0'"):
        check_pipeline_spec(spec_of(chain), backend="2.16")
    with pytest.raises(ValueError, match="older than 2.15.0"):
        check_pipeline_spec(spec_of(chain), backend="2.14.0")
    with pytest.raises(ValueError, match="no such file"):
        check_pipeline_spec(ROOT / "compiled" / "missing.yaml")
    with pytest.raises(ValueError, match="platform spec; the PipelineSpec must come first"):
        check_pipeline_spec([{"platforms": {}}])
    assert min_backend_version(spec_of(chain)) == "2.15.0"
    for broken in ({"components": ["not", "a", "mapping"]}, {"root": {"dag": {"tasks": {"add": {"inputs": [1]}}}}}):
        docs = spec_of(chain)
        docs[0].update(broken)
        v = check_pipeline_spec(docs)  # reports, does not crash
        assert "R4" in {x.rule for x in v}, "\n".join(map(str, v))
