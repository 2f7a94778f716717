"""docs/api.md runs as written: every ```python block, each in a fresh namespace (the blocks are independent), in
the page's order; then the invariants the page claims, checked here again so that a block losing its asserts
still fails. Tracebacks point at docs/api.md's own line numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
SECTIONS = ["The relational loss", "The embedding queue", "A method's step in your loop",
            "The whole trainer from Python"]


def blocks() -> list[tuple[str, int, str]]:
    """(section heading, first line, code) of every python block of the page."""
    text = DOC.read_text()
    out = []
    for m in FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[:m.start()], re.M)
        out.append((headings[-1] if headings else "", text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return out


def run_block(code: str, first_line: int = 1) -> dict:
    """Execute one block as a script would; its line numbers are the page's."""
    namespace = {"__name__": "__api_doc__"}
    exec(compile("\n" * (first_line - 1) + code, str(DOC), "exec"), namespace)
    return namespace


def run_section(section: str) -> dict:
    [(_, line, code)] = [b for b in blocks() if b[0] == section]
    return run_block(code, line)


def test_one_block_per_section():
    assert [b[0] for b in blocks()] == SECTIONS, "a section lost its ```python block, or a block moved"


def test_a_failing_block_fails():
    with pytest.raises(AssertionError):
        run_block("x = 1\nassert x == 2\n")
    with pytest.raises(RuntimeError, match="boom"):
        run_block("raise RuntimeError('boom')\n")


def _independent_loss(q, k, queue, tau_s, tau_t):
    """The formula of the page, in fp64."""
    q, k, queue = q.double(), k.double(), queue.double()
    p_t = F.softmax(k @ queue.T / tau_t, dim=-1)
    return -(p_t * F.log_softmax(q @ queue.T / tau_s, dim=-1)).sum(-1).mean()


def test_relational_loss_block():
    ns = run_section("The relational loss")
    q, k, queue, loss = ns["q"], ns["k"], ns["queue"], ns["loss"]
    assert queue.shape[0] > 4096 and ns["auto_impl"](q, queue) == "cpu"  # the blockwise path, several blocks
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ns["ref"].item()) < 1e-5
    assert abs(loss.item() - _independent_loss(q.detach(), k, queue, 0.1, 0.04).item()) < 1e-5
    assert torch.allclose(ns["grad"], ns["grad_ref"], rtol=1e-4, atol=1e-7) and ns["grad"].abs().sum() > 0
    assert ns["per_row"].shape == (3, q.shape[0])


def test_queue_block():
    ns = run_section("The embedding queue")
    queue, keys, before = ns["queue"], ns["keys"], ns["before"]
    assert torch.equal(queue.rows[:16], keys) and int(queue.ptr) == 16
    assert torch.equal(queue.rows[16:], before[16:])
    assert torch.equal(ns["restored"].rows, queue.rows)
    # The page's claim: committing before backward() is refused by autograd, whichever implementation ran.
    for impl in ("reference", "cpu"):
        q = F.normalize(torch.randn(16, 128), dim=1).requires_grad_()
        loss = ns["relational_loss"](q, keys, queue.rows, 0.1, 0.04, impl=impl)
        queue.stage(keys)
        queue.commit()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_method_step_block():
    ns = run_section("A method's step in your loop")
    start, end, method = ns["start"], ns["end"], ns["method"]
    assert all(torch.isfinite(torch.tensor(ns["losses"]))) and len(ns["losses"]) == ns["steps"]
    student = [n for n in start if n.startswith("student.") and start[n].is_floating_point()]
    assert any(not torch.equal(start[n], end[n]) for n in student)  # the optimiser step trained the student
    assert not torch.equal(end["teacher.0.conv1.weight"], end["student.0.conv1.weight"])  # an EMA, not a copy
    assert int(method.queue.ptr) == ns["steps"] * ns["batch"]
    assert method.evaluated_encoder() is method.student[0]  # no encoder_ema: the student's backbone
    assert ns["features"].shape == (ns["batch"], method.student[0].out_dim)


def test_trainer_block():
    ns = run_section("The whole trainer from Python")
    assert ns["summary"]["steps"] == 2
    assert ns["cfg"].options == {"queue_size": 256}  # method options beside run settings, sorted by settings()
