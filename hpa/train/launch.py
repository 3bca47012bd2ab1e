"""One training launcher inside a pod: `train_processes(cfg, nproc)` runs `python -m hpa train` as `nproc` DDP
processes on this machine, one per GPU it was given (gloo CPU processes where there is no CUDA), and stops them
all when the caller is stopped.

The command is `<this interpreter> -m torch.distributed.run --standalone --nproc-per-node N -m hpa train ...`,
never a `torchrun` script found on PATH: that script belongs to whichever Python installed it (in the CUDA
image, the base image's, which cannot import hpa), and torch.distributed.run starts the workers with
`os.getenv("PYTHON_EXEC", sys.executable)` (torch/distributed/run.py `config_from_args`, torch 2.14). So the
launcher runs under `sys.executable` and sets PYTHON_EXEC to it: the workers are this interpreter, which imports
hpa.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from hpa.config import option_args
from hpa.errors import ConfigError, HPAError
from hpa.processes import RunProcesses, die_with_parent_hook, signals_interrupt
from hpa.train.config import TrainConfig
from hpa.train.run import train

log = logging.getLogger("hpa.train")

# Seconds between SIGTERM and SIGKILL when the task is stopped: the workers checkpoint at their next step boundary
# (hpa.train.loop.StopFlag) and last.pt may be on its way to the store; Kubernetes' default grace is 30 s.
STOP_GRACE = 20.0


def train_args(cfg: TrainConfig) -> list[str]:
    """`python -m hpa train`'s arguments for `cfg`: every field, so that the workers run exactly `cfg`."""
    return option_args({k: v for k, v in vars(cfg).items() if v is not None})


def train_command(cfg: TrainConfig, nproc: int) -> list[str]:
    """The command that trains `cfg` as `nproc` processes of this machine (torch.distributed.run --standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "hpa", "train", *train_args(cfg)]


def check_devices(gpus: int) -> str:
    """"cuda" when this machine has at least `gpus` CUDA devices; "cpu" (gloo processes) when it has none, as in
    a local run or CI; one ConfigError line when it has some but fewer."""
    if not torch.cuda.is_available():
        return "cpu"
    found = torch.cuda.device_count()
    if found < gpus:
        raise ConfigError(f"train gpus={gpus}: this pod sees {found} CUDA device(s); expected at least {gpus} "
                          "(the task's GPU limit is the gpus run parameter)")
    return "cuda"


def train_processes(cfg: TrainConfig, nproc: int, grace: float = STOP_GRACE) -> None:
    """Train `cfg` as `nproc` DDP processes and wait for them. The processes log to this process's stdout and
    stderr (rank 0 prints the metric lines). SIGTERM, SIGINT or SIGHUP stops every process the launcher started
    (SIGTERM, then SIGKILL after `grace` seconds) and raises hpa.processes.Interrupted; if this process is
    SIGKILLed, the kernel kills the launcher (PR_SET_PDEATHSIG), whose workers then fail on their collectives.
    A non-zero exit is one HPAError line."""
    if nproc < 2:
        raise ConfigError(f"train_processes nproc={nproc}: expected >= 2 (one process trains in-process: hpa.train)")
    kind = check_devices(nproc)
    if kind == "cpu":
        log.warning("gpus=%d but no CUDA device here: training as %d gloo CPU processes", nproc, nproc)
    cmd = train_command(cfg, nproc)
    env = {**os.environ, "PYTHON_EXEC": sys.executable}
    processes = RunProcesses(grace=grace)
    log.info("training as %d processes: %s", nproc, " ".join(cmd[:8]) + " ...")
    with signals_interrupt(lambda signum: processes.stop()) as guard:
        try:
            proc = processes.popen(cmd, env=env, preexec_fn=die_with_parent_hook())
            code = proc.wait() if proc is not None else None
        finally:
            guard.shield()
            processes.stop()
    if code != 0:
        raise HPAError(f"train: {nproc} training processes (torch.distributed.run) exited with code {code}; "
                       "their log is above")


def run_training(cfg: TrainConfig, nproc: int) -> None:
    """`cfg` trained by `nproc` processes: in this process when nproc <= 1, else `train_processes`."""
    if nproc > 1:
        train_processes(cfg, nproc)
    else:
        train(cfg)
