"""What the loop knows of a method: its views, its step, its teacher, its encoder.

A method is one small module: it declares the views it wants (by role), builds its heads and teacher,
computes the loss from a batch of views, and keeps its own state (EMA teacher, queue) in its
`state_dict`. The loop never looks inside.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import TrainConfig
from ..errors import UserError
from ..views import ViewSpec


class Method(nn.Module):
    name: ClassVar[str]
    backprops_per_image: ClassVar[int]  # student backward passes per image: the "1x vs 2x" cost
    max_crops: ClassVar[int] = 1  # student crops per image the method can take (cfg.crops; multi-crop)
    head_bn_switch: ClassVar[bool] = False  # cfg.proj_bn changes its head (other heads are their papers')

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
        self.distributed_student: nn.Module | None = None  # a DDP wrapper of `student`, kept outside the state
        # The encoder's running average (weights and BN statistics), in the state_dict so that resume is exact.
        # Built from `backbone`, which every encoder() starts as; its first update copies encoder() anyway.
        self.encoder_average = (AveragedModel(backbone, multi_avg_fn=get_ema_multi_avg_fn(cfg.encoder_ema),
                                              use_buffers=True) if cfg.encoder_ema else None)

    def step(self, views: dict[str, torch.Tensor], progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass and loss for one batch; `progress` in [0, 1) drives schedules (EMA momentum)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """State updates that must follow the optimiser step (e.g. enqueue the teacher's keys)."""

    def encoder(self) -> nn.Module:
        """The method's trained backbone (the student's; ReSA: the momentum encoder)."""
        return self.student[0]

    def update_encoder_average(self) -> None:
        if self.encoder_average is not None:
            self.encoder_average.update_parameters(self.encoder())

    def evaluated_encoder(self) -> nn.Module:
        """The backbone the kNN monitor evaluates and the run exports: encoder(), or its running average."""
        return self.encoder() if self.encoder_average is None else self.encoder_average.module

    def student_forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.distributed_student or self.student)(x)

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimiser updates (wrapped in DDP under torchrun)."""
        return self.student


def fp32(like: torch.Tensor):
    """A region with autocast off, for a loss's small matmuls: logits and similarities stay fp32 (the networks
    around it still run in bf16). `like` gives the device type."""
    return torch.autocast(like.device.type, enabled=False)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: base at the start, 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
