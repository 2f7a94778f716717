"""MoCo v2 baseline: InfoNCE between a query and its EMA key, against a queue of past keys as negatives.

Both views are the same strong (MoCo v2) augmentation; the student embeds the first, the EMA teacher the
second; logits = [q.k, q.queue] / tau with the positive at index 0 (kernels.infonce_loss). The keys are
enqueued after the loss. The teacher forwards a shuffled batch (MoCo's shuffle-BN, dist.shuffled_forward):
the global batch is permuted across ranks as the paper does it, so that a query and its key sit in different
BN groups (in one process: different split-BN groups). The permutation comes from a generator seeded by the
run and kept in the checkpoint, the same on every rank. 1x backprop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..kernels import infonce_loss
from ..models import ema_update, mlp
from ..queue import EmbeddingQueue
from ..views import strong
from . import register
from .base import Method


@register
class MoCoV2(Method):
    name = "mocov2"
    backprops_per_image = 1

    @staticmethod
    def defaults(small: bool) -> dict:
        return dict(lr=0.06 if small else 0.03, weight_decay=5e-4 if small else 1e-4, warmup_epochs=0,
                    final_lr_ratio=0.0, queue_size=4096 if small else 65536, tau_s=0.2,
                    momentum=0.99 if small else 0.999, proj_hidden=2048, proj_dim=128)

    @staticmethod
    def views(cfg, size, mean, std):
        spec = strong(size, mean=mean, std=std)
        return {"view1": spec, "view2": spec}

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        self.student = nn.Sequential(backbone, mlp([backbone.out_dim, cfg.proj_hidden, cfg.proj_dim]))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.queue = EmbeddingQueue(cfg.queue_size, cfg.proj_dim, seed=cfg.seed)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)  # shuffle-BN's permutations

    def step(self, views, progress):
        ema_update(self.teacher, self.student, self.cfg.momentum)  # before the teacher forward
        with torch.no_grad():
            k = dist.shuffled_forward(self.teacher, views["view2"], self.shuffle)
        (q,) = self.student_forward(views["view1"])
        loss = infonce_loss(q, k, self.queue.rows, self.cfg.tau_s)
        self.queue.stage(F.normalize(k.float(), dim=1))  # after the optimiser step: not this batch's own negatives
        return loss, {}

    def get_extra_state(self) -> dict:
        return {"shuffle": self.shuffle.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.shuffle.set_state(state["shuffle"])
