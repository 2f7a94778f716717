"""What every pipeline shares: the loader interface, seeding and the final normalisation on the device."""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Iterator, Protocol

import torch

from fastssl.errors import UserError
from fastssl.views import ViewSpec


class Loader(Protocol):
    """Yields exact epochs of batches: {role: float [B,3,H,W] normalised on the device, "label": int64 [B]}."""

    batch_size: int  # per rank

    def __len__(self) -> int: ...  # batches per epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]: ...


# What installs each optional dependency (DALI wheels are per CUDA major version).
EXTRAS = {"dali": "pip install 'fastssl[dali]' ('fastssl[dali-cuda120]' with a CUDA 12 build of torch)",
          "ffcv": "pip install 'fastssl[ffcv]'"}


@contextlib.contextmanager
def torch_threads_kept():
    """Undo what the block does to torch's intra-op threads: FFCV sets them to 1 on import and to its worker
    count making a Loader and starting an epoch, which would leave a CPU run training on one core."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def optional(module: str, extra: str) -> ModuleType:
    """Import an optional dependency (DALI, FFCV), or say in one line how to install it; torch's threads kept."""
    try:
        with torch_threads_kept():
            return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{extra.upper()} is not installed ({e}); {EXTRAS[extra]}") from None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed per (run, epoch, sample): augmentations do not depend on workers, order or resumption."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


def epoch_indices(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's sample indices for one epoch: a fresh permutation, sharded by rank, whole batches only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, -1)))
    per_rank = n // world // batch_size * batch_size
    return perm[rank::world][:per_rank]


def normalize(x: torch.Tensor, spec: ViewSpec, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B,3,H,W] (any device) -> float [B,3,H,W] on `device`, (x/255 - mean) / std."""
    x = x.to(device, non_blocking=True)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255)
    x = (x.float() - mean) * inv_std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
