"""The few torch.distributed helpers the trainer needs; every function is a no-op in one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td
import torch.nn as nn

from .device import to_device
from .errors import UserError


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def local_world_size() -> int:
    """Processes on this machine (torchrun sets LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def launched() -> bool:
    """Started by torchrun (or another launcher) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device, timeout_minutes: float) -> None:
    """Join the process group when launched by torchrun: NCCL on CUDA, gloo on CPU. A collective that waits
    longer than the timeout (a rank died or hangs) fails instead of hanging the job."""
    if launched() and not is_dist():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes),
                              device_id=device if device.type == "cuda" else None)


def destroy() -> None:
    if is_dist():
        td.destroy_process_group()


def barrier() -> None:
    if is_dist():
        td.barrier()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate x from every rank (of `group`, default all) along dim 0, in rank order (no gradient). Every rank's
    x has one shape."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(td.get_world_size(group))]
    td.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out)


@torch.no_grad()
def all_gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """all_gather_cat for ranks holding different numbers of rows (padded to the longest, then cut)."""
    if not is_dist():
        return x
    counts = all_gather_cat(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    return torch.cat([part[:n] for part, n in zip(all_gather_cat(padded).split(max(counts)), counts)])


@torch.no_grad()
def all_reduce(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """x summed (op "sum"), averaged ("mean") or maximised ("max") elementwise over ranks (of `group`, default all),
    in place; returns x."""
    if is_dist():
        td.all_reduce(x, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "mean": td.ReduceOp.SUM}[op],
                      group=group)
        if op == "mean":
            x.div_(td.get_world_size(group))
    return x


@torch.no_grad()
def average_batchnorm_statistics(module: nn.Module) -> None:
    """Average the BatchNorm running statistics over ranks. Without SyncBatchNorm each rank updates them from its
    own share of the batch; the update is linear, so their mean is what one process with split BN keeps."""
    if is_dist():
        stats = [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                 for t in (m.running_mean, m.running_var)]
        if stats:
            flat = torch.cat([t.flatten() for t in stats])
            all_reduce(flat, "mean")
            torch._foreach_copy_(stats, list(flat.split([t.numel() for t in stats])))


def shuffled_forward(net: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """net(x) with BatchNorm statistics taken over a shuffled global batch (MoCo's shuffle-BN): the batches of all
    ranks are gathered, permuted by one permutation drawn from `generator` (every rank holds the same one, so
    they draw the same permutation without a broadcast), each rank forwards its slice of the permuted batch,
    and the outputs are gathered and unshuffled. In one process with split BN the same permutation puts every
    sample in another BN group than its query, as it would on W GPUs."""
    world, me = world_size(), rank()
    everything = all_gather_cat(x)
    perm = to_device(torch.randperm(len(everything), generator=generator), x.device)
    mine = perm.view(world, -1)[me]
    out = all_gather_cat(net(everything[mine]))
    return out[perm.argsort()].view(world, len(x), *out.shape[1:])[me]


class Vote:
    """Ranks agree on yes/no questions (stop now? checkpoint now?) without a host sync in the step: each call
    starts an all-reduce (max) of the local answers on a CPU (gloo) group and returns the previous call's
    result, which has long arrived. Every rank calls at every step, so all read the same answers at the same
    step. In one process the answers come back at once."""

    def __init__(self):
        self.group = td.new_group(backend="gloo") if is_dist() else None
        self.pending: tuple[td.Work, torch.Tensor] | None = None

    def __call__(self, *answers) -> list[bool]:
        if self.group is None:
            return [bool(a) for a in answers]
        agreed = [False] * len(answers)
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            agreed = [bool(f) for f in flags.tolist()]
        flags = torch.tensor([float(bool(a)) for a in answers])
        self.pending = (td.all_reduce(flags, op=td.ReduceOp.MAX, group=self.group, async_op=True), flags)
        return agreed

    def close(self) -> None:
        """Finish the vote in flight, so that no rank leaves a collective unanswered."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


DistError = td.DistError
_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "nccl", "gloo",
         "socket", "peer")


def is_lost_peer(error: BaseException) -> bool:
    """An error of a collective whose peer died or hung (rather than a bug of ours)."""
    return isinstance(error, td.DistError) or any(word in str(error).lower() for word in _LOST)


def lost_peer(error: BaseException) -> UserError:
    """A collective that failed because another process died or timed out, as a one-line error."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"rank {rank()} lost contact with the other processes ({first[:200]}); another rank died or hung "
                     f"(see its log); the last checkpoint is intact: start the job again with --resume")


@dataclass(frozen=True)
class BatchSplit:
    """The batch arithmetic of a run, in one place: the global batch (--batch-size) shared by `world` processes,
    each process's batch in BatchNorm groups (split BN: --bn-splits groups over the global batch, as that many GPUs
    with per-GPU BN; one group with --sync-bn, whose statistics span the global batch), and the learning rate
    scaled by the global batch."""

    global_batch: int
    world: int = 1
    bn_splits: int = 1
    sync_bn: bool = False

    def __post_init__(self):
        if self.global_batch % self.world:
            raise UserError(f"batch size {self.global_batch} is not divisible by the {self.world} processes")
        if self.rank_batch % self.bn_groups:
            where = f" per process ({self.world} processes share bn_splits={self.bn_splits})" if self.world > 1 else ""
            raise UserError(f"batch size {self.rank_batch}{where} is not a multiple of bn_splits={self.bn_groups}; "
                            f"change either (--bn-splits 1 turns split BatchNorm off)")

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.world

    @property
    def bn_groups(self) -> int:
        """BatchNorm groups in each process's batch (at least 1: per-process BN)."""
        return 1 if self.sync_bn else max(1, round(self.bn_splits / self.world))

    def lr(self, base_lr: float) -> float:
        """The linear scaling rule: the base lr is per 256 images of the global batch."""
        return base_lr * self.global_batch / 256

    def describe(self) -> str:
        if self.sync_bn:
            return "SyncBatchNorm over the global batch"
        return f"BN in {self.bn_groups * self.world} groups of {self.rank_batch // self.bn_groups}"
