"""DDP helpers for `python -m hpa train` (process group, rank info, collectives), kept apart from the training
loop as in torchvision's references; launching the Kubernetes jobs that run it is hpa.train_distributed's.

`torchrun`, PyTorchJob and Kubeflow Trainer all set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; without them everything here degrades to a single process (rank 0 of 1).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpa.config import env_int
from hpa.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group when launched by torchrun/PyTorchJob: NCCL on GPU, gloo on CPU."""
    info = dist_info_from_env()
    if not info.distributed:
        return info
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    _tag_logs(info.rank)
    return info


def dist_info_from_env() -> DistInfo:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; a bad or missing one is one ConfigError line."""
    world_size = env_int("WORLD_SIZE", 1, minimum=1)
    if world_size == 1:
        return DistInfo()
    if not os.environ.get("RANK", "").strip():
        raise ConfigError(f"environment variable RANK is not set, but WORLD_SIZE={world_size}: expected an integer "
                          f"in [0, {world_size}) (torchrun, PyTorchJob and TrainJob set both)")
    rank = env_int("RANK", 0, minimum=0)
    if rank >= world_size:
        raise ConfigError(f"environment variable RANK={rank}: expected an integer in [0, WORLD_SIZE={world_size})")
    return DistInfo(rank, world_size, env_int("LOCAL_RANK", 0, minimum=0))


def _tag_logs(rank: int) -> None:
    """Prefix every stderr log record with the rank, so interleaved logs from workers stay readable."""
    old_factory = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = old_factory(*args, **kwargs)
        record.msg = f"[rank{rank}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj):
    """Every rank's `obj` as a list ordered by rank (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (e.g. a SIGTERM seen by one worker)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank. DDP syncs them at the start of
    each training forward, so after the last step each rank holds its own batch's update; evaluation
    must use the statistics of the model that rank 0 saves."""
    if dist.is_available() and dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
