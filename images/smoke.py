"""Build the images and run real component executions in them, the way a KFP pod runs them.

    python images/smoke.py                 # build cpu + cuda, run download -> split -> train in both
    python images/smoke.py build cpu       # one step at a time: build | run | ddp | check | clean
    python images/smoke.py run cpu         # (run: the three stages; check: import hpa, torch, kfp as uid 1000)
    python images/smoke.py ddp cuda        # the TrainJob pod's `torchrun -m hpa train` with 2 gloo processes

Each stage is executed as the KFP launcher executes it: the container command and args are read at run
time from components/<stage>/component.yaml (deploymentSpec.executors.<label>.container), `{{$}}` is the
executor input JSON built here (inputs.parameterValues with the driver's defaults for optional inputs,
inputs.artifacts, outputs.artifacts under a task root, outputs.outputFile), the process runs as the
image's USER (uid 1000) with the image's ENV and WORKDIR, and the S3 keys arrive as HPA_S3_ACCESS_KEY /
HPA_S3_SECRET_KEY in the environment, as `kubernetes.use_secret_as_env` gives them to the pod (the
endpoint is the `s3_endpoint` input, as pipeline.py passes it). The store is a real SeaweedFS
(`hpa.s3server.LocalS3Server`) on 127.0.0.1; the outputs are checked from the host afterwards.

The ddp step runs what a TrainJob pod runs: the command and env that hpa.train_distributed renders (torch's
launcher, `-m hpa train ...`, the PET_* variables the Trainer's Torch plugin adds) with 2 gloo processes on
the CPU, then the same job through the image's `torchrun`; on the stand-in CUDA base that `torchrun` is, as
in the real base, a script of the system Python, which has no hpa. Every rank must join and the epoch finish.

Engines: docker (when `docker info` answers) or podman; `--engine` picks one. Where `podman run` cannot
start containers (crun without rlimits, as in some sandboxes), a stage runs in the image's root
filesystem (`podman mount` of a created container) through chroot with /proc, /dev and a tmpfs
/dev/shm mounted; `--runner` picks run or chroot explicitly.

Bases: `--base real` pulls the Dockerfiles' bases; `--base stand-in` builds a local stand-in with
mmdebstrap (for machines without Docker Hub); `--base auto` (default) uses the real base when it is
present or can be pulled, else the stand-in. The stand-ins are tagged localhost/hpa-stand-in/<base> and
carry this host's pip configuration and CA bundle so that pip inside the build reaches the registry the
host uses; images built on them are tagged localhost/hpa-kfp-smoke:<cpu|cuda> and are for this check
only (never push them). Needs: root (chroot, mounts, mmdebstrap), `apt-get install podman mmdebstrap`
(or docker), and this package installed on the host (`pip install -e .`: the S3 server and the checks).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "images" / "Dockerfile", "cuda": ROOT / "images" / "Dockerfile.cuda"}
SMOKE_TAG = "localhost/hpa-kfp-smoke:{}"
STAND_IN_PREFIX = "localhost/hpa-stand-in/"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TASK_ROOT = "/smoke"  # where the task roots appear inside the container (a bind mount of --work)
BUCKET = "mlpipeline"  # the bucket every KFP install has
# The smoke run: a small synthetic dataset, one tiny epoch. Inputs not named here keep their defaults;
# data_uri, store_uri and s3_endpoint are added at run time.
N_TRAIN, N_TEST, IMAGE_SIZE, FOLDS = 64, 16, 32, 3
SMOKE_PARAMETERS = {
    "download": {"source": "synthetic", "n_train": N_TRAIN, "n_test": N_TEST, "image_size": IMAGE_SIZE, "seed": 0},
    "split": {"folds": FOLDS, "seed": 0},
    "train": {"arch": "resnet18", "fold": 0, "models": {"resnet18": 1e-3}, "image_size": IMAGE_SIZE, "epochs": 1,
              "batch_size": 16, "tta": 2},
}


class SmokeError(Exception):
    """One line that says what failed and what was expected."""


def log(msg: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def output(cmd: list[str], timeout: float | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout.strip()


def succeeds(cmd: list[str], timeout: float = 60) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ------------------------------------------------------------------------------------------- engine
def pick_engine(choice: str) -> str:
    if choice in ("docker", "podman"):
        if not shutil.which(choice):
            raise SmokeError(f"--engine {choice}: `{choice}` is not on PATH")
        return choice
    if shutil.which("docker") and succeeds(["docker", "info"], timeout=20):
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise SmokeError("no container engine: install docker, or podman (apt-get install podman mmdebstrap)")


def qualified(ref: str) -> str:
    """Docker Hub short names as podman needs them fully qualified (python:3.11 -> docker.io/library/python:3.11)."""
    first = ref.split("/")[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"docker.io/{ref}" if "/" in ref else f"docker.io/library/{ref}"


def image_exists(engine: str, ref: str) -> bool:
    return succeeds([engine, "image", "inspect", ref], timeout=60)

def _built_image_and_work_dir(engine: str, which: str, work: Path) -> tuple[str, Path]:
    """The smoke image of `which` (one SmokeError line when it was not built) and `work`, emptied."""
    image = SMOKE_TAG.format(which)
    if not image_exists(engine, image):
        raise SmokeError(f"{image} does not exist: python images/smoke.py build {which}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return image, work



def image_config(engine: str, ref: str) -> dict:
    doc = json.loads(output([engine, "image", "inspect", ref]))[0]
    return {"size": int(doc.get("Size") or 0), **(doc.get("Config") or {})}


def dockerfile_base(dockerfile: Path) -> str:
    match = re.search(r"^ARG BASE=(\S+)", dockerfile.read_text(), re.M)
    if not match:
        raise SmokeError(f"{dockerfile}: expected an `ARG BASE=<image>` line (the base to build on)")
    return match.group(1)


# ------------------------------------------------------------------------------------------- stand-in bases
def host_pip_config() -> tuple[str, list[Path]]:
    """The host's effective pip settings as one pip.conf, and the files it names (CA bundle, constraints).

    Settings that point at host directories or file:// indexes are left out: a build cannot see them.
    The text may hold an index URL with credentials: it goes into the local stand-in only, never to a log.
    """
    listing = output([sys.executable, "-m", "pip", "config", "list"])
    sections: dict[str, dict[str, str]] = {}
    env_values: dict[str, str] = {}
    for line in listing.splitlines():
        match = re.match(r"^([^=]+?)='(.*)'$", line.strip())
        if not match:
            continue
        key, value = match.groups()
        if key.startswith(":env:."):
            env_values[key[len(":env:."):]] = value
        elif "." in key:
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
    sections.setdefault("global", {}).update(env_values)  # pip: the environment wins over the files
    files, dropped = [], []
    for section in sections.values():
        for name, value in list(section.items()):
            parts = value.split()
            if any(p.startswith("file:") or Path(p).is_dir() for p in parts):
                dropped.append(name)
                del section[name]
            elif len(parts) == 1 and value.startswith("/") and Path(value).is_file():
                files.append(Path(value))
    if dropped:
        log("host pip settings left out of the stand-in (host directories / file:// indexes): "
            f"{', '.join(sorted(set(dropped)))}")
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for s, kv in sections.items() if kv)
    return text, files


def ubuntu_keyring(work: Path) -> Path:
    """Ubuntu's archive keyring, from Debian's ubuntu-keyring package (apt checks it against Debian's keys)."""
    target = work / "ubuntu-keyring" / "usr/share/keyrings/ubuntu-archive-keyring.gpg"
    if target.exists():
        return target
    apt = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "etc/sources.list").write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main\n")
    opts = ["-o", f"Dir::Etc::SourceList={apt}/etc/sources.list", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State::Lists={apt}/lists", "-o", f"Dir::Cache={apt}/cache", "-qq"]
    run(["apt-get", *opts, "update"])
    run(["apt-get", *opts, "download", "ubuntu-keyring"], cwd=apt)
    deb = next(apt.glob("ubuntu-keyring_*.deb"))
    run(["dpkg-deb", "-x", str(deb), str(work / "ubuntu-keyring")])
    return target


def stand_in_recipe(base: str, work: Path) -> dict:
    """mmdebstrap arguments for a stand-in of `base` with the properties our Dockerfiles depend on."""
    repo = base.rsplit(":", 1)[0]
    if repo == "python":  # python:3.11.x-slim-bookworm: Debian bookworm with Python 3.11
        return {"suite": "bookworm", "mirror": "http://deb.debian.org/debian", "options": [],
                "include": ["python3.11", "python3-pip", "python3-venv", "ca-certificates", "passwd"], "hooks": []}
    if repo == "pytorch/pytorch":
        # Recent pytorch/pytorch runtime tags: Ubuntu 24.04 (user `ubuntu` at uid/gid 1000, system Python
        # 3.12 marked EXTERNALLY-MANAGED) with torch in that Python. No python3-venv on purpose: the
        # Dockerfile must not rely on ensurepip. Torch is put in as the base has it: PyPI's CUDA build.
        torch = re.match(r"(\d+\.\d+\.\d+)", base.rsplit(":", 1)[1]).group(1)
        return {"suite": "noble", "mirror": "http://archive.ubuntu.com/ubuntu",
                "options": [f"--keyring={ubuntu_keyring(work)}", "--components=main,universe"],
                "include": ["python3", "python3-pip", "ca-certificates", "passwd", "libstdc++6"],
                "hooks": ['chroot "$1" groupadd --gid 1000 ubuntu',
                          'chroot "$1" useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ubuntu',
                          'chroot "$1" python3 -c "import os, sys, sysconfig; '
                          "sys.exit(not os.path.exists(os.path.join("
                          "sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))\"",
                          f'chroot "$1" python3 -m pip install --break-system-packages --no-cache-dir torch=={torch}',
                          'chroot "$1" python3 -c "import torch"',
                          # as in the real base: `torchrun` is a script of the system Python (the ddp step's case)
                          """chroot "$1" sh -c 'test "$(head -n 1 /usr/local/bin/torchrun)" = "#!/usr/bin/python3"'"""]}
    raise SmokeError(f"no stand-in recipe for base {base!r}: use --base real on a machine that can pull it")


def build_stand_in(engine: str, base: str, work: Path) -> str:
    tag = STAND_IN_PREFIX + base
    if image_exists(engine, tag):
        log(f"stand-in {tag} exists (remove it to rebuild)")
        return tag
    if not shutil.which("mmdebstrap"):
        raise SmokeError("mmdebstrap not found: apt-get install mmdebstrap (needed for --base stand-in)")
    recipe = stand_in_recipe(base, work)
    conf, files = host_pip_config()
    conf_file = work / "pip.conf"
    conf_file.write_text(conf)
    conf_file.chmod(0o600)
    hooks = [f'mkdir -p "$1/etc" && cp {shlex.quote(str(conf_file))} "$1/etc/pip.conf" && chmod 644 "$1/etc/pip.conf"']
    hooks += [f'mkdir -p "$1{f.parent}" && cp {shlex.quote(str(f))} "$1{f}"' for f in files]
    hooks += recipe["hooks"]
    cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(recipe['include'])}",
           *recipe["options"], *[f"--customize-hook={h}" for h in hooks], recipe["suite"], "-", recipe["mirror"]]
    log(f"building stand-in {tag}: mmdebstrap {recipe['suite']} ({', '.join(recipe['include'])})")
    start = time.monotonic()
    # The hooks' pip reads the stand-in's /etc/pip.conf, not this process's PIP_* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    boot = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    imported = subprocess.run([engine, "import", "--change", f"ENV PATH={DEFAULT_PATH}",
                               "--change", 'CMD ["/bin/bash"]', "-", tag],
                              stdin=boot.stdout, capture_output=True, text=True)
    boot.stdout.close()
    if boot.wait() != 0 or imported.returncode != 0:
        raise SmokeError(f"stand-in {tag}: mmdebstrap rc={boot.returncode}, import rc={imported.returncode} "
                         f"{imported.stderr.strip()[-300:]}")
    log(f"stand-in {tag} built in {time.monotonic() - start:.0f} s, {image_config(engine, tag)['size'] / 1e9:.2f} GB")
    return tag


def resolve_base(engine: str, base: str, mode: str, work: Path) -> str:
    if mode != "stand-in":
        ref = qualified(base) if engine == "podman" else base
        if image_exists(engine, ref) or succeeds([engine, "pull", ref], timeout=120):
            return ref
        if mode == "real":
            raise SmokeError(f"base {base} cannot be pulled (--base real); try --base stand-in")
        log(f"base {base} cannot be pulled: building a stand-in")
    return build_stand_in(engine, base, work)


# ------------------------------------------------------------------------------------------- build
def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=15).close()
        return True
    except Exception:
        return False


def build(engine: str, which: str, args) -> None:
    dockerfile = DOCKERFILES[which]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = resolve_base(engine, dockerfile_base(dockerfile), args.base, work)
    cmd = [engine, "build", "-f", str(dockerfile), "-t", SMOKE_TAG.format(which), "--build-arg", f"BASE={base}"]
    if engine == "podman":
        cmd.insert(2, "--isolation=chroot")  # what works without a full OCI runtime
    if args.no_cache:
        cmd.insert(2, "--no-cache")
    if which == "cpu":
        index = args.torch_index_url
        if index == "auto":
            index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", dockerfile.read_text(), re.M).group(1)
            if not reachable(index.rstrip("/") + "/torch/"):
                log(f"{index} is not reachable: torch from https://pypi.org/simple (CUDA wheels, a larger image)")
                index = "https://pypi.org/simple"
        cmd += ["--build-arg", f"TORCH_INDEX_URL={index}"]
    log("$ " + " ".join(shlex.quote(c) for c in cmd) + " .")
    start = time.monotonic()
    run([*cmd, str(ROOT)])
    size = image_config(engine, SMOKE_TAG.format(which))["size"]
    log(f"built {SMOKE_TAG.format(which)} in {time.monotonic() - start:.0f} s, {size / 1e9:.2f} GB")


# ------------------------------------------------------------------------------------------- containers
class Container:
    """Run commands in an image as its USER, with its ENV and WORKDIR: `docker/podman run`, or chroot."""

    def __init__(self, engine: str, image: str, runner: str, task_root: Path):
        self.engine, self.image, self.task_root = engine, image, task_root
        self.config = image_config(engine, image)
        user = (self.config.get("User") or "0").split(":")
        if not all(u.isdigit() for u in user) or user[0] == "0":
            raise SmokeError(f"{image}: USER is {self.config.get('User')!r}, expected a numeric non-root uid[:gid]")
        self.uid, self.gid = int(user[0]), int(user[-1]) if len(user) > 1 else int(user[0])
        self.env = dict(e.split("=", 1) for e in self.config.get("Env") or [])
        self.workdir = self.config.get("WorkingDir") or "/"
        self.runner = runner if runner != "auto" else self._pick_runner()
        self._stack = ExitStack()
        self.root: Path | None = None

    def _pick_runner(self) -> str:
        if self.engine == "docker" or succeeds([self.engine, "run", "--rm", "--network=host", self.image, "true"], 120):
            return "run"
        log(f"`{self.engine} run` cannot start a container here: running the stages through chroot")
        return "chroot"

    def __enter__(self) -> "Container":
        try:
            self._enter()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _enter(self) -> None:
        os.chown(self.task_root, self.uid, self.gid)
        if self.runner == "chroot":
            if os.geteuid() != 0:
                raise SmokeError("the chroot runner needs root (chroot, mount)")
            name = f"hpa-smoke-{os.getpid()}"
            run([self.engine, "create", "--name", name, self.image, "true"], capture_output=True)
            self._stack.callback(run, [self.engine, "rm", "-f", name], capture_output=True, check=False)
            self.root = Path(output([self.engine, "mount", name]))
            self._stack.callback(run, [self.engine, "umount", name], capture_output=True, check=False)
            # What the kubelet gives every pod: /proc, /dev, a /dev/shm; and the artifacts volume.
            for target, mount in [("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"]),
                                  ("dev/shm", ["-t", "tmpfs", "-o", "mode=1777,size=2g", "shm"]),
                                  (TASK_ROOT.lstrip("/"), ["--bind", str(self.task_root)])]:
                path = self.root / target
                path.mkdir(parents=True, exist_ok=True)
                run(["mount", *mount, str(path)])
                self._stack.callback(run, ["umount", str(path)], check=False)

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def exec(self, command: list[str], secrets: dict[str, str]) -> tuple[int, str]:
        """Run `command` in the container, echoing its output; returns (exit status, output).

        `secrets` travel in the environment only, never on a command line.
        """
        if self.runner == "run":
            cmd = [self.engine, "run", "--rm", "--network=host", "--shm-size=2g", "-v", f"{self.task_root}:{TASK_ROOT}"]
            for name in secrets:
                cmd += ["-e", name]  # the value comes from this process's environment
            popen = {"args": [*cmd, self.image, *command], "env": {**os.environ, **secrets}}
        else:
            # chroot(1) switches to the image's root and user (and looks the program up along the image's
            # PATH inside it); the image's sh then enters its WORKDIR, as the runtime would.
            popen = {"args": ["chroot", f"--userspec={self.uid}:{self.gid}", f"--groups={self.gid}", str(self.root),
                              "/bin/sh", "-c", 'cd "$0" && exec "$@"', self.workdir, *command],
                     "env": {"PATH": DEFAULT_PATH, **self.env, **secrets}}
        lines = []
        with subprocess.Popen(**popen, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                lines.append(line)
        sys.stdout.flush()
        return proc.returncode, "".join(lines)


# ------------------------------------------------------------------------------------------- KFP executor input
def load_component(stage: str) -> dict:
    """The compiled component: its single task's component spec and executor container."""
    path = ROOT / "components" / stage / "component.yaml"
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    if len(tasks) != 1:
        raise SmokeError(f"{path}: expected one task in root.dag.tasks, found {len(tasks)}")
    comp = spec["components"][next(iter(tasks.values()))["componentRef"]["name"]]
    container = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
    return {"path": path, "component": comp, "container": container}


def parameter_value(value, kind: str):
    """As the backend's protojson renders a structpb value: integers as JSON integers."""
    if kind == "NUMBER_INTEGER" and value is not None:
        return int(value)
    if kind == "NUMBER_DOUBLE" and value is not None:
        return float(value)
    return value


def executor_input(comp: dict, where: str, params: dict, artifacts: dict, task_root: str) -> dict:
    """The executor input the KFP 2.17 driver builds for one task.

    Optional inputs the task does not set get their default, as the driver passes them along
    (kubeflow/pipelines 2.17.0 backend/src/v2/driver/resolve.go, resolveInputs: "If no value was input,
    pass along the default value to the component"); output artifacts go under one task root, the
    output file sits there as output_metadata.json and output parameters at /tmp/kfp/outputs/<name>
    (backend/src/v2/driver/driver.go, provisionOutputs).
    """
    defs = comp.get("inputDefinitions", {})
    values = {}
    for name, spec in defs.get("parameters", {}).items():
        if name in params:
            values[name] = parameter_value(params[name], spec["parameterType"])
        elif "defaultValue" in spec:
            values[name] = parameter_value(spec["defaultValue"], spec["parameterType"])
        elif not spec.get("isOptional"):
            raise SmokeError(f"{where}: input parameter {name!r} is required and the smoke run has no value for it")
    unknown = set(params) - set(defs.get("parameters", {}))
    if unknown:
        raise SmokeError(f"{where}: the smoke run sets {sorted(unknown)}, which the component does not declare")
    in_artifacts = {}
    for name, spec in defs.get("artifacts", {}).items():
        if name in artifacts:
            in_artifacts[name] = {"artifacts": [{**artifacts[name], "type": spec["artifactType"]}]}
        elif not spec.get("isOptional"):
            raise SmokeError(f"{where}: input artifact {name!r} is required and the smoke run has no value for it")
    outs = comp.get("outputDefinitions", {})
    out_artifacts = {name: {"artifacts": [{"name": name, "type": spec["artifactType"], "uri": f"{task_root}/{name}",
                                           "metadata": {}}]}
                     for name, spec in outs.get("artifacts", {}).items()}
    out_params = {name: {"outputFile": f"/tmp/kfp/outputs/{name}"} for name in outs.get("parameters", {})}
    return {"inputs": {"parameterValues": values, "artifacts": in_artifacts},
            "outputs": {"parameters": out_params, "artifacts": out_artifacts,
                        "outputFile": f"{task_root}/output_metadata.json"}}


def pod_command(container: dict, exec_input: dict) -> list[str]:
    """command + args with the launcher's placeholder substitution ({{$}} = the executor input JSON)."""
    text = json.dumps(exec_input)
    return [arg.replace("{{$}}", text) for arg in [*container["command"], *container.get("args", [])]]


def stage_inputs(loaded: dict, stage: str, values: dict, endpoint: str) -> tuple[dict, dict]:
    """The task's parameters as pipeline.py sets them, and the extra environment, for one stage.

    The endpoint goes in the `s3_endpoint` input where the component has one (pipeline.py passes it so),
    else in HPA_S3_ENDPOINT.
    """
    params = {**SMOKE_PARAMETERS[stage], **values}
    if "s3_endpoint" in loaded["component"].get("inputDefinitions", {}).get("parameters", {}):
        return {**params, "s3_endpoint": endpoint}, {}
    return params, {"HPA_S3_ENDPOINT": endpoint}


def run_stage(box: Container, stage: str, values: dict, artifacts: dict, secrets: dict, endpoint: str,
              work: Path) -> dict:
    loaded = load_component(stage)
    where = str(loaded["path"].relative_to(ROOT))
    params, extra_env = stage_inputs(loaded, stage, values, endpoint)
    task_dir = work / stage
    shutil.rmtree(task_dir, ignore_errors=True)
    task_dir.mkdir(parents=True)
    os.chown(task_dir, box.uid, box.gid)
    exec_input = executor_input(loaded["component"], where, params, artifacts, f"{TASK_ROOT}/{stage}")
    (task_dir.parent / f"{stage}.executor_input.json").write_text(json.dumps(exec_input, indent=1))
    log(f"{stage}: {' '.join(loaded['container']['command'][:2])} ... executor_main, as uid {box.uid} in {box.image}")
    start = time.monotonic()
    status, text = box.exec(pod_command(loaded["container"], exec_input), {**secrets, **extra_env})
    if any(value and value in text for value in secrets.values()):
        raise SmokeError(f"{stage}: an S3 key from the environment appears in the task's output")
    if status != 0:
        raise SmokeError(f"{stage}: the executor exited {status} (its output is above)")
    out_file = task_dir / "output_metadata.json"
    if not out_file.is_file():
        raise SmokeError(f"{stage}: no {TASK_ROOT}/{stage}/output_metadata.json written by the executor")
    log(f"{stage}: done in {time.monotonic() - start:.1f} s")
    return json.loads(out_file.read_text())


def host_path(work: Path, uri: str) -> Path:
    return work / uri[len(TASK_ROOT) + 1:]


def owned_by(path: Path, uid: int) -> None:
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if p.stat().st_uid != uid:
            raise SmokeError(f"{p} is owned by uid {p.stat().st_uid}, expected {uid} (the image's USER)")


# ------------------------------------------------------------------------------------------- the smoke run
def smoke_run(engine: str, which: str, args) -> None:
    import numpy as np
    import torch

    from hpa.s3server import LocalS3Server
    from hpa.store import open_store

    image, work = _built_image_and_work_dir(engine, which, Path(args.work) / f"run-{which}")
    start = time.monotonic()
    with LocalS3Server() as server, Container(engine, image, args.runner, work) as box, _env(server.env()):
        open_store(f"s3://{BUCKET}", create_bucket=True).put_bytes("smoke/.keep", b"")
        secrets = {"HPA_S3_ACCESS_KEY": server.access_key, "HPA_S3_SECRET_KEY": server.secret_key}
        store_uri = f"s3://{BUCKET}/smoke-{which}"

        out = run_stage(box, "download", {"store_uri": store_uri}, {}, secrets, server.endpoint, work)
        data_uri = out["parameterValues"]["data_uri"]
        dataset = open_store(data_uri)
        manifest = dataset.read_manifest()
        n_objects = dataset.verify()
        manifest_file = host_path(work, out["artifacts"]["manifest"]["artifacts"][0]["uri"])
        if not data_uri.startswith(store_uri + "/") or json.loads(manifest_file.read_text()) != manifest:
            raise SmokeError(f"download: data_uri {data_uri} / manifest artifact do not match the committed dataset")
        train_ids = [r["Id"] for r in csv.DictReader(io.StringIO(dataset.get_bytes("train.csv").decode()))]
        if len(train_ids) != N_TRAIN:
            raise SmokeError(f"download: train.csv has {len(train_ids)} rows, expected {N_TRAIN}")
        log(f"download: verified {data_uri}: manifest committed, {n_objects} objects read back with their sha256")

        out = run_stage(box, "split", {"data_uri": data_uri}, {}, secrets, server.endpoint, work)
        split_uri = out["artifacts"]["split_csv"]["artifacts"][0]["uri"]
        rows = list(csv.DictReader(host_path(work, split_uri).open()))
        if sorted(r["Id"] for r in rows) != sorted(train_ids) or {int(r["fold"]) for r in rows} != set(range(FOLDS)):
            raise SmokeError(f"split: {split_uri} does not assign every training id to one of {FOLDS} folds")
        log(f"split: verified {len(rows)} ids in {FOLDS} folds ({split_uri})")

        split_artifact = {"name": "split_csv", "uri": split_uri, "metadata": {}}
        out = run_stage(box, "train", {"data_uri": data_uri}, {"split_csv": split_artifact}, secrets,
                        server.endpoint, work)
        arts = {name: host_path(work, a["artifacts"][0]["uri"]) for name, a in out["artifacts"].items()}
        checkpoint = torch.load(arts["model"], map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict) or not any(isinstance(v, dict) and v for v in checkpoint.values()):
            raise SmokeError(f"train: {arts['model']} is not a checkpoint with a state dict")
        metrics = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        if not metrics or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()):
            raise SmokeError(f"train: metrics {metrics} are not finite numbers")
        test = np.load(arts["test_predictions"], allow_pickle=False)
        if test["probs"].shape != (N_TEST, 28):
            raise SmokeError(f"train: test predictions of shape {test['probs'].shape}, expected ({N_TEST}, 28)")
        for name in ("model", "run", "val_predictions", "test_predictions"):  # metrics live in the metadata
            owned_by(arts[name], box.uid)
        log(f"train: verified checkpoint ({arts['model'].stat().st_size / 1e6:.1f} MB), "
            f"test predictions {test['probs'].shape}, metrics {json.dumps(metrics)}")
    log(f"smoke run on {image}: download -> split -> train passed in {time.monotonic() - start:.0f} s "
        f"(runner {box.runner}, uid {box.uid})")


# ------------------------------------------------------------------------------------------- the TrainJob's torchrun
DDP_PROCS = 2  # one pod with two CPU training processes (gloo), as a TrainJob on CPU-only nodes starts them
TRAINER_MASTER_PORT = 29500  # Trainer v2.1.0 pkg/constants ContainerTrainerPort: PET_MASTER_PORT of every TrainJob


def ddp_config(data: str, split: str, out: str, endpoint: str, image: str):
    """The TrainJob the smoke run renders: one node, DDP_PROCS CPU processes, the smoke's tiny data, no
    pretrained weights (no network in the image), no DataLoader workers (2 processes on a small machine)."""
    from hpa import train_distributed

    cfg = train_distributed.DistributedConfig(
        data=data, split=split, out=out, s3_endpoint=endpoint, image=image, num_nodes=1, gpus_per_node=0,
        procs_per_node=DDP_PROCS, arch="resnet18", size=IMAGE_SIZE, epochs=1, batch_size=8, weights="",
        train_options={"workers": 0})
    return train_distributed.validate_config(cfg)


def trainjob_pod(job: dict, secrets: dict[str, str], node_rank: int, master_addr: str,
                 master_port: int = TRAINER_MASTER_PORT) -> tuple[list[str], dict[str, str]]:
    """Command and environment of node `node_rank`'s pod of a rendered TrainJob, as Kubeflow Trainer makes them.

    The container's command is trainer.command + trainer.args; its env is trainer.env (a secretKeyRef
    resolved from `secrets`, keyed by the variable's name, as the kubelet resolves it) plus what the Torch
    plugin adds for torchrun (kubeflow/trainer v2.1.0 pkg/runtime/framework/plugins/torch/torch.go
    EnforceMLPolicy): PET_NNODES = numNodes, PET_NPROC_PER_NODE = numProcPerNode, PET_NODE_RANK = the job
    completion index, PET_MASTER_ADDR = <job>-node-0-0.<job> (here `master_addr`: no cluster DNS),
    PET_MASTER_PORT = 29500. torchrun reads every option from PET_<OPTION> and defaults to the static
    rendezvous (torch/distributed/run.py, argparse_util.env).
    """
    trainer = job["spec"]["trainer"]
    env = {}
    for item in trainer.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            if item["name"] not in secrets:
                raise SmokeError(f"TrainJob env {item['name']} comes from a secret the smoke run does not have")
            env[item["name"]] = secrets[item["name"]]
        else:
            raise SmokeError(f"TrainJob env {item['name']}: expected a value or a secretKeyRef, got {item}")
    env.update({"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_NODE_RANK": str(node_rank), "PET_MASTER_ADDR": master_addr, "PET_MASTER_PORT": str(master_port)})
    return [*trainer["command"], *trainer.get("args", [])], env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launchers(command: list[str]) -> dict[str, list[str]]:
    """The rendered TrainJob command, and the same job through the `torchrun` on the image's PATH.

    A job may start torch's launcher either way: as a module of the image's `python3` or as the `torchrun`
    script (its docs, the Trainer's examples, a user's own manifest). Both must start workers that import
    hpa: torchrun starts them with os.getenv("PYTHON_EXEC", sys.executable) (torch 2.14.1
    torch/distributed/run.py config_from_args), so a `torchrun` of another Python than the venv's fails."""
    module = ["-m", "torch.distributed.run"]
    if command[0] == "torchrun":
        rest = command[1:]
    elif command[1:3] == module:
        rest = command[3:]
    else:
        raise SmokeError(f"the TrainJob command {command[:4]} starts neither torchrun nor torch.distributed.run")
    variants = {"trainjob": command, "torchrun": ["torchrun", *rest]}
    return {"trainjob": command} if variants["torchrun"] == command else variants


def smoke_ddp(engine: str, which: str, args) -> None:
    """The exact command a TrainJob pod runs (rendered by hpa.train_distributed: torch's launcher, `-m hpa
    train ...`) with its PET_* environment, DDP_PROCS gloo processes on the CPU, on data that `python -m hpa
    download` and `python -m hpa split` write inside the image; then the same job through `torchrun` (see
    launchers). Each passes when every rank logged that it joined a world of DDP_PROCS, the launcher exited
    0 and the job's metrics.json and last.pt are in the store."""
    from hpa import train_distributed
    from hpa.s3server import LocalS3Server
    from hpa.store import open_store

    image, work = _built_image_and_work_dir(engine, which, Path(args.work) / f"ddp-{which}")
    start = time.monotonic()
    failures = []
    with LocalS3Server() as server, Container(engine, image, args.runner, work) as box, _env(server.env()):
        open_store(f"s3://{BUCKET}", create_bucket=True).put_bytes("smoke/.keep", b"")
        secrets = {"HPA_S3_ACCESS_KEY": server.access_key, "HPA_S3_SECRET_KEY": server.secret_key}
        root = f"s3://{BUCKET}/smoke-ddp-{which}"
        data, split = f"{root}/data", f"{root}/split.csv"
        env = {"HPA_S3_ENDPOINT": server.endpoint, **secrets}
        for step in (["python", "-m", "hpa", "download", "--source", "synthetic", "--dest", data,
                      "--n-train", str(N_TRAIN), "--n-test", str(N_TEST), "--size", str(IMAGE_SIZE), "--seed", "0"],
                     ["python", "-m", "hpa", "split", "--data", data, "--folds", str(FOLDS), "--out", split]):
            status, _ = box.exec(step, env)
            if status != 0:
                raise SmokeError(f"`{' '.join(step[:4])}` exited {status} in {image} (its output is above)")
        _, where = box.exec(["sh", "-c", 'command -v torchrun && head -n 1 "$(command -v torchrun)"'], {})
        log(f"ddp: torchrun on the image's PATH: {' '.join(where.split())}")
        for label in ("trainjob", "torchrun"):
            cfg = ddp_config(data, split, f"{root}/out-{label}", server.endpoint, image)
            rendered, env = trainjob_pod(train_distributed.render_trainjob(cfg), secrets, node_rank=0,
                                         master_addr="127.0.0.1", master_port=free_port())
            command = launchers(rendered).get(label)
            if command is None:
                continue  # the TrainJob itself runs `torchrun`
            log(f"ddp ({label}): $ {' '.join(f'{k}={v}' for k, v in env.items() if k.startswith('PET_'))} "
                f"{shlex.join(command)}")
            status, text = box.exec(command, env)
            if any(value in text for value in secrets.values()):
                raise SmokeError("ddp: an S3 key from the environment appears in the job's output")
            try:
                check_ddp_output(status, text, open_store(cfg.out), f"{image} ({label})")
            except SmokeError as exc:
                failures.append(str(exc))  # run the other launcher too: the report names every failing one
    if failures:
        raise SmokeError("; ".join(failures))
    log(f"ddp on {image}: {DDP_PROCS} ranks trained 1 epoch with each launcher in {time.monotonic() - start:.0f} s "
        f"(runner {box.runner}, uid {box.uid})")


def check_ddp_output(status: int, text: str, out, image: str) -> None:
    """Every rank joined a world of DDP_PROCS, the launcher exited 0, the job wrote metrics.json and last.pt."""
    missing = [rank for rank in range(DDP_PROCS)
               if not re.search(rf"\[rank{rank}\] .*world size {DDP_PROCS}\b", text)]
    if missing:
        raise SmokeError(f"ddp in {image}: rank(s) {missing} never logged `world size {DDP_PROCS}` (the "
                         f"launcher exited {status}; its output is above)")
    if status != 0:
        raise SmokeError(f"ddp in {image}: the launcher exited {status} (its output is above)")
    if not out.exists("metrics.json"):
        raise SmokeError(f"ddp in {image}: no metrics.json under {out}")
    metrics = json.loads(out.get_bytes("metrics.json"))
    if metrics.get("epochs_run") != 1 or not math.isfinite(metrics.get("best_val_macro_f1", math.nan)):
        raise SmokeError(f"ddp in {image}: metrics.json {metrics} is not one finished epoch")
    if not out.exists("last.pt"):
        raise SmokeError(f"ddp in {image}: no last.pt under {out}")
    log(f"ddp: {DDP_PROCS} ranks joined, training finished: {json.dumps(metrics)}")


def check_imports(engine: str, which: str, args) -> None:
    image = SMOKE_TAG.format(which)
    work = Path(args.work) / f"check-{which}"
    work.mkdir(parents=True, exist_ok=True)
    code = ("import os, pwd, sys, hpa, kfp, torch; print(f'uid={os.getuid()} gid={os.getgid()} "
            "user={pwd.getpwuid(os.getuid()).pw_name} cwd={os.getcwd()} python={sys.version.split()[0]} '"
            "f'torch={torch.__version__} kfp={kfp.__version__} prefix={sys.prefix} '"
            "f'torch_at={os.path.dirname(torch.__file__)}')")
    with Container(engine, image, args.runner, work) as box:
        status, text = box.exec(["python", "-c", code], {})
    if status != 0 or f"uid={box.uid} " not in text or f" cwd={box.workdir} " not in text:
        raise SmokeError(f"{image}: `python -c 'import hpa, torch, kfp'` as uid {box.uid} exited {status}")
    log(f"{image}: import hpa, torch, kfp as uid {box.uid}: ok")


@contextmanager
def _env(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def clean(engine: str, which: str, args) -> None:
    refs = [SMOKE_TAG.format(which)]
    if args.base != "real":
        refs.append(STAND_IN_PREFIX + dockerfile_base(DOCKERFILES[which]))
    for ref in refs:
        if image_exists(engine, ref):
            run([engine, "rmi", ref])
    run([engine, "image", "prune", "-f"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python images/smoke.py", description=__doc__.split("\n")[0])
    p.add_argument("step", nargs="?", default="all", choices=("all", "build", "run", "ddp", "check", "clean"))
    p.add_argument("images", nargs="*", default=["cpu", "cuda"], help="cpu and/or cuda (default both)")
    p.add_argument("--engine", default="auto", choices=("auto", "docker", "podman"))
    p.add_argument("--base", default="auto", choices=("auto", "real", "stand-in"),
                   help="real: pull the Dockerfiles' bases; stand-in: mmdebstrap stand-ins; auto: real if pullable")
    p.add_argument("--runner", default="auto", choices=("auto", "run", "chroot"))
    p.add_argument("--torch-index-url", default="auto",
                   help="CPU image's torch index; auto: the Dockerfile's, or PyPI when that is unreachable")
    p.add_argument("--no-cache", action="store_true", help="build every layer afresh (for timing a cold build)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hpa-image-smoke"))
    args = p.parse_args(argv)
    bad = [i for i in args.images if i not in DOCKERFILES]
    if bad:
        p.error(f"images: expected cpu and/or cuda, got {', '.join(bad)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unmount and stop the S3 server on a kill too
    try:
        engine = pick_engine(args.engine)
        log(f"engine {engine}")
        steps = ["build", "run", "ddp"] if args.step == "all" else [args.step]
        for which in args.images:
            for step in steps:
                {"build": build, "run": smoke_run, "ddp": smoke_ddp, "check": check_imports,
                 "clean": clean}[step](engine, which, args)
                if step == "ddp" and args.step == "all":
                    check_imports(engine, which, args)
    except SmokeError as exc:
        print(f"smoke: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"smoke: `{' '.join(map(str, exc.cmd[:3]))} ...` exited {exc.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
