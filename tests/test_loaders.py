"""The loader contract, held by every pipeline alike (torch, tensor, DALI, FFCV, nvJPEG): exact epochs in the shared
order, reshuffled and seeded; shards of global batches, so that one process at batch 2B sees at each step what two
processes at B see together (same samples, same views); exact resumption at any batch."""

from __future__ import annotations

import functools

import pytest
import torch
from pipeline_checks import CPU, unique_set

from fastssl.pipelines import build, common
from fastssl.pipelines.common import Shard
from fastssl.views import ViewSpec, strong, weak

PIPELINES = ("torch", "tensor", "dali", "ffcv", "nvjpeg")
N, BATCH = 103, 10  # 103 images, each its own flat colour and label: a batch shows which samples it holds
VIEWS = {"weak": weak(8), "strong": strong(8, blur_p=0.5), "crop1": ViewSpec(8, crop_scale=(0.1, 0.5), flip_p=0.3)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same 103 images as each pipeline reads them: in memory, and as a .beton for FFCV."""
    from fastssl import data
    from fastssl.beton import write_beton
    memory = unique_set(N)
    path = tmp_path_factory.mktemp("contract") / "unique_train.beton"
    write_beton(memory, path)
    return {"memory": memory, "beton": data.load(str(path))}


@pytest.fixture(scope="module")
def make(images):
    """make(pipeline, rank=0, world=1, seed=1, batch=BATCH): a loader, built once per setting (FFCV and DALI compile
    or build their pipelines, which takes seconds)."""
    @functools.cache
    def loader(kind: str, rank: int = 0, world: int = 1, seed: int = 1, batch: int = BATCH):
        source = images["beton" if kind == "ffcv" else "memory"]
        return build(kind, source, VIEWS, Shard(rank, world, seed, batch), CPU, workers=1)
    return loader


def labels(batches) -> list[int]:
    return torch.cat([b["label"] for b in batches]).tolist()


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol) for k in a)


@pytest.mark.parametrize("kind", PIPELINES)
def test_epochs_are_exact_in_the_shared_order_and_reshuffled(make, kind):
    run = make(kind)
    assert len(run) == N // BATCH
    for epoch in (0, 1):
        seen = labels(run.epoch(epoch))
        assert seen == common.epoch_indices(N, run.shard, epoch).tolist()  # each sample once, whole batches
    assert labels(run.epoch(0)) != labels(run.epoch(1))


@pytest.mark.parametrize("kind", PIPELINES)
def test_batches_are_seeded_and_resume_at_any_batch(make, kind):
    first = list(make(kind).epoch(2))
    again = list(make(kind).epoch(2))
    assert all(same(a, b) for a, b in zip(first, again, strict=True))
    resumed = list(make(kind).epoch(2, start_batch=4))  # the views too, not only the order
    assert len(resumed) == len(first) - 4 and all(same(a, b) for a, b in zip(first[4:], resumed, strict=True))
    other = next(make(kind, seed=2).epoch(2))
    assert not torch.equal(other["strong"], first[0]["strong"])
    unfinished = make(kind).epoch(3)
    next(unfinished)
    unfinished.close()  # the loop left an epoch early: the next one starts clean
    assert labels(make(kind).epoch(0)) == common.epoch_indices(N, make(kind).shard, 0).tolist()


@pytest.mark.parametrize("kind", PIPELINES)
def test_two_ranks_see_at_each_step_what_one_process_sees_at_twice_the_batch(make, kind):
    whole = list(make(kind, batch=2 * BATCH).epoch(1))
    ranks = [list(make(kind, rank=r, world=2).epoch(1)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == N // (2 * BATCH)
    for step, (a, b) in enumerate(zip(*ranks)):
        joined = {k: torch.cat([a[k], b[k]]) for k in a}
        # keyed randomness: the same views of the same samples (the resampling may round differently by batch shape)
        assert joined["label"].tolist() == whole[step]["label"].tolist()
        assert same(joined, whole[step], atol=1e-5), step
