"""The tensor pipeline (pipelines/device_augment.py + tensor_loader.py) against torchvision, on CPU.

Each op equals torchvision.transforms.v2.functional on the same float image and parameters; the random
parameters follow the ViewSpec as torchvision's transforms draw them; the loader has exact, seeded,
resumable epochs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.pipelines import build
from fastssl.pipelines import device_augment as A
from fastssl.pipelines import tensor_loader
from fastssl.pipelines.common import SampleRandom, Shard
from fastssl.pipelines.torch_loader import to_torchvision
from fastssl.views import ViewSpec, resa_strong, strong, weak

pytestmark = pytest.mark.usefixtures("backbones_train_here")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops run faster on one thread than on two contended ones (torchvision's per-image ops 30x so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(n: int, seed: int = 0) -> SampleRandom:
    """Random parameters for n samples (the loaders key them by (seed, epoch, sample index))."""
    return SampleRandom(seed, 0, torch.arange(n))


def images(n: int = 12, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    """Float [n,3,h,w] in [0, 1]: noise, with a grey image, a saturated patch and a flat patch in the mix."""
    x = torch.rand(n, 3, h, w, generator=gen(seed))
    x[0] = x[0, :1]
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.5]).view(3, 1, 1)
    x[2, :, 5:9] = 0.5
    return x


def per_sample(fn, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(x[i], *(p[i].item() for p in params)) for i in range(len(x))])


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 2e-6) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol


# ---- each op equals torchvision's ----

@pytest.mark.parametrize("op, tv", [(A.BRIGHTNESS, TF.adjust_brightness), (A.CONTRAST, TF.adjust_contrast),
                                    (A.SATURATION, TF.adjust_saturation)])
def test_adjust_matches_torchvision(op, tv):
    x = images()
    factor = torch.rand(len(x), generator=gen(1)) * 1.6
    close(A.adjust(x, torch.full((len(x),), op), factor), per_sample(tv, x, factor))
    close(A.adjust(x, torch.full((len(x),), A.NO_OP), factor), x, 0)


def test_hue_matches_torchvision():
    x = images()
    shift = torch.rand(len(x), generator=gen(1)) - 0.5
    close(A.hue(x, shift), per_sample(TF.adjust_hue, x, shift))
    close(A.hue(x, torch.zeros(len(x))), x)


def test_color_jitter_matches_torchvision_in_each_sample_order():
    x = images(64, 12, 12)
    p = A.sample_params(12, 12, strong(12), draws(64, 2))
    expected = []
    for i in range(64):
        y = x[i]
        for op in p["order"][i].tolist():  # torchvision's ColorJitter.transform, one image at a time
            fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
            y = fn(y, p["jitter"][i, op].item())
        expected.append(y)
    close(A.color_jitter(x, p["jitter"], p["order"]), torch.stack(expected), 5e-6)


def test_grayscale_blur_solarize_match_torchvision():
    x = images()
    mask = torch.arange(len(x)) % 3 != 0
    close(A.grayscale(x, mask), torch.stack([TF.rgb_to_grayscale(x[i], 3) if mask[i] else x[i] for i in range(len(x))]))
    sigma = torch.rand(len(x), generator=gen(1)) * 1.9 + 0.1
    for k in (3, 7):
        blurred = [TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2) if mask[i] else x[i] for i in range(len(x))]
        close(A.gaussian_blur(x, sigma, k, mask), torch.stack(blurred))
    solarized = [TF.solarize(x[i], 0.5) if mask[i] else x[i] for i in range(len(x))]
    close(A.solarize(x, 0.5, mask), torch.stack(solarized), 0)


@pytest.mark.parametrize("size", [32, 9])  # enlarging, and shrinking (antialiased)
def test_resized_crop_and_flip_match_torchvision(size):
    x = images()
    boxes = torch.tensor([[2.0, 3.0, 10.0, 12.0], [0.0, 0.0, 24.0, 20.0], [5.0, 1.0, 19.0, 19.0]]).repeat(4, 1)
    flip = torch.arange(len(x)) % 2 == 1
    expected = []
    for i, (x0, y0, w, h) in enumerate(boxes.int().tolist()):
        y = TF.resized_crop(x[i], y0, x0, h, w, [size, size], antialias=True)
        expected.append(TF.horizontal_flip(y) if flip[i] else y)
    close(A.resized_crop(x, boxes, flip, size), torch.stack(expected))
    u8 = (x * 255).round().to(torch.uint8)  # uint8 input is read as x / 255
    close(A.resized_crop(u8, boxes, flip, size), A.resized_crop(u8.float() / 255, boxes, flip, size))


# ---- random parameters follow the spec as torchvision draws them ----

def crop_stats(boxes: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
    x0, y0, bw, bh = boxes.double().unbind(1)
    return {"area": bw * bh / (h * w), "log_aspect": (bw / bh).log(), "cx": (x0 + bw / 2) / w, "cy": (y0 + bh / 2) / h}


@pytest.mark.parametrize("h, w, scale, ratio", [(28, 28, (0.2, 1.0), (3 / 4, 4 / 3)),
                                                (40, 20, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                (32, 32, (0.5, 1.0), (1.5, 3.0))])  # 45% fallback
def test_crop_distribution_matches_random_resized_crop(h, w, scale, ratio):
    n = 3000
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, h, w), scale, ratio) for _ in range(n)])
    ref = torch.stack([ref[:, 1], ref[:, 0], ref[:, 3], ref[:, 2]], 1)  # (i, j, h, w) -> (x0, y0, w, h)
    ours = A.sample_crops(h, w, scale, ratio, draws(4 * n))
    assert ours.min() >= 0 and (ours[:, 0] + ours[:, 2]).max() <= w and (ours[:, 1] + ours[:, 3]).max() <= h
    assert (ours == ours.round()).all()
    for name, ref_values in crop_stats(ref, h, w).items():
        assert ks_distance(crop_stats(ours, h, w)[name], ref_values) < 0.05, name
    # when no try fits: the central crop at the nearest ratio, as often as in torchvision
    in_ratio = min(max(w / h, ratio[0]), ratio[1])
    fw, fh = min(w, round(h * in_ratio)), min(h, round(w / in_ratio))
    central = torch.tensor([(w - fw) // 2, (h - fh) // 2, fw, fh])
    rate = lambda boxes: (boxes == central).all(1).double().mean().item()  # noqa: E731
    assert abs(rate(ours) - rate(ref)) < 0.04


def test_crops_of_images_of_different_sizes_fit_each_image():
    """Per-sample sizes (the DALI pipeline's files): each box inside its own image, as drawn for that size alone."""
    heights, widths = torch.tensor([20.0, 300.0, 64.0, 31.0]).repeat(50), torch.tensor([40.0, 200.0, 64.0, 9.0]).repeat(50)
    boxes = A.sample_crops(heights, widths, (0.2, 1.0), (3 / 4, 4 / 3), draws(200))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= widths).all() and (y0 + h <= heights).all()
    area = w * h / (heights * widths)
    assert area.min() > 0.15 and area.max() <= 1
    alone = A.sample_crops(20, 40, (0.2, 1.0), (3 / 4, 4 / 3), draws(200))
    assert torch.equal(boxes[0::4], alone[0::4])  # a sample's draws do not depend on the others'


def test_op_rates_and_factor_ranges_follow_the_spec():
    spec = ViewSpec(16, jitter=(0.4, 0.3, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.3,
                    flip_p=0.4)
    n = 20000
    p = A.sample_params(16, 16, spec, draws(n))
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    fired = (p["jitter"] != identity).any(1)
    tol = 4 * math.sqrt(0.25 / n)
    for name, rate, expected in [("flip", p["flip"], 0.4), ("jitter", fired, 0.8), ("gray", p["gray"], 0.2),
                                 ("blur", p["blur"], 0.5), ("solarize", p["solarize"], 0.3)]:
        assert abs(rate.double().mean().item() - expected) < tol, name
    for i, (lo, hi) in enumerate(A.jitter_ranges(spec.jitter)):
        f = p["jitter"][fired, i]
        assert lo <= f.min() and f.max() <= hi and abs(f.mean() - (lo + hi) / 2) < 0.01 * (hi - lo) + 1e-3
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # a permutation per sample ...
    for op in range(4):  # ... each op equally likely at each position
        assert ((p["order"] == op).double().mean(0) - 0.25).abs().max() < 0.02
    assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest gap between the two empirical CDFs (the Kolmogorov-Smirnov statistic)."""
    grid = torch.cat([a, b]).double().unique()
    cdf = lambda v: torch.searchsorted(v.double().sort().values, grid, right=True) / len(v)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def test_view_statistics_match_the_torchvision_pipeline():
    """Whole strong views of one colourful image: grey-view rate, distributions of mean and saturation."""
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[0, :, :8], img[1, :8], img[2, 4:12, 4:12] = 220, 180, 250
    spec = resa_strong(12, blur_p=0.5)
    torch.manual_seed(0)
    transform = to_torchvision(spec)
    ref = torch.stack([transform(img) for _ in range(800)]).float() / 255
    ours = A.view(img.expand(4000, -1, -1, -1), spec, draws(4000))

    def stats(v):
        span = v.amax(1) - v.amin(1)  # per-pixel saturation, as max - min
        return (span.amax((1, 2)) < 0.02).double().mean().item(), v.mean((1, 2, 3)), span.mean((1, 2))

    (grey_ref, mean_ref, sat_ref), (grey, mean, sat) = stats(ref), stats(ours)
    assert abs(grey - grey_ref) < 0.04 and abs(grey - 0.2) < 0.03
    assert ks_distance(mean, mean_ref) < 0.07 and ks_distance(sat, sat_ref) < 0.07


# ---- the loader (the contract every pipeline keeps: tests/test_loaders.py) ----

def tiny_set(n: int = 100, side: int = 8) -> ImageSet:
    """Image i is one flat colour and has label i, so a batch shows which samples it holds."""
    colours = torch.randint(0, 256, (n, 1, 1, 3), generator=gen(5), dtype=torch.uint8)
    return ImageSet("cifar10", "tiny", "train", [str(i) for i in range(n)], torch.arange(n),
                    images=colours.expand(n, side, side, 3).contiguous())


def views(size: int = 8) -> dict[str, ViewSpec]:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    return {"weak": weak(size, mean=mean, std=std), "strong": strong(size, blur_p=0.5, mean=mean, std=std)}


def loader(images: ImageSet, batch_size: int = 10, device=CPU, **kw):
    return build("tensor", images, kw.pop("views", views()), Shard(rank_batch=batch_size), device, **kw)


def labels(batches) -> torch.Tensor:
    return torch.cat([b["label"] for b in batches])


def test_batch_layout_normalisation_and_a_weak_view_without_colour_change():
    data, spec = tiny_set(), views()
    batch = next(loader(data, batch_size=20, views={**spec, "crop1": ViewSpec(10, crop_scale=(0.1, 0.5))}).epoch(0))
    assert set(batch) == {"weak", "strong", "crop1", "label"}
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (20,)
    for role, size in (("weak", 8), ("strong", 8), ("crop1", 10)):
        assert batch[role].shape == (20, 3, size, size) and batch[role].dtype == torch.float32
        assert batch[role].is_contiguous(memory_format=torch.channels_last)
    # flat images: the weak view is the image's own colour, normalised
    colour = data.images[batch["label"], 0, 0].float() / 255
    mean, std = torch.tensor(spec["weak"].mean), torch.tensor(spec["weak"].std)
    close(batch["weak"], ((colour - mean) / std)[:, :, None, None].expand(-1, -1, 8, 8), 1e-5)
    changed = (batch["strong"] - batch["weak"]).abs().amax((1, 2, 3)) > 1e-3
    assert 0.5 <= changed.double().mean() < 1  # jitter p 0.8, grayscale 0.2
    flat = next(loader(data, views=views(), channels_last=False).epoch(0))["weak"]
    assert flat.is_contiguous()


def test_image_folder_is_decoded_once_at_the_view_size(tmp_path):
    for i, (cls, size) in enumerate([("a", (30, 20)), ("a", (16, 16)), ("b", (12, 40)), ("b", (50, 50))]):
        (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i, 200, 10)).save(tmp_path / "train" / cls / f"{i}.png")
    from fastssl.data import load
    folder = load(str(tmp_path))
    run = loader(folder, batch_size=2, views=views(12))
    assert run.pixels.shape == (4, 12, 12, 3) and run.pixels.dtype == torch.uint8
    assert sorted(labels(run.epoch(0)).tolist()) == [0, 0, 1, 1]
    with pytest.raises(UserError, match="at most 128 px"):
        loader(folder, batch_size=2, views=views(160))


def test_refuses_a_set_that_does_not_fit(monkeypatch):
    monkeypatch.setattr(tensor_loader, "free_memory", lambda device: 1000)
    data = tiny_set()
    with pytest.raises(UserError) as err:
        tensor_loader.resident_images(data, 8, torch.device("cuda"))  # checked before anything is copied
    message = str(err.value)
    assert "\n" not in message and "0.00 GiB" in message and "--pipeline torch" in message, message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_ops_and_never_wait_for_the_gpu():
    cuda, spec, x = torch.device("cuda"), resa_strong(16, blur_p=0.5), images()
    p = A.sample_params(20, 24, spec, draws(len(x)))
    make = lambda x, p: A.photometric(A.resized_crop(x, p["boxes"], p["flip"], 16), spec, p)  # noqa: E731
    close(make(x.to(cuda), {k: v.to(cuda) for k, v in p.items()}).cpu(), make(x, p), 1e-4)
    batches = loader(tiny_set(), device=cuda).epoch(0)
    next(batches)  # the epoch's indices and the constants go to the GPU once
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = next(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batch["strong"].is_cuda and batch["label"].is_cuda


def test_the_trainer_runs_on_the_tensor_pipeline(tmp_path):
    """`fastssl train --pipeline tensor` end to end on a Fashion-MNIST slice (a smoke test, not a learning check)."""
    train = pytest.importorskip("fastssl.train").train
    from fastssl.config import settings
    cfg = settings(method="ressl", arch="resnet18-w8", data="fashion-mnist", pipeline="tensor", train_subset=1024,
                   epochs=1, batch_size=128, queue_size=512, knn_every=0, knn_bank=500, knn_queries=200,
                   device="cpu", out=str(tmp_path))
    summary = train(cfg)
    assert summary["steps"] == 8 and 10 < summary["knn_top1"] <= 100
    assert (tmp_path / "backbone.pt").is_file()
