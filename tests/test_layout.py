"""The tree stays the one the README describes: a layout section with one line per room that matches the files,
one stage map (component folder = KFP task = CLI stage = library module), and small modules."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [p for p in out if (ROOT / p).exists()]


def _layout_rooms() -> list[str]:
    """The paths the layout section names: the first backticked path of each table row."""
    rows = [line for line in _section("Layout").splitlines() if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]


def test_layout_section_names_every_room_and_only_existing_ones():
    rooms = _layout_rooms()
    assert rooms, "the README's Layout section lists no paths"
    missing = [room for room in rooms if not (ROOT / room.rstrip("/")).exists()]
    assert not missing, f"README Layout names paths that do not exist: {missing}"
    files = _tracked()
    top = sorted({p.split("/")[0] + ("/" if "/" in p else "") for p in files if not p.startswith(".")})
    modules = sorted({p if p.count("/") == 1 else p.rsplit("/", 1)[0] + "/" for p in files
                      if p.startswith("hpa/") and p.endswith(".py") and p.count("/") <= 2}
                     - {"hpa/__init__.py", "hpa/__main__.py"})
    unlisted = [p for p in top + modules if p not in rooms]
    assert not unlisted, f"README Layout lacks a line for: {unlisted}"


def test_stage_map_matches_components_cli_and_modules():
    from hpa.cli import STAGES

    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")]
            for line in _section("Layout").splitlines() if re.match(r"\| `components/\w+/`", line)]
    by_folder = {row[0].rstrip("/").split("/")[1]: row for row in rows}
    folders = sorted(p.name for p in (ROOT / "components").iterdir() if (p / "component.py").exists())
    assert sorted(by_folder) == folders, "the stage map lists every components/<stage> folder once"
    for folder, (_, task, cli, module, *_rest) in by_folder.items():
        assert task == folder.replace("_", "-"), f"{folder}: the KFP task is named after the folder"
        path = ROOT / (module.replace(".", "/") + ".py")
        package = ROOT / module.replace(".", "/") / "__init__.py"
        assert path.exists() or package.exists(), f"{folder}: module {module} does not exist"
        assert cli == "-" or cli in STAGES, f"{folder}: no CLI stage {cli!r} in hpa.cli.STAGES"
        component = (ROOT / "components" / folder / "component.py").read_text()
        parent, leaf = module.rsplit(".", 1)
        calls = rf"from {re.escape(module)}(\.\w+)* import|from {parent} import [\w, ]*\b{leaf}\b"
        assert re.search(calls, component), f"components/{folder} does not call its module {module}"


def test_no_library_module_is_over_the_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "hpa").rglob("*.py")}
    large = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not large, f"modules over {MAX_MODULE_LINES} lines (split by concern): {large}"
