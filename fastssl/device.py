"""Where and in what precision the networks run: device choice, bf16 autocast, the CPU's bf16 support."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import UserError


def local_rank() -> int:
    """This process's index on its machine (torchrun sets LOCAL_RANK): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose auto | cpu | cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # torchrun starts one process per GPU and tells each its GPU by LOCAL_RANK
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} GPU(s) are visible; start "
                            f"at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed view sizes: let cuDNN time its algorithms once
        return torch.device("cuda", index)
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matmul/conv on this CPU (AVX512-BF16 or AMX): autocast then helps rather than hurts."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """bf16 autocast for convs and matmuls; BN, softmaxes and the losses stay fp32 (autocast's fp32 list + .float())."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a blocking copy: through pinned memory on CUDA (the caching host
    allocator keeps the pinned buffer until the copy is done)."""
    if t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
