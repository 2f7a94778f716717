"""The augmentation recipe as data.

A `ViewSpec` says what one view of an image looks like: crop, flip, photometric ops with their
probabilities, normalisation. Pipelines (torchvision, tensor, DALI, FFCV) compile the same spec;
methods ask for views by role (a dict such as {"weak": ..., "strong": ...}, multi-crop adds "crop1", ...)
and never see which pipeline made them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import torch

from .data import IMAGENET_MEAN, IMAGENET_STD, is_small
from .errors import UserError


@dataclass(frozen=True)
class ViewSpec:
    size: int  # output side in pixels (square)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    # colour jitter strengths (brightness, contrast, saturation, hue) as in torchvision ColorJitter
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on [0, 1] intensities (128/255 for uint8 is the papers' value)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale {self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"{name}={p} is not a probability")
        if self.size < 8:
            raise ValueError(f"view size {self.size} is too small (min 8 px)")

    @property
    def blur_kernel(self) -> int:
        """Odd kernel side, ~10% of the view (23 px at 224 as in MoCo v2 / SimCLR)."""
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)

    @property
    def is_photometric(self) -> bool:
        return self.jitter_p > 0 or self.grayscale_p > 0 or self.blur_p > 0 or self.solarize_p > 0


def weak(size: int, **kw) -> ViewSpec:
    """ReSSL/ISD/ReSA teacher view: random resized crop (0.2, 1) + horizontal flip, nothing else."""
    return ViewSpec(size=size, **kw)


def _blur_p(size: int, blur_p: float | None) -> float:
    """The papers' blur probability: 0.5 on ImageNet sizes, 0 on small images (the CIFAR recipes drop blur)."""
    return (0.0 if is_small(size) else 0.5) if blur_p is None else blur_p


def strong(size: int, blur_p: float | None = None, **kw) -> ViewSpec:
    """MoCo v2 recipe: crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p, flip."""
    return ViewSpec(size=size, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2,
                    blur_p=_blur_p(size, blur_p), **kw)


def symmetric(size: int, **kw) -> dict[str, ViewSpec]:
    """The MoCo v2 and BYOL baselines' views: the strong recipe on both, "view1" and "view2"."""
    spec = strong(size, **kw)
    return {"view1": spec, "view2": spec}


def resa_strong(size: int, blur_p: float | None = None, **kw) -> ViewSpec:
    """ReSA x1: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p, solarize 0.2, flip."""
    return ViewSpec(size=size, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2,
                    blur_p=_blur_p(size, blur_p), solarize_p=0.2, **kw)


# ReSSL multi-crop on ImageNet: sizes and crop scales of the 5 student crops (the first is the 224 view).
MULTI_CROP_224 = ((224, (0.2, 1.0)), (192, (0.172, 0.86)), (160, (0.143, 0.715)),
                  (128, (0.114, 0.571)), (96, (0.086, 0.429)))


def multi_crop(base: ViewSpec, n_crops: int = 5) -> list[ViewSpec]:
    """The student's crops for multi-crop: sizes and scales of ReSSL's ImageNet set, scaled to `base.size`."""
    if not 1 <= n_crops <= len(MULTI_CROP_224):
        raise ValueError(f"n_crops={n_crops} must be in 1..{len(MULTI_CROP_224)}")
    out = []
    for size, scale in MULTI_CROP_224[:n_crops]:
        side = max(8, round(size * base.size / 224))
        out.append(replace(base, size=side, crop_scale=scale))
    return out


def apply_overrides(views: dict[str, ViewSpec], text: str) -> dict[str, ViewSpec]:
    """`views` with the changes in `text`: space-separated ROLE.FIELD=VALUE items, e.g. "weak.crop_scale=1,1
    strong.jitter_p=0.5"; a pair field takes two comma-separated numbers. Roles are the method's view names."""
    out, known = dict(views), {f.name for f in fields(ViewSpec)}
    for item in text.split():
        role, _, rest = item.partition(".")
        name, eq, value = rest.partition("=")
        if not eq or not name:
            raise UserError(f"view setting {item!r} must read ROLE.FIELD=VALUE, e.g. weak.crop_scale=1,1")
        if role not in out:
            raise UserError(f"view setting {item!r}: this method has no view {role!r}; its views: {', '.join(out)}")
        if name not in known:
            raise UserError(f"view setting {item!r}: no field {name!r}; fields: {', '.join(sorted(known))}")
        current = getattr(out[role], name)
        try:
            parsed = tuple(float(v) for v in value.split(",")) if isinstance(current, tuple) else type(current)(value)
            if isinstance(current, tuple) and len(parsed) != len(current):
                raise ValueError(f"{name} takes {len(current)} comma-separated numbers")
            out[role] = replace(out[role], **{name: parsed})
        except ValueError as e:
            raise UserError(f"view setting {item!r}: {e}") from None
    return out


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=256)
def constant(values: tuple[float, ...], device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """A small fp32 constant (values x scale) on the device, copied there once per (values, device, scale) and then
    reused: a copy from the host at every call would wait for the GPU. Shared, so never changed in place."""
    return (torch.tensor(values) * scale).to(device)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool) -> torch.Tensor:
    """The last step of every view and every evaluation batch: uint8 [B,3,H,W] (0..255) or float in [0, 1] ->
    float (x - mean) / std, in the trainer's memory layout."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    x = (x.float() - constant(mean, x.device, scale).view(1, 3, 1, 1)).div_(
        constant(std, x.device, scale).view(1, 3, 1, 1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
