"""Pipelines turn a data set and a method's view specs into batches of views on the training device, and read
data sets for evaluation with the same family of decoders. `load_images` and `eval_split` are where the trainer
reads its data sets: FFCV .beton files here (beton.py), everything else by fastssl.data.

A pipeline knows ViewSpecs and devices, never methods.
"""

from __future__ import annotations

from typing import Iterable

import torch

from fastssl import data as datasets
from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.views import ViewSpec

from . import beton
from .beton import BetonSet, is_beton
from .common import Loader, Shard

KINDS = ("torch", "tensor", "dali", "ffcv", "nvjpeg")


def load_images(data: str, split: str = "train") -> ImageSet:
    """Split train or test of `data`: what fastssl.data.load reads, or NAME_train.beton, whose test split is the
    NAME_val.beton (else NAME_test.beton) beside it."""
    if not is_beton(data):
        return datasets.load(data, split)
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    return beton.load(datasets.existing(data), split)


def eval_split(data: str, data_val: str = "") -> tuple[ImageSet | None, str]:
    """The labelled split that the kNN monitor and `fastssl eval` query, as fastssl.data.eval_split finds it, and
    the .beton ones: the .beton --data-val names, else the NAME_val.beton (else NAME_test.beton) beside a
    NAME_train.beton --data."""
    if data_val and is_beton(data_val):
        return datasets.labelled_split(beton.read(datasets.existing(data_val, "--data-val"), "test"), "")
    if not data_val and is_beton(data):
        path, why = beton.eval_path(datasets.existing(data))
        return datasets.labelled_split(beton.read(path, "test") if path else None, why)
    return datasets.eval_split(data, data_val)


def check(kind: str, images: ImageSet) -> None:
    """A one-line error when `kind` cannot read `images`."""
    if kind not in KINDS:
        raise UserError(f"unknown pipeline {kind!r}; choose {' | '.join(KINDS)}")
    if kind == "ffcv" and not isinstance(images, BetonSet):
        raise UserError(f"--pipeline ffcv reads an FFCV .beton: write one with `fastssl convert {images.root} "
                        f"--to ffcv --out NAME_train.beton` (and --split val for NAME_val.beton), pass it as --data")
    if kind != "ffcv" and isinstance(images, BetonSet):
        raise UserError(f"{images.root} is an FFCV .beton: train on it with --pipeline ffcv")


def build(kind: str, images: ImageSet, specs: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
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
    return Pipeline(images, specs, shard, device, workers=workers, channels_last=channels_last)


def eval_reader(kind: str, images: ImageSet, size: int, *, batch_size: int, workers: int) -> Iterable[torch.Tensor]:
    """Every image of `images`, in order, as uint8 [B,3,size,size] batches (the evaluation view: the centre crop of
    common.EVAL_CROP of the shorter side, resized; small images whole), decoded by the pipeline's own family: slices of
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
