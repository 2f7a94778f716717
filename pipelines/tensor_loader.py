"""No loader: the whole (small) data set lives on the training device as one uint8 tensor.

For CIFAR, STL-10, Tiny-ImageNet, Fashion-MNIST: each batch is an index into that tensor, and every view
is made from the batch by batched tensor ops (pipelines/device_augment.py), as airbench does for
CIFAR-10. Random parameters are keyed by (seed, epoch, sample index) (common.SampleRandom), drawn on the
device: a run is reproducible, resumes exactly mid-epoch and gives every sample the same views whatever the
number of processes. Nothing in the loop waits on the GPU.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.transforms.v2 import functional as TF

from fastssl.data import ImageSet, UnreadableImage
from fastssl.errors import UserError
from fastssl.views import ViewSpec, normalize

from .common import Loader, Shard
from .device_augment import view

MEMORY_FRACTION = 0.5  # of the free memory where the set is kept: the rest is for the model and activations
MAX_FOLDER_SIDE = 128  # image folders are decoded once at the view size: only small images belong here


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def resident_images(images: ImageSet, size: int, device: torch.device, workers: int = 2
                    ) -> tuple[torch.Tensor, list[str]]:
    """The whole split as uint8 [N,H,W,3] on the device: in-memory sets as they are (crops resample them to
    the view size), image folders decoded once, shorter side resized to `size` and centre-cropped square;
    and the files that could not be decoded (each replaced by the next readable image). UserError when it
    would take more than MEMORY_FRACTION of the free memory there."""
    if images.in_memory:
        shape = tuple(images.images.shape)
        need = 0 if device.type == "cpu" else images.images.numel()  # already in host memory
    else:
        if size > MAX_FOLDER_SIDE:
            raise UserError(f"--pipeline tensor keeps image folders decoded in memory, at most {MAX_FOLDER_SIDE} px "
                            f"a side, and the views need {size} px; use a smaller --image-size or --pipeline torch")
        shape = (len(images), size, size, 3)
        need = len(images) * size * size * 3
    free = free_memory(device)
    if need > MEMORY_FRACTION * free:
        smaller = "--train-subset" if images.in_memory else "a smaller --image-size or --train-subset"
        raise UserError(f"--pipeline tensor would keep {len(images)} images of {images.root} on {device}: "
                        f"{_gib(need)} as uint8 {shape[1]}x{shape[2]}, more than {MEMORY_FRACTION:.0%} of the "
                        f"{_gib(free)} free there; use --pipeline torch, or {smaller}")
    if images.in_memory:
        return images.images.to(device), []

    def decode(i: int) -> torch.Tensor | str:
        try:
            img = TF.resize(images.read(i), size, antialias=True)
        except UnreadableImage as e:
            return e.path
        return TF.center_crop(img, size).permute(1, 2, 0)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding releases the GIL
        decoded = list(pool.map(decode, range(len(images))))
    good = [i for i, img in enumerate(decoded) if not isinstance(img, str)]
    if not good:
        raise UserError(f"no image of {images.root} could be decoded (e.g. {decoded[0]}); `fastssl check` lists them")
    out = torch.empty(shape, dtype=torch.uint8)
    for i, img in enumerate(decoded):
        out[i] = decoded[next((j for j in good if j > i), good[0])] if isinstance(img, str) else img
    return out.to(device), [img for img in decoded if isinstance(img, str)]


class TensorLoader(Loader):
    def __init__(self, images: ImageSet, specs: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
                 workers: int = 2, channels_last: bool = True):
        super().__init__(images, specs, shard, device, channels_last)
        self.pixels, self.bad_files = resident_images(images, max(spec.size for spec in specs.values()), device,
                                                      workers)
        self.labels = images.labels.to(device)

    def epoch(self, epoch: int, start_batch: int = 0):
        for idx in self.indices(epoch, start_batch).to(self.device):
            src = self.pixels[idx].permute(0, 3, 1, 2)  # uint8 [B,3,H,W]
            rnd = self.random(epoch, idx)
            out = {role: normalize(view(src, spec, rnd), spec.mean, spec.std, self.channels_last)
                   for role, spec in self.specs.items()}
            out["label"] = self.labels[idx]
            if self.bad_files:  # replaced when the set was decoded: reported once, with the first batch
                out["bad_files"], self.bad_files = self.bad_files, []
            yield out
