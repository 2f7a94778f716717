"""FFCV pipeline: a .beton written by `fastssl convert`, every view cropped from one decode of each image.

FFCV's own decoders decode an image once per view (and once more for the field's default output), and
decoding is most of the cost. `ViewsDecoder` decodes each image once (JPEG or raw) in FFCV's threads and
writes every view's random resized crop, mirrored with the spec's probability, into one uint8 row per
sample: [B, sum of size*size*3]. Measured on 2 CPU cores (512 ImageNet-like JPEGs, two 224 px crops and
flips, nothing else): 386 images/s, against 249 with FFCV's decoder once per view and 90 decoding once at
256 px then cropping with device_augment.resized_crop (which is for GPUs). On the training device (after
ToDevice on CUDA; the same code on CPU tensors) the row splits into uint8 views (NCHW over NHWC memory:
channels_last), and each view's photometric ops (jitter, grayscale, blur, solarize) run batched with per-sample
parameters (device_augment, the code of --pipeline tensor), then the normalisation.

Seeding: the crops and flips of a sample are drawn from numba's generator seeded per (run seed, epoch, row),
so they do not depend on which FFCV thread decodes it; the photometric parameters are keyed by (seed, epoch,
sample) too (common.SampleRandom). The order of an epoch is common.epoch_indices (global batches, a slice per
rank), so a run resumes exactly at any batch and a sample gets the same views whatever the process count.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastssl.errors import UserError
from fastssl.extras import optional, torch_threads_kept
from fastssl.views import ViewSpec, normalize

from .beton import BetonSet, read_info
from .common import EVAL_CROP, GOLDEN, MIX1, MIX2, Shard, sample_seed
from .common import Loader as LoaderBase
from .device_augment import photometric, sample_params, to_unit

optional("ffcv", "ffcv")  # a one-line error naming the extra when FFCV is missing; torch's threads kept
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.decoders import CenterCropRGBImageDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, get_random_crop  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.pipeline import PipelineSpec  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


@intrinsic
def _load_uint64(typingctx, address):
    """The uint64 stored at `address`. Numba freezes the arrays a compiled function captures, so the decoder
    reads the epoch's seed, which changes between epochs, through the address of a one-element array."""
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
    return types.uint64(types.uint64), codegen


def _row_seed(epoch_seed, row):
    """A 32-bit seed per (epoch seed, row), as numba's np.random.seed takes: the top half of common's splitmix64,
    in numba's uint64."""
    z = epoch_seed + np.uint64(row) * np.uint64(GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return np.uint32((z ^ (z >> np.uint64(31))) >> np.uint64(32))


def _mirror(image):
    """Flip an [H,W,3] image left-right in place."""
    width = image.shape[1]
    for r in range(image.shape[0]):
        for c in range(width // 2):
            for k in range(3):
                image[r, c, k], image[r, width - 1 - c, k] = image[r, width - 1 - c, k], image[r, c, k]


class ViewsDecoder(Operation):
    """Decodes each image once; every view's random resized crop (+ flip) goes into one uint8 row per sample."""

    def __init__(self, specs: list[ViewSpec], epoch_seed: np.ndarray):
        super().__init__()
        self.specs, self.epoch_seed = specs, epoch_seed  # epoch_seed: uint64 [1], read at every batch
        self.offsets = np.cumsum([0] + [3 * v.size * v.size for v in specs])

    def largest_image(self) -> tuple[int, int]:
        """(height, width) of the stored image with the most pixels, which sizes each sample's decode scratch: a
        JPEG decodes into its first height*width*3 bytes (FFCV's decoders reserve max height x max width)."""
        heights, widths = self.metadata["height"].astype(np.int64), self.metadata["width"].astype(np.int64)
        largest = int(np.argmax(heights * widths))  # in int64: the fields are uint16
        return int(heights[largest]), int(widths[largest])

    def declare_state_and_memory(self, previous_state):
        row = (int(self.offsets[-1]),)
        height, width = self.largest_image()
        u8 = np.dtype("u1")
        return (replace(previous_state, jit_mode=True, shape=row, dtype=u8),
                (AllocationQuery(row, u8), AllocationQuery((height * width * 3,), u8)))

    def generate_code(self):
        mem_read, my_range, jpg = self.memory_read, Compiler.get_iterator(), IMAGE_MODES["jpg"]
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        random_crop, row_seed, mirror = (Compiler.compile(f) for f in (get_random_crop, _row_seed, _mirror))
        sides = np.array([v.size for v in self.specs], dtype=np.int64)
        offsets = self.offsets.astype(np.int64)
        scales = np.array([v.crop_scale for v in self.specs], dtype=np.float64)
        ratios = np.array([v.crop_ratio for v in self.specs], dtype=np.float64)
        flip_p = np.array([v.flip_p for v in self.specs], dtype=np.float64)
        address = np.uint64(self.epoch_seed.ctypes.data)

        def decode(batch_indices, storage, metadata, storage_state):
            destination, decoded = storage
            epoch_seed = _load_uint64(address)
            for i in my_range(len(batch_indices)):
                row = batch_indices[i]
                np.random.seed(row_seed(epoch_seed, row))  # this thread's generator, for this sample
                field = metadata[row]
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                data = mem_read(field["data_ptr"], storage_state)
                if field["mode"] == jpg:
                    image = decoded[i][:height * width * 3].reshape(height, width, 3)
                    imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    image = data.reshape(height, width, 3)
                for v in range(len(sides)):
                    top, left, h, w = random_crop(height, width, scales[v], ratios[v])
                    view = destination[i][offsets[v]:offsets[v + 1]].reshape(sides[v], sides[v], 3)
                    resize_crop_c(image, top, top + h, left, left + w, view)
                    if np.random.random() < flip_p[v]:
                        mirror(view)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# FFCV allocates each buffer a pipeline declares once per batch in flight: batches_ahead (3 by default) + 2
# (ffcv/loader/epoch_iterator.py), in pinned memory where CUDA is available (ffcv/pipeline/allocation_query.py).
BATCHES_AHEAD = 3
BATCHES_IN_FLIGHT = BATCHES_AHEAD + 2


class _EpochOrder:
    """Stands in for FFCV's traversal order: the rows of the epoch set by FFCVLoader.epoch, in order."""

    rows = np.empty(0, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.rows


def _check_bounded(images: BetonSet):
    """Refuse a .beton converted with --max-resolution 0: its images, and so FFCV's decode buffers, have no size
    bound."""
    if read_info(Path(images.root)).get("max_resolution") == 0:
        raise UserError(f"{images.root} was converted with --max-resolution 0 (images of any size), and the FFCV "
                        f"loader's decode scratch (pinned with CUDA) holds the largest image for every sample of "
                        f"{BATCHES_IN_FLIGHT} batches; convert it again with --max-resolution 512 (the default)")


def _to_device(device: torch.device) -> list:
    """FFCV's copy to the GPU (pinned buffers, its own stream); nothing on CPU."""
    return [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []


class FFCVLoader(LoaderBase):
    def __init__(self, images: BetonSet, specs: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
                 workers: int = 2, channels_last: bool = True):
        _check_bounded(images)
        super().__init__(images, specs, shard, device, channels_last)
        self.epoch_seed = np.zeros(1, dtype=np.uint64)
        self.order = _EpochOrder()
        decoder = ViewsDecoder(list(specs.values()), self.epoch_seed)
        with torch_threads_kept():
            self.loader = Loader(images.root, batch_size=shard.rank_batch, num_workers=max(1, workers),
                                 drop_last=True, order=OrderOption.SEQUENTIAL, indices=images.rows.numpy(),
                                 batches_ahead=BATCHES_AHEAD,
                                 pipelines={"image": PipelineSpec("image", decoder, [ToTensor(), *_to_device(device)]),
                                            "label": [IntDecoder(), ToTensor(), *_to_device(device)]})
        self.loader.traversal_order = self.order
        sides = [spec.size for spec in specs.values()]
        self.slices = dict(zip(specs, zip(decoder.offsets[:-1].tolist(), decoder.offsets[1:].tolist(), sides)))
        # the decode scratch FFCV allocates for an epoch: [batches in flight, batch, largest image's pixels x 3]
        self.scratch_shape = (BATCHES_IN_FLIGHT, shard.rank_batch, *decoder.largest_image(), 3)
        self.scratch_bytes = math.prod(self.scratch_shape)

    def scratch_note(self) -> str:
        """The decode scratch in a few words, e.g. 'decode scratch 480.0 MiB pinned (5 batches x 128 x 512x512x3 B)'."""
        batches, batch, height, width, channels = self.scratch_shape
        memory = "pinned" if torch.cuda.is_available() else "pageable"
        return (f"decode scratch {self.scratch_bytes / 2**20:.1f} MiB {memory} "
                f"({batches} batches x {batch} x {height}x{width}x{channels} B)")

    def epoch(self, epoch: int, start_batch: int = 0):
        order = self.indices(epoch, start_batch)  # [batches, batch] positions in the set
        self.order.rows = self.images.rows[order.flatten()].numpy().astype(np.uint64)
        self.epoch_seed[0] = sample_seed(self.shard.seed, epoch, 0)
        with torch_threads_kept():
            batches = iter(self.loader)
        try:
            for idx, (packed, labels) in zip(order.to(self.device), batches):
                rnd = self.random(epoch, idx)
                out = {}
                for role, spec in self.specs.items():
                    start, end, side = self.slices[role]
                    x = packed[:, start:end].view(-1, side, side, 3).permute(0, 3, 1, 2)  # uint8, channels_last
                    x = photometric(x, spec, sample_params(side, side, spec, rnd)) if spec.is_photometric \
                        else to_unit(x)
                    out[role] = normalize(x, spec.mean, spec.std, self.channels_last)
                out["label"] = labels.view(-1).clone()  # FFCV reuses its buffers
                yield out
        finally:
            batches.close()  # stops FFCV's thread, also when the loop leaves the epoch early


class EvalReader:
    """uint8 [B,3,size,size] batches of every image of a .beton split, in order: the centre crop of EVAL_CROP of
    the shorter side (the whole image for sets converted from a named set) resized to size. FFCV compiles a
    Loader (seconds), so a reader is made once and iterated at every evaluation."""

    def __init__(self, images: BetonSet, size: int, batch_size: int, workers: int):
        _check_bounded(images)
        decoder = CenterCropRGBImageDecoder((size, size), ratio=1.0 if images.side else EVAL_CROP)
        with torch_threads_kept():
            self.loader = Loader(images.root, batch_size=batch_size, num_workers=max(1, workers),
                                 order=OrderOption.SEQUENTIAL, indices=images.rows.numpy(), drop_last=False,
                                 batches_ahead=BATCHES_AHEAD,
                                 pipelines={"image": [decoder, ToTensor(), ToTorchImage()], "label": None})

    def __iter__(self):
        with torch_threads_kept():
            batches = iter(self.loader)
        try:
            for (x,) in batches:
                yield x
        finally:
            batches.close()
