"""What the loop knows of a method: its views, its step, its teacher, its encoder.

A method is one small module: it declares the views it wants (by role), builds its heads and teacher,
computes the loss from a batch of views, and keeps its own state (EMA teacher, queue) in its
`state_dict`. The loop never looks inside: it calls `distribute`, `compile`, `step` and `after_step`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..errors import UserError
from ..models import EncoderAverage
from ..queue import EmbeddingQueue
from ..sync_batchnorm import convert_sync_batchnorm
from ..views import ViewSpec


class PerView(nn.Module):
    """net applied to each of several inputs in one call: one forward per view (BatchNorm sees one view at a
    time) and one call through DDP per step, however many views the student sees."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *xs: torch.Tensor) -> list:
        return [self.net(x) for x in xs]


class Method(nn.Module):
    name: ClassVar[str]
    backprops_per_image: ClassVar[int]  # student backward passes per image: the "1x vs 2x" cost
    max_crops: ClassVar[int] = 1  # student crops per image the method can take (cfg.crops; multi-crop)
    head_bn_switch: ClassVar[bool] = False  # cfg.proj_bn changes its head (other heads are their papers')
    student: nn.Module
    teacher: nn.Module

    @staticmethod
    def defaults(small: bool) -> dict:
        """Recipe values for the TrainConfig fields left at None (small: images of at most 64 px)."""
        raise NotImplementedError

    @staticmethod
    def views(cfg: TrainConfig, size: int, mean, std) -> dict[str, ViewSpec]:
        """The views of one image, by role; pipelines deliver a batch of each under the same keys."""
        raise NotImplementedError

    def __init__(self, cfg: TrainConfig, backbone: nn.Module):
        super().__init__()
        if not 1 <= cfg.crops <= self.max_crops:
            raise UserError(f"crops={cfg.crops}: {self.name} takes " + (
                f"1 to {self.max_crops} student crops" if self.max_crops > 1 else "no multi-crop; leave crops at 1"))
        if cfg.proj_bn and not self.head_bn_switch:
            raise UserError(f"proj_bn: {self.name}'s head is its paper's (only ressl takes --proj-bn); leave it off")
        self.cfg = cfg
        # The encoder's running average, in the state_dict so that resume is exact. Built from `backbone`, which
        # every encoder() starts as; its first update copies encoder() anyway.
        self.encoder_average = EncoderAverage(backbone, cfg.encoder_ema) if cfg.encoder_ema else None
        self.queue: EmbeddingQueue | None = None
        object.__setattr__(self, "_student_call", None)  # set by distribute(); kept out of _modules and state_dict

    def step(self, views: dict[str, torch.Tensor], progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass and loss for one batch; `progress` in [0, 1) drives schedules (EMA momentum)."""
        raise NotImplementedError

    def student_forward(self, *xs: torch.Tensor) -> list:
        """The student on each view, in one call (through DDP under torchrun)."""
        return (self._student_call or PerView(self.student))(*xs)

    def after_step(self) -> None:
        """What follows the optimiser step: the staged keys into the queue, the encoder's running average."""
        if self.queue is not None:
            self.queue.commit()
        if self.encoder_average is not None:
            self.encoder_average.update(self.encoder())

    def encoder(self) -> nn.Module:
        """The method's trained backbone (the student's; ReSA: the momentum encoder)."""
        return self.student[0]

    def evaluated_encoder(self) -> nn.Module:
        """The backbone the kNN monitor evaluates and the run exports: encoder(), or its running average."""
        return self.encoder() if self.encoder_average is None else self.encoder_average.module

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimiser updates."""
        return self.student

    def distribute(self, device: torch.device, sync_bn: bool) -> None:
        """Under torchrun: DDP around the student (gradients averaged over ranks), held outside the method's
        modules so that checkpoints hold each weight once; with sync_bn, BatchNorm statistics over the global
        batch in the student and the teacher (SyncFreeBatchNorm: torch's SyncBatchNorm without its host sync)."""
        if sync_bn:
            self.student = convert_sync_batchnorm(self.student)
            self.teacher = convert_sync_batchnorm(self.teacher)
        # BN running statistics are averaged over ranks when they are read (fastssl.dist), not broadcast from
        # rank 0 at every forward.
        ddp = DistributedDataParallel(PerView(self.student), device_ids=[device.index] if device.type == "cuda"
                                      else None, forward_sync_buffers=False)
        object.__setattr__(self, "_student_call", ddp)

    def networks(self) -> list[nn.Module]:
        """The modules `step` calls: --compile compiles each of them."""
        return [self.student, self.teacher]

    def compile(self) -> None:
        """torch.compile each network `step` calls, in place. Under DDP the compiled student runs inside DDP's forward,
        where dynamo hands the graph to its DDPOptimizer: split at the gradient buckets' boundaries, so the all-reduce
        of each bucket overlaps the rest of the backward. The encoder's average only runs in evaluation."""
        for net in self.networks():
            net.compile()


def fp32(like: torch.Tensor):
    """A region with autocast off, for a loss's small matmuls: logits and similarities stay fp32 (the networks
    around it still run in bf16). `like` gives the device type."""
    return torch.autocast(like.device.type, enabled=False)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: base at the start, 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
