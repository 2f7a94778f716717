"""MoCo v2 baseline: InfoNCE between a query and its EMA key, against a queue of past keys as negatives.

Both views are the same strong (MoCo v2) augmentation; the student embeds the first, the EMA teacher the
second; logits = [q.k, q.queue] / tau with the positive at index 0. The keys are enqueued after the loss.
One process: the keys' batch is shuffled for the teacher forward (MoCo's shuffle-BN), so that with split
BatchNorm a query and its key sit in different BN groups; under torchrun each GPU's BN sees only its own
batch and this shuffle does not cross GPUs. 1x backprop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import ema_update, mlp
from ..queue import EmbeddingQueue
from ..views import strong
from . import register
from .base import Method, fp32


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
        self._keys: torch.Tensor | None = None

    def step(self, views, progress):
        ema_update(self.teacher, self.student, self.cfg.momentum)  # before the teacher forward
        with torch.no_grad():
            x = views["view2"]
            order = torch.randperm(x.shape[0], device=x.device)  # shuffle-BN
            k = F.normalize(self.teacher(x[order]).float(), dim=1)[order.argsort()]
        q = F.normalize(self.student_forward(views["view1"]).float(), dim=1)
        with fp32(q):
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.rows.T], dim=1) / self.cfg.tau_s
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self._keys = k
        return loss, {}

    def after_step(self):
        self.queue.enqueue(self._keys)  # after the loss: this batch's keys are not its own negatives
        self._keys = None
