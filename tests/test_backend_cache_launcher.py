"""Strict kfp.local with the KFP backend's cache hits, DAG bookkeeping and launcher downloads (issue 22, items 1
and 2), on toy pipelines, and the IR simulator on the fixture copy of the pre-issue-22 compiled pipeline.

The rules (each cited in cluster/backend_cache.py and cluster/backend_launcher.py from kubeflow/pipelines
2.15.0-2.17.0): a cache hit is published CACHED and no launcher runs (driver/container.go Container(),
argocompiler/container.go `cached-decision`); only a launcher sets its DAG COMPLETE (launcher_v2.go Execute ->
metadata/client.go UpdateDAGExecutionsState); dsl.OneOf takes the first CACHED/COMPLETE branch or fails
"processing OneOf: No successful task found" (driver/resolve.go GetProducerTask); the launcher downloads every
input artifact and opens a bucket other than the pipeline root's with no session (launcher_v2.go
downloadArtifacts/fetchNonDefaultBuckets).
"""

import sys
from pathlib import Path

import pytest
import yaml
from kfp import dsl

import kfp.local

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.backend_cache import CacheStore  # noqa: E402
from cluster.backend_errors import LauncherDownloadError, OneOfResolutionError  # noqa: E402
from cluster.backend_rules import strict_local  # noqa: E402
from cluster.backend_simulate import simulate_run  # noqa: E402

IMAGE = "python:3.11"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def counted(tag: str, counter: str) -> str:
    """Appends a line to `counter` (a file) each time it really runs: cache hits leave it alone."""
    with open(counter, "a") as f:
        f.write(tag + "\n")
    return f"value-{tag}"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def consume(value: str, counter: str) -> str:
    with open(counter, "a") as f:
        f.write("consume\n")
    return value.upper()


@dsl.pipeline(name="oneof-cached")
def oneof_cached(flag: bool = True, counter: str = "") -> str:
    with dsl.If(flag == True):  # noqa: E712 - a KFP condition
        a = counted(tag="a", counter=counter)
    with dsl.Else():
        b = counted(tag="b", counter=counter)
    return consume(value=dsl.OneOf(a.output, b.output), counter=counter).output


@dsl.pipeline(name="oneof-uncached")
def oneof_uncached(flag: bool = True, counter: str = "") -> str:
    with dsl.If(flag == True):  # noqa: E712
        a = counted(tag="a", counter=counter).set_caching_options(False)
    with dsl.Else():
        b = counted(tag="b", counter=counter).set_caching_options(False)
    return consume(value=dsl.OneOf(a.output, b.output), counter=counter).output


@dsl.pipeline(name="plain-chain")
def plain_chain(counter: str = "") -> str:
    first = counted(tag="a", counter=counter)
    return consume(value=first.output, counter=counter).output


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def square(x: int, counter: str) -> int:
    with open(counter, "a") as f:
        f.write(f"square {x}\n")
    return x * x


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def add_all(xs: list) -> int:
    return int(sum(xs))


@dsl.pipeline(name="collected")
def collected(counter: str = "") -> int:
    with dsl.ParallelFor([1, 2, 3]) as x:
        sq = square(x=x, counter=counter)
    return add_all(xs=dsl.Collected(sq.output)).output


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def read_dataset(dataset: dsl.Input[dsl.Dataset]) -> str:
    return dataset.uri


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def read_uri(uri: str) -> str:
    return uri


@dsl.pipeline(name="imported")
def imported(uri: str = "s3://mlpipeline/datasets/x") -> str:
    data = dsl.importer(artifact_uri=uri, artifact_class=dsl.Dataset, reimport=False)
    return read_dataset(dataset=data.output).output


@dsl.pipeline(name="uri-string")
def uri_string(uri: str = "s3://mlpipeline/datasets/x") -> str:
    return read_uri(uri=uri).output


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def make_dataset(out: dsl.Output[dsl.Dataset], n: int):
    with open(out.path, "w") as f:
        f.write("x" * n)


@dsl.pipeline(name="produced")
def produced(n: int = 1000) -> str:
    made = make_dataset(n=n)
    return read_dataset(dataset=made.outputs["out"]).output


@pytest.fixture
def local(tmp_path):
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   raise_on_error=True)
    return tmp_path


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_oneof_over_a_cached_single_task_branch_fails_on_the_second_run(local):
    cache, counter = CacheStore(local / "cache"), local / "count.txt"
    with strict_local(cache=cache) as run:
        assert oneof_cached(counter=str(counter)).output == "VALUE-A"
    assert run.cache_hits() == [] and lines(counter) == ["a", "consume"]
    with pytest.raises(OneOfResolutionError) as caught, strict_local(cache=cache) as run:
        oneof_cached(counter=str(counter))
    err = caught.value
    assert err.task == "consume" and "processing OneOf: No successful task found" in str(err)
    assert "condition-2=RUNNING" in str(err) and "counted=CACHED" in str(err) and "resolve.go" in str(err)
    assert run.cache_hits() == ["counted"] and lines(counter) == ["a", "consume"]  # the hit did not run
    with pytest.raises(OneOfResolutionError, match=r'for output key "pipelinechannel--condition-branches-1-oneof-1"'
                                                   r' in parent task "condition-branches-1" \(dag ID \d+\)'):
        with strict_local(cache=cache, backend="2.17.0"):
            oneof_cached(counter=str(counter))


def test_oneof_over_uncached_branches_passes_twice(local):
    cache, counter = CacheStore(local / "cache"), local / "count.txt"
    for _ in range(2):
        with strict_local(cache=cache) as run:
            assert oneof_uncached(counter=str(counter)).output == "VALUE-A"
    # run 2: the branch task ran (its launcher set the branch COMPLETE); consume's inputs are unchanged: a hit
    assert run.cache_hits() == ["consume"] and lines(counter) == ["a", "consume", "a"]


def test_without_oneof_a_second_run_is_all_cache_hits(local):
    cache, counter = CacheStore(local / "cache"), local / "count.txt"
    with strict_local(cache=cache):
        assert plain_chain(counter=str(counter)).output == "VALUE-A"
    with strict_local(cache=cache) as run:
        assert plain_chain(counter=str(counter)).output == "VALUE-A"
    assert sorted(run.cache_hits()) == ["consume", "counted"] and lines(counter) == ["a", "consume"]
    with strict_local(cache=cache) as run:  # another argument: another key
        assert plain_chain(counter=str(local / "other.txt")).output == "VALUE-A"
    assert run.cache_hits() == []


def test_collected_over_an_all_cached_parallel_for_resolves(local):
    """resolve.go CollectInputs reads no DAG state: an all-cached ParallelFor still collects (2.16.0, 2.17.0)."""
    cache, counter = CacheStore(local / "cache"), local / "count.txt"
    for backend in ("2.16.0", "2.17.0"):
        with strict_local(cache=cache, backend=backend) as run:
            assert collected(counter=str(counter)).output == 14
    assert sorted(run.cache_hits()) == ["add-all", "square", "square", "square"]
    assert sorted(lines(counter)) == ["1", "2", "3", "square", "square", "square"]


def test_importer_of_a_foreign_uri_fails_in_the_launcher_and_a_string_uri_passes(local):
    imported(uri="s3://mlpipeline/datasets/x")  # plain kfp.local: passes
    with pytest.raises(LauncherDownloadError) as caught, strict_local(pipeline_root="minio://mlpipeline/v2/artifacts"):
        imported(uri="s3://mlpipeline/datasets/x")
    err = caught.value
    assert err.task == "read-dataset" and err.parameter == "dataset"
    assert ('failed to download input artifact "dataset" from remote storage URI "s3://mlpipeline/datasets/x"'
            in str(err))
    assert "no session info" in str(err) and "launcher_v2.go" in str(err)
    with pytest.raises(LauncherDownloadError):
        with strict_local(pipeline_root="minio://mlpipeline/v2/artifacts"):
            imported(uri="s3://other-bucket/datasets/x")
    with strict_local(pipeline_root="minio://mlpipeline/v2/artifacts") as run:  # same scheme and bucket: session
        assert imported(uri="minio://mlpipeline/datasets/x").output == "minio://mlpipeline/datasets/x"
    assert [d.how for d in run.tasks[-1].downloads] == ["same-bucket"]
    with strict_local(pipeline_root="minio://mlpipeline/v2/artifacts") as run:
        assert uri_string(uri="s3://mlpipeline/datasets/x").output == "s3://mlpipeline/datasets/x"
    assert run.downloaded_bytes("read-uri") == 0


def test_launcher_downloads_task_artifacts_and_counts_their_bytes(local):
    with strict_local(pipeline_root="minio://mlpipeline/v2/artifacts") as run:
        produced(n=1000)
    (download,) = [d for t in run.tasks if t.task == "read-dataset" for d in t.downloads]
    assert download.uri.startswith("minio://mlpipeline/v2/artifacts/produced-") and download.nbytes == 1000
    assert download.how == "run" and run.downloaded_bytes("read-dataset") == 1000
    assert run.downloaded_bytes("make-dataset") == 0


def test_strict_local_validates_its_options(local):
    with pytest.raises(ValueError, match="cache: expected a cluster.backend_cache.CacheStore"):
        with strict_local(cache=str(local / "cache")):
            pass
    with pytest.raises(ValueError, match="pipeline_root: unsupported Cloud bucket"):
        with strict_local(pipeline_root="file:///tmp/x"):
            pass
    with pytest.raises(ValueError, match="backend: expected one of"):
        with strict_local(backend="2.14.0"):
            pass


# ------------------------------------------------------------------ the IR simulator on the pre-issue-22 fixture
FIXTURE = ROOT / "tests" / "fixtures" / "hpa_pipeline_pre_issue22.yaml"
TYPED = {"STRING": "", "NUMBER_INTEGER": 0, "NUMBER_DOUBLE": 0.0, "BOOLEAN": False, "STRUCT": {}, "LIST": []}
STORE = "s3://mlpipeline/private/ns/hpa-kfp"


def typed_outputs(path: Path):
    """A stub executor of the compiled pipeline at `path`: every output parameter of the task a typed placeholder."""
    spec = next(yaml.safe_load_all(path.read_text()))

    def typed(task, inputs):
        outputs = spec["components"][f"comp-{task}"].get("outputDefinitions", {}).get("parameters", {})
        return {k: TYPED[v["parameterType"]] for k, v in outputs.items()}

    return typed


def fixture_stubs(*, manifest: str, existing: bool = False, data_uri: str = STORE + "/datasets/synthetic-2000"):
    """Stub executors for the fixture: what dataset-state reports (manifest "" before the first commit), what
    download/use-dataset return, one training task; every other output a typed placeholder."""
    typed = typed_outputs(FIXTURE)
    return {
        "*": typed,
        "check-params": lambda i: {**typed("check-params", i), "store_uri": STORE,
                                   "train_plan": [{"arch": "resnet18", "fold": 0}]},
        "dataset-state": lambda i: {"existing": existing, "data_uri": data_uri, "manifest_sha256": manifest,
                                    "shards_sha256": manifest},
        "download": lambda i: {"data_uri": data_uri, "manifest_sha256": "sha-1"},
        "use-dataset": lambda i: {"data_uri": data_uri, "manifest_sha256": "sha-1"},
    }


def test_fixture_item1_second_run_with_tune_false_fails_at_the_katib_defaults_oneof(tmp_path):
    cache = CacheStore(tmp_path / "cache")
    first = simulate_run(FIXTURE, {"tune": False}, stubs=fixture_stubs(manifest=""), cache=cache)
    assert first.cache_hits() == [] and first.state("condition-branches-5/condition-7/katib-defaults") == "COMPLETE"
    with pytest.raises(OneOfResolutionError) as caught:
        simulate_run(FIXTURE, {"tune": False}, stubs=fixture_stubs(manifest="sha-1"), cache=cache)
    err = caught.value
    assert err.task == "for-loop-8" and "condition-branches-5-oneof" in err.parameter
    assert "processing OneOf: No successful task found" in str(err)
    assert "condition-7=RUNNING" in str(err) and "katib-defaults=CACHED" in str(err)
    cache = CacheStore(tmp_path / "cache-2.17")  # 2.17.0: same break, the driver's longer message
    simulate_run(FIXTURE, {"tune": False}, stubs=fixture_stubs(manifest=""), cache=cache, backend="2.17.0")
    with pytest.raises(OneOfResolutionError, match='No successful task found for output key '
                                                   '"pipelinechannel--condition-branches-5-oneof-1" in parent task '
                                                   r'"condition-branches-5" \(dag ID \d+\)'):
        simulate_run(FIXTURE, {"tune": False}, stubs=fixture_stubs(manifest="sha-1"), cache=cache, backend="2.17.0")


def test_fixture_item1_download_branch_is_all_cache_hits_from_the_third_run(tmp_path):
    """tune=true keeps the Katib branch uncached (katib-tune has no cachingOptions.enableCache): only the
    download branch matters. Run 1: dataset-state reports no manifest; run 2: the committed manifest's hash, a new
    expected_manifest for download (a miss, which runs and sets its branch COMPLETE); run 3: the same again,
    download is a hit, its branch never becomes COMPLETE, and the first consumer of the OneOf fails."""
    cache = CacheStore(tmp_path / "cache")
    simulate_run(FIXTURE, {"tune": True}, stubs=fixture_stubs(manifest=""), cache=cache)
    second = simulate_run(FIXTURE, {"tune": True}, stubs=fixture_stubs(manifest="sha-1"), cache=cache)
    assert second.state("condition-branches-1/condition-3/download") == "COMPLETE"
    with pytest.raises(OneOfResolutionError) as caught:
        simulate_run(FIXTURE, {"tune": True}, stubs=fixture_stubs(manifest="sha-1"), cache=cache)
    assert caught.value.task == "condition-4" and "condition-branches-1-oneof-1" in caught.value.parameter
    assert "condition-3=RUNNING" in str(caught.value) and "download=CACHED" in str(caught.value)


def test_fixture_item2_committed_s3_dataset_fails_at_use_dataset_in_the_launcher(tmp_path):
    uri = "s3://bucket/datasets/x"
    with pytest.raises(LauncherDownloadError) as caught:
        simulate_run(FIXTURE, {"data_source": uri}, stubs=fixture_stubs(manifest="sha-1", existing=True,
                                                                        data_uri=uri), cache=CacheStore(tmp_path))
    err = caught.value
    assert err.task == "condition-branches-1/condition-2/use-dataset" and err.parameter == "dataset"
    assert f'failed to download input artifact "dataset" from remote storage URI "{uri}"' in str(err)


def test_simulator_agrees_with_strict_kfp_local_on_the_toy_pipelines(tmp_path):
    from kfp import compiler

    def stub(task, inputs):
        return {"Output": "value" if task.startswith("counted") else inputs.get("value", "").upper()}

    for pipeline, fails in ((oneof_cached, True), (oneof_uncached, False), (plain_chain, False)):
        path = tmp_path / f"{pipeline.name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        cache = CacheStore(tmp_path / f"cache-{pipeline.name}")
        simulate_run(path, stubs={"*": stub}, cache=cache)
        if fails:
            with pytest.raises(OneOfResolutionError, match="processing OneOf: No successful task found"):
                simulate_run(path, stubs={"*": stub}, cache=cache)
        else:
            again = simulate_run(path, stubs={"*": stub}, cache=cache)
            assert sorted(again.cache_hits()) == (["consume"] if pipeline is oneof_uncached else ["consume", "counted"])
    with pytest.raises(ValueError, match=r"arguments: \['nope'\] are not inputs"):
        simulate_run(tmp_path / "plain-chain.yaml", {"nope": 1}, stubs={"*": stub})


# ------------------------------------------------------------------ the same rules over today's compiled pipelines
COMPILED = [ROOT / "compiled" / "hpa_pipeline.yaml", ROOT / "compiled" / "hpa_pipeline_multinode.yaml"]


def compiled_stubs(path: Path, *, manifest: str, data_uri: str = STORE + "/datasets/synthetic-2000"):
    """Stub executors for a compiled pipeline of today: the same dataset story as fixture_stubs."""
    typed = typed_outputs(path)
    return {
        "*": typed,
        "check-params": lambda i: {**typed("check-params", i), "store_uri": STORE,
                                   "train_plan": [{"arch": "resnet18", "fold": 0, "weights": ""}]},
        "dataset-state": lambda i: {"existing": data_uri.startswith("s3://bucket"), "data_uri": data_uri,
                                    "manifest_sha256": manifest, "shards_sha256": manifest},
        "download": lambda i: {"data_uri": data_uri, "manifest_sha256": "sha-1"},
    }


@pytest.mark.parametrize("path", COMPILED, ids=lambda p: p.name)
@pytest.mark.parametrize("tune", [False, True])
def test_compiled_pipelines_run_three_times_on_the_backend_rules(tmp_path, path, tune):
    """Items 1 and 2 cannot come back: today's compiled pipelines, with the backend's cache and DAG rules, pass three
    identical runs (download and pack miss on run 2 as their expected_* inputs change, then hit), and a committed
    s3:// dataset as data_source makes no task download a byte of it (the launcher's rule)."""
    cache = CacheStore(tmp_path / "cache")
    runs = [simulate_run(path, {"tune": tune}, stubs=compiled_stubs(path, manifest=m), cache=cache)
            for m in ("", "sha-1", "sha-1")]
    hits = [set(run.cache_hits()) for run in runs]
    assert hits[0] == set() and "download" not in hits[1] and "download" in hits[2], hits
    assert "dataset-state" not in hits[1] | hits[2]
    uri = "s3://bucket/datasets/x"
    run = simulate_run(path, {"data_source": uri, "tune": tune}, stubs=compiled_stubs(path, manifest="sha-1",
                                                                                      data_uri=uri))
    assert run.downloaded_bytes("download") == 0
