"""What the loop asks of every method's step, checked on a CPU as rank 0 of two (fake_world.py): nothing read back
to the host (on a GPU each read waits for the device), the same collectives at every step (a rank never waits on a
collective its peers skip), one collective per BN layer and pass under --sync-bn, and --compile compiling exactly the
networks the step calls. tests/test_cuda_sync.py checks the same steps on a GPU under CUDA's sync debug mode."""

from __future__ import annotations

import collections
import contextlib

import fake_world
import pytest
import torch
import torch.distributed as td
import torch.nn as nn
from method_options import own

from fastssl.config import settings
from fastssl.device import autocast
from fastssl.methods import METHODS
from fastssl.methods.base import PerView
from fastssl.train import setup, train_step

pytestmark = pytest.mark.usefixtures("backbones_train_here")

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "all_gather_object")
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@pytest.fixture
def rank_0_of_2():
    with fake_world.rank_0_of_2():
        yield


@contextlib.contextmanager
def counting(monkeypatch, calls: collections.Counter):
    """Every collective called through torch.distributed, and every read of a tensor's value on the host, counted."""
    with monkeypatch.context() as patch:
        for owner, names in ((td, COLLECTIVES), (torch.Tensor, HOST_READS)):
            for name in names:
                original = getattr(owner, name)

                def counted(*args, _name=name, _original=original, **kwargs):
                    calls[_name] += 1
                    return _original(*args, **kwargs)
                patch.setattr(owner, name, counted)
        yield


def steps(method: str, tmp_path, monkeypatch, **extra) -> tuple[object, list[collections.Counter]]:
    """Three steps of a run set up as `fastssl train` sets it up on rank 0 of 2: the calls of steps 2 and 3."""
    cfg = settings(method=method, arch="resnet18-w8", data="fashion-mnist", data_val="none", pipeline="tensor",
                   train_subset=256, image_size=16, batch_size=16, bn_splits=2, epochs=1, precision="fp32",
                   encoder_ema=0.99, device="cpu", out=str(tmp_path), **own(method, queue_size=64), **extra)
    run = setup(cfg)
    fake_world.keep_gradients(run.method._student_call)
    amp, counts = autocast(run.precision, run.device), []
    with contextlib.closing(run.loader.epoch(0)) as batches:
        for i in range(3):
            views = next(batches)
            calls = collections.Counter()
            with counting(monkeypatch, calls) if i else contextlib.nullcontext():
                train_step(run.method, views, run.opt, amp, run.step / run.total_steps)
                run.sched.step()
                run.step += 1
            counts += [calls] if i else []
    return run, counts


@pytest.mark.parametrize("sync_bn", [False, True], ids=["split-bn", "sync-bn"])
@pytest.mark.parametrize("method", METHODS)
def test_a_step_reads_nothing_back_and_calls_the_same_collectives(method, sync_bn, rank_0_of_2, tmp_path,
                                                                  monkeypatch):
    run, (second, third) = steps(method, tmp_path, monkeypatch, sync_bn=sync_bn)
    reads = {name: n for name, n in second.items() if name in HOST_READS}
    assert not reads, f"{method} reads tensors back to the host in a step: {reads}"
    assert second == third
    assert second["all_gather"] > 0 if sync_bn else True  # each BN layer's statistics


def test_sync_bn_is_one_collective_per_layer_and_pass(rank_0_of_2, tmp_path, monkeypatch):
    """ReSSL on a ResNet-18: 20 BN layers, the student on one view, the teacher on another, no BN in the head: 40
    gathers of statistics forward, 20 all-reduces of gradient sums backward, plus the queue's one gather."""
    run, (calls, _) = steps("ressl", tmp_path, monkeypatch, sync_bn=True)
    layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.method.student.modules())
    assert layers == 20
    assert (calls["all_gather"], calls["all_reduce"]) == (2 * layers + 1, layers)


@pytest.mark.parametrize("method", METHODS)
def test_compile_compiles_the_networks_the_step_calls(method, tmp_path, monkeypatch):
    """The modules the step calls first (outside any other module that holds weights) are the ones --compile
    compiles (recorded, not compiled: compiling takes minutes on a CPU)."""
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    cfg = settings(method=method, arch="resnet18-w8", data="fashion-mnist", data_val="none", pipeline="tensor",
                   train_subset=64, image_size=16, batch_size=16, epochs=1, precision="fp32", compile=True,
                   device="cpu", out=str(tmp_path), **own(method, queue_size=64))
    run = setup(cfg)
    outer, inside = [], []  # the modules called first; the weighted modules being called

    def enter(module, args):  # PerView: the wrapper that calls the student once per view
        if next(module.parameters(), None) is not None and not isinstance(module, PerView):
            if not inside:
                outer.append(module)
            inside.append(module)

    def leave(module, args, out):
        if inside and inside[-1] is module:
            inside.pop()
    with contextlib.closing(run.loader.epoch(0)) as batches, \
            nn.modules.module.register_module_forward_pre_hook(enter), \
            nn.modules.module.register_module_forward_hook(leave):
        train_step(run.method, next(batches), run.opt, autocast("fp32", run.device), 0.0)
    assert compiled and {id(m) for m in outer} == {id(m) for m in compiled}, (
        f"called: {[type(m).__name__ for m in outer]}, compiled: {[type(m).__name__ for m in compiled]}")
