"""Sinkhorn-Knopp as ReSA (and SwAV) use it: a balanced soft assignment from a similarity matrix.

For scores S [B,K] (rows: samples, columns: the K "targets"), with Q = exp(S / eps).T [K,B], repeat `iters`
times: scale the rows of Q to equal sums, then its columns to equal sums; return Q.T. Every row of the result
sums to 1 and every column sums to about B/K (exactly, as the iterations converge).

The usual write-up also divides by the total first, by K and B inside the loop and multiplies by B at the end;
each of those is a global scale that the next normalisation cancels, so they are left out here.

Under DDP each process holds its own rows of S (its samples) and every column: the sums over samples (the rows
of Q) must then be global, and so must the per-column maximum used for stability. `all_reduce(x, op)` with op
"sum" or "max" does that (fastssl.dist.all_reduce); left as None it is the identity of one process.
"""

from __future__ import annotations

from typing import Callable

import torch

AllReduce = Callable[[torch.Tensor, str], torch.Tensor]


def _local(x: torch.Tensor, op: str) -> torch.Tensor:
    return x


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, eps: float = 0.05, iters: int = 3,
                   all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Balanced assignment [B,K] (fp32, no gradient) from scores [B,K]; each row sums to 1.

    Meant for cosine similarities: after the shift every entry of exp((S - max) / eps) is at least exp(-2 / eps),
    which fp32 holds for eps down to about 0.025 (a smaller eps may leave a sample with no mass: NaN rows)."""
    if scores.dim() != 2:
        raise ValueError(f"expected scores [B,K], got shape {tuple(scores.shape)}")
    if not (eps > 0 and iters >= 1):
        raise ValueError(f"need eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    reduce = all_reduce or _local
    s = scores.float()
    # A constant per column of S cancels in the first row normalisation of Q: subtracting each column's
    # (global) maximum keeps exp in range at any eps without changing the result.
    q = torch.exp((s - reduce(s.amax(dim=0), "max")) / eps).T  # [K,B]
    for _ in range(iters):
        q = q / reduce(q.sum(dim=1, keepdim=True), "sum")  # each target: equal mass over all samples
        q = q / q.sum(dim=0, keepdim=True)  # each sample: mass 1 over the targets (all of them local)
    return q.T
