"""Pipelines turn a data set and a method's view specs into batches of views on the training device, and read
data sets for evaluation with the same family of decoders.

A pipeline knows ViewSpecs and devices, never methods.
"""

from __future__ import annotations

from typing import Iterable

import torch

from fastssl.beton import BetonSet
from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.views import ViewSpec

from .common import Loader, Shard

KINDS = ("torch", "tensor", "dali", "ffcv", "nvjpeg")


def check(kind: str, images: ImageSet) -> None:
    """A one-line error when `kind` cannot read `images`."""
    if kind not in KINDS:
        raise UserError(f"unknown pipeline {kind!r}; choose {' | '.join(KINDS)}")
    if kind == "ffcv" and not isinstance(images, BetonSet):
        raise UserError(f"--pipeline ffcv reads an FFCV .beton: write one with `fastssl convert {images.root} "
                        f"--to ffcv --out NAME_train.beton` (and --split val for NAME_val.beton), pass it as --data")
    if kind != "ffcv" and isinstance(images, BetonSet):
        raise UserError(f"{images.root} is an FFCV .beton: train on it with --pipeline ffcv")


def build(kind: str, images: ImageSet, views: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
          workers: int = 2, channels_last: bool = True) -> Loader:
    check(kind, images)
    if len(images) < shard.global_batch:
        raise UserError(f"the global batch of {shard.global_batch} is larger than the {len(images)} training images "
                        f"of {images.root}; lower --batch-size")
    if kind == "dali":
        from .dali_loader import DaliLoader as Pipeline
    elif kind == "ffcv":
        from .ffcv_loader import FFCVLoader as Pipeline
    elif kind == "tensor":
        from .tensor_loader import TensorLoader as Pipeline
    elif kind == "nvjpeg":
        from .nvjpeg_loader import NvjpegLoader as Pipeline
    else:
        from .torch_loader import TorchLoader as Pipeline
    return Pipeline(images, views, shard, device, workers=workers, channels_last=channels_last)


def eval_reader(kind: str, images: ImageSet, size: int, *, batch_size: int, workers: int) -> Iterable[torch.Tensor]:
    """Every image of `images`, in order, as uint8 [B,3,size,size] batches (the evaluation view: the centre crop of
    224/256 of the shorter side, resized; small images whole), decoded by the pipeline's own family: slices of
    the tensor for sets held in memory, FFCV for a .beton, DALI's decoder under --pipeline dali, torchvision's
    nvJPEG under --pipeline nvjpeg, else PIL in DataLoader workers. Iterable again at every evaluation."""
    if images.in_memory:
        from .torch_loader import MemoryEvalReader as Reader
    elif isinstance(images, BetonSet):
        from .ffcv_loader import EvalReader as Reader
    elif kind == "dali":
        from .dali_loader import EvalReader as Reader
    elif kind == "nvjpeg":
        from .nvjpeg_loader import EvalReader as Reader
    else:
        from .torch_loader import FileEvalReader as Reader
    return Reader(images, size, batch_size, workers)
