"""ReSSL: the student matches the teacher's sharpened similarity distribution over a queue of anchors.

Student sees the strong view, the EMA teacher the weak view (crop + flip); both are compared with a FIFO
queue of past teacher embeddings; the teacher's embeddings are enqueued after the loss. 1x backprop.

Multi-crop (cfg.crops > 1): the student also gets smaller strong crops ("crop1", ...; ReSSL's 224/192/160/128/96 px
set scaled to the image size), each compared with the teacher's one weak-view distribution; losses averaged.
Each extra crop is one more (smaller) student backward pass, which backprops_per_image does not count.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import relational_loss
from ..models import ema_update, mlp
from ..queue import EmbeddingQueue
from ..views import MULTI_CROP_224, multi_crop, strong, weak
from . import register
from .base import Method


@register
class ReSSL(Method):
    name = "ressl"
    backprops_per_image = 1
    max_crops = len(MULTI_CROP_224)
    head_bn_switch = True

    @staticmethod
    def defaults(small: bool) -> dict:
        return dict(lr=0.06 if small else 0.05, weight_decay=5e-4 if small else 1e-4, warmup_epochs=5,
                    final_lr_ratio=0.0, queue_size=4096 if small else 131072, tau_s=0.1, tau_t=0.04,
                    momentum=0.99 if small else 0.999, proj_hidden=2048 if small else 4096,
                    proj_dim=128 if small else 512)

    @staticmethod
    def views(cfg, size, mean, std):
        student = multi_crop(strong(size, mean=mean, std=std), cfg.crops)  # [0] is the strong view
        return {"weak": weak(size, mean=mean, std=std), "strong": student[0],
                **{f"crop{i}": spec for i, spec in enumerate(student[1:], 1)}}

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        head = mlp([backbone.out_dim, cfg.proj_hidden, cfg.proj_dim], hidden_bn=cfg.proj_bn)  # the paper's: no BN
        self.student = nn.Sequential(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.queue = EmbeddingQueue(cfg.queue_size, cfg.proj_dim, seed=cfg.seed)

    def step(self, views, progress):
        ema_update(self.teacher, self.student, self.cfg.momentum)  # before the teacher forward, as the papers do
        with torch.no_grad():
            k = F.normalize(self.teacher(views["weak"]).float(), dim=1)
        crops = [views["strong"]] + [views[f"crop{i}"] for i in range(1, self.cfg.crops)]
        qs = [F.normalize(x.float(), dim=1) for x in self.student_forward(*crops)]  # one forward per crop size
        q = torch.stack(qs) if len(qs) > 1 else qs[0]  # [C,B,D]: the kernel streams the teacher once for all
        loss = relational_loss(q, k, self.queue.rows, self.cfg.tau_s, self.cfg.tau_t)
        self.queue.stage(k)  # enqueued after the optimiser step: a sample is never its own anchor
        return loss, {}
