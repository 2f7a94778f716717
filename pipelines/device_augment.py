"""Batched augmentations on the training device: every view of a batch made by a few tensor ops.

Each op takes a uint8 or float [B,3,H,W] batch on any device, plus per-sample parameters ([B] tensors),
and returns float [B,3,H,W] in [0, 1]. The ops follow torchvision.transforms.v2.functional on float
images (same formulas, same clamping). A sample the op should leave alone gets the op's identity
parameter (factor 1, a delta kernel, a False mask) rather than being skipped: shapes never depend on the
data, so nothing waits on the GPU. `sample_params` draws every parameter of a view from a ViewSpec with
a `SampleRandom` (draws keyed by each sample, on the batch's device); `view` makes one view of a batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastssl.device import to_device
from fastssl.views import ViewSpec, constant

from .common import SampleRandom

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op ids
NO_OP = -1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; float input is taken to be in [0, 1] already."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _uniform(rnd: SampleRandom, lo: float, hi: float, k: int | None = None) -> torch.Tensor:
    """[n] (k None) or [n, k] uniform in [lo, hi)."""
    u = rnd.uniform(k or 1)
    return (u if k else u[:, 0]).mul_(hi - lo).add_(lo)


def _coin(rnd: SampleRandom, p: float) -> torch.Tensor:
    return rnd.uniform()[:, 0] < p


# ---- geometry: random resized crop + horizontal flip ----

def _per_image(side, rnd: SampleRandom) -> torch.Tensor:
    """A side (an int, or [n] sizes) as float [n] on rnd's device: filled there, or copied without a blocking wait."""
    if isinstance(side, torch.Tensor):
        return to_device(side.float(), rnd.device).expand(len(rnd))
    return torch.full((len(rnd),), float(side), device=rnd.device)


def sample_crops(height, width, scale: tuple[float, float], ratio: tuple[float, float],
                 rnd: SampleRandom) -> torch.Tensor:
    """RandomResizedCrop.get_params for n images at once: boxes [n,4] as (x0, y0, w, h) in whole pixels.

    height, width: ints, or [n] tensors for images of different sizes. Ten tries per image as torchvision makes,
    vectorised: the first try whose box fits is kept; an image with none gets torchvision's fallback, the
    central crop clamped to the ratio range.
    """
    height, width = _per_image(height, rnd), _per_image(width, rnd)
    target = _uniform(rnd, *scale, 10) * (height * width)[:, None]
    aspect = _uniform(rnd, math.log(ratio[0]), math.log(ratio[1]), 10).exp_()
    w = (target * aspect).sqrt_().round_()
    h = (target / aspect).sqrt_().round_()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.int().argmax(1, keepdim=True)  # the first fitting try (0 when none fits)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)

    narrow, wide = width / height < min(ratio), width / height > max(ratio)
    fw = torch.where(wide, (height * max(ratio)).round(), width)
    fh = torch.where(narrow, (width / min(ratio)).round(), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    # torchvision's randint(0, side - crop + 1) for the corner, or the centre for the fallback
    y0 = torch.where(found, (_uniform(rnd, 0, 1) * (height - h + 1)).floor_(), ((height - fh) / 2).floor())
    x0 = torch.where(found, (_uniform(rnd, 0, 1) * (width - w + 1)).floor_(), ((width - fw) / 2).floor())
    return torch.stack([x0, y0, w, h], 1)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, n_in: int) -> torch.Tensor:
    """[B,size,n_in]: output pixel i of the span [start, start + length) of each row, resized to size.

    The weights of torch's bilinear resize with antialias (what torchvision's resize uses): a triangle
    over the input pixel centres, as wide as the scale factor when shrinking, restricted to the span and
    normalised, which also reproduces the clamping at the crop's edges.
    """
    scale = length / size
    centre = start[:, None] + (torch.arange(size, device=start.device) + 0.5) * scale[:, None]
    pos = torch.arange(n_in, device=start.device) + 0.5
    w = (1 - (pos - centre[..., None]).abs() / scale.clamp(min=1)[:, None, None]).clamp_(min=0)
    w = w * ((pos >= start[:, None, None]) & (pos < (start + length)[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop boxes [B,4] (x0, y0, w, h) of x, resize to size x size, mirror where flip: float [0, 1].

    torchvision's resized_crop (antialias=True) + horizontal_flip as two batched matmuls with per-sample
    resampling matrices; the flip is the column matrix reversed.
    """
    x0, y0, w, h = boxes.unbind(1)
    rows = _resize_weights(y0, h, size, x.shape[-2])
    cols = _resize_weights(x0, w, size, x.shape[-1])
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    if x.dtype == torch.uint8:
        rows = rows / 255
    return torch.einsum("bsh,bchw,btw->bcst", rows, x.float(), cols).contiguous()  # later ops run faster on it


# ---- photometric ops ----

def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [B,1,H,W] with torchvision's weights (as one matmul: several times faster than three multiply-adds)."""
    x = to_unit(x)
    b, _, h, w = x.shape
    return (constant(GRAY_WEIGHTS, x.device) @ x.reshape(b, 3, h * w)).view(b, 1, h, w)


def adjust(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """adjust_brightness, adjust_contrast or adjust_saturation, chosen per sample by op [B] (NO_OP: none).

    All three are torchvision's blend of the image with a reference, clamped to [0, 1]: black for
    brightness, the mean of its grey image for contrast, its grey image for saturation.
    """
    x = to_unit(x)
    luma = gray(x)
    ref = luma * _col(op == SATURATION) + luma.mean((2, 3), keepdim=True) * _col(op == CONTRAST)
    factor = torch.where(op == NO_OP, 1.0, factor)
    return torch.lerp(ref.expand_as(x), x, _col(factor)).clamp_(0, 1)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """adjust_hue: rotate the HSV hue by shift [B] (turns, in [-0.5, 0.5]); saturation and value are kept.

    torchvision's hue formula (h6 = 6 h), and HSV -> RGB written per channel as
    v - (v - min) * clamp(2 - |k - 2|, 0, 1) with k = (n + h6) mod 6, n = 5, 3, 1 for R, G, B:
    torchvision's table lookup without the gather.
    """
    x = to_unit(x)
    r, g, b = x.unbind(1)
    hi, lo = x.amax(1), x.amin(1)
    span = hi - lo
    h6 = torch.where(hi == r, g - b, torch.where(hi == g, (b - r).add_(span, alpha=2), (r - g).add_(span, alpha=4)))
    # grey pixels (span 0) have zero numerators: any hue, and v on every channel
    h6 = h6.div_(span.clamp(min=1e-30)).add_(shift.view(-1, 1, 1) * 6)
    return torch.stack([(h6 + n).remainder_(6).sub_(2).abs_().neg_().add_(2).clamp_(0, 1).mul_(span).neg_().add_(hi)
                        for n in (5, 3, 1)], 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, with_hue: bool = True) -> torch.Tensor:
    """ColorJitter with per-sample factors [B,4] (brightness, contrast, saturation, hue shift) and order [B,4].

    torchvision runs the four ops in a random order per image. Brightness, contrast and saturation are one
    `adjust` per position; hue, the costly op, runs once for all samples: first the positions before each
    sample's hue, then hue, then the positions after it. with_hue=False skips hue (strength 0).
    """
    x = to_unit(x)
    hue_pos = order.argsort(1)[:, HUE]

    def blend_at(x, pos, chosen):
        op = torch.where(chosen, order[:, pos], NO_OP)
        return adjust(x, op, factors.gather(1, order[:, pos:pos + 1])[:, 0])

    for pos in range(3):
        x = blend_at(x, pos, pos < hue_pos)
    if with_hue:
        x = hue(x, factors[:, HUE])
    for pos in range(1, 4):
        x = blend_at(x, pos, pos > hue_pos)
    return x


def grayscale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale: luma on all three channels where mask [B]."""
    x = to_unit(x)
    return torch.where(_col(mask), gray(x).expand_as(x), x)


def blur_kernels(sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-sample 1D Gaussian kernels [B, kernel], built as torchvision builds them."""
    lim = (kernel - 1) / (2 * math.sqrt(2))
    t = torch.linspace(-lim, lim, kernel, device=sigma.device)
    return torch.softmax(-(t / sigma[:, None]) ** 2, dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int, mask: torch.Tensor) -> torch.Tensor:
    """gaussian_blur with sigma [B] where mask [B] (a delta kernel elsewhere), reflect padding.

    Separable: one grouped conv per axis, each group one (sample, channel) plane with its own kernel.
    """
    x = to_unit(x)
    b, c, h, w = x.shape
    delta = (torch.arange(kernel, device=x.device) == kernel // 2).float()
    weight = torch.where(mask[:, None], blur_kernels(sigma, kernel), delta).repeat_interleave(c, 0)
    pad = kernel // 2
    planes = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, b * c, h + 2 * pad, w + 2 * pad)
    planes = F.conv2d(planes, weight.view(b * c, 1, 1, kernel), groups=b * c)
    planes = F.conv2d(planes, weight.view(b * c, 1, kernel, 1), groups=b * c)
    return planes.view(b, c, h, w)


def solarize(x: torch.Tensor, threshold: float, mask: torch.Tensor) -> torch.Tensor:
    """RandomSolarize: invert the pixels >= threshold where mask [B]."""
    x = to_unit(x)
    return torch.where(_col(mask) & (x >= threshold), 1 - x, x)


# ---- a view from its spec ----

def jitter_ranges(strength: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """ColorJitter's factor ranges: [max(0, 1 - s), 1 + s] for brightness, contrast, saturation; [-h, h] for hue."""
    b, c, s, h = strength
    return [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]


def sample_params(height, width, spec: ViewSpec, rnd: SampleRandom) -> dict[str, torch.Tensor]:
    """Every random parameter of one view of len(rnd) images of height x width (ints, or [n] tensors), drawn
    on rnd's device.

    Keys: boxes, flip; then for the ops the spec uses: jitter [n,4] (identity factors where jitter did not
    fire) and order [n,4]; gray; blur and sigma; solarize. Masks are bool [n].
    """
    p = {"boxes": sample_crops(height, width, spec.crop_scale, spec.crop_ratio, rnd), "flip": _coin(rnd, spec.flip_p)}
    if spec.jitter_p:
        drawn = torch.stack([_uniform(rnd, lo, hi) for lo, hi in jitter_ranges(spec.jitter)], 1)
        identity = constant((1.0, 1.0, 1.0, 0.0), rnd.device)
        p["jitter"] = torch.where(_coin(rnd, spec.jitter_p)[:, None], drawn, identity)
        p["order"] = rnd.uniform(4).argsort(1)  # a randperm(4) per sample
    if spec.grayscale_p:
        p["gray"] = _coin(rnd, spec.grayscale_p)
    if spec.blur_p:
        p["blur"], p["sigma"] = _coin(rnd, spec.blur_p), _uniform(rnd, *spec.blur_sigma)
    if spec.solarize_p:
        p["solarize"] = _coin(rnd, spec.solarize_p)
    return p


def photometric(x: torch.Tensor, spec: ViewSpec, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The spec's photometric ops in torchvision's order (jitter, grayscale, blur, solarize): float [0, 1]."""
    x = to_unit(x)
    if "jitter" in p:
        x = color_jitter(x, p["jitter"], p["order"], with_hue=spec.jitter[HUE] > 0)
    if "gray" in p:
        x = grayscale(x, p["gray"])
    if "blur" in p:
        x = gaussian_blur(x, p["sigma"], spec.blur_kernel, p["blur"])
    if "solarize" in p:  # the threshold the uint8 reference pipeline applies (128 for 0.5)
        x = solarize(x, round(spec.solarize_threshold * 255) / 255, p["solarize"])
    return x


def view(src: torch.Tensor, spec: ViewSpec, rnd: SampleRandom) -> torch.Tensor:
    """One view of every image of a uint8 or float [B,3,H,W] batch: float [B,3,size,size] in [0, 1]."""
    p = sample_params(src.shape[-2], src.shape[-1], spec, rnd)
    return photometric(resized_crop(src, p["boxes"], p["flip"], spec.size), spec, p)
