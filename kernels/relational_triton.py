"""Relational loss as Triton kernels: the blockwise algorithm of relational_cpu.py on the GPU.

Two kernels, each run over a grid of (row block, queue chunk) programs. A batch of a few hundred rows
gives only a handful of row blocks, so the queue is also split into chunks (flash-decoding style) to
fill the GPU; the per-chunk results are merged in torch, which costs O(chunks * rows * D).

  _stats_kernel  per row and chunk: log-sum-exp of the logits and, for the teacher, the softmax-weighted
                 mean anchor mu. Run once for the teacher rows k, once for all C*B student rows.
  _grad_kernel   per student row and chunk: sum_j p_s[i, j] a_j, recomputed from the saved student lse.

loss_ci = lse_s[c,i] - q_ci . mu_i / tau_s and dloss/dq_ci = (sum_j p_s[c,i,j] a_j - mu_i) / tau_s, so the
teacher is streamed once per forward and never in the backward, whatever the number of crops C.

Everything is accumulated in fp32. 16-bit inputs are cast to fp32 before tl.dot (a bf16 tl.dot is wrong
under TRITON_INTERPRET, triton#11584); fp64 inputs are computed in fp32 like the reference.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = math.log2(math.e)  # the kernels work in base 2: exp2 is the native instruction
LN2 = math.log(2.0)


# Autotune candidates, picked from ptxas resource usage for sm_80/sm_90 (compile only, no GPU timings yet); the
# last fits every kernel at D=512 even in an A100's 164 KiB of shared memory. `fitting_configs` drops, per D, those
# whose tiles exceed the register budget; the autotuner also skips any that does not compile.
GPU_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in (
    (16, 32, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 3), (64, 32, 8, 2),
    (128, 32, 8, 2), (16, 32, 4, 1))]
# The interpreter would run every config: it gets one, small.
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
_CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS

# fp32 registers per thread that a program's live tiles may take. A thread addresses at most 255 registers
# (sm_80/sm_90); beyond that ptxas spills to local memory, i.e. to cache and DRAM inside the inner loop. 160
# leaves ~95 for pointers, masks, the row statistics m and l, and tl.dot's operand fragments.
REGISTER_BUDGET = 160


def tile_registers(config: triton.Config, d_pad: int, accumulates: bool) -> float:
    """fp32 registers per thread for a program's live tiles, spread over its 32 * num_warps threads: the rows
    x [BLOCK_M, D_PAD], the logits [BLOCK_M, BLOCK_K] and, in kernels that sum p_ij a_j, the accumulator
    [BLOCK_M, D_PAD]. The anchor tile [BLOCK_K, D_PAD] is not counted: tl.dot reads it from shared memory."""
    block_m, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    row_tiles = 2 if accumulates else 1
    return (row_tiles * block_m * d_pad + block_m * block_k) / (32 * config.num_warps)


def fitting_configs(configs: list[triton.Config], d_pad: int, accumulates: bool) -> list[triton.Config]:
    """The configs whose tiles fit REGISTER_BUDGET at this D_PAD; where none does (D > 512 in the kernels that
    accumulate), those with the fewest registers, so that there is always one to run."""
    registers = [tile_registers(c, d_pad, accumulates) for c in configs]
    limit = max(REGISTER_BUDGET, min(registers))
    return [c for c, r in zip(configs, registers) if r <= limit]


# Triton's early_config_prune hooks: (configs, the kernel's positional arguments, its keyword arguments; Tritons
# before 3.2 pass no keyword arguments: WITH_MEAN is then taken as on, the stricter budget).
def _prune_stats(configs, named_args, **kwargs):
    return fitting_configs(configs, _d_pad(named_args["D"]), accumulates=kwargs.get("WITH_MEAN", True))


def _prune_grad(configs, named_args, **kwargs):
    return fitting_configs(configs, _d_pad(named_args["D"]), accumulates=True)


# cache_results: each tuning key's timings (the key's arguments and the tensors' dtypes) are written under
# TRITON_CACHE_DIR (default ~/.triton/cache), so later runs, and ranks that start after one has tuned, read the
# winner instead of timing every config on their first step; ranks that start together each tune once. The
# entry's hash also covers the Triton version, the GPU architecture and ptxas version, the kernel source, the
# TRITON_* variables that change compilation and the configs left after pruning (Autotuner.check_disk_cache in
# triton/runtime/autotuner.py), so none of those reuses a wrong entry. Triton turns it off in the interpreter.
# Tritons before 3.2 (torch < 2.6) have no disk cache: they tune in every process.
DISK_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
@triton.autotune(configs=_CONFIGS, key=["K", "D", "K_SPLIT", "WITH_MEAN"],
                 prune_configs_by={"early_config_prune": _prune_stats}, **DISK_CACHE)
@triton.jit
def _stats_kernel(X, A, LSE2, MEAN, n_rows, K, D, K_SPLIT, scale,
                  D_PAD: tl.constexpr, WITH_MEAN: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """LSE2[s, i] = log2 sum_{j in chunk s} exp2(z_ij) with base-2 logits z = X A^T * scale;
    WITH_MEAN: MEAN[s, i] = sum_{j in chunk s} softmax_chunk(z_i)_j A_j."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < n_rows
    col_ok = cols < D
    x = tl.load(X + rows[:, None].to(tl.int64) * D + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(z - m)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)  # running sum of exp2(z - m) a_j
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for start in range(k_lo, k_hi, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        key_ok = keys < k_hi
        a = tl.load(A + keys[:, None].to(tl.int64) * D + cols[None, :],
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        z = tl.dot(x, tl.trans(a), input_precision=PRECISION) * scale
        z = tl.where(key_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        p = tl.exp2(z - m_new[:, None])
        alpha = tl.exp2(m - m_new)  # rescales the sums kept so far (0 on the first block)
        l = l * alpha + tl.sum(p, 1)
        if WITH_MEAN:
            acc = tl.dot(p, a, acc * alpha[:, None], input_precision="tf32x3")
        m = m_new
    out = split.to(tl.int64) * n_rows + rows
    tl.store(LSE2 + out, m + tl.log2(l), mask=row_ok)
    if WITH_MEAN:
        tl.store(MEAN + out[:, None] * D + cols[None, :], acc / l[:, None],
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_CONFIGS, key=["K", "D", "K_SPLIT"], prune_configs_by={"early_config_prune": _prune_grad},
                 **DISK_CACHE)
@triton.jit
def _grad_kernel(X, A, LSE2, OUT, n_rows, K, D, K_SPLIT, scale,
                 D_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[s, i] = sum_{j in chunk s} exp2(z_ij - LSE2[i]) A_j, z as in _stats_kernel."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < n_rows
    col_ok = cols < D
    x = tl.load(X + rows[:, None].to(tl.int64) * D + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    lse = tl.load(LSE2 + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for start in range(k_lo, k_hi, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        key_ok = keys < k_hi
        a = tl.load(A + keys[:, None].to(tl.int64) * D + cols[None, :],
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        z = tl.dot(x, tl.trans(a), input_precision=PRECISION) * scale
        # Masked keys have a = 0, but exp2(0 - lse) can overflow and inf * 0 is NaN: zero them.
        p = tl.where(key_ok[None, :], tl.exp2(z - lse[:, None]), 0.0)
        acc = tl.dot(p, a, acc, input_precision="tf32x3")
    out = split.to(tl.int64) * n_rows + rows
    tl.store(OUT + out[:, None] * D + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Contiguous rows in a dtype the kernels load (fp64 is computed in fp32, as in the reference)."""
    t = t.detach()
    return (t.float() if t.dtype == torch.float64 else t).contiguous()


def _precision(x: torch.Tensor, queue: torch.Tensor) -> str:
    # 16-bit values are exact in tf32, so their logits need a single tf32 pass; fp32 needs 3 (~fp32 accuracy).
    return "tf32" if x.element_size() == 2 and queue.element_size() == 2 else "tf32x3"


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _d_pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.arange needs a power of two, tl.dot at least 16


def _split(n_rows: int, num_keys: int, device: torch.device, k_split: int | None) -> tuple[int, int]:
    """Queue keys per chunk and number of chunks: enough (row block, chunk) programs to fill the GPU."""
    if k_split is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        chunks = max(1, min(triton.cdiv(2 * sms, triton.cdiv(n_rows, 64)), triton.cdiv(num_keys, 1024)))
        k_split = triton.cdiv(triton.cdiv(num_keys, chunks), 256) * 256  # whole BLOCK_Ks per chunk
    return k_split, triton.cdiv(num_keys, k_split)


def _stats(x, queue, tau: float, with_mean: bool, k_split: int | None):
    """(lse [n], mean [n,D] or None) of softmax(x @ queue.T / tau), merged over queue chunks."""
    n, dim = x.shape
    k_split, chunks = _split(n, queue.shape[0], x.device, k_split)
    lse = torch.empty(chunks, n, dtype=torch.float32, device=x.device)
    mean = torch.empty(chunks, n, dim, dtype=torch.float32, device=x.device) if with_mean else lse
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), chunks)  # noqa: E731
    _stats_kernel[grid](x, queue, lse, mean, n, queue.shape[0], dim, k_split, LOG2E / tau,
                        D_PAD=_d_pad(dim), WITH_MEAN=with_mean, PRECISION=_precision(x, queue))
    total = torch.logsumexp(lse.mul_(LN2), 0)
    if not with_mean:
        return total, None
    weight = (lse - total).exp_()  # each chunk's share of the row's softmax mass
    return total, torch.einsum("sn,snd->nd", weight, mean)


class _RelationalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, queue, tau_s: float, tau_t: float, k_split: int | None):
        dim = k.shape[1]
        x, k, queue = _rows(q.reshape(-1, dim)), _rows(k), _rows(queue)
        with _on_device(x):
            _, mu = _stats(k, queue, tau_t, True, k_split)  # teacher: once, shared by every crop
            lse_s, _ = _stats(x, queue, tau_s, False, k_split)  # all C*B student rows in one launch
        lse_s = lse_s.view(q.shape[:-1])
        loss = lse_s - (x.view(q.shape).float() * mu).sum(-1) / tau_s
        ctx.save_for_backward(x, queue, lse_s, mu)
        ctx.tau_s, ctx.k_split, ctx.q_dtype = tau_s, k_split, q.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, queue, lse_s, mu = ctx.saved_tensors
        n, dim = x.shape
        k_split, chunks = _split(n, queue.shape[0], x.device, ctx.k_split)
        partial = torch.empty(chunks, n, dim, dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), chunks)  # noqa: E731
        with _on_device(x):
            _grad_kernel[grid](x, queue, lse_s.flatten() * LOG2E, partial, n, queue.shape[0], dim, k_split,
                               LOG2E / ctx.tau_s, D_PAD=_d_pad(dim), PRECISION=_precision(x, queue))
        dq = partial.sum(0).view(lse_s.shape + (dim,)).sub_(mu).mul_(grad.unsqueeze(-1) / ctx.tau_s)
        return dq.to(ctx.q_dtype), None, None, None, None, None


def relational_loss_triton(q, k, queue, tau_s: float, tau_t: float, reduction: str = "mean",
                           k_split: int | None = None):
    """Triton relational loss; same contract as `relational_loss_reference` (gradient flows to q only).

    k_split: queue keys per program (default: chosen to fill the GPU); tests set it to exercise the merge.
    """
    if not (q.device == k.device == queue.device):
        raise ValueError(f"q, k and queue must share a device, got {q.device}, {k.device}, {queue.device}")
    if not (q.is_cuda or INTERPRET):
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to interpret it on CPU)")
    if k_split is not None and k_split < 1:
        raise ValueError(f"k_split must be a positive number of queue rows, got {k_split}")
    per_row = _RelationalLoss.apply(q, k, queue, tau_s, tau_t, k_split)
    return per_row.mean() if reduction == "mean" else per_row
