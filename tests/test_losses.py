"""The baselines' and ReSA's losses (kernels/losses.py) against their papers' formulas, written out entry by entry
in float64 Python; fp32 inside whatever the inputs; gradients only where the papers put them."""

from __future__ import annotations

import math

import pytest
import torch
from test_sinkhorn import plain_sinkhorn

from fastssl.kernels import byol_loss, infonce_loss, resa_target, soft_cross_entropy


def rows(*shape, seed=0, scale=1.0) -> torch.Tensor:
    """Raw (unnormalised) network outputs: the losses normalise them."""
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(x: torch.Tensor) -> list[list[float]]:
    return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x.double().tolist()]


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_infonce_is_mocos_minus_log_share_of_the_positive():
    q, k, negatives, tau = rows(5, 8, seed=1), rows(5, 8, seed=2, scale=3), unit(rows(11, 8, seed=3)), 0.2
    queue = torch.tensor(negatives, dtype=torch.float32)
    qs, ks = unit(q), unit(k)
    expected = 0.0
    for qi, ki in zip(qs, ks):
        positive = math.exp(dot(qi, ki) / tau)
        expected -= math.log(positive / (positive + sum(math.exp(dot(qi, n) / tau) for n in negatives)))
    assert infonce_loss(q, k, queue, tau).item() == pytest.approx(expected / len(qs), rel=1e-5)


def test_byol_loss_is_two_minus_twice_the_cosine():
    p, z = rows(6, 4, seed=1), rows(6, 4, seed=2, scale=5)
    expected = sum(2 - 2 * dot(a, b) for a, b in zip(unit(p), unit(z))) / 6
    assert byol_loss(p, z).item() == pytest.approx(expected, rel=1e-6)
    assert byol_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)


def test_resa_target_is_sinkhorn_of_the_encoder_cosines_and_the_loss_its_cross_entropy():
    h, hm, z, zm, tau = rows(6, 10, seed=1), rows(6, 10, seed=2), rows(6, 4, seed=3), rows(6, 4, seed=4), 0.4
    hs, hms = unit(h), unit(hm)
    scores = torch.tensor([[dot(a, b) for b in hms] for a in hs], dtype=torch.float64)
    target = resa_target(h, hm, 0.05, 3)
    torch.testing.assert_close(target.double(), torch.tensor(plain_sinkhorn(scores, 0.05, 3), dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    zs, zms, a = unit(z), unit(zm), target.double().tolist()
    expected = 0.0
    for ai, zi in zip(a, zs):
        logits = [dot(zi, zj) / tau for zj in zms]
        lse = math.log(sum(math.exp(v) for v in logits))
        expected -= sum(aij * (v - lse) for aij, v in zip(ai, logits))
    assert soft_cross_entropy(target, z, zm, tau).item() == pytest.approx(expected / 6, rel=1e-5)


def test_gradients_flow_to_the_student_side_only_and_losses_stay_fp32_under_autocast():
    q, k, queue = rows(4, 8, seed=1).requires_grad_(), rows(4, 8, seed=2).requires_grad_(), rows(9, 8, seed=3)
    p, z = rows(4, 8, seed=4).requires_grad_(), rows(4, 8, seed=5).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [infonce_loss(q, k, queue, 0.2), byol_loss(p, z),
                  soft_cross_entropy(resa_target(p, z, 0.05, 3), p, z, 0.4)]
    assert all(loss.dtype == torch.float32 for loss in losses)
    sum(losses).backward()
    assert q.grad is not None and p.grad is not None and k.grad is None and z.grad is None
