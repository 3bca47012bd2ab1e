"""The image instructions in the docs are one recipe, at the package's version (issue 22, item 11).

Every pod pulls the image the compiled YAML names, fixed at compile time from HPA_IMAGE (light tasks, CPU
training) and HPA_CUDA_IMAGE (GPU training, Katib trials, TrainJobs): a recipe that compiles with one of
them leaves the other's pods on the default tag, and one that compiles in place overwrites the committed
compiled/ and component.yaml files that the drift tests compare with the defaults.
"""

import re
from pathlib import Path

import hpa
from hpa import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "images" / "README.md",
        *sorted((ROOT / "components").glob("*/README.md"))]
# `<registry>/hpa-kfp:<tag>` and the elided `...:<tag>` the docs use for the CUDA default.
IMAGE_TAG = re.compile(r"(?:\bhpa-kfp|\.\.\.):(\d[\w.-]*\w)")
RECIPE_DOCS = [ROOT / "images" / "README.md", ROOT / "docs" / "cluster.md"]


def logical_lines(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) with shell continuations (`\\` at the end) joined."""
    out, pending, first = [], "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not pending:
            first = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((first, " ".join((pending + line).split())))
        pending = ""
    return out


def compile_commands(path: Path) -> list[tuple[int, str]]:
    """The lines that compile the pipeline with an image variable set."""
    return [(n, line) for n, line in logical_lines(path)
            if "pipeline.py compile" in line and re.search(r"\bHPA_(CUDA_)?IMAGE=", line)]


def test_every_image_tag_in_the_docs_is_the_package_version():
    version = hpa.__version__
    found, stale = 0, []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in IMAGE_TAG.finditer(line):
                found += 1
                if match.group(1) not in (version, f"{version}-cuda"):
                    stale.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert found >= 10, f"only {found} image references found: the pattern no longer matches the docs"
    assert not stale, f"image tags other than {version} / {version}-cuda (hpa.__version__): {stale}"


def test_default_images_are_tagged_with_the_package_version():
    assert config.DEFAULT_IMAGE.endswith(f"/hpa-kfp:{hpa.__version__}"), config.DEFAULT_IMAGE
    assert config.DEFAULT_CUDA_IMAGE == f"{config.DEFAULT_IMAGE}-cuda"


def test_docs_compile_custom_images_with_both_variables_into_their_own_directory():
    """A compile with custom images sets both variables and writes under --out, never over compiled/."""
    wrong = []
    for path in DOCS:
        for number, line in compile_commands(path):
            if not ("HPA_IMAGE=" in line and "HPA_CUDA_IMAGE=" in line and re.search(r"--out \S", line)):
                wrong.append(f"{path.relative_to(ROOT)}:{number}: {line}")
    assert not wrong, "compile with HPA_IMAGE and HPA_CUDA_IMAGE and --out DIR: " + "; ".join(wrong)


def test_images_readme_and_cluster_docs_give_one_recipe():
    """Build both images, push both, compile with both into DIR, upload DIR/compiled/hpa_pipeline.yaml:
    the same command in images/README.md and docs/cluster.md."""
    recipes = {}
    for path in RECIPE_DOCS:
        commands = {line for _, line in compile_commands(path)}
        assert commands, f"{path.relative_to(ROOT)}: no compile command with the image variables"
        recipes[path.name if path.parent.name != "images" else "images/README.md"] = commands
        text = " ".join(path.read_text().split())
        for step in ("docker build -f images/Dockerfile ", "docker build -f images/Dockerfile.cuda ",
                     "docker push $REGISTRY/hpa-kfp:", "/compiled/hpa_pipeline.yaml"):
            assert step in text, f"{path.relative_to(ROOT)} lacks `{step}`"
        for command in commands:
            out = re.search(r"--out (\S+)", command).group(1)
            assert f"{out}/compiled/hpa_pipeline.yaml" in text, f"{path.relative_to(ROOT)}: upload {out}/compiled/..."
    assert len({frozenset(c) for c in recipes.values()}) == 1, recipes
