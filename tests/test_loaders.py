"""The loader contract, held by every pipeline alike (torch, tensor, DALI, FFCV, nvJPEG), on every kind of data it
reads (sets held in memory, a .beton, image files): exact epochs in the shared order, reshuffled and seeded; shards of
global batches, so that one process at batch 2B sees at each step what two processes at B see together (same
samples, same views); exact resumption at any batch."""

from __future__ import annotations

import functools

import pytest
import torch
from pipeline_checks import CPU, check_colour_views, unique_set

from fastssl.pipelines import build, common
from fastssl.pipelines.common import Shard
from fastssl.views import ViewSpec, resa_strong, strong, weak

# (pipeline, what it reads)
CASES = [("torch", "memory"), ("tensor", "memory"), ("dali", "memory"), ("ffcv", "beton"), ("nvjpeg", "memory"),
         ("torch", "files"), ("dali", "files"), ("nvjpeg", "files")]
IDS = [f"{kind}-{source}" for kind, source in CASES]
N, BATCH = 103, 10  # 103 images, each its own flat colour and label: a batch shows which samples it holds
VIEWS = {"weak": weak(8), "strong": strong(8, blur_p=0.5), "crop1": ViewSpec(8, crop_scale=(0.1, 0.5), flip_p=0.3)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same 103 images as the pipelines read them: in memory, as a .beton for FFCV, and as files (image i, of
    side 8 to 12, in class folder i: PNG and JPEG in turn)."""
    from PIL import Image

    from fastssl import data
    from fastssl.pipelines import load_images
    from fastssl.pipelines.beton import write_beton
    memory = unique_set(N)
    folder = tmp_path_factory.mktemp("contract")
    write_beton(memory, folder / "unique_train.beton")
    for i, pixels in enumerate(memory.images.numpy()):
        (folder / "files" / f"{i:03d}").mkdir(parents=True)
        side, suffix = 8 + i % 5, "jpg" if i % 2 else "png"
        Image.fromarray(pixels).resize((side, side)).save(folder / "files" / f"{i:03d}" / f"x.{suffix}")
    return {"memory": memory, "beton": load_images(str(folder / "unique_train.beton")),
            "files": data.load(str(folder / "files"))}


@pytest.fixture(scope="module")
def make(images):
    """make((pipeline, source), rank=0, world=1, seed=1, batch=BATCH): a loader, built once per setting (FFCV and
    DALI compile or build their pipelines, which takes seconds)."""
    @functools.cache
    def loader(case: tuple[str, str], rank: int = 0, world: int = 1, seed: int = 1, batch: int = BATCH):
        kind, source = case
        return build(kind, images[source], VIEWS, Shard(rank, world, seed, batch), CPU, workers=1)
    return loader


def labels(batches) -> list[int]:
    return torch.cat([b["label"] for b in batches]).tolist()


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol) for k in a)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_epochs_are_exact_in_the_shared_order_and_reshuffled(make, case):
    run = make(case)
    assert len(run) == N // BATCH
    for epoch in (0, 1):
        seen = labels(run.epoch(epoch))
        assert seen == common.epoch_indices(N, run.shard, epoch).tolist()  # each sample once, whole batches
    assert labels(run.epoch(0)) != labels(run.epoch(1))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batches_are_seeded_and_resume_at_any_batch(make, case):
    first = list(make(case).epoch(2))
    again = list(make(case).epoch(2))
    assert all(same(a, b) for a, b in zip(first, again, strict=True))
    resumed = list(make(case).epoch(2, start_batch=4))  # the views too, not only the order
    assert len(resumed) == len(first) - 4 and all(same(a, b) for a, b in zip(first[4:], resumed, strict=True))
    other = next(make(case, seed=2).epoch(2))
    assert not torch.equal(other["strong"], first[0]["strong"])
    unfinished = make(case).epoch(3)
    next(unfinished)
    unfinished.close()  # the loop left an epoch early: the next one starts clean
    assert labels(make(case).epoch(0)) == common.epoch_indices(N, make(case).shard, 0).tolist()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_ranks_see_at_each_step_what_one_process_sees_at_twice_the_batch(make, case):
    whole = list(make(case, batch=2 * BATCH).epoch(1))
    ranks = [list(make(case, rank=r, world=2).epoch(1)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == N // (2 * BATCH)
    for step, (a, b) in enumerate(zip(*ranks)):
        joined = {k: torch.cat([a[k], b[k]]) for k in a}
        # keyed randomness: the same views of the same samples (the resampling may round differently by batch shape)
        assert joined["label"].tolist() == whole[step]["label"].tolist()
        assert same(joined, whole[step], atol=1e-5), step


@pytest.mark.parametrize("kind", ["dali", "nvjpeg"])
def test_evaluation_readers_read_files_in_order_as_torchvision_does(colour_folder, kind):
    from fastssl import data
    from fastssl.pipelines import eval_reader
    from fastssl.pipelines.torch_loader import FileEvalReader
    images = data.load(str(colour_folder))
    reader = eval_reader(kind, images, 24, batch_size=20, workers=2)
    ours, reference = list(reader), list(FileEvalReader(images, 24, 20, workers=0))
    assert [x.shape for x in ours] == [x.shape for x in reference] == [(20, 3, 24, 24)] * 2 + [(8, 3, 24, 24)]
    assert all(x.dtype == torch.uint8 for x in ours)
    # the same resize sizes and centre corners; the JPEGs decode alike: at most one grey level apart
    assert (torch.cat(ours).float() - torch.cat(reference).float()).abs().max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(ours, reader, strict=True))  # iterable again


@pytest.mark.parametrize("kind", ["dali", "nvjpeg"])
def test_folder_views_have_the_trainers_layout_and_labels_match_images(colour_folder, kind):
    from fastssl import data
    images = data.load(str(colour_folder))  # PNGs and JPEGs of many sizes
    views = {"weak": weak(24), "strong": resa_strong(24, blur_p=0.5), "crop1": ViewSpec(12, crop_scale=(0.1, 0.5))}
    run = build(kind, images, views, Shard(0, 1, 1, 16), CPU)
    assert len(run) == 3  # 48 images
    for batch, idx in zip(run.epoch(0), run.indices(0), strict=True):
        check_colour_views(batch, views)
        assert batch["label"].tolist() == images.labels[idx].tolist() and "bad_files" not in batch
    flat = next(build(kind, images, views, Shard(0, 1, 1, 8), CPU, channels_last=False).epoch(0))["strong"]
    assert flat.is_contiguous() and flat.shape == (8, 3, 24, 24)
