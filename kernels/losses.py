"""The baselines' and ReSA's losses as pure functions of embeddings (the relational loss: relational.py).

Every function computes in fp32 with autocast off, whatever the inputs' dtype: logits at a sharp temperature
overflow in half precision. Rows are L2-normalised here, so callers pass raw network outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sinkhorn import AllReduce, sinkhorn_knopp


def _fp32(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE: -mean_i log softmax([q_i.k_i, q_i.queue_j ...] / tau)[0], positive first.

    q [B,D] (gradient flows), k [B,D] the positive keys (no gradient), queue [K,D] the negatives."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
    with _fp32(q):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.detach().float().T], dim=1) / tau
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss, mean_i (2 - 2 cos(p_i, z_i)): predictions p [B,D] of targets z [B,D] (no gradient)."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(1)).mean()


def resa_target(h: torch.Tensor, hm: torch.Tensor, eps: float, iters: int,
                all_reduce: AllReduce | None = None) -> torch.Tensor:
    """ReSA's target A = SinkhornKnopp(norm(h) norm(hm)^T) [B, B'] (no gradient), from the online encoder's
    features h [B,D] of the weak view against the momentum encoder's hm [B',D] (B' = the global batch under
    DDP, whose sums `all_reduce` makes global); each row sums to 1."""
    h, hm = F.normalize(h.detach().float(), dim=1), F.normalize(hm.detach().float(), dim=1)
    with _fp32(h):
        return sinkhorn_knopp(h @ hm.T, eps, iters, all_reduce=all_reduce)


def soft_cross_entropy(target: torch.Tensor, z: torch.Tensor, zm: torch.Tensor, tau: float) -> torch.Tensor:
    """-mean_i sum_j target_ij log softmax_j(norm(z_i) . norm(zm_j) / tau): ReSA's loss for one view order, the
    online projections z [B,D] (gradient flows) against the momentum ones zm [B',D]."""
    z, zm = F.normalize(z.float(), dim=1), F.normalize(zm.detach().float(), dim=1)
    with _fp32(z):
        return -(target * F.log_softmax(z @ zm.T / tau, dim=1)).sum(1).mean()
