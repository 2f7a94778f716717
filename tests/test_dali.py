"""The DALI pipeline, CPU-only (device_id=None): the graph a GPU run uses, on CPU operators.

Views: layout, normalisation, labels in line with the images, ops at the spec's rates; epochs: exact, sharded,
seeded; the same graph placed on the GPU when training there; a short training run learns.
"""

from __future__ import annotations

import pytest
import torch
from nvidia.dali import Pipeline
from pipeline_checks import (CPU, PROBE_VIEWS, check_colour_views, check_probe_rates, check_short_run_learns,
                             probe_set, unique_set)
from PIL import Image

from fastssl import data
from fastssl.errors import UserError
from fastssl.pipelines import build, common
from fastssl.pipelines.dali_loader import views_graph
from fastssl.views import ViewSpec, resa_strong, strong, weak

VIEWS = {"weak": weak(24), "strong": strong(24, blur_p=0.5), "crop1": ViewSpec(12, crop_scale=(0.1, 0.5))}


def loader(images, views=VIEWS, batch_size=8, **kw):
    return build("dali", images, views, batch_size=batch_size, device=CPU, **kw)


def labels(batches) -> list[int]:
    return torch.cat([b["label"] for b in batches]).tolist()


def test_folder_views_have_the_trainers_layout_and_labels_match_images(colour_folder):
    views = {"weak": weak(24), "strong": resa_strong(24, blur_p=0.5), "crop1": ViewSpec(12, crop_scale=(0.1, 0.5))}
    run = loader(data.load(str(colour_folder)), views, batch_size=16)
    assert len(run) == 3  # 48 images
    for batch in run.epoch(0):
        check_colour_views(batch, views)
    flat = next(loader(data.load(str(colour_folder)), views, channels_last=False).epoch(0))["strong"]
    assert flat.is_contiguous() and flat.shape == (8, 3, 24, 24)


@pytest.mark.parametrize("world", [1, 2])
def test_reader_epochs_are_exact_and_sharded(tmp_path, world):
    """75 images, each its own class: every rank yields len(loader) whole batches an epoch, no sample twice."""
    for i in range(75):
        (tmp_path / "train" / f"{i:03d}").mkdir(parents=True)
        Image.new("RGB", (10, 8), (i, 100, 200)).save(tmp_path / "train" / f"{i:03d}" / "x.png")
    images = data.load(str(tmp_path))
    runs = [loader(images, batch_size=8, rank=r, world=world, seed=3) for r in range(world)]
    assert len(runs[0]) == 75 // world // 8
    epochs = [[labels(run.epoch(e)) for e in range(3)] for run in runs]
    for e in range(3):
        seen = [ids[e] for ids in epochs]
        assert all(len(ids) == len(set(ids)) == len(runs[0]) * 8 for ids in seen)
        assert len(set().union(*seen)) == sum(map(len, seen))  # ranks hold different samples
    assert epochs[0][0] != epochs[0][1]  # reshuffled every epoch
    resumed = list(loader(images, batch_size=8, rank=0, world=world, seed=3).epoch(0, start_batch=2))
    assert len(resumed) == len(runs[0]) - 2


def test_in_memory_epochs_follow_the_shared_order_and_resume_exactly():
    images = unique_set(103)
    run = loader(images, batch_size=10, seed=1)
    assert len(run) == 10
    for e in range(2):
        assert labels(run.epoch(e)) == common.epoch_indices(103, 10, e, 1).tolist()
    a, b = list(loader(images, batch_size=10, seed=1).epoch(0)), list(loader(images, batch_size=10, seed=1).epoch(0))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)  # seeded
    assert labels(loader(images, batch_size=10, seed=1).epoch(1, start_batch=4)) == labels(run.epoch(1))[40:]
    unfinished = run.epoch(2)
    next(unfinished)
    unfinished.close()  # the loop left the epoch early: the next one still starts at its beginning
    assert labels(run.epoch(3)) == common.epoch_indices(103, 10, 3, 1).tolist()


def test_ops_fire_at_the_specs_rates_and_crops_stay_in_range():
    batches = list(loader(probe_set(2048), PROBE_VIEWS, batch_size=256, seed=0).epoch(0))
    check_probe_rates(batches)


def test_the_gpu_graph_decodes_with_nvjpeg_and_keeps_every_view_on_the_gpu():
    """Defined, not run (no GPU here): the graph for device cuda places each view on the GPU."""
    with Pipeline(batch_size=2, num_threads=1, device_id=0):
        from_files = views_graph(list(VIEWS.values()), True, True, files=["a.jpg"], labels=[0])
    with Pipeline(batch_size=2, num_threads=1, device_id=0):
        from_memory = views_graph(list(VIEWS.values()), True, True, feed=lambda info: None)
    for outputs in (from_files, from_memory):
        assert [o.device for o in outputs] == ["gpu"] * len(VIEWS) + ["cpu"]  # labels move with .to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches(colour_folder):
    batch = next(build("dali", data.load(str(colour_folder)), VIEWS, batch_size=8, device=torch.device("cuda"))
                 .epoch(0))
    assert all(batch[k].is_cuda for k in batch) and batch["weak"].is_contiguous(memory_format=torch.channels_last)


def test_unreadable_image_is_one_line_naming_convert(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16)).save(tmp_path / "train" / "a" / f"{i}.png")
    (tmp_path / "train" / "a" / "bad.jpg").write_text("not an image")
    with pytest.raises(UserError, match="fastssl convert") as err:
        list(loader(data.load(str(tmp_path)), batch_size=5).epoch(0))
    assert "\n" not in str(err.value)


def test_missing_extra_is_named():
    with pytest.raises(UserError, match=r"pip install 'fastssl\[dali\]'"):
        common.optional("nvidia.dali_not_installed", "dali")


@pytest.mark.slow
def test_a_short_run_learns(fashion_folder, tmp_path):
    check_short_run_learns(str(fashion_folder), "dali", tmp_path / "run")
