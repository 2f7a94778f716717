"""BatchNorm over the global batch of all ranks (--sync-bn), without a host-device sync.

torch's SyncBatchNorm drops the statistics of ranks whose batch is empty with a boolean mask (`count_all[mask]`):
an output whose shape the host must read, so every BN layer of every step waits for the GPU (~150-220 waits in a
ResNet-50 step). No rank's batch is ever empty here (every rank gets the same share of the global batch), so the
gathered statistics are used as they are, and nothing in the step reads a value back.

Forward: each rank's per-channel mean and 1/std, all-gathered (one collective per layer), combined with the counts,
the running statistics updated, the input normalised. Backward: the sums of dy and dy * (x - mean) all-reduced (one
collective), the input gradient formed from them. On CUDA these are torch's own kernels (the ones SyncBatchNorm uses);
on a CPU the same steps in plain tensor ops, so that gloo runs (and the tests) take the same path.
"""

from __future__ import annotations

import torch
import torch.distributed as td
import torch.nn as nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNorm

from . import dist


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] vector shaped to broadcast over x [B, C, ...]."""
    return v.view(1, -1, *[1] * (x.dim() - 2))


def _scale(invstd: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return invstd if weight is None else invstd * weight


class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of x over every rank's batch; running statistics updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float, group):
        channels = x.shape[1]
        if x.is_cuda:
            if not x.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous()
            mean, invstd = torch.batch_norm_stats(x, eps)
        else:
            var, mean = torch.var_mean(x.float(), _channel_dims(x), correction=0)
            invstd = (var + eps).rsqrt()
        count = torch.full((1,), x.numel() // channels, dtype=mean.dtype, device=mean.device)
        gathered = dist.all_gather_cat(torch.cat([mean, invstd, count])[None], group)
        means, invstds, counts = gathered.split([channels, channels, 1], dim=1)
        if x.is_cuda:
            mean, invstd = torch.batch_norm_gather_stats_with_counts(x, means, invstds, running_mean, running_var,
                                                                     momentum, eps, counts.view(-1))
            y = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        else:  # the parallel variance: each rank's variance plus the spread of the ranks' means
            n = counts.sum()
            mean = (means * counts).sum(0) / n
            var = ((invstds.pow(-2) - eps + (means - mean).square()) * counts).sum(0) / n
            invstd = (var + eps).rsqrt()
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * n / (n - 1)).to(running_var.dtype), momentum)  # unbiased, as torch keeps it
            y = (x.float() - _per_channel(mean, x)) * _per_channel(_scale(invstd, weight), x)
            y = (y if bias is None else y + _per_channel(bias, x)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, counts.to(torch.int32))
        ctx.process_group = group
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy.is_cuda:  # torch's: batch_norm_backward_reduce, one all_reduce, batch_norm_backward_elemt
            return _TorchSyncBatchNorm.backward(ctx, dy)[:8]  # its forward takes one more input (world_size)
        x, weight, mean, invstd, counts = ctx.saved_tensors
        dims, xmu = _channel_dims(x), x.float() - _per_channel(mean, x)
        dy = dy.float()
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy  # this rank's share: DDP averages them
        means = dist.all_reduce(torch.cat([sum_dy, sum_dy_xmu]), group=ctx.process_group) / counts.sum()
        mean_dy, mean_dy_xmu = means.split(len(mean))
        dx = (dy - _per_channel(mean_dy, x) - xmu * _per_channel(invstd.square() * mean_dy_xmu, x))
        dx = dx * _per_channel(_scale(invstd, weight), x)
        return (dx.to(x.dtype), None if weight is None else grad_weight, None if weight is None else grad_bias,
                None, None, None, None, None)


class SyncFreeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from every rank's batch (`process_group`, default all ranks), as
    torch's SyncBatchNorm computes them, without waiting for the device. In evaluation, or in one process, it is a
    plain BatchNorm. Not torch's class: DDP refuses that one on CPU modules, and these also run under gloo."""

    process_group = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (got {x.dim()})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or td.group.WORLD
        if not (self.training and dist.is_dist() and td.get_world_size(group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                      self.momentum, group)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm1d/2d in `module` becomes a SyncFreeBatchNorm holding the same parameters and buffers."""
    for m in module.modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            m.__class__ = SyncFreeBatchNorm  # the same tensors (the state_dict's keys unchanged); only forward differs
    return module
