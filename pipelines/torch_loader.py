"""Reference pipeline: torchvision transforms v2 in DataLoader workers, one transform per view.

Workers return uint8 views (4x less inter-process traffic than floats); normalisation runs on the
training device. Every sample's augmentation is seeded by (seed, epoch, index), so a run is
reproducible for any worker or process count and resumes exactly mid-epoch. An unreadable image is
replaced by the next readable one and named in the batch's "bad_files" (the trainer stops on it, or
goes on with --skip-bad-images).
"""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fastssl.data import ImageSet, UnreadableImage
from fastssl.views import ViewSpec, normalize

from .common import Loader, Shard, eval_resize, sample_seed


def to_torchvision(spec: ViewSpec) -> v2.Compose:
    """The view recipe as torchvision v2 transforms on uint8 [3,H,W] tensors."""
    ops = [v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True)]
    if spec.flip_p:
        ops.append(v2.RandomHorizontalFlip(spec.flip_p))
    if spec.jitter_p:
        ops.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.grayscale_p:
        ops.append(v2.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p:
        ops.append(v2.RandomApply([v2.GaussianBlur(spec.blur_kernel, spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p:
        ops.append(v2.RandomSolarize(round(spec.solarize_threshold * 255), p=spec.solarize_p))
    return v2.Compose(ops)


class _Views(Dataset):
    def __init__(self, images: ImageSet, specs: dict[str, ViewSpec], seed: int):
        self.images, self.seed, self.epoch = images, seed, 0
        self.transforms = {role: to_torchvision(spec) for role, spec in specs.items()}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        """Sample i's views; an unreadable image is replaced by the next readable one and named in "bad_files"."""
        bad, j = [], i
        while True:
            try:
                img = self.images.read(j)
                break
            except UnreadableImage as e:
                bad.append(e.path)
                j = (j + 1) % len(self.images)
                if len(bad) == len(self.images):
                    raise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            out = {role: t(img) for role, t in self.transforms.items()}
        out["label"], out["bad_files"] = self.images.labels[j], "\n".join(bad)
        return out


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker leaves SIGTERM/SIGUSR1/Ctrl-C to the trainer, which stops after its step: dying first, the worker
    would take the batches of that step with it."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class TorchLoader(Loader):
    def __init__(self, images: ImageSet, specs: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
                 workers: int = 2, channels_last: bool = True):
        super().__init__(images, specs, shard, device, channels_last)
        self.dataset, self.workers = _Views(images, specs, shard.seed), workers

    def epoch(self, epoch: int, start_batch: int = 0):
        self.dataset.epoch = epoch  # workers fork after this, so they see it
        order = self.indices(epoch, start_batch).flatten().tolist()
        loader = DataLoader(self.dataset, batch_size=self.rank_batch, sampler=order, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", drop_last=True,
                            prefetch_factor=4 if self.workers else None, worker_init_fn=_ignore_stop_signals)
        for batch in loader:
            out = {role: normalize(batch[role].to(self.device, non_blocking=True), spec.mean, spec.std,
                                   self.channels_last) for role, spec in self.specs.items()}
            out["label"] = batch["label"].to(self.device, non_blocking=True)
            bad = [f for files in batch["bad_files"] for f in files.split("\n") if f]
            if bad:
                out["bad_files"] = bad
            yield out


class MemoryEvalReader:
    """A set held in memory, in order: slices of its tensor, resized to size where the stored side differs."""

    def __init__(self, images: ImageSet, size: int, batch_size: int, workers: int = 0):
        self.images, self.size, self.batch_size = images, size, batch_size

    def __iter__(self):
        for i in range(0, len(self.images), self.batch_size):
            x = self.images.images[i:i + self.batch_size].permute(0, 3, 1, 2)
            yield x if x.shape[-1] == self.size else v2.functional.resize(x, [self.size, self.size], antialias=True)


def eval_view(size: int) -> v2.Compose:
    """The evaluation view of an image (common.EVAL_CROP): the shorter side resized, the centre size x size."""
    return v2.Compose([v2.Resize(eval_resize(size), antialias=True), v2.CenterCrop(size)])


class _CentreCrops(Dataset):
    """The evaluation view of image files, one a sample."""

    def __init__(self, images: ImageSet, size: int):
        self.images = images
        self.transform = eval_view(size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images.read(i))


class FileEvalReader:
    """Image files, in order, decoded by PIL in DataLoader workers (the reference pipeline's decoder)."""

    def __init__(self, images: ImageSet, size: int, batch_size: int, workers: int):
        self.dataset, self.batch_size, self.workers = _CentreCrops(images, size), batch_size, workers

    def __iter__(self):
        yield from DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers)
