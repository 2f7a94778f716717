"""Pipelines turn a data set and a method's view specs into batches of views on the training device.

A pipeline knows ViewSpecs and devices, never methods.
"""

from __future__ import annotations

import torch

from fastssl.data import BetonSet, ImageSet
from fastssl.errors import UserError
from fastssl.views import ViewSpec

from .common import Loader

KINDS = ("torch", "tensor", "dali", "ffcv")


def build(kind: str, images: ImageSet, views: dict[str, ViewSpec], *, batch_size: int, device: torch.device,
          workers: int = 2, seed: int = 0, rank: int = 0, world: int = 1, channels_last: bool = True) -> Loader:
    if kind not in KINDS:
        raise UserError(f"unknown pipeline {kind!r}; choose {' | '.join(KINDS)}")
    if kind == "ffcv" and not isinstance(images, BetonSet):
        raise UserError(f"--pipeline ffcv reads an FFCV .beton: write one with `fastssl convert {images.root} "
                        f"--to ffcv --out NAME_train.beton` (and --split val for NAME_val.beton), pass it as --data")
    if kind != "ffcv" and isinstance(images, BetonSet):
        raise UserError(f"{images.root} is an FFCV .beton: train on it with --pipeline ffcv")
    if len(images) // world < batch_size:
        raise UserError(f"batch size {batch_size} is larger than the {len(images) // world} training images "
                        f"per process in {images.root}; lower --batch-size")
    if kind == "dali":
        from .dali_loader import DaliLoader as Pipeline
    elif kind == "ffcv":
        from .ffcv_loader import FFCVLoader as Pipeline
    elif kind == "tensor":
        from .tensor_loader import TensorLoader as Pipeline
    else:
        from .torch_loader import TorchLoader as Pipeline
    return Pipeline(images, views, batch_size=batch_size, device=device, workers=workers, seed=seed, rank=rank,
                    world=world, channels_last=channels_last)
