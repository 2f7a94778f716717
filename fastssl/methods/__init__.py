"""The methods: each is its own module, a Method subclass with its Options, `@register`ed (methods.base); importing
the module here (the last line) registers it. `build` makes one from a run's settings."""

from __future__ import annotations

import dataclasses

import torch

from ..data import is_small
from ..models import build_backbone, split_batchnorm
from .base import METHODS, get


def build(cfg, bn_groups: int = 1):
    """The method `cfg` (a TrainConfig) names, on CPU: its options resolved at cfg.image_size (the recipe for small
    images or ImageNet fills those cfg.options leaves out), a fresh backbone seeded by the run, BatchNorm statistics
    in `bn_groups` groups of each process's batch (split BN). Returns cfg holding every option, and the method."""
    cls = get(cfg.method)
    opts = cls.Options.resolve(cfg.options, small=is_small(cfg.image_size))
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.arch, cfg.image_size, cfg.drop_path)
    method = cls(opts, backbone, seed=cfg.seed, encoder_ema=cfg.encoder_ema)
    return dataclasses.replace(cfg, options=dataclasses.asdict(opts)), split_batchnorm(method, bn_groups)


from . import byol, isd, mocov2, resa, ressl  # noqa: E402,F401  (registers them)

__all__ = ["METHODS", "build", "get"]
