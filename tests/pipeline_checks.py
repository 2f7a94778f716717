"""What the DALI and FFCV pipeline tests check alike: small sets whose pixels or labels show what a pipeline did."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fastssl.data import ImageSet
from fastssl.views import ViewSpec

CPU = torch.device("cpu")
# One flat colour per class of the colour_folder fixture: a view that keeps colours shows its class.
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 70, 220), (240, 220, 30)]

SIDE = 32  # of the probe image
# Views of the probe image that each isolate one random op; the outputs are x / 255 (mean 0, std 1).
_PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
_WHOLE = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **_PLAIN)  # the whole image at its own size: untouched
PROBE_VIEWS = {
    "crop": ViewSpec(32, crop_scale=(0.25, 0.8), flip_p=0.0, **_PLAIN),
    "flip": ViewSpec(SIDE, flip_p=0.3, **_WHOLE),
    "gray": ViewSpec(SIDE, flip_p=0.0, grayscale_p=0.3, **_WHOLE),
    "jitter": ViewSpec(SIDE, flip_p=0.0, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.6, **_WHOLE),
    "blur": ViewSpec(SIDE, flip_p=0.0, blur_p=0.4, blur_sigma=(1.0, 2.0), **_WHOLE),
    "solarize": ViewSpec(SIDE, flip_p=0.0, solarize_p=0.25, **_WHOLE),
}
PROBE_RATES = {"flip": 0.3, "gray": 0.3, "jitter": 0.6, "blur": 0.4, "solarize": 0.25}


def probe_image() -> np.ndarray:
    """SIDE x SIDE RGB whose pixels tell what a view did: R = 8x and G = 8y (the crop box, a flip), B a
    checkerboard of 200 and 60 (blur mixes it, solarize turns 200 into 55); colourful, so a grey view shows."""
    y, x = np.mgrid[:SIDE, :SIDE]
    return np.stack([8 * x, 8 * y, np.where((x + y) % 2, 200, 60)], -1).astype(np.uint8)


def probe_set(n: int) -> ImageSet:
    images = torch.from_numpy(probe_image()).expand(n, -1, -1, -1).contiguous()
    return ImageSet("cifar10", "probe", "train", ["probe"], torch.zeros(n, dtype=torch.int64), images=images)


def unique_set(n: int, side: int = 8) -> ImageSet:
    """Image i is one flat colour and has label i, so a batch shows which samples it holds."""
    colours = torch.randint(0, 256, (n, 1, 1, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    return ImageSet("cifar10", "unique", "train", [str(i) for i in range(n)], torch.arange(n),
                    images=colours.expand(n, side, side, 3).contiguous())


def check_probe_rates(batches: list[dict]) -> None:
    """Each op fires at its spec's rate (within 4 standard errors); crops fall in the spec's area and ratio ranges."""
    views = {role: torch.cat([b[role] for b in batches]).float() * 255 for role in PROBE_VIEWS}
    image = torch.from_numpy(probe_image()).permute(2, 0, 1).float()
    n = len(views["flip"])
    fired = {
        "flip": views["flip"][:, 0, SIDE // 2, 0] > views["flip"][:, 0, SIDE // 2, -1],
        "gray": (views["gray"].amax(1) - views["gray"].amin(1)).amax((1, 2)) < 4,
        "jitter": (views["jitter"] - image).abs().amax((1, 2, 3)) > 3,
        "blur": (views["blur"][:, 2] - image[2]).abs().amax((1, 2)) > 20,
        "solarize": views["solarize"][:, 2, 0, 1] < 128,  # a 200 pixel of the checkerboard
    }
    for op, p in PROBE_RATES.items():
        rate = fired[op].double().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (op, rate, p)
    # crop box from the gradients: output column i samples x0 + (i + 0.5) w / S, where R = 8 (x - 0.5)
    crop, side = views["crop"], PROBE_VIEWS["crop"].size
    span = side / (side - 5) / 8  # between output pixels 2 and side - 3, away from the edges
    w = (crop[:, 0, :, side - 3] - crop[:, 0, :, 2]).mean(1) * span
    h = (crop[:, 1, side - 3, :] - crop[:, 1, 2, :]).mean(1) * span
    area, ratio = w * h / SIDE**2, w / h
    (lo, hi), (r_lo, r_hi) = PROBE_VIEWS["crop"].crop_scale, PROBE_VIEWS["crop"].crop_ratio
    # within the ranges up to whole-pixel boxes (a 16 px side is +-3%) and the gradient read-out; the extremes reached
    assert lo / 1.15 < area.min() < lo * 1.2 and hi / 1.2 < area.max() < hi * 1.15, (area.min(), area.max())
    assert r_lo / 1.15 < ratio.min() < r_lo * 1.1 and r_hi / 1.1 < ratio.max() < r_hi * 1.15, (ratio.min(), ratio.max())


def check_colour_views(batch: dict, views: dict[str, ViewSpec], tol: float = 3.5) -> None:
    """Views of colour_folder: float32 NCHW channels_last, normalised; the weak view keeps the class's colour."""
    n = len(batch["label"])
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (n,)
    for role, spec in views.items():
        x = batch[role]
        assert x.shape == (n, 3, spec.size, spec.size) and x.dtype == torch.float32, role
        assert x.is_contiguous(memory_format=torch.channels_last), role
    spec = views["weak"]
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    pixels = (batch["weak"] * std + mean) * 255  # back to 0..255
    colours = torch.tensor(COLOURS, dtype=torch.float32)[batch["label"]].view(n, 3, 1, 1)
    assert (pixels - colours).abs().max() < tol  # flat images: crops, flips and JPEG keep the colour
    changed = (batch["strong"] * std + mean) * 255 - colours
    assert (changed.abs().amax((1, 2, 3)) > tol).double().mean() > 0.3  # jitter p 0.8 (the rates: check_probe_rates)


# test_methods.py's short run that learns (lr 0.5 so that 64 steps show it, kNN with k=20 on a 2048-image bank),
# through another pipeline, on a Fashion-MNIST slice stored as image files or a .beton.
LEARN = dict(method="ressl", arch="resnet18-w8", image_size=28, batch_size=64, epochs=2, knn_every=2,
             warmup_epochs=0, lr=0.5, queue_size=256, knn_bank=2048, knn_queries=512, knn_k=20, device="cpu",
             precision="fp32", log_every=16)


def check_short_run_learns(data_path: str, pipeline: str, out: Path) -> None:
    from fastssl.config import settings
    from fastssl.train import train
    cfg = settings(**LEARN, data=data_path, pipeline=pipeline, out=str(out))
    summary = train(cfg)
    (_, random_init), (_, trained) = summary["knn_history"]  # random init: with its BN statistics of the data
    assert trained > random_init + 4, summary["knn_history"]


def torch_threads_after(code: str) -> int:
    """torch's intra-op threads after `code` runs in a fresh process that set them to 3 (this one may have imported
    FFCV, which changes them, long ago)."""
    script = f"import torch; torch.set_num_threads(3); {code}; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def losses(out) -> list[tuple[int, float]]:
    """(step, loss) as the run in `out` logged them to metrics.csv."""
    import csv
    with open(out / "metrics.csv") as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["key"] == "loss"]


def wait_for_steps(out, steps: int, proc, timeout: float = 300) -> None:
    """Until the run writing to `out` (a background `fastssl train`) has logged `steps` losses in metrics.csv;
    an AssertionError when it exits or times out first."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.csv").exists() and len(losses(out)) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run in {out} did not reach step {steps} (exit {proc.poll()})")
