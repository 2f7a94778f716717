"""Every relational-loss implementation equals the reference: loss and gradient w.r.t. q.

The Triton kernels run under TRITON_INTERPRET=1 on CPU tensors. The variable must be set before triton is
imported, so they run in one subprocess (this file as a script, `_run_triton_cases`) whose per-case
verdicts the tests below read.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastssl.kernels import relational as R
from fastssl.kernels.relational_cpu import DEFAULT_BLOCK, relational_loss_cpu

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (C, B, K, D, tau_t, scale, block or k_split, reduction); C=0 means q is [B,D], scale multiplies the
# unit rows of q and k (large logits), block/k_split is small so K spans several blocks with a ragged tail.
CPU_CASES = [
    (0, 1, 37, 64, 0.04, 1.0, 16, "mean"),
    (0, 8, 1000, 128, 0.04, 1.0, 96, "mean"),
    (0, 5, 300, 512, 0.01, 1.0, 128, "none"),
    (0, 6, 257, 64, 0.01, 10.0, 64, "none"),
    (3, 7, 999, 128, 0.01, 10.0, 128, "mean"),
    (2, 4, 130, 64, 0.07, 1.0, 4096, "none"),  # one block holds the whole queue
    (4, 1, 65, 512, 0.02, 10.0, 32, "none"),
]
TRITON_CASES = [
    (0, 1, 50, 64, 0.04, 1.0, None, "mean"),
    (0, 17, 99, 128, 0.01, 1.0, 40, "none"),  # 3 chunks, none a multiple of BLOCK_K
    (0, 5, 70, 512, 0.04, 10.0, None, "none"),
    (0, 9, 64, 100, 0.05, 1.0, 32, "mean"),  # D padded to 128
    (3, 7, 130, 64, 0.01, 10.0, 64, "none"),
    (2, 20, 33, 128, 0.04, 1.0, None, "mean"),
]


def _inputs(case, dtype=torch.float32, seed=0):
    crops, batch, keys, dim, _, scale = case[:6]
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    q = unit(*((crops,) if crops else ()), batch, dim) * scale
    return q.to(dtype), (unit(batch, dim) * scale).to(dtype), unit(keys, dim).to(dtype)


def _far_inputs(keys=45, dim=64):
    """Students pointing away from every anchor: all their logits are about -200, so lse is too."""
    g = torch.Generator().manual_seed(0)
    anchor = F.normalize(torch.randn(dim, generator=g), dim=0)
    queue = F.normalize(anchor + 0.05 * torch.randn(keys, dim, generator=g), dim=-1)
    q = -20 * F.normalize(anchor + 0.05 * torch.randn(3, dim, generator=g), dim=-1)
    return q, F.normalize(torch.randn(3, dim, generator=g), dim=-1), queue


def _loss_and_grad(fn, q, k, queue, tau_s, tau_t, reduction):
    q = q.clone().requires_grad_()
    loss = fn(q, k, queue, tau_s, tau_t, reduction=reduction)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)  # tests every row's grad
    (loss * weights).sum().backward()
    return loss.detach(), q.grad


def _assert_matches(fn, q, k, queue, tau_t, reduction="none", tau_s=0.1):
    """fn's loss and grad equal the reference's, to the rounding of logits as large as these inputs give."""
    ref_loss, ref_grad = _loss_and_grad(R.relational_loss_reference, q, k, queue, tau_s, tau_t, reduction)
    loss, grad = _loss_and_grad(fn, q, k, queue, tau_s, tau_t, reduction)
    assert loss.shape == ref_loss.shape and grad.dtype == q.dtype
    eps = 4e-3 if q.dtype == torch.bfloat16 else 1e-6  # bf16 grads carry 8 bits
    norm = lambda t: t.float().norm(dim=-1).max().item()  # noqa: E731
    logit_scale = norm(queue) * (norm(q) / tau_s + norm(k) / tau_t)
    torch.testing.assert_close(loss.float(), ref_loss, rtol=eps, atol=eps * logit_scale)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=10 * eps,
                               atol=eps * logit_scale * ref_grad.abs().max().item())


def _assert_case(fn, case, dtype=torch.float32):
    _assert_matches(fn, *_inputs(case, dtype), tau_t=case[4], reduction=case[7])


# --- blockwise torch path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_cpu_matches_reference(case):
    _assert_case(lambda *a, **kw: relational_loss_cpu(*a, **kw, block=case[6]), case)


@pytest.mark.parametrize("case", CPU_CASES[1:2] + CPU_CASES[4:5], ids=str)
def test_cpu_matches_reference_bf16(case):
    _assert_case(lambda *a, **kw: relational_loss_cpu(*a, **kw, block=case[6]), case, dtype=torch.bfloat16)


def test_cpu_matches_reference_far_from_queue():
    _assert_matches(lambda *a, **kw: relational_loss_cpu(*a, **kw, block=16), *_far_inputs(), tau_t=0.04)


@pytest.mark.parametrize("crops", [0, 2])
def test_cpu_gradcheck(crops):
    q, k, queue = _inputs((crops, 3, 23, 8, 0.05, 3.0), torch.float64)
    fn = lambda q: relational_loss_cpu(q, k, queue, 0.1, 0.05, reduction="none", block=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q.requires_grad_(),))


class _LargestAllocation(TorchDispatchMode):
    """Records the numel of the largest tensor any op allocates (views and in-place results are not)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_cpu_never_materialises_batch_by_queue():
    crops, batch, keys, block = 2, 16, 4096, 256
    q, k, queue = _inputs((crops, batch, keys, 64, 0.04, 1.0))
    q.requires_grad_()
    with _LargestAllocation() as mode:
        relational_loss_cpu(q, k, queue, 0.1, 0.04, block=block).backward()
    assert mode.largest <= (crops + 1) * batch * block < batch * keys


# --- every implementation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_no_gradient_to_teacher_or_queue(impl):
    q, k, queue = _inputs((2, 4, 50, 64, 0.04, 1.0))
    q, k, queue = q.requires_grad_(), k.requires_grad_(), queue.requires_grad_()
    R.relational_loss(q, k, queue, 0.1, 0.04, impl=impl).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


@pytest.mark.parametrize("keys, expected", [(DEFAULT_BLOCK, "reference"), (DEFAULT_BLOCK + 1, "cpu")])
def test_auto_on_cpu_tensors_streams_only_queues_longer_than_a_block(monkeypatch, keys, expected):
    for name in ("reference", "cpu"):
        monkeypatch.setitem(R._IMPLS, name, lambda *a, name=name, **kw: name)
    q, k, queue = _inputs((0, 2, keys, 64, 0.04, 1.0))
    assert R.relational_loss(q, k, queue, 0.1, 0.04) == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="fast"), "unknown impl"),
    (dict(reduction="sum"), "reduction"),
    (dict(shapes=((2, 64), (3, 64), (10, 64))), "shape mismatch"),
    (dict(shapes=((2, 64), (2, 64), (10, 32))), "shape mismatch"),
    (dict(shapes=((64,), (2, 64), (10, 64))), "expected q"),
    (dict(tau_t=0.0), "temperatures"),
    (dict(dtype=torch.int64), "floating-point"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    shapes = kwargs.pop("shapes", ((2, 64), (2, 64), (10, 64)))
    dtype = kwargs.pop("dtype", torch.float32)
    tau_t = kwargs.pop("tau_t", 0.04)
    q, k, queue = (torch.ones(s, dtype=dtype) for s in shapes)
    with pytest.raises(ValueError, match=match):
        R.relational_loss(q, k, queue, 0.1, tau_t, **kwargs)


def test_cpu_rejects_bad_block():
    q, k, queue = _inputs((0, 2, 10, 64, 0.04, 1.0))
    with pytest.raises(ValueError, match="block"):
        relational_loss_cpu(q, k, queue, 0.1, 0.04, block=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_triton_rejects_cpu_tensors():
    q, k, queue = _inputs((0, 2, 10, 64, 0.04, 1.0))
    with pytest.raises(ValueError, match="CUDA"):
        R.relational_loss(q, k, queue, 0.1, 0.04, impl="triton")


# --- Triton autotuning: which configs are timed, and that the choice is kept on disk --------------------

def _triton_module():
    return importlib.import_module(f"{R.__package__}.relational_triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_autotune_drops_configs_whose_tiles_exceed_the_register_budget():
    T = _triton_module()
    largest = T.triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8)
    assert T.tile_registers(largest, 512, accumulates=True) == (2 * 128 * 512 + 128 * 32) / 256
    assert T.tile_registers(largest, 512, accumulates=False) == (128 * 512 + 128 * 32) / 256
    # at a given D, a thread's share of the row tiles grows with BLOCK_M / num_warps
    rows_per_warp = lambda configs: {c.kwargs["BLOCK_M"] / c.num_warps for c in configs}  # noqa: E731
    assert T.fitting_configs(T.GPU_CONFIGS, 128, accumulates=True) == T.GPU_CONFIGS  # at D=128 every tile fits
    assert max(rows_per_warp(T.fitting_configs(T.GPU_CONFIGS, 256, accumulates=True))) == 8
    assert max(rows_per_warp(T.fitting_configs(T.GPU_CONFIGS, 512, accumulates=True))) == 4
    assert max(rows_per_warp(T.fitting_configs(T.GPU_CONFIGS, 512, accumulates=False))) == 8
    for d_pad in (16, 32, 64, 128, 256, 512):
        for accumulates in (True, False):
            kept = T.fitting_configs(T.GPU_CONFIGS, d_pad, accumulates)
            assert kept and all(T.tile_registers(c, d_pad, accumulates) <= T.REGISTER_BUDGET for c in kept)
    # past the budget (D=1024 and up) the configs with the smallest tiles are left, never none
    fewest = min(T.tile_registers(c, 1024, True) for c in T.GPU_CONFIGS)
    kept = T.fitting_configs(T.GPU_CONFIGS, 1024, accumulates=True)
    assert fewest > T.REGISTER_BUDGET and kept and {T.tile_registers(c, 1024, True) for c in kept} == {fewest}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton turns its autotuning cache off "
                                                                         "in the interpreter, which has one config")
def test_triton_autotuners_prune_by_registers_and_cache_their_choice_on_disk():
    T = _triton_module()
    for kernel, kwargs, accumulates in ((T._stats_kernel, {"WITH_MEAN": True}, True),
                                        (T._stats_kernel, {"WITH_MEAN": False}, False), (T._grad_kernel, {}, True)):
        assert kernel.configs == T.GPU_CONFIGS and kernel.cache_results
        pruned = kernel.early_config_prune(kernel.configs, {"D": 500}, D_PAD=512, PRECISION="tf32x3", **kwargs)
        assert pruned == T.fitting_configs(T.GPU_CONFIGS, 512, accumulates)
    # a Triton that passes no keyword arguments: the stats kernel is pruned as if it accumulated
    assert T._stats_kernel.early_config_prune(T.GPU_CONFIGS, {"D": 500}) == T.fitting_configs(T.GPU_CONFIGS, 512, True)


# --- Triton kernels, interpreted ---------------------------------------------------------------------------

def _triton_no_grad_to_teacher_or_queue(impl):
    q, k, queue = (t.requires_grad_() for t in _inputs((2, 4, 50, 64, 0.04, 1.0)))
    impl(q, k, queue, 0.1, 0.04).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None and queue.grad is None


def _triton_check(case, dtype=torch.float32):
    return lambda impl: _assert_case(lambda *a, **kw: impl(*a, **kw, k_split=case[6]), case, dtype)


# Each check takes relational_loss_triton, which only the interpreting subprocess can import.
TRITON_CHECKS = {
    **{str(case): _triton_check(case) for case in TRITON_CASES},
    **{f"{case} bf16": _triton_check(case, torch.bfloat16) for case in TRITON_CASES[1:3]},
    f"{TRITON_CASES[0]} fp64": _triton_check(TRITON_CASES[0], torch.float64),
    "far from queue": lambda impl: _assert_matches(impl, *_far_inputs(), tau_t=0.04),
    "no grad to k, queue": _triton_no_grad_to_teacher_or_queue,
}


def _run_triton_cases():
    """Subprocess side: run every Triton check, print {check: "ok" or the failure} as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"
    triton_impl = importlib.import_module(f"{R.__package__}.relational_triton").relational_loss_triton
    verdicts = {}
    for name, check in TRITON_CHECKS.items():
        try:
            check(triton_impl)
            verdicts[name] = "ok"
        except Exception as e:  # report every check, not just the first failure
            verdicts[name] = f"{type(e).__name__}: {e}"
    print(json.dumps(verdicts))


@pytest.fixture(scope="module")
def triton_verdicts():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("check", TRITON_CHECKS)
def test_triton_matches_reference_interpreted(triton_verdicts, check):
    assert triton_verdicts[check] == "ok", triton_verdicts[check]


# --- Triton kernels, compiled (on a CUDA machine) -------------------------------------------------------------

# training-sized shapes: many queue chunks, the autotuned configs, real bf16 tl.dot inputs
CUDA_CASES = [(0, 256, 16384, 128, 0.04, 1.0, None, "mean"), (2, 256, 65536, 256, 0.01, 1.0, None, "none")]
CUDA_CHECKS = {**TRITON_CHECKS, **{f"{case} {dtype}": _triton_check(case, dtype)
                                   for case in CUDA_CASES for dtype in (torch.float32, torch.bfloat16)}}


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA device")
@pytest.mark.parametrize("check", CUDA_CHECKS)
def test_triton_matches_reference_on_cuda(check):
    from fastssl.kernels.relational_triton import relational_loss_triton

    def on_cuda(q, k, queue, *args, **kwargs):  # CPU tensors in and out: the gradient reaches the CPU q
        return relational_loss_triton(q.cuda(), k.cuda(), queue.cuda(), *args, **kwargs).cpu()
    CUDA_CHECKS[check](on_cuda)


if __name__ == "__main__":
    _run_triton_cases()
