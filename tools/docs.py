"""The generated documentation: every component's README.md, the pipeline picture and its mermaid block, and the
run-parameter tables of README.md and docs/cluster.md.

    python pipeline.py compile                  # first: compiled/*.yaml and components/*/component.yaml
    python tools/docs.py                        # every generated doc: components/*/README.md, docs/pipeline.png,
                                                #   the mermaid block of docs/cluster.md, the run-parameter
                                                #   tables of README.md and docs/cluster.md
    python tools/docs.py graph [--png FILE]     # draw the compiled DAG (default docs/pipeline.png), print the mermaid

A component's README comes from the component itself (docstrings, typed inputs and outputs, its CLI_EXAMPLE and
PIPELINE_EXAMPLE); the picture and the mermaid block come from compiled/hpa_pipeline.yaml, condition groups and
ParallelFor loops expanded to the tasks inside them; the tables come from the run parameters' one declaration in
hpa/config.py (PipelineConfig, ClusterParameters). tests/test_docs.py checks that the committed files are in sync.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from hpa.options import help_of  # noqa: E402

CLUSTER_DOC = ROOT / "docs" / "cluster.md"
README = ROOT / "README.md"
PNG = ROOT / "docs" / "pipeline.png"
GPU_NOTE = "gpus x accelerator_type"
# KFP's parameter types as the README tables name them (artifact types keep their class name).
TYPE_NAMES = {"String": "str", "Integer": "int", "Float": "float", "Boolean": "bool", "Dict": "dict", "List": "list"}


# ---------------------------------------------------------------------------------------------- component READMEs
def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def type_name(kfp_type: str) -> str:
    return TYPE_NAMES.get(kfp_type, kfp_type.split("@")[0].replace("system.", ""))


def component_readme(stage: str, module) -> str:
    """components/<stage>/README.md from the component itself: docstrings, typed inputs and outputs."""
    import docstring_parser

    component = getattr(module, stage)
    spec = component.component_spec
    parsed = docstring_parser.parse(component.python_func.__doc__)
    described = {p.arg_name: " ".join(p.description.split()) for p in parsed.params}
    for r in parsed.many_returns:  # Returns: (output parameters); Google style puts the name in type_name
        name = r.return_name or r.type_name
        if name and name not in described:
            described[name] = " ".join((r.description or "").split())

    lines = [f"# `{spec.name}`", "", _sentence(module.__doc__.split("\n\n")[0].split(": ", 1)[-1]), "",
             " ".join(module.__doc__.split("\n\n")[1].split()), "", "## Inputs", "",
             "| name | type | default | description |", "|---|---|---|---|"]
    for name, inp in spec.inputs.items():
        default = "required" if not inp.optional else f"`{inp.default!r}`"
        lines.append(f"| `{name}` | {type_name(inp.type)} | {default} | {described.get(name, '')} |")
    lines += ["", "## Outputs", "", "| name | type | description |", "|---|---|---|"]
    for name, out in (spec.outputs or {}).items():
        lines.append(f"| `{name}` | {type_name(out.type)} | {described.get(name, '')} |")
    lines += ["", "## Example", "", "The same stage without Kubeflow:", "", "```bash", module.CLI_EXAMPLE.strip(),
              "```", "", "In a pipeline (see `pipeline.py` for the wiring, resources and secrets):", "", "```python",
              f"from components.{stage}.component import {stage}", "", module.PIPELINE_EXAMPLE.strip(), "```", "",
              f"`python components/{stage}/component.py` rewrites `component.yaml` (image: `HPA_IMAGE`, default "
              "`hpa.config.DEFAULT_IMAGE`), as `python pipeline.py compile` does for every component; "
              "`python tools/docs.py` rewrites this README.", ""]
    return "\n".join(lines)


def write_readmes(out_dir: Path | None = None) -> list[Path]:
    """components/<stage>/README.md of every component with examples, into `out_dir` (same layout) or in place.
    Opt-in: a component without CLI_EXAMPLE keeps its own README."""
    out_dir = Path(out_dir) if out_dir else ROOT
    written = []
    for script in sorted(pipeline.COMPONENTS.glob("*/component.py")):
        stage = script.parent.name
        module = importlib.import_module(f"components.{stage}.component")
        if hasattr(module, "CLI_EXAMPLE"):
            readme = out_dir / script.parent.relative_to(ROOT) / "README.md"
            readme.parent.mkdir(parents=True, exist_ok=True)
            readme.write_text(component_readme(stage, module))
            written.append(readme)
    return written


# ---------------------------------------------------------------------------------------------- the graph
def condition_text(condition: str) -> str:
    """A compiled trigger condition in run-parameter terms: "!(int(...['pipelinechannel--num_nodes']) > 1)"
    -> "not num_nodes > 1"."""
    def name(match: re.Match) -> str:  # a run parameter, or a task's output (<task>-<output>: "dataset-state.existing")
        task, _, output = match.group(1).rpartition("-")
        return f"{task}.{output}" if task else output

    text = re.sub(r"(?:int\()?inputs\.parameter_values\['pipelinechannel--([\w-]+)'\]\)?", name, condition)
    text = text.replace(" == true", "")
    return re.sub(r"^!\((.*)\)$", r"not \1", text)


def pipeline_graph(compiled: Path = pipeline.COMPILED) -> tuple[dict, dict]:
    """(task -> upstream tasks, task -> notes) from a compiled pipeline. Condition groups (dsl.If/Else,
    nested) and ParallelFor loops are expanded to the tasks inside them; a task's notes are its condition
    ("if ..."), its loop ("for each of models x folds") and whether it requests the accelerator."""
    spec = next(yaml.safe_load_all(Path(compiled).read_text()))
    deps, notes = {}, {}

    def leaves(name: str, task: dict) -> list[str]:
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" not in component:
            return [name]
        return [leaf for n, t in component["dag"]["tasks"].items() for leaf in leaves(n, t)]

    def walk(tasks: dict, outer: list[str], condition: str | None, loop: str | None) -> None:
        for name, task in tasks.items():
            upstream = outer + [leaf for u in task.get("dependentTasks", []) for leaf in leaves(u, tasks[u])]
            trigger = task.get("triggerPolicy", {}).get("condition")
            where = condition_text(trigger) if trigger else condition
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                each = task["taskInfo"]["name"].replace("-x-", " x ") if "parameterIterator" in task else loop
                walk(component["dag"]["tasks"], upstream, where, each)
                continue
            deps[name] = upstream
            executor = spec["deploymentSpec"]["executors"][task["componentRef"]["name"].replace("comp-", "exec-", 1)]
            task_notes = ([f"if {where}"] if where else []) + ([f"for each of {loop}"] if loop else [])
            if "accelerator" in executor.get("container", {}).get("resources", {}):  # an importer has no container
                task_notes.append(GPU_NOTE)
            if task_notes:
                notes[name] = task_notes

    walk(spec["root"]["dag"]["tasks"], [], None, None)
    return deps, notes


def is_conditional(task_notes: list[str]) -> bool:
    return any(note.startswith("if ") for note in task_notes)


def mermaid(compiled: Path = pipeline.COMPILED) -> str:
    deps, notes = pipeline_graph(compiled)
    lines = ["flowchart LR"]
    for name in deps:
        label = name + "".join(f"<br/><i>{note}</i>" for note in notes.get(name, []))
        lines.append(f'    {name.replace("-", "_")}["{label}"]')
    for name, upstream in transitive_reduction(deps).items():
        arrow = "-.->" if is_conditional(notes.get(name, [])) else "-->"
        lines += [f'    {u.replace("-", "_")} {arrow} {name.replace("-", "_")}' for u in upstream]
    return "\n".join(lines)


def transitive_reduction(deps: dict) -> dict:
    """Drop an edge u -> v when v is reached from u through another task (the picture shows order)."""
    def reaches(src: str, dst: str, skip_direct: bool) -> bool:
        todo = [v for v, ups in deps.items() if src in ups and not (skip_direct and v == dst)]
        seen = set()
        while todo:
            v = todo.pop()
            if v == dst:
                return True
            if v not in seen:
                seen.add(v)
                todo += [w for w, ups in deps.items() if v in ups]
        return False

    return {v: [u for u in ups if not reaches(u, v, skip_direct=True)] for v, ups in deps.items()}


def render_graph(png: Path, compiled: Path = pipeline.COMPILED) -> Path:
    """Draw the compiled DAG left to right, one column per dependency depth (matplotlib, no graphviz)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deps, notes = pipeline_graph(compiled)
    depth = {}
    while len(depth) < len(deps):
        for name, upstream in deps.items():
            if name not in depth and all(u in depth for u in upstream):
                depth[name] = 1 + max((depth[u] for u in upstream), default=-1)
    columns = {}
    for name in sorted(deps, key=lambda n: (not is_conditional(notes.get(n, [])), n)):  # conditional on top
        columns.setdefault(depth[name], []).append(name)
    pos = {n: (d * 2.4, (len(col) - 1) / 2 - i * 1.2) for d, col in columns.items() for i, n in enumerate(col)}
    fig, ax = plt.subplots(figsize=(2.1 * len(columns) + 0.4, 1.2 * max(map(len, columns.values())) + 1.4))
    boxes = {}
    for name, (x, y) in pos.items():
        task_notes = notes.get(name, [])
        color = "#d5e8f7" if GPU_NOTE in task_notes else "#fde7c8" if is_conditional(task_notes) else "#e6f2e1"
        boxes[name] = ax.text(x, y, "\n".join([name, *task_notes]), ha="center", va="center", fontsize=10,
                              bbox=dict(boxstyle="round,pad=0.5", fc=color, ec="#333", lw=1.0,
                                        linestyle="--" if is_conditional(task_notes) else "-"))
    fig.canvas.draw()  # box patches get their size at draw time; arrows are clipped to them
    for name, upstream in transitive_reduction(deps).items():
        for u in upstream:
            ax.annotate("", xy=pos[name], xytext=pos[u], arrowprops=dict(
                arrowstyle="-|>", color="#444", lw=1.3, shrinkA=3, shrinkB=3,
                linestyle="--" if is_conditional(notes.get(name, [])) else "-",
                patchA=boxes[u].get_bbox_patch(), patchB=boxes[name].get_bbox_patch()))
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    ax.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.axis("off")
    ax.set_title(f"{pipeline.PIPELINE_NAME}: blue = GPU task (run parameters gpus, accelerator_type), "
                 "dashed = runs only when its condition holds", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_mermaid(doc: Path = CLUSTER_DOC, compiled: Path = pipeline.COMPILED) -> Path:
    """Replace the first ```mermaid block of `doc` with the compiled pipeline's graph."""
    text = doc.read_text()
    block = re.search(r"```mermaid\n(.*?)\n```", text, re.S)
    if block is None:
        raise ValueError(f"{doc}: no ```mermaid block to rewrite")
    doc.write_text(text[:block.start(1)] + mermaid(compiled) + text[block.end(1):])
    return doc


KINDS = {str: "string", int: "int", float: "float", bool: "bool", dict: "JSON object", list: "JSON list"}
TABLE_START = "<!-- run parameters: generated by `python tools/docs.py` from hpa/config.py -->"
TABLE_END = "<!-- end of run parameters -->"


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)) or value == "":
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def parameter_table() -> str:
    """The run parameters as a Markdown table (name, type, default, the description the KFP UI shows), from their
    one declaration in hpa/config.py, with the multi-node pipeline's and run --local's own defaults."""
    rows = ["| parameter | type | default | description |", "|---|---|---|---|"]
    for param in pipeline.run_parameters():
        default = f"`{_value(param.default)}`"
        for other, where in ((pipeline.MULTINODE_DEFAULTS, "the multi-node pipeline"),
                             (pipeline.LOCAL_DEFAULTS, "`run --local`")):
            if param.name in other:
                default += f" (`{_value(other[param.name])}` in {where})"
        cls = next(c for c in pipeline.RUN_PARAMETER_CLASSES if param.name in c.__dataclass_fields__)
        rows.append(f"| `{param.name}` | {KINDS[param.annotation]} | {default} | {help_of(cls, param.name)} |")
    return "\n".join(rows)


def write_parameter_tables(docs: tuple[Path, ...] = (README, CLUSTER_DOC)) -> list[Path]:
    """Replace the table between TABLE_START and TABLE_END in each of `docs`."""
    for doc in docs:
        text = doc.read_text()
        start, end = text.find(TABLE_START), text.find(TABLE_END)
        if start < 0 or end < start:
            raise ValueError(f"{doc}: no run-parameter table markers ({TABLE_START} ... {TABLE_END})")
        doc.write_text(text[:start + len(TABLE_START)] + "\n" + parameter_table() + "\n" + text[end:])
    return list(docs)


def write_all() -> list[Path]:
    """Every generated doc, in place, from the components, hpa/config.py and the compiled pipeline YAML."""
    return [*write_readmes(), render_graph(PNG), write_mermaid(), *write_parameter_tables()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("all", help="rewrite every generated doc (the default)")
    graph = sub.add_parser("graph", help="draw the compiled DAG (docs/pipeline.png) and print it as mermaid")
    graph.add_argument("--png", type=Path, default=PNG)
    args = parser.parse_args(argv)
    if args.command == "graph":
        png = render_graph(args.png)
        print(png.resolve().relative_to(ROOT) if png.resolve().is_relative_to(ROOT) else png)
        print(mermaid())
    else:
        for path in write_all():
            print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
