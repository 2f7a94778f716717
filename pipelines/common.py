"""What every pipeline shares: the loader contract, the order of an epoch, and randomness keyed by sample.

The contract: `len(loader)` batches an epoch on every rank; `loader.epoch(e, start_batch)` yields them from
`start_batch` on as {role: float [B,3,H,W] normalised on the device, "label": int64 [B]}. An epoch is a
permutation of the set cut into global batches of `world x rank_batch` samples; rank r takes the r-th slice of
each. So one process at the global batch sees, at every step, the concatenation of what W processes see, and
a step is the same step whatever the process count (a run resumes with another one). Augmentations draw
their randomness from (seed, epoch, sample index), never from a batch or a rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.views import ViewSpec


@dataclass(frozen=True)
class Shard:
    """This process's share of the data: its rank among `world`, the run's seed, its batch (per rank; the trainer's
    --batch-size is the global batch)."""

    rank: int = 0
    world: int = 1
    seed: int = 0
    rank_batch: int = 1

    @property
    def global_batch(self) -> int:
        return self.rank_batch * self.world


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed per (run, epoch, sample): augmentations do not depend on workers, order, ranks or resumption."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


def epoch_indices(n: int, shard: Shard, epoch: int) -> torch.Tensor:
    """This rank's sample indices for one epoch, batch after batch: a fresh permutation of the n samples cut
    into whole global batches, of which this rank takes slice `rank` of each."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(shard.seed, epoch, -1)))
    steps = n // shard.global_batch
    return perm[:steps * shard.global_batch].view(steps, shard.world, shard.rank_batch)[:, shard.rank].reshape(-1)


# The evaluation view of an image file: its shorter side resized to eval_resize(size), then the centre size x size,
# i.e. the centre EVAL_CROP of the shorter side (sets held in memory and .beton files of small images: whole).
EVAL_CROP = 224 / 256


def eval_resize(size: int) -> int:
    """The side the shorter side of an image is resized to, before the centre crop of the evaluation view."""
    return round(size / EVAL_CROP)


# ---- counter-based randomness: the draws of a sample are a function of its key alone ----

# splitmix64: a counter advanced by GOLDEN, each value through the finaliser (x ^= x >> 30, x *= MIX1,
# x ^= x >> 27, x *= MIX2, x ^= x >> 31): _mix here on int64 tensors, ffcv_loader's row seeds on numba's uint64.
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps around, as the algorithm wants)."""
    x = (x ^ _shr(x, 30)) * _signed(MIX1)
    x = (x ^ _shr(x, 27)) * _signed(MIX2)
    return x ^ _shr(x, 31)


class SampleRandom:
    """Uniform draws for a batch of samples, each row a function of the sample's (seed, epoch, index) only.

    Every call to `uniform` is one more draw per sample (`k` values each); the same sequence of calls gives
    every sample the same values whichever batch, rank, worker or device makes it. splitmix64 over a counter:
    no generator state, nothing to seed per batch, and all of it batched tensor ops on the device.
    """

    def __init__(self, seed: int, epoch: int, indices: torch.Tensor):
        base = _signed(sample_seed(seed, epoch, 0) * GOLDEN)
        self.keys = _mix(indices.to(torch.int64) * _signed(GOLDEN) + base)
        self.draws = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def uniform(self, k: int = 1) -> torch.Tensor:
        """float [n, k] in [0, 1): the next k draws of each sample."""
        counter = self.draws * 64 + torch.arange(1, k + 1, device=self.device)
        self.draws += 1
        bits = _mix(self.keys[:, None] + counter * _signed(GOLDEN))
        return _shr(bits, 40).float() * 2.0**-24  # the top 24 bits: exact in fp32


class Loader:
    """The contract's bookkeeping; a pipeline implements `epoch`."""

    def __init__(self, images: ImageSet, specs: dict[str, ViewSpec], shard: Shard, device: torch.device,
                 channels_last: bool = True):
        self.images, self.specs, self.shard, self.device = images, specs, shard, device
        self.channels_last = channels_last

    @property
    def rank_batch(self) -> int:
        return self.shard.rank_batch

    def __len__(self) -> int:
        return len(self.images) // self.shard.global_batch

    def indices(self, epoch: int, start_batch: int = 0) -> torch.Tensor:
        """This rank's sample indices of the epoch from `start_batch` on, [batches, rank_batch]."""
        return epoch_indices(len(self.images), self.shard, epoch).view(-1, self.rank_batch)[start_batch:]

    def random(self, epoch: int, indices: torch.Tensor) -> SampleRandom:
        return SampleRandom(self.shard.seed, epoch, indices)

    def readable(self, samples: list[int], bad: set[int]) -> list[int]:
        """samples with each one in `bad` (known unreadable) replaced by the next sample of the set not in it; the
        slot keeps its own random draws. UserError when none of the set can be read."""
        if len(bad) >= len(self.images):
            raise UserError(f"none of the images of {self.images.root} can be read; `fastssl check "
                            f"{self.images.root}` lists the unreadable files")
        out = []
        for i in samples:
            while i in bad:
                i = (i + 1) % len(self.images)
            out.append(i)
        return out

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError
