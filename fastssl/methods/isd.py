"""ISD (ISD+ form): ReSSL's similarity distillation with BN projectors on both nets and a student predictor.

The student (strong view) predicts, through its extra predictor, the EMA teacher's (weak view) sharp similarity
distribution over a queue of past teacher embeddings; same relational loss as ReSSL, the query never among its
own anchors (the teacher's embeddings are enqueued after the loss). 1x backprop.

Heads scale with the backbone as in the official code: projector feat -> 2 feat (BN, ReLU) -> feat/4 on both
nets (2048 -> 4096 -> 512 for ResNet-50), predictor feat/4 -> 2 feat (BN, ReLU) -> feat/4 on the student only.
Small images use the ResNet-18 script's temperatures (0.2 / 0.02, the same 10x ratio as ImageNet's 0.1 / 0.01)
and, as no CIFAR recipe exists, the CIFAR weight decay of ReSSL/MoCo.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import relational_loss
from ..models import ema_update, mlp
from ..queue import EmbeddingQueue
from ..views import strong, weak
from . import register
from .base import Method


@register
class ISD(Method):
    name = "isd"
    backprops_per_image = 1

    @staticmethod
    def defaults(small: bool) -> dict:
        return dict(lr=0.05, weight_decay=5e-4 if small else 1e-4, warmup_epochs=0, final_lr_ratio=0.0,
                    queue_size=4096 if small else 128000, tau_s=0.2 if small else 0.1,
                    tau_t=0.02 if small else 0.01, momentum=0.99)

    @staticmethod
    def views(cfg, size, mean, std):
        return {"weak": weak(size, mean=mean, std=std), "strong": strong(size, mean=mean, std=std)}

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        hidden = cfg.proj_hidden or 2 * backbone.out_dim
        dim = cfg.proj_dim or backbone.out_dim // 4
        projector = mlp([backbone.out_dim, hidden, dim], hidden_bn=True)
        self.student = nn.Sequential(backbone, projector, mlp([dim, hidden, dim], hidden_bn=True))
        self.teacher = copy.deepcopy(self.student[:2]).requires_grad_(False)  # no predictor on the teacher
        self.queue = EmbeddingQueue(cfg.queue_size, dim, seed=cfg.seed)

    def step(self, views, progress):
        ema_update(self.teacher, self.student[:2], self.cfg.momentum)  # before the teacher forward
        with torch.no_grad():
            k = F.normalize(self.teacher(views["weak"]).float(), dim=1)
        (q,) = self.student_forward(views["strong"])
        loss = relational_loss(F.normalize(q.float(), dim=1), k, self.queue.rows, self.cfg.tau_s, self.cfg.tau_t)
        self.queue.stage(k)  # enqueued after the optimiser step: a sample is never its own anchor
        return loss, {}
