"""Relational (similarity-distillation) loss of ReSSL and ISD.

For student rows q [B,D] (or several student crops [C,B,D] sharing one teacher row), teacher rows
k [B,D] and a queue of anchors [K,D], all unit norm:

    p_t = softmax(k @ queue.T / tau_t)          (no gradient)
    loss_i = -sum_j p_t[i, j] * log_softmax(q @ queue.T / tau_s)[i, j]

Softmaxes are computed in fp32 whatever the input dtype: exp(1/0.01) overflows fp16.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .relational_cpu import DEFAULT_BLOCK, relational_loss_cpu

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _check(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float):
    if q.dim() not in (2, 3) or k.dim() != 2 or queue.dim() != 2:
        raise ValueError(f"expected q [B,D] or [C,B,D], k [B,D], queue [K,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(queue.shape)}")
    if q.shape[-2:] != k.shape or k.shape[1] != queue.shape[1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, queue {tuple(queue.shape)}")
    if not (tau_s > 0 and tau_t > 0):
        raise ValueError(f"temperatures must be positive, got tau_s={tau_s}, tau_t={tau_t}")


def relational_loss_reference(q, k, queue, tau_s: float, tau_t: float, reduction: str = "mean"):
    """Exact reference: materialises the [B,K] logits. Gradient flows to q only."""
    _check(q, k, queue, tau_s, tau_t)
    anchors = queue.detach().float()
    p_t = F.softmax(k.detach().float() @ anchors.T / tau_t, dim=-1)  # [B,K], shared by every crop
    log_p_s = F.log_softmax(q.float() @ anchors.T / tau_s, dim=-1)  # [B,K] or [C,B,K]
    per_row = -(p_t * log_p_s).sum(-1)
    return per_row.mean() if reduction == "mean" else per_row


def _relational_loss_triton(q, k, queue, tau_s: float, tau_t: float, reduction: str = "mean"):
    """The kernels of relational_triton.py, imported on first use: triton is optional on CPU machines."""
    if not TRITON_AVAILABLE:
        raise ValueError("impl='triton' needs the triton package, which is not installed")
    from .relational_triton import relational_loss_triton as triton_impl

    return triton_impl(q, k, queue, tau_s, tau_t, reduction=reduction)


_IMPLS = {"reference": relational_loss_reference, "cpu": relational_loss_cpu, "triton": _relational_loss_triton}


def auto_impl(q: torch.Tensor, queue: torch.Tensor) -> str:
    """"triton" for CUDA tensors when triton is installed; elsewhere "cpu", unless the queue fits in one of its
    blocks: then the blockwise path saves little memory and its backward's second pass over the queue makes it
    1.25-1.6x slower than the reference (bench/loss.py, K=4096)."""
    if q.is_cuda and TRITON_AVAILABLE:
        return "triton"
    return "reference" if queue.shape[0] <= DEFAULT_BLOCK else "cpu"


def relational_loss(q, k, queue, tau_s: float, tau_t: float, *, impl: str = "auto", reduction: str = "mean"):
    """Mean cross-entropy between teacher and student similarity distributions over the queue.

    impl: "reference" (materialises [B,K]) | "cpu" (blockwise torch, any device, O(B*block) memory) |
          "triton" (GPU kernels) | "auto" (`auto_impl`).
    reduction: "mean" (a scalar) or "none" (per-row values, shape q.shape[:-1]).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if impl == "auto":
        impl = auto_impl(q, queue)
    if impl not in _IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from {sorted(_IMPLS)} or 'auto'")
    _check(q, k, queue, tau_s, tau_t)
    if not all(t.is_floating_point() for t in (q, k, queue)):
        raise ValueError(f"expected floating-point tensors, got {q.dtype}, {k.dtype}, {queue.dtype}")
    with torch.autocast(q.device.type, enabled=False):  # under autocast the reference's logits would be bf16
        return _IMPLS[impl](q, k, queue, tau_s, tau_t, reduction=reduction)
