"""kfp.local in backend-strict mode (cluster.backend_rules.strict_local), on small real pipelines.

Plain kfp.local looks a task's componentInputParameter up through every enclosing DAG (kfp/local/io.py
IOStore.get_parent_input); the KFP backend driver looks only in the immediate parent DAG's inputs
(kubeflow/pipelines backend/src/v2/driver/resolve.go, resolveInputParameter: "parent DAG does not have input
parameter", 2.15.0-2.17.0) and reads runtime pod-spec values with GetStringValue()
(resolve.go resolvePodSpecInputRuntimeParameter; driver.go initPodSpecPatch). The fixture `unregistered`
reproduces break 1 of issue 11: kfp 2.17's set_accelerator_type/limit do not register their channels on the
enclosing condition group, so only an outer group receives them. It passes plain kfp.local and fails strict.
"""

import sys
import threading
from typing import List, NamedTuple
from pathlib import Path

import pytest
import yaml
from kfp import compiler, components, dsl

import kfp.local

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster import BackendResolutionError, check_pipeline_spec, strict_local  # noqa: E402

IMAGE = "python:3.11"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def add(x: int) -> int:
    return x + 1


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def note_int(gpus: int, acc: str) -> str:
    return f"{gpus} x {acc}"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def note(gpus: str, acc: str) -> str:
    return f"{gpus} x {acc}"


@dsl.pipeline(name="unregistered")
def unregistered(gpus: int = 1, acc: str = "nvidia.com/gpu", flag: bool = True):
    """Break 1: the outer group receives gpus/acc (note_int's arguments); the inner `gpu-group` does not."""
    with dsl.If(flag == True, name="outer"):  # noqa: E712 - a KFP condition
        note_int(gpus=gpus, acc=acc)
        with dsl.If(flag == True, name="gpu-group"):  # noqa: E712
            add(x=1).set_accelerator_type(acc).set_accelerator_limit(gpus)


@dsl.pipeline(name="registered")
def registered(gpus: str = "1", acc: str = "nvidia.com/gpu", flag: bool = True):
    with dsl.If(flag == True, name="outer"):  # noqa: E712
        note(gpus=gpus, acc=acc)
        with dsl.If(flag == True, name="gpu-group"):  # noqa: E712
            train = add(x=1).set_accelerator_type(acc).set_accelerator_limit(gpus)
            train.register_pipeline_channels([gpus, acc])


@dsl.pipeline(name="as-arguments")
def as_arguments(gpus: str = "2", acc: str = "nvidia.com/gpu", flag: bool = True):
    """The accelerator values also go to the task as arguments, which registers them on the group."""
    with dsl.If(flag == True, name="gpu-group"):  # noqa: E712
        note(gpus=gpus, acc=acc).set_accelerator_type(acc).set_accelerator_limit(gpus)


@dsl.pipeline(name="registered-int")
def registered_int(gpus: int = 1, acc: str = "nvidia.com/gpu", flag: bool = True):
    """Channels registered, but the count is an integer: on the cluster no GPU is requested (break 2)."""
    with dsl.If(flag == True, name="gpu-group"):  # noqa: E712
        train = add(x=1).set_accelerator_type(acc).set_accelerator_limit(gpus)
        train.register_pipeline_channels([gpus, acc])


@dsl.pipeline(name="resources")
def resources(cpu: str = "500m", memory: str = "1Gi", image: str = "python:3.11-slim", run_it: bool = False):
    add(x=1).set_cpu_limit(cpu).set_memory_request(memory).set_container_image(image)
    with dsl.If(run_it == True, name="skipped"):  # noqa: E712
        add(x=2)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plus(x: int, y: int) -> int:
    return x + y


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def total(xs: list) -> str:
    return str(sum(xs))


@dsl.pipeline(name="loop")
def loop(xs: list = [1, 2, 3], y: int = 10, flag: bool = True) -> str:
    """ParallelFor, a condition inside it, an outer parameter and dsl.Collected: compiled right, runs strict."""
    with dsl.ParallelFor(xs) as x:
        with dsl.If(flag == True, name="inside"):  # noqa: E712
            summand = plus(x=x, y=y)
    return total(xs=dsl.Collected(summand.output)).output


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_and_tag() -> NamedTuple("Outputs", [("plan", list), ("tag", str)]):
    from collections import namedtuple

    return namedtuple("Outputs", ["plan", "tag"])([{"arch": "a", "fold": 0}, {"arch": "b", "fold": 1}], "v1")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def label(arch: str, fold: int, tag: str) -> str:
    return f"{arch}-{int(fold)}-{tag}"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def join(labels: List[str]) -> str:
    return ",".join(sorted(labels))


@dsl.pipeline(name="loop-over-named-output")
def loop_over_named_output() -> str:
    """The pipeline's training loop in small: items from one named output of a task, the body reading another
    output of the same task and fields of the item, the results collected."""
    made = plan_and_tag()
    with dsl.ParallelFor(made.outputs["plan"], name="plan") as item:
        one = label(arch=item.arch, fold=item.fold, tag=made.outputs["tag"])
    return join(labels=dsl.Collected(one.output)).output


@dsl.pipeline(name="loop-over-input")
def loop_over_input(plan: list = [{"arch": "a", "fold": 0}, {"arch": "b", "fold": 1}]) -> str:
    """Items from a pipeline input (kfp.local finds those), the body reading another task's output."""
    made = plan_and_tag()
    with dsl.ParallelFor(plan, name="plan") as item:
        one = label(arch=item.arch, fold=item.fold, tag=made.outputs["tag"])
    return join(labels=dsl.Collected(one.output)).output


@pytest.fixture
def local(tmp_path):
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   raise_on_error=True)
    return tmp_path


def test_break1_passes_plain_kfp_local_and_fails_strict(local):
    # the static check agrees with the strict run
    path = local / "unregistered.yaml"
    compiler.Compiler().compile(unregistered, str(path))
    assert {(v.rule, v.parameter) for v in check_pipeline_spec(path) if v.rule == "R1"} == {
        ("R1", "pipelinechannel--gpus"), ("R1", "pipelinechannel--acc")}

    unregistered(gpus=1)  # plain kfp.local (raise_on_error=True): found in the outer group, runs

    with pytest.raises(BackendResolutionError) as caught, strict_local():
        unregistered(gpus=1)
    err = caught.value
    assert err.task == "add" and err.parameter in ("pipelinechannel--gpus", "pipelinechannel--acc")
    text = str(err)
    assert "parent DAG does not have input parameter pipelinechannel--gpus" in text
    assert "parent DAG does not have input parameter pipelinechannel--acc" in text
    assert "resolve.go" in text


def test_registered_channels_pass_strict_and_request_the_gpu(local):
    with strict_local() as run:
        registered(gpus="1")
    assert run.pod("add").limits == {"nvidia.com/gpu": "1"}
    assert run.pod("add").image == IMAGE and run.pod("note").limits == {}


def test_channels_passed_as_arguments_pass_strict(local):
    with strict_local() as run:
        as_arguments(gpus="2")
    assert run.pod("note").limits == {"nvidia.com/gpu": "2"}


def test_integer_accelerator_count_fails_strict_and_a_string_passes(local):
    registered_int(gpus=1)  # plain kfp.local ignores resources: it runs
    with pytest.raises(BackendResolutionError) as caught, strict_local():
        registered_int(gpus=1)
    assert caught.value.task == "add" and caught.value.parameter == "pipelinechannel--gpus"
    assert "GetStringValue()" in str(caught.value) and "is a int, not a string" in str(caught.value)

    with strict_local() as run:
        registered(gpus="1")
    assert run.pod("add").limits["nvidia.com/gpu"] == "1"


def test_runtime_cpu_memory_and_image_are_resolved_and_validated(local):
    with strict_local() as run:
        resources()
    pod = run.pod("add")  # the `skipped` branch did not run: one pod only
    assert (pod.image, pod.limits, pod.requests) == ("python:3.11-slim", {"cpu": "500m"}, {"memory": "1Gi"})

    with pytest.raises(BackendResolutionError, match="'lots': failed to init podSpecPatch: quantities must match"):
        with strict_local():
            resources(cpu="lots")
    with pytest.raises(BackendResolutionError, match="container image resolves to \"\""):
        with strict_local():
            resources(image="")


def test_condition_reads_the_condition_tasks_own_inputs(local, tmp_path):
    """A condition on `flag`, which the group task does not receive (it has `pipelinechannel--flag`): the driver
    fails (CEL over the task's own inputs: no such key); plain kfp.local finds `flag` among the root's inputs."""
    path = tmp_path / "registered.yaml"
    compiler.Compiler().compile(registered, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    outer = next(t for t in docs[0]["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "outer")
    assert outer["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--flag'] == true"
    outer["triggerPolicy"]["condition"] = "inputs.parameter_values['flag'] == true"
    broken = components.load_component_from_text(yaml.safe_dump_all(docs))

    with strict_local() as run:
        registered(gpus="1")  # the compiled condition is fine
    assert sorted(p.task for p in run.pods) == ["add", "note"]
    with strict_local() as run:
        registered(gpus="1", flag=False)  # and evaluates to false: nothing in the group runs
    assert run.pods == []

    broken(gpus="1")  # plain kfp.local runs it
    with pytest.raises(BackendResolutionError, match=r"reads inputs.parameter_values\['flag'\], "
                                                     "which is not an input of the task"):
        with strict_local():
            broken(gpus="1")


def test_nested_dag_gets_only_what_its_task_passes(local, tmp_path):
    path = tmp_path / "registered.yaml"
    compiler.Compiler().compile(registered, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    outer = next(t for t in docs[0]["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "outer")
    del outer["inputs"]["parameters"]["pipelinechannel--acc"]  # the DAG declares it, its task no longer passes it
    broken = components.load_component_from_text(yaml.safe_dump_all(docs))
    with pytest.raises(BackendResolutionError, match="neither value nor default value provided for non-optional "
                                                     "parameter 'pipelinechannel--acc'"):
        with strict_local():
            broken(gpus="1")


def test_parallel_for_condition_and_collected_run_strict(local, tmp_path):
    path = tmp_path / "loop.yaml"
    compiler.Compiler().compile(loop, str(path))
    assert check_pipeline_spec(path) == []
    assert float(loop().output) == 36
    with strict_local() as run:
        assert float(loop().output) == 36
    assert sorted(p.task for p in run.pods) == ["plus", "plus", "plus", "total"]


def test_parallel_for_over_a_named_output_runs_strict_as_on_the_backend(local, tmp_path):
    """Two kfp.local 2.17 faults that the backend does not have (found with the training loop over check-params'
    train_plan): plain kfp.local finds a ParallelFor's items only as an enclosing DAG input or a task output named
    "Output" (enhanced_dag_orchestrator._run_parallel_for_task), and it replaces every task-output input of the
    loop with the item (task_spec_utils.create_parameter_loop_iteration_task_spec). The backend resolves the
    loop task's inputs like any task's and reads the items from them (kubeflow/pipelines 2.16.0
    backend/src/v2/driver/dag.go); strict mode does the same."""
    path = tmp_path / "named.yaml"
    compiler.Compiler().compile(loop_over_named_output, str(path))
    assert check_pipeline_spec(path) == []
    with pytest.raises(ValueError, match="plan-and-tag-plan' not found"):  # plain kfp.local: no items
        loop_over_named_output()
    with strict_local() as run:
        assert loop_over_named_output().output == "a-0-v1,b-1-v1"
    # plain kfp.local hands the loop item to the body in place of the other task's output `tag`
    plain = loop_over_input().output  # e.g. "a-0-{'arch': 'a', 'fold': 0.0},b-1-{...}" (Struct key order varies)
    assert "v1" not in plain and plain.startswith("a-0-{") and "'arch': 'b'" in plain
    with strict_local():
        assert loop_over_input().output == "a-0-v1,b-1-v1"
    assert sorted(p.task for p in run.pods) == ["join", "label", "label", "plan-and-tag"]


def _patched_attributes():
    from kfp.local import io
    from kfp.local.orchestrator import enhanced_dag_orchestrator, task_executor, task_spec_utils

    return {
        "get_parent_input": io.IOStore.__dict__["get_parent_input"],
        "execute_single_task": task_executor.execute_single_task,
        "build_nested_dag_arguments": task_spec_utils.build_nested_dag_arguments,
        "run_enhanced_dag": enhanced_dag_orchestrator.run_enhanced_dag,
        "evaluate_condition": enhanced_dag_orchestrator.ConditionEvaluator.__dict__["evaluate_condition"],
        "_run_parallel_for_task": enhanced_dag_orchestrator._run_parallel_for_task,
        "create_parameter_loop_iteration_task_spec": task_spec_utils.create_parameter_loop_iteration_task_spec,
    }


def test_strict_local_nests_restores_everything_and_survives_errors(local):
    before = _patched_attributes()
    with strict_local() as outer:
        inside = _patched_attributes()
        assert all(inside[k] is not before[k] for k in before)
        with strict_local() as inner:
            assert _patched_attributes() == inside  # nested: one installation
            registered(gpus="1")
        assert _patched_attributes() == inside  # still strict after the inner block
        with pytest.raises(BackendResolutionError):
            with strict_local():
                registered_int(gpus=1)
        assert _patched_attributes() == inside
    assert _patched_attributes() == before
    assert sorted(p.task for p in inner.pods) == sorted(p.task for p in outer.pods) == ["add", "note"]

    with pytest.raises(ZeroDivisionError):
        with strict_local():
            1 / 0
    assert _patched_attributes() == before
    unregistered(gpus=1)  # lenient again


def test_strict_local_from_two_threads(local):
    errors = []

    def enter_and_leave():
        try:
            for _ in range(50):
                with strict_local():
                    pass
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    before = _patched_attributes()
    threads = [threading.Thread(target=enter_and_leave) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and _patched_attributes() == before
