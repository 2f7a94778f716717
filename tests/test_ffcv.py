"""The FFCV pipeline on CPU (no ToDevice): one decode per image feeds every view; the photometric ops run batched.

Views: layout, normalisation, labels in line with the images, ops at the spec's rates; .beton splits for evaluation;
a short training run learns (the loader contract, exact and sharded epochs: test_loaders.py). Every FFCV Loader
compiles its pipeline with numba (seconds), so the tests share loaders where they can.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ffcv.pipeline import graph as ffcv_graph
from pipeline_checks import (COLOURS, CPU, PROBE_VIEWS, check_colour_views, check_probe_rates,
                             check_short_run_learns, probe_set, torch_threads_after)

from fastssl import data
from fastssl.errors import UserError
from fastssl.pipelines import build, eval_reader, load_images
from fastssl.pipelines.beton import BetonSet, info_path, read_info, write_beton
from fastssl.pipelines.common import Shard
from fastssl.pipelines.convert import convert
from fastssl.views import ViewSpec, resa_strong, weak

pytestmark = pytest.mark.usefixtures("backbones_train_here")

VIEWS = {"weak": weak(24), "strong": resa_strong(24, blur_p=0.5), "crop1": ViewSpec(12, crop_scale=(0.1, 0.5))}


def loader(images, views=VIEWS, batch_size=8, device=CPU):
    return build("ffcv", images, views, Shard(rank_batch=batch_size), device)


@pytest.fixture(scope="module")
def colour_beton(colour_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("betons") / "colours_train.beton"
    convert(str(colour_folder), out, workers=2)
    return out


def test_views_have_the_trainers_layout_and_labels_match_images(colour_beton):
    images = load_images(str(colour_beton))
    assert isinstance(images, BetonSet) and images.classes == [f"class{c}" for c in range(4)]
    run = loader(images, batch_size=16)
    assert len(run) == 3
    for batch in run.epoch(0):
        check_colour_views(batch, VIEWS)


def test_evaluation_reads_the_beton_in_order_with_a_centre_crop(colour_beton):
    images = load_images(str(colour_beton)).subset(20, seed=1)
    batches = list(eval_reader("ffcv", images, 16, batch_size=8, workers=1))
    assert [len(x) for x in batches] == [8, 8, 4] and batches[0].dtype == torch.uint8
    x = torch.cat(batches).float()
    assert x.shape == (20, 3, 16, 16)
    colours = torch.tensor(COLOURS, dtype=torch.float32)[images.labels].view(20, 3, 1, 1)
    assert (x - colours).abs().max() < 4


def test_ops_fire_at_the_specs_rates_and_crops_stay_in_range(tmp_path):
    write_beton(probe_set(2048), tmp_path / "probe_train.beton")
    batches = list(loader(load_images(str(tmp_path / "probe_train.beton")), PROBE_VIEWS, batch_size=256).epoch(0))
    check_probe_rates(batches)


def test_beton_splits_and_what_each_pipeline_accepts(colour_beton, colour_folder, tmp_path):
    with pytest.raises(UserError, match="fastssl convert .* --split val"):
        load_images(str(colour_beton), "test")  # no colours_val.beton beside it
    (tmp_path / "a_train.beton").write_bytes(colour_beton.read_bytes())
    (tmp_path / "a_val.beton").write_bytes(colour_beton.read_bytes())
    assert load_images(str(tmp_path / "a_train.beton"), "test").root == str(tmp_path / "a_val.beton")
    with pytest.raises(UserError, match="name the files NAME_train.beton"):
        load_images(str(tmp_path / "a_val.beton"), "test")
    with pytest.raises(UserError, match="--pipeline ffcv reads an FFCV .beton: write one with `fastssl convert"):
        loader(data.load(str(colour_folder)))
    with pytest.raises(UserError, match="train on it with --pipeline ffcv"):
        build("torch", load_images(str(colour_beton)), VIEWS, Shard(rank_batch=8), CPU)
    (tmp_path / "junk_train.beton").write_text("not a beton")
    with pytest.raises(UserError, match="not a readable FFCV file"):
        load_images(str(tmp_path / "junk_train.beton"))


def _converted(colour_folder, tmp_path, max_resolution: int):
    out = tmp_path / f"colours{max_resolution}_train.beton"
    convert(str(colour_folder), out, max_resolution=max_resolution, workers=2)
    return load_images(str(out))


def test_decode_scratch_is_what_ffcv_allocates_and_follows_max_resolution(colour_folder, tmp_path, monkeypatch):
    allocated = []  # bytes of each buffer FFCV allocates
    ffcv_allocate = ffcv_graph.allocate_query

    def allocate(query, batch_size, batches_ahead):
        allocated.append(batches_ahead * batch_size * math.prod(query.shape) * np.dtype(query.dtype).itemsize)
        return ffcv_allocate(query, batch_size, batches_ahead)
    monkeypatch.setattr(ffcv_graph, "allocate_query", allocate)
    scratch = {}
    for side in (32, 64):  # the colour images are up to 117 px wide
        run = loader(_converted(colour_folder, tmp_path, side))
        allocated.clear()
        epoch = run.epoch(0)
        next(epoch)  # FFCV allocates its buffers as an epoch starts
        epoch.close()
        batches, batch, height, width, channels = run.scratch_shape
        assert run.scratch_bytes in allocated and run.scratch_bytes == batches * batch * height * width * channels
        assert batch == 8 and max(height, width) <= side
        assert run.scratch_note().endswith(f"({batches} batches x 8 x {height}x{width}x3 B)")
        scratch[side] = run.scratch_bytes
    assert scratch[32] < scratch[64]


def test_a_beton_of_unbounded_image_size_is_refused_in_one_line(colour_folder, tmp_path):
    with pytest.raises(UserError, match="--max-resolution 0: a .beton needs a bound") as e:
        _converted(colour_folder, tmp_path, 0)
    assert "\n" not in str(e.value)
    images = _converted(colour_folder, tmp_path, 64)
    info = read_info(Path(images.root))
    info_path(Path(images.root)).write_text(json.dumps({**info, "max_resolution": 0}))  # as fastssl 0.2 wrote it
    for open_it in (lambda: loader(images), lambda: eval_reader("ffcv", images, 16, batch_size=8, workers=1)):
        with pytest.raises(UserError, match="--max-resolution 0 .* decode scratch .* --max-resolution 512") as e:
            open_it()
        assert "\n" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches(colour_beton):
    batch = next(loader(load_images(str(colour_beton)), device=torch.device("cuda")).epoch(0))
    assert all(batch[k].is_cuda for k in batch) and batch["weak"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_a_short_run_learns(fashion_folder, tmp_path):
    for split in ("train", "val"):
        convert(str(fashion_folder), tmp_path / f"fashion_{split}.beton", split=split, workers=2)
    check_short_run_learns(str(tmp_path / "fashion_train.beton"), "ffcv", tmp_path / "run")


def test_importing_the_ffcv_pipeline_keeps_torchs_threads():
    # FFCV sets torch's threads to 1 on import: a CPU run would train on one core
    assert torch_threads_after("import fastssl.pipelines.ffcv_loader") == 3
