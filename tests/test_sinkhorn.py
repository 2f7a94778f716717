"""Sinkhorn-Knopp (ReSA's target): balanced rows and columns, the plain iteration written out, and the DDP branch
(two gloo processes holding half the rows each) giving the rows of the one-process result."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastssl import dist
from fastssl.kernels import sinkhorn_knopp


def cosine_scores(b: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, 16, generator=g), dim=1) @ F.normalize(torch.randn(k, 16, generator=g), dim=1).T


def plain_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> list[list[float]]:
    """ReSA's / SwAV's recipe entry by entry: Q = exp(S/eps).T / total; repeat: rows to 1/K, columns to 1/B;
    then x B and transpose."""
    b, k = scores.shape
    q = [[math.exp(scores[i, j].item() / eps) for i in range(b)] for j in range(k)]  # [K][B]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        col = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / col[i] / b for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


@pytest.mark.parametrize("b, k, eps, iters", [(6, 6, 0.05, 3), (5, 9, 0.1, 1), (8, 4, 0.5, 4)])
def test_equals_the_plain_iteration_written_out(b, k, eps, iters):
    s = cosine_scores(b, k)
    expected = torch.tensor(plain_sinkhorn(s.double(), eps, iters), dtype=torch.float32)
    torch.testing.assert_close(sinkhorn_knopp(s, eps, iters), expected, rtol=1e-4, atol=1e-6)


def test_rows_sum_to_one_and_columns_are_near_uniform():
    s = cosine_scores(64, 64, seed=1)
    a = sinkhorn_knopp(s, eps=0.05, iters=3)
    torch.testing.assert_close(a.sum(1), torch.ones(64))
    # columns sum to about B/K = 1: far more even than a plain softmax's after 3 iterations, exact at convergence
    off, softmax_off = (a.sum(0) - 1).abs(), (F.softmax(s / 0.05, dim=1).sum(0) - 1).abs()
    assert off.mean() < 0.1 and off.mean() < softmax_off.mean() / 5 and off.max() < softmax_off.max() / 4
    converged = sinkhorn_knopp(s, eps=0.05, iters=200)
    torch.testing.assert_close(converged.sum(0), torch.ones(64), rtol=0, atol=1e-4)


def test_sharp_eps_and_low_precision_scores_stay_finite():
    s = cosine_scores(32, 32, seed=2)  # exp(1 / 0.01) overflows fp32 without the shift by the column maximum
    a = sinkhorn_knopp(s.bfloat16(), eps=0.01, iters=3)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a.sum(1), torch.ones(32))


def test_no_gradient_flows_through_the_target():
    s = cosine_scores(4, 4).requires_grad_()
    assert not sinkhorn_knopp(s).requires_grad


def _rows_on_rank(rank: int, world: int, init_file: str, scores: torch.Tensor, out: str) -> None:
    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = scores.chunk(world)[rank]  # this process's samples, against every column
        torch.save(sinkhorn_knopp(rows, eps=0.05, iters=3, all_reduce=dist.all_reduce), f"{out}/{rank}.pt")
    finally:
        td.destroy_process_group()


def test_ddp_rows_equal_the_rows_of_the_one_process_result(tmp_path):
    scores = cosine_scores(12, 12, seed=3)
    mp.spawn(_rows_on_rank, args=(2, str(tmp_path / "init"), scores, str(tmp_path)), nprocs=2)
    gathered = torch.cat([torch.load(tmp_path / f"{r}.pt") for r in range(2)])
    torch.testing.assert_close(gathered, sinkhorn_knopp(scores, eps=0.05, iters=3))


def test_all_reduce_is_the_identity_in_one_process():
    x = torch.arange(3.0)
    assert dist.all_reduce(x, "max") is x and torch.equal(x, torch.arange(3.0))
