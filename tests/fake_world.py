"""This process as rank 0 of two, without a peer: torch's fake process group, whose collectives return at once (an
all-gather gives every rank this rank's tensor). One process then runs DDP, SyncBN and the gathered queue as a rank of
a larger job does, on a CPU or a single GPU."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as td


@contextlib.contextmanager
def rank_0_of_2():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    td.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        td.destroy_process_group()


def _gradients_as_they_are(state, bucket):
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def keep_gradients(ddp) -> None:
    """DDP's communication hook for the fake group (whose all-reduce returns nothing): each bucket left as it is.
    DDP's bucketed all-reduce runs in C++, outside what the tests count."""
    ddp.register_comm_hook(None, _gradients_as_they_are)
