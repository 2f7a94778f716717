"""On CUDA the training step never waits for the GPU, for every pipeline and method.

A run set up as `fastssl train` sets it up (train.setup: split BN, bf16, channels_last, the encoder's running
average on) takes warm-up steps, then steps under torch.cuda.set_sync_debug_mode("error"), which raises at any
host-device synchronisation: the forward, the loss, backward, the optimiser step, the schedule and the method's
post-step updates (queue commit, teacher EMA, the encoder average's foreach lerp with its host counter). The step
boundary is train.loop's: each batch is fetched outside the checked region, since the loaders' hand-over may wait
on their own streams (DALI's output copy, FFCV's ToDevice); test_tensor_pipeline checks that batch fetch itself.
--sync-bn runs as rank 0 of two on the one GPU (fake_world.py): DDP, the synchronised BatchNorm's collectives and the
gathered queue, all under the check. test_step_contract.py counts the same steps' collectives and reads on a CPU.
"""

from __future__ import annotations

import contextlib

import fake_world
import pytest
import torch

from fastssl.config import settings
from fastssl.device import autocast
from fastssl.train import setup, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PIPELINES = ("tensor", "torch", "nvjpeg", "dali", "ffcv")
METHODS = ("ressl", "isd", "resa", "mocov2", "byol")
NEEDS = {"dali": "nvidia.dali", "ffcv": "ffcv"}  # optional extras: their cases skip where not installed
WARMUP, CHECKED = 2, 3  # warm-up: cuDNN's algorithm search, the optimiser's buffers, the cached constants


@contextlib.contextmanager
def sync_errors(on: bool):
    """Any host-device synchronisation raises inside (when on); the mode is reset whatever happens."""
    torch.cuda.set_sync_debug_mode("error" if on else 0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.fixture(scope="module")
def colour_beton(colour_folder, tmp_path_factory):
    from fastssl.pipelines.convert import convert
    out = tmp_path_factory.mktemp("sync") / "colours_train.beton"
    convert(str(colour_folder), out, workers=2)
    return out


def check_steps(run) -> None:
    """WARMUP steps, then CHECKED steps in which any host-device synchronisation raises."""
    amp, losses = autocast(run.precision, run.device), []
    batches = run.loader.epoch(0)
    try:
        for i in range(WARMUP + CHECKED):
            views = next(batches)  # the loader's own work: outside the checked step
            views.pop("bad_files", None)
            with sync_errors(i >= WARMUP):
                loss, _ = train_step(run.method, views, run.opt, amp, run.step / run.total_steps)
                run.sched.step()
                run.step += 1
            losses.append(loss)
    finally:
        batches.close()
    assert run.method.encoder_average.updates == WARMUP + CHECKED
    assert torch.stack(losses[WARMUP:]).isfinite().all(), losses  # read back after leaving the mode


def cuda_run(method: str, data, pipeline: str, out, sync_bn: bool = False):
    # 48 images, 8 a batch: 6 steps in epoch 0; BN in 2 groups of 4 (or over the 8 of both ranks); no kNN monitor
    cfg = settings(method=method, arch="resnet18-w8", data=str(data), data_val="none", pipeline=pipeline,
                   image_size=32, batch_size=8, bn_splits=2, sync_bn=sync_bn, epochs=1, encoder_ema=0.99,
                   knn_every=0, workers=2, device="cuda", out=str(out))
    return setup(cfg)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_cuda_training_step_never_syncs_with_the_host(pipeline, method, colour_folder, request, tmp_path):
    if pipeline in NEEDS:
        pytest.importorskip(NEEDS[pipeline])
    data = request.getfixturevalue("colour_beton") if pipeline == "ffcv" else colour_folder
    check_steps(cuda_run(method, data, pipeline, tmp_path))


@pytest.mark.parametrize("method", METHODS)
def test_cuda_sync_bn_step_never_syncs_with_the_host(method, colour_folder, tmp_path):
    with fake_world.rank_0_of_2():
        run = cuda_run(method, colour_folder, "tensor", tmp_path, sync_bn=True)
        fake_world.keep_gradients(run.method._student_call)
        check_steps(run)
