"""Memory-lean relational loss in plain torch: streams over the queue, never holds a [B,K] matrix.

Same maths as `relational_loss_reference`, rewritten around two per-row quantities:

    lse_i = log sum_j exp(x_i . a_j)        (online log-sum-exp over queue blocks)
    mu_i  = sum_j p_t[i, j] a_j             (teacher-weighted mean anchor, [B,D])

so that loss_ci = lse_s[c,i] - q_ci . mu_i / tau_s and dloss_ci/dq_ci = (sum_j p_s[c,i,j] a_j - mu_i) / tau_s.
The forward keeps mu (O(B*D)) and the student lse; the backward recomputes the student probabilities
block by block. The teacher is streamed once per call, whatever the number of student crops C.
Works on any device; fp64 inputs are computed in fp64 (for gradcheck), everything else in fp32.
"""

from __future__ import annotations

import math

import torch

# Queue rows per step. At B=256, K=65536, D=128..512, blocks of 1024 to 8192 time alike (matmuls dominate);
# 4096 keeps the [(C+1)B, block] fp32 buffer (8 MiB for C=1) far below 1/8 of the reference's peak.
DEFAULT_BLOCK = 4096


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _exp_floor(dtype: torch.dtype) -> float:
    # exp() of anything lower underflows to denormals, which x86 computes ~50x slower (tau_t=0.01 gets there).
    # Clamping changes a sum that is >= 1 (its max term is exp(0)) by less than K * 1e-37.
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _blocks(queue: torch.Tensor, block: int, dtype: torch.dtype):
    for start in range(0, queue.shape[0], block):
        yield queue[start:start + block].to(dtype)  # a view unless the queue is stored in another dtype


class _RelationalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, queue, tau_s: float, tau_t: float, block: int):
        dtype = _acc_dtype(q, k, queue)
        batch, dim = k.shape
        # One matmul per block gives teacher and student logits together: rows [k / tau_t; q / tau_s].
        x = torch.cat([k.to(dtype) / tau_t, q.reshape(-1, dim).to(dtype) / tau_s])
        rows = x.shape[0]
        m = torch.full((rows,), float("-inf"), dtype=dtype, device=q.device)  # running max
        l = torch.zeros(rows, dtype=dtype, device=q.device)  # running sum of exp(logit - m)
        mu = torch.zeros(batch, dim, dtype=dtype, device=q.device)  # running sum of exp(teacher - m) a_j
        buf = torch.empty(rows * min(block, queue.shape[0]), dtype=dtype, device=q.device)
        floor = _exp_floor(dtype)
        for a in _blocks(queue, block, dtype):
            z = torch.mm(x, a.T, out=buf[: rows * a.shape[0]].view(rows, a.shape[0]))
            m_new = torch.maximum(m, z.amax(1))
            z.sub_(m_new[:, None]).clamp_(min=floor).exp_()
            alpha = m.sub_(m_new).exp_()  # rescales the sums kept so far (0 on the first block)
            l.mul_(alpha).add_(z.sum(1))
            mu.mul_(alpha[:batch, None]).addmm_(z[:batch], a)
            m = m_new
        mu.div_(l[:batch, None])
        lse = m.add_(l.log_())
        lse_s = lse[batch:].view(q.shape[:-1])
        loss = lse_s - (x[batch:].view(q.shape) * mu).sum(-1)
        ctx.save_for_backward(q, queue, lse_s, mu)
        ctx.tau_s, ctx.block = tau_s, block
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, queue, lse_s, mu = ctx.saved_tensors
        dtype = mu.dtype
        dim = q.shape[-1]
        x = q.reshape(-1, dim).to(dtype) / ctx.tau_s
        lse = lse_s.reshape(-1, 1)
        dq = torch.zeros_like(x)  # accumulates sum_j p_s[i, j] a_j
        buf = torch.empty(x.shape[0] * min(ctx.block, queue.shape[0]), dtype=dtype, device=q.device)
        floor = _exp_floor(dtype)
        for a in _blocks(queue, ctx.block, dtype):
            z = torch.mm(x, a.T, out=buf[: x.shape[0] * a.shape[0]].view(x.shape[0], a.shape[0]))
            dq.addmm_(z.sub_(lse).clamp_(min=floor).exp_(), a)
        dq = dq.view(q.shape).sub_(mu).mul_(grad.to(dtype).unsqueeze(-1) / ctx.tau_s)
        return dq.to(q.dtype), None, None, None, None, None


def relational_loss_cpu(q, k, queue, tau_s: float, tau_t: float, reduction: str = "mean",
                        block: int = DEFAULT_BLOCK):
    """Blockwise relational loss; same contract as `relational_loss_reference` (gradient flows to q only)."""
    if block < 1:
        raise ValueError(f"block must be a positive number of queue rows, got {block}")
    per_row = _RelationalLoss.apply(q, k.detach(), queue.detach(), tau_s, tau_t, block)
    return per_row.mean() if reduction == "mean" else per_row
