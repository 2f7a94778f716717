"""nvJPEG pipeline: JPEGs decoded on the GPU by torchvision alone (no extra package), the views by device_augment.

What runs where. `workers` CPU threads read the files of the next batch while the loader's thread decodes the
current one. JPEGs (known by their first bytes) go to torchvision's `decode_jpeg` as one list and come back as RGB
(grey and CMYK ones too), decoded by nvJPEG: baseline JPEGs in one batched call on the GPU's hardware JPEG
decoder where it has one (A100, H100, H200); other GPUs, and progressive JPEGs, one image after another, nvJPEG's
Huffman stage on the CPU in the loader's thread. On a CPU device the same call decodes with libjpeg-turbo. Any
other format (PNG, GIF, BMP, WebP, TIFF ...) is decoded by PIL in the reading thread, as --pipeline torch decodes
it, and copied to the device. Sets held in memory are taken as they are (--pipeline tensor is the one for them).

On the device, every random parameter comes from device_augment.sample_params keyed by sample
(common.SampleRandom): a sample's views are the same whatever its batch, rank or resume point. The decoded images
differ in size, so each is padded with zeros (bottom and right) to `padded_side` a side, and the images of one
padded shape are cropped by one device_augment.resized_crop call (two matmuls with per-sample weights, which never
reach the padding). The photometric ops (device_augment.photometric) and the normalisation then run on the whole
batch: the code, and the views, of --pipeline tensor.

Against DALI: nothing to install (DALI's wheels are large and tied to a CUDA major); torchvision's formulas for
every op, where DALI approximates the colour twist, the blur and the resampling; every format PIL reads (DALI fails
a batch on a GIF). But the decode runs in the loader's thread, which waits for it, where DALI decodes batches
ahead in its own threads; and the decoded images stay whole on the GPU until their batch is cropped.

Unreadable files, as --pipeline torch and DALI treat them: a batch of JPEGs nvJPEG fails on is decoded file by
file; a JPEG nvJPEG cannot decode alone (a colour format it lacks, say) is decoded by PIL from then on; a file PIL
cannot read either is replaced by the next readable sample of the set (its image and label; the slot keeps its
own random draws) and named in the batch's "bad_files": the trainer decides whether to go on.

Limits: torchvision deprecated its image decoders in 0.29 (TorchCodec's `decoders.decode_jpeg` supersedes them:
this module will need porting); it keeps one nvJPEG decoder per process, whose calls wait on each other; images
are decoded as stored, without EXIF rotation, as PIL reads them. On a CPU device the same code runs, for tests:
there the crops' matmuls over whole images cost most (about 9 ms an image and view, 224 px from 400-500 px, on one
core), and --pipeline torch is faster.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fastssl.data import ImageSet, UnreadableImage
from fastssl.device import to_device
from fastssl.errors import UserError
from fastssl.views import ViewSpec, normalize

from .common import Loader, SampleRandom, Shard
from .device_augment import photometric, resized_crop, sample_params
from .torch_loader import eval_view

JPEG_START = b"\xff\xd8\xff"  # the start-of-image marker and the first byte of the next: how every JPEG begins


def padded_side(side: int) -> int:
    """`side` rounded up to one of four sides an octave (at most 25% more): padded to these, most images of a
    batch share a shape with others, and each shape's images are cropped in one batched call."""
    step = 1 << max(0, side.bit_length() - 3)
    return -(-side // step) * step


def padded_batch(images: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """uint8 [n,3,height,width]: the images, zero-padded at the bottom and right."""
    out = images[0].new_zeros(len(images), 3, height, width)
    for row, image in enumerate(images):
        out[row, :, :image.shape[1], :image.shape[2]] = image
    return out


class FileDecoder:
    """The image files of a set decoded on a device: read by `workers` threads, JPEGs decoded together by nvJPEG
    (libjpeg-turbo on a CPU device), other files by PIL in the reading threads."""

    def __init__(self, images: ImageSet, device: torch.device, workers: int):
        self.images, self.device = images, device
        self.pool = ThreadPoolExecutor(max(1, workers))  # file reads and PIL release the GIL
        self.by_pil: set[int] = set()  # JPEGs nvJPEG fails on and PIL reads
        self.bad: set[int] = set()  # samples PIL cannot read either

    def read(self, samples: list[int]) -> list[Future]:
        """Start reading the samples' files in the threads."""
        return [self.pool.submit(self._read, i) for i in samples]

    def _read(self, i: int) -> torch.Tensor:
        """Sample i as the decode takes it: a JPEG's bytes (uint8 [n]) for nvJPEG, anything else decoded by PIL
        (uint8 [3,H,W]). UnreadableImage when PIL cannot read it."""
        if i not in self.by_pil:
            data = np.fromfile(self.images.files[i], dtype=np.uint8)
            if data[:3].tobytes() == JPEG_START:
                return torch.from_numpy(data)
        return self.images.read(i)

    def decode(self, samples: list[int], reads: list[Future]) -> list[torch.Tensor | None]:
        """Each sample's image, uint8 [3,H,W] on the device; None where it cannot be read (the sample joins bad)."""
        done = [self._result(i, read) for i, read in zip(samples, reads)]
        jpegs = [k for k, data in enumerate(done) if data is not None and data.dim() == 1]
        images = [None if data is None or data.dim() == 1 else to_device(data, self.device) for data in done]
        for k, image in zip(jpegs, self._nvjpeg([samples[k] for k in jpegs], [done[k] for k in jpegs])):
            images[k] = image
        return images

    def _result(self, i: int, read: Future) -> torch.Tensor | None:
        """What _read gave for sample i; None (and i joins bad) when PIL cannot read the file or it cannot be opened."""
        try:
            return read.result()
        except (UnreadableImage, OSError):
            self.bad.add(i)
            return None

    def _nvjpeg(self, samples: list[int], encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The JPEGs decoded in one call on the device; when that fails, one by one (_decode_alone)."""
        if not encoded:
            return []
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)  # grey and CMYK: RGB too
        except RuntimeError:
            return [self._decode_alone(i, data) for i, data in zip(samples, encoded)]

    def _decode_alone(self, i: int, encoded: torch.Tensor) -> torch.Tensor | None:
        """One JPEG by nvJPEG, else by PIL (from then on); None when PIL cannot read it either."""
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            image = self.images.read(i)
        except UnreadableImage:
            self.bad.add(i)
            return None
        self.by_pil.add(i)
        return to_device(image, self.device)

    def batches(self, batches: Iterable[list[int]]) -> Iterator[tuple[list[int], list[torch.Tensor | None]]]:
        """(samples, decode's images) of each batch of samples in turn; the next batch's files are read while
        this one decodes (so its samples are chosen before this one's unreadable files are known)."""
        previous = None
        for samples in batches:
            reads = self.read(samples)
            if previous:
                yield previous[0], self.decode(*previous)
            previous = samples, reads
        if previous:
            yield previous[0], self.decode(*previous)


class NvjpegLoader(Loader):
    def __init__(self, images: ImageSet, specs: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
                 workers: int = 2, channels_last: bool = True):
        super().__init__(images, specs, shard, device, channels_last)
        self.decoder = None if images.in_memory else FileDecoder(images, device, workers)

    def _decoded(self, order: list[list[int]]) -> Iterator[tuple[list[torch.Tensor], list[int], list[str]]]:
        """Each batch's images (uint8 [3,H,W] on the device), the samples they are, and the unreadable files among
        the batch's own samples, each replaced by the next readable sample."""
        if self.images.in_memory:
            for idx in order:
                yield list(to_device(self.images.images[idx], self.device).permute(0, 3, 1, 2)), idx, []
            return
        bad = self.decoder.bad
        for idx, (samples, images) in zip(order, self.decoder.batches(self.readable(i, bad) for i in order)):
            while missing := [k for k, image in enumerate(images) if image is None]:
                samples = self.readable(samples, bad)
                replacements = [samples[k] for k in missing]
                for k, image in zip(missing, self.decoder.decode(replacements, self.decoder.read(replacements))):
                    images[k] = image
            yield images, samples, [self.images.files[i] for i in idx if i in self.decoder.bad]

    def _shape_groups(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch as groups of one padded shape: (positions [n] on the device, padded_batch of those images)."""
        groups = defaultdict(list)
        for k, image in enumerate(images):
            groups[padded_side(image.shape[1]), padded_side(image.shape[2])].append(k)
        return [(to_device(torch.tensor(members), self.device), padded_batch([images[k] for k in members], h, w))
                for (h, w), members in groups.items()]

    def _views(self, images: list[torch.Tensor], rnd: SampleRandom) -> dict[str, torch.Tensor]:
        """Every view of the decoded images, normalised: float [B,3,size,size] each."""
        sizes = to_device(torch.tensor([image.shape[1:] for image in images]), self.device)  # [B, (H, W)], once
        groups = self._shape_groups(images)
        out = {}
        for role, spec in self.specs.items():
            p = sample_params(sizes[:, 0], sizes[:, 1], spec, rnd)
            crops = torch.empty(len(images), 3, spec.size, spec.size, device=self.device)
            for members, padded in groups:
                crops[members] = resized_crop(padded, p["boxes"][members], p["flip"][members], spec.size)
            out[role] = normalize(photometric(crops, spec, p), spec.mean, spec.std, self.channels_last)
        return out

    def epoch(self, epoch: int, start_batch: int = 0):
        order = self.indices(epoch, start_batch)
        keys = to_device(order, self.device)  # the slots' own samples: a replaced image keeps the slot's draws
        for step, (images, samples, bad) in enumerate(self._decoded(order.tolist())):
            out = self._views(images, self.random(epoch, keys[step]))
            out["label"] = to_device(self.images.labels[samples], self.device)
            if bad:
                out["bad_files"] = bad
            yield out


class EvalReader:
    """Every image of an image folder, in order, as uint8 [B,3,size,size] batches (the last one may be partial) on
    the GPU when there is one: torch_loader's evaluation view (the shorter side resized to common.eval_resize(size),
    the centre size x size) of the images FileDecoder decodes. Iterable again at every evaluation."""

    def __init__(self, images: ImageSet, size: int, batch_size: int, workers: int):
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.decoder, self.batch_size = FileDecoder(images, device, workers), batch_size
        self.transform = eval_view(size)

    def __iter__(self):
        images = self.decoder.images
        batches = (list(range(start, min(start + self.batch_size, len(images))))
                   for start in range(0, len(images), self.batch_size))
        for samples, decoded in self.decoder.batches(batches):
            for i, image in zip(samples, decoded):
                if image is None:
                    raise UserError(f"cannot decode image {images.files[i]}; remove or replace it (`fastssl check "
                                    f"{images.root}` lists every bad file)")
            yield torch.stack([self.transform(image) for image in decoded])
