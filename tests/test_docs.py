"""tools/docs.py: the pipeline picture and mermaid block are drawn from the compiled YAML, condition groups expanded;
the committed generated docs (component READMEs, the mermaid block of docs/cluster.md) are in sync."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from tools import docs  # noqa: E402


@pytest.mark.parametrize("compiled,expected", [
    ("inputs.parameter_values['pipelinechannel--plot_samples'] == true", "plot_samples"),
    ("!(inputs.parameter_values['pipelinechannel--tune'] == true)", "not tune"),
    ("int(inputs.parameter_values['pipelinechannel--num_nodes']) > 1", "num_nodes > 1"),
    ("!(int(inputs.parameter_values['pipelinechannel--num_nodes']) > 1)", "not num_nodes > 1"),
    ("!(inputs.parameter_values['pipelinechannel--dataset-state-existing'] == true)", "not dataset-state.existing"),
])
def test_condition_text(compiled, expected):
    assert docs.condition_text(compiled) == expected


def test_graph_expands_nested_condition_groups():
    deps, notes = docs.pipeline_graph()
    # Only executor tasks, never the compiler's group names.
    assert not [name for name in deps if name.startswith("condition")]
    assert notes["montage"] == ["if plot_samples"]
    assert "katib-tune" not in notes and "katib-defaults" not in deps  # one task in every run (issue 22 item 1)
    assert notes["train"] == ["for each of models x folds", docs.GPU_NOTE]
    assert "train-distributed" not in deps  # the multi-node pipeline is compiled/hpa_pipeline_multinode.yaml
    # download checks an existing committed s3:// dataset or fetches one, in every run (issue 22 items 1 and 2)
    assert "importer" not in deps and "use-dataset" not in deps
    for unconditional in ("check-params", "dataset-state", "download", "katib-tune", "split", "pack", "compare-plots",
                          "ensemble", "submit"):
        assert unconditional not in notes, unconditional
    # Edges into and out of the groups and the loop reach the tasks inside them.
    assert {"katib-tune", "check-params", "pack", "split"} <= set(deps["train"])
    assert "train" in deps["ensemble"] and "train" in deps["compare-plots"]
    assert set(deps["submit"]) == {"download", "ensemble"}  # data_uri: the sample submission
    assert "dataset-state" in deps["pack"] and "dataset-state" in deps["download"]  # their cache keys follow the store
    multi, multi_notes = docs.pipeline_graph(pipeline.COMPILED_MULTINODE)
    assert "train-distributed" in multi and "train" not in multi
    # its pods (not the task) get the GPUs
    assert multi_notes["train-distributed"] == ["for each of models x folds"]
    assert "train-distributed" in multi["ensemble"]


def test_docs_mermaid_matches_the_compiled_pipeline():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    block = re.search(r"```mermaid\n(.*?)\n```", doc, re.S).group(1)
    assert block == docs.mermaid(), "docs/cluster.md is stale: run `python tools/docs.py`"


def test_component_readmes_match_the_components(tmp_path):
    written = docs.write_readmes(tmp_path)
    assert len(written) == len(list((ROOT / "components").glob("*/component.py")))  # every one has examples
    stale = [str(p.relative_to(tmp_path)) for p in written
             if p.read_bytes() != (ROOT / p.relative_to(tmp_path)).read_bytes()]
    assert not stale, f"out of date, run `python tools/docs.py` and commit: {stale}"


def test_write_mermaid_rewrites_only_the_block(tmp_path):
    doc = tmp_path / "cluster.md"
    doc.write_text("# x\n\n```mermaid\nflowchart LR\n    old\n```\n\nafter\n")
    docs.write_mermaid(doc)
    assert doc.read_text() == f"# x\n\n```mermaid\n{docs.mermaid()}\n```\n\nafter\n"


def test_run_parameter_tables_are_generated_from_the_declarations():
    """README.md and docs/cluster.md show every run parameter with its type, default and UI description, as
    hpa/config.py declares them (python tools/docs.py rewrites both tables)."""
    table = docs.parameter_table()
    for doc in (ROOT / "README.md", ROOT / "docs" / "cluster.md"):
        text = doc.read_text()
        start, end = text.index(docs.TABLE_START) + len(docs.TABLE_START), text.index(docs.TABLE_END)
        assert text[start:end].strip() == table, f"{doc.name}: run-parameter table is stale: run `python tools/docs.py`"
    import pipeline

    for name in pipeline.parameter_names():
        assert f"| `{name}` |" in table
