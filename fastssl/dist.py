"""The few torch.distributed helpers the trainer needs; every function is a no-op in one process."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as td


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun sets LOCAL_RANK): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.

    The long timeout covers rank 0's kNN monitor, which the other ranks wait for at their next collective.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2),
                              device_id=device if device.type == "cuda" else None)


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0, in rank order (no gradient)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    td.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x summed (op "sum") or maximised (op "max") elementwise over ranks, in place; returns x (no gradient)."""
    if is_dist():
        td.all_reduce(x, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX}[op])
    return x
