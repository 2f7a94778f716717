"""DALI pipeline: one graph decodes each image once and makes every view from that decode.

Image folders are read by DALI's file reader: sharded by rank, the whole set reshuffled every epoch, each
shard padded to whole batches and the padded batch dropped, so every rank yields the same len(loader)
batches an epoch and no sample twice. The named in-memory sets come in through external_source, batch by
batch in the order of common.epoch_indices (exact epochs, exact resume). Decoding is nvJPEG ("mixed") on
CUDA and every op after it runs on the GPU; with no GPU the same graph runs CPU-only (device_id=None).

A ViewSpec compiles to DALI ops with per-sample random arguments, each op gated by a per-sample coin drawn
with the spec's probability (a gated-off sample gets the op's identity arguments):
    random_resized_crop -> color_twist (jitter; grayscale as saturation 0) -> gaussian_blur -> solarize
    -> crop_mirror_normalize (flip, mean/std, float, NHWC memory = the trainer's channels_last)
Where DALI differs from torchvision: color_twist applies brightness, contrast, saturation and hue in one
fixed order (torchvision draws an order per image), contrast pivots around mid-grey (torchvision: the
image's mean grey), the blur kernel is cut at 3 sigma, and resampling and grey weights differ slightly.
Rates and factor ranges are the spec's.
"""

from __future__ import annotations

import contextlib

import torch

from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.views import ViewSpec

from .common import epoch_indices, optional, sample_seed
from .device_augment import jitter_ranges

optional("nvidia.dali", "dali")  # a one-line error naming the extra when DALI is missing
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali import math as dmath  # noqa: E402
from nvidia.dali.plugin.base_iterator import LastBatchPolicy  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

READER = "reader"
# nvJPEG's buffers sized for ImageNet up front (DALI's ResNet-50 example), so they are not regrown mid-epoch.
MIXED_DECODER_PADDING = {"device_memory_padding": 211_025_920, "host_memory_padding": 140_544_512}


def _coin(p: float):
    """A per-sample 0/1 (float) that is 1 with probability p."""
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _factor(on, lo: float, hi: float, identity: float):
    """A per-sample factor uniform in [lo, hi] where `on`, `identity` elsewhere."""
    if lo == hi:
        return identity + on * (lo - identity)
    return identity + on * (fn.random.uniform(range=[lo, hi]) - identity)


def _color_twist(x, spec: ViewSpec):
    """Jitter with probability jitter_p, then grayscale with probability grayscale_p, as one color_twist."""
    on = _coin(spec.jitter_p)
    (b_lo, b_hi), (c_lo, c_hi), (s_lo, s_hi), (h_lo, h_hi) = jitter_ranges(spec.jitter)
    saturation = _factor(on, s_lo, s_hi, 1.0)
    if spec.grayscale_p:  # color_twist desaturates before brightness and contrast, which keep grey grey
        saturation = saturation * (1 - _coin(spec.grayscale_p))
    x = fn.color_twist(x, brightness=_factor(on, b_lo, b_hi, 1.0), contrast=_factor(on, c_lo, c_hi, 1.0),
                       saturation=saturation, hue=_factor(on, h_lo * 360, h_hi * 360, 0.0),  # turns -> degrees
                       dtype=types.FLOAT)
    # Written as float, color_twist runs 3x faster on CPU than writing uint8 itself; the cast saturates and rounds.
    return fn.cast(x, dtype=types.UINT8)


def _view(images, spec: ViewSpec, gpu: bool, channels_last: bool):
    """One view of uint8 HWC images: float [H,W,3] (channels_last) or [3,H,W] per sample, normalised."""
    x = fn.random_resized_crop(images, size=[spec.size, spec.size], random_area=list(spec.crop_scale),
                               random_aspect_ratio=list(spec.crop_ratio), num_attempts=10, antialias=True)
    if spec.jitter_p or spec.grayscale_p:
        x = _color_twist(x, spec)
    if spec.blur_p:
        # The spec's kernel cut at 3 sigma (DALI's default window): what that leaves out is < 0.2% of the kernel's
        # weight, and the blur, the costliest op on CPU, runs 2-3x faster. A window of 1 leaves a sample untouched.
        sigma = fn.random.uniform(range=list(spec.blur_sigma))
        radius = dmath.min(dmath.ceil(3 * sigma), (spec.blur_kernel - 1) // 2)
        window = fn.cast(_coin(spec.blur_p) * 2 * radius + 1, dtype=types.INT32)
        x = fn.gaussian_blur(x, window_size=window, sigma=sigma)
    if spec.solarize_p:  # 255 - x == x ^ 255 on uint8: flip every bit where the pixel is >= threshold
        coin = fn.random.coin_flip(probability=spec.solarize_p, dtype=types.UINT8)
        mask = (x >= round(spec.solarize_threshold * 255)) * (coin.gpu() if gpu else coin)
        x = x ^ fn.cast(mask * 255, dtype=types.UINT8)
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                    mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std],
                                    mirror=fn.random.coin_flip(probability=spec.flip_p))


def views_graph(views: list[ViewSpec], gpu: bool, channels_last: bool, files=None, labels=None, feed=None,
                rank: int = 0, world: int = 1, shuffle_seed: int = 0):
    """Outputs: one float view per spec, then the labels. Reads `files` (with `labels`) or calls `feed`."""
    if feed is None:
        encoded, label = fn.readers.file(files=files, labels=labels, shard_id=rank, num_shards=world,
                                         shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed,
                                         pad_last_batch=True, name=READER)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   **(MIXED_DECODER_PADDING if gpu else {}))
    else:
        images, label = fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True,
                                           layout=["HWC", ""], dtype=[types.UINT8, types.INT64])
        images = images.gpu() if gpu else images
    return (*[_view(images, spec, gpu, channels_last) for spec in views], label)


views_pipeline = pipeline_def(views_graph)


class _Feed:
    """external_source callback for in-memory sets: batch `iteration` of the current epoch's order."""

    def __init__(self, images: ImageSet):
        self.images, self.labels = images.images.numpy(), images.labels.numpy()
        self.batches = torch.empty(0, 0, dtype=torch.int64)  # [batches, batch size] sample indices

    def __call__(self, info):
        if info.iteration >= len(self.batches):
            raise StopIteration
        idx = self.batches[info.iteration].numpy()
        return self.images[idx], self.labels[idx]


class DaliLoader:
    def __init__(self, images: ImageSet, views: dict[str, ViewSpec], *, batch_size: int, device: torch.device,
                 workers: int = 2, seed: int = 0, rank: int = 0, world: int = 1, channels_last: bool = True):
        self.images, self.views, self.batch_size, self.device = images, views, batch_size, device
        self.workers, self.seed, self.rank, self.world = workers, seed, rank, world
        self.channels_last = channels_last
        self.feed = _Feed(images) if images.in_memory else None
        self.iterator = None  # built at the first epoch, so that its seeds follow that epoch (resume)
        self.in_epoch = False

    def __len__(self) -> int:
        return len(self.images) // self.world // self.batch_size

    def _build(self, epoch: int) -> DALIGenericIterator:
        gpu = self.device.type == "cuda"
        source = ({"feed": self.feed} if self.feed is not None else
                  {"files": self.images.files, "labels": self.images.labels.tolist(), "rank": self.rank,
                   "world": self.world, "shuffle_seed": sample_seed(self.seed, epoch, -1) % 2**31})
        pipe = views_pipeline(list(self.views.values()), gpu, self.channels_last, **source,
                              batch_size=self.batch_size, num_threads=max(1, self.workers),
                              device_id=(self.device.index or 0) if gpu else None,
                              seed=sample_seed(self.seed, epoch, self.rank) % 2**31)
        pipe.build()
        reader = {"reader_name": READER} if self.feed is None else {}
        return DALIGenericIterator(pipe, [*self.views, "label"], last_batch_policy=LastBatchPolicy.DROP, **reader)

    @contextlib.contextmanager
    def _errors(self):
        """DALI's failures (an unreadable image, most likely) as one line that says what to do."""
        try:
            yield
        except RuntimeError as e:  # DALI's message is long; the cause is the line after "encountered:"
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            cause = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0]
            raise UserError(f"DALI failed reading {self.images.root} ({cause}); an unreadable image is the usual "
                            f"cause: `fastssl convert {self.images.root} --to ffcv` lists them (and leaves them out)"
                            ) from None

    def _next(self) -> dict[str, torch.Tensor] | None:
        """The next batch of the epoch, or None at its end."""
        try:
            with self._errors():
                return next(self.iterator)[0]
        except StopIteration:
            self.in_epoch = False
            return None

    def epoch(self, epoch: int, start_batch: int = 0):
        while self.in_epoch and self._next() is not None:  # the last epoch was left unfinished: run it out
            pass
        if self.feed is not None:
            order = epoch_indices(len(self.images), self.batch_size, epoch, self.seed, self.rank, self.world)
            self.feed.batches = order[start_batch * self.batch_size:].view(-1, self.batch_size)
        with self._errors():  # the iterator reads its first batches when built or reset
            if self.iterator is None:
                self.iterator = self._build(epoch)
            else:
                self.iterator.reset()
        self.in_epoch = True
        if self.feed is None:  # the reader's order is DALI's: resuming skips batches by running them
            for _ in range(start_batch):
                self._next()
        while (batch := self._next()) is not None:
            # HWC memory read as NCHW is channels_last; CHW output is already contiguous NCHW
            out = {role: batch[role].permute(0, 3, 1, 2) if self.channels_last else batch[role]
                   for role in self.views}
            out["label"] = batch["label"].view(-1).long().to(self.device, non_blocking=True)
            yield out
