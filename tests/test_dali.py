"""The DALI pipeline, CPU-only (device_id=None): the graph a GPU run uses, on CPU operators.

Views: ops at the spec's rates, crops and flips where the shared draws put them; epochs on one pipeline per
loader; unreadable images replaced and reported in their own batch, even one DALI fails on while it holds earlier
batches; one evaluation pipeline for every pass; the same graph placed on the GPU when training there; a short
training run learns. The loader contract (epochs, shards, resume; from files and from memory), the views' layout and
labels and the evaluation reader against torchvision's: tests/test_loaders.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nvidia.dali import Pipeline
from pipeline_checks import CPU, PROBE_VIEWS, check_probe_rates, check_short_run_learns, probe_set
from PIL import Image

from fastssl import data
from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.extras import optional
from fastssl.pipelines import build, dali_loader
from fastssl.pipelines.common import Shard, epoch_indices
from fastssl.pipelines.dali_loader import PREFETCH, EvalReader, eval_graph, views_graph
from fastssl.views import ViewSpec, resa_strong, strong, weak

pytestmark = pytest.mark.usefixtures("backbones_train_here")

VIEWS = {"weak": weak(24), "strong": resa_strong(24, blur_p=0.5), "crop1": ViewSpec(12, crop_scale=(0.1, 0.5))}


def loader(images, batch, views=VIEWS, rank=0, world=1, seed=1, **kw):
    return build("dali", images, views, Shard(rank, world, seed, batch), CPU, **kw)


def labels(batches) -> list[int]:
    return torch.cat([b["label"] for b in batches]).tolist()


def same(a: dict, b: dict) -> bool:
    """Bitwise the same batch (bad_files: the same list)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The name of each DALI pipeline built (views_pipeline, eval_pipeline) by loaders and readers made in the test."""
    built = []
    for name in ("views_pipeline", "eval_pipeline"):
        def counted(*args, make=getattr(dali_loader, name), name=name, **kw):
            built.append(name)
            return make(*args, **kw)
        monkeypatch.setattr(dali_loader, name, counted)
    return built


def corrupt(path: Path) -> None:
    """Zeroes bytes inside a PNG's pixel data: PIL reads its header, DALI's decoder fails on it."""
    data = bytearray(path.read_bytes())
    data[60:80] = bytes(20)
    path.write_bytes(bytes(data))


def test_one_pipeline_serves_every_epoch_and_every_evaluation_pass(colour_folder, builds):
    images = data.load(str(colour_folder))
    run = loader(images, 8)
    epochs = [list(run.epoch(e)) for e in range(2)]
    unfinished = run.epoch(2)
    next(unfinished)
    unfinished.close()  # left early: DALI gives out the batches it holds, and the pipeline serves on
    resumed = list(run.epoch(1, start_batch=2))
    assert builds == ["views_pipeline"]
    for e, batches in enumerate(epochs):
        assert labels(batches) == images.labels[run.indices(e).flatten()].tolist()
    assert all(same(a, b) for a, b in zip(epochs[1][2:], resumed, strict=True))
    reader = EvalReader(images, 24, 20, workers=2)
    first = next(iter(reader))  # a pass left early, as the kNN monitor's BN calibration leaves it
    passes = [list(reader) for _ in range(2)]
    assert builds == ["views_pipeline", "eval_pipeline"]
    assert torch.equal(first, passes[0][0]) and all(torch.equal(a, b) for a, b in zip(*passes, strict=True))


def test_crops_and_flips_are_the_shared_draws():
    """The weak view (crop + flip) against --pipeline tensor's, which draws the same boxes and flips and resamples
    as torchvision does: close, not equal (DALI's resampling reads pixels just outside the box)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (64, 3, 10, 12), generator=g, dtype=torch.uint8).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(40, 48), mode="bilinear").round().to(torch.uint8)
    images = ImageSet("cifar10", "smooth", "train", ["a"], torch.zeros(64, dtype=torch.int64),
                      images=smooth.permute(0, 2, 3, 1).contiguous())
    views = {"weak": weak(24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))}
    shard = Shard(0, 1, 3, 16)
    dali, tensor = (torch.cat([b["weak"] for b in build(kind, images, views, shard, CPU).epoch(0)]) * 255
                    for kind in ("dali", "tensor"))
    diff = (dali - tensor).abs()
    assert diff.mean() < 1 and diff.flatten().quantile(0.99) < 6, (diff.mean(), diff.flatten().quantile(0.99))


def test_ops_fire_at_the_specs_rates_and_crops_stay_in_range():
    check_probe_rates(list(loader(probe_set(2048), 256, PROBE_VIEWS, seed=0).epoch(0)))


def test_unreadable_images_are_replaced_by_the_next_readable_one_and_reported(tmp_path):
    """bad.jpg is no image (its header tells), corrupt.png has a good header and fails in DALI's decoder: each slot
    takes the next readable image of the set (and its label) and the batch names the file; nothing else changes."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "3b_bad.jpg").write_text("not an image")
    Image.new("RGB", (16, 16), (0, 0, 200)).save(folder / "6b_corrupt.png")
    corrupt(folder / "6b_corrupt.png")
    images = data.load(str(tmp_path))
    bad = {images.files.index(str(folder / name)): str(folder / name) for name in ("3b_bad.jpg", "6b_corrupt.png")}
    views = {"weak": weak(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)}  # the whole image
    colour = {i: 20.0 * int(Path(f).stem) for i, f in enumerate(images.files) if i not in bad}  # R of each image
    spec = views["weak"]
    for batch_size, reported in ((3, [0, 0, 1, 1]), (6, [0, 2])):  # one bad file a batch, or both in one
        run = loader(images, batch_size, views, seed=2)
        batches = list(run.epoch(0))
        for batch, idx in zip(batches, run.indices(0).tolist(), strict=True):
            assert batch.get("bad_files", []) == [bad[i] for i in idx if i in bad]
            red = (batch["weak"][:, 0] * spec.std[0] + spec.mean[0]).mean((1, 2)) * 255
            assert (red - torch.tensor([colour[i + 1 if i in bad else i] for i in idx])).abs().max() < 1
        assert [len(b.get("bad_files", [])) for b in batches] == reported
        resumed = list(loader(images, batch_size, views, seed=2).epoch(0, start_batch=1))  # knowing no bad file yet
        assert all(same(a, b) for a, b in zip(batches[1:], resumed, strict=True))


def test_a_file_dali_fails_on_in_a_later_prefetched_batch_is_reported_in_its_own_batch(tmp_path, builds):
    """Two files DALI's decoder fails on, in batch 1 and in batch PREFETCH, which DALI holds when batch 1 fails: that
    one failure finds both, and one new pipeline reruns the batches. Each batch names its own file, whose slot takes
    the next image of the set (and its label); every other sample, in every view, is as in a run on intact files."""
    n, batch, seed = 24, 3, 4
    order = epoch_indices(n, Shard(0, 1, seed, batch), 0).view(-1, batch).tolist()
    broken = {order[1][0], order[PREFETCH][2]}
    stand_in = {i: next(j % n for j in range(i + 1, i + n) if j % n not in broken) for i in broken}  # next readable
    views = {"whole": weak(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0), "strong": VIEWS["strong"]}

    def image_set(name: str, bad: set[int]) -> ImageSet:
        for i in range(n):  # image i is class i, in a colour of its own
            (tmp_path / name / "train" / f"{i:02d}").mkdir(parents=True)
            path = tmp_path / name / "train" / f"{i:02d}" / "x.png"
            Image.new("RGB", (16, 16), (10 * i, 100, 240 - 10 * i)).save(path)
            if i in bad:
                corrupt(path)
        return data.load(str(tmp_path / name))

    intact = list(loader(image_set("intact", set()), batch, views, seed=seed).epoch(0))
    whole = {i: b["whole"][j] for b, idx in zip(intact, order) for j, i in enumerate(idx)}
    images = image_set("broken", broken)
    run = loader(images, batch, views, seed=seed)
    first = list(run.epoch(0))
    assert builds.count("views_pipeline") == 3  # the intact run's; the broken run's, and one after its one failure
    assert all(same(a, b) for a, b in zip(first, run.epoch(0), strict=True))  # the files known: the same batches
    assert builds.count("views_pipeline") == 3
    for b, clean, idx in zip(first, intact, order, strict=True):
        assert b.get("bad_files", []) == [images.files[i] for i in idx if i in broken]
        if not broken & set(idx):
            assert same(b, clean)
            continue
        assert b["label"].tolist() == [stand_in.get(i, i) for i in idx]
        for j, i in enumerate(idx):
            if i in broken:
                assert torch.equal(b["whole"][j], whole[stand_in[i]])
            else:
                assert all(torch.equal(b[role][j], clean[role][j]) for role in views)


def test_a_failure_that_is_no_unreadable_file_is_one_line(tmp_path):
    """A GIF named .png: PIL reads it, DALI does not decode GIFs."""
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16)).save(tmp_path / "train" / "a" / f"{i}.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "a" / "gif.png", format="GIF")
    with pytest.raises(UserError, match="fastssl convert") as err:
        list(loader(data.load(str(tmp_path)), 5).epoch(0))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_the_gpu_graph_decodes_with_nvjpeg_and_keeps_every_view_on_the_gpu():
    """Defined, not run (no GPU here): the graph for device cuda places each view on the GPU."""
    graphs = []
    for files in (True, False):
        with Pipeline(batch_size=2, num_threads=1, device_id=0):
            graphs.append(views_graph(list(VIEWS.values()), True, True, files, feed=lambda: None))
    for outputs in graphs:
        assert [o.device for o in outputs] == ["gpu"] * len(VIEWS) + ["cpu"]  # labels move with .to(device)
    with Pipeline(batch_size=2, num_threads=1, device_id=0):
        assert eval_graph(24, True, feed=lambda: None).device == "gpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches(colour_folder):
    views = {"weak": weak(24), "strong": strong(24, blur_p=0.5)}
    run = build("dali", data.load(str(colour_folder)), views, Shard(rank_batch=8), torch.device("cuda"))
    batch = next(run.epoch(0))
    assert all(batch[k].is_cuda for k in batch) and batch["weak"].is_contiguous(memory_format=torch.channels_last)


def test_missing_extra_is_named():
    with pytest.raises(UserError, match=r"pip install 'fastssl\[dali\]'"):
        optional("nvidia.dali_not_installed", "dali")


@pytest.mark.slow
def test_a_short_run_learns(fashion_folder, tmp_path):
    check_short_run_learns(str(fashion_folder), "dali", tmp_path / "run")
