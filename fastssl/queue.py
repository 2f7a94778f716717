"""FIFO queue of unit-norm teacher embeddings (ReSSL/ISD anchors, MoCo negatives)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist


class EmbeddingQueue(nn.Module):
    """Ring buffer [size, dim] of unit-norm rows. `enqueue` overwrites the oldest rows, wrapping around.

    Contents and pointer are buffers, so they travel with `state_dict` (checkpoints resume exactly).
    Under DDP every rank enqueues the all-gathered batch (in rank order: the global batch), so all ranks hold
    the same queue. A method `stage`s its keys during the step and the loop `commit`s them after the optimiser
    step: the loss only ever sees earlier batches' keys, so a sample is never its own anchor or negative.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("rows", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("enqueued", torch.zeros((), dtype=torch.long))  # keys ever enqueued (its fill and age)
        self.staged: torch.Tensor | None = None
        self.batch = 1  # keys per enqueue (the global batch)

    def stage(self, keys: torch.Tensor) -> None:
        """Keys to enqueue at the next `commit`."""
        self.staged = keys.detach()

    def commit(self) -> None:
        if self.staged is not None:
            self.enqueue(self.staged)
            self.staged = None

    def __len__(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        x = dist.all_gather_cat(x.detach()).to(self.rows.dtype)
        size, n = len(self), x.shape[0]
        if n >= size:  # a batch at least as long as the queue: keep its last rows
            x, n = x[-size:], size
        idx = (self.ptr + torch.arange(n, device=x.device)) % size
        self.rows.index_copy_(0, idx, x)
        self.ptr.copy_((self.ptr + n) % size)
        self.enqueued += n
        self.batch = n

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """queue_fill: the share of rows that are teacher keys (the rest: the random start); queue_age: the steps
        since the oldest of them was enqueued, the staleness of the anchors against the teacher's momentum."""
        keys = self.enqueued.clamp(max=len(self)).float()
        return {"queue_fill": keys / len(self), "queue_age": keys / self.batch}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a fastssl 0.3 checkpoint has no count: taken as full (its pointer cannot say whether it wrapped)
        state_dict.setdefault(prefix + "enqueued", self.ptr.new_tensor(len(self)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
