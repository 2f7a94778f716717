"""BYOL baseline: the student predicts the EMA teacher's projection of the other view; symmetric, 2x backprop.

loss = sum over both view orders of mean_i (2 - 2 cos(pred(proj(enc(x_a)))_i, proj_t(enc_t(x_b))_i)), as in
the paper (L + L~). Projector with BN (feat -> 4096 -> 256 on ImageNet, halved hidden width on small images),
predictor of the same shape on the student only; the teacher covers encoder + projector, momentum on a cosine
schedule from `momentum` to 1. Both views reuse views.strong (the MoCo v2 recipe) rather than BYOL's own
asymmetric blur/solarize pair, so the baselines differ only in their objective.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..kernels import byol_loss
from ..models import ema_update, mlp
from ..views import strong
from . import register
from .base import Method, cosine_momentum


@register
class BYOL(Method):
    name = "byol"
    backprops_per_image = 2

    @staticmethod
    def defaults(small: bool) -> dict:
        return dict(lr=0.06 if small else 0.05, weight_decay=5e-4 if small else 1e-4, warmup_epochs=5 if small else 10,
                    final_lr_ratio=0.0, momentum=0.99 if small else 0.996, proj_hidden=2048 if small else 4096,
                    proj_dim=256)

    @staticmethod
    def views(cfg, size, mean, std):
        spec = strong(size, mean=mean, std=std)
        return {"view1": spec, "view2": spec}

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        projector = mlp([backbone.out_dim, cfg.proj_hidden, cfg.proj_dim], hidden_bn=True)
        predictor = mlp([cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim], hidden_bn=True)
        self.student = nn.Sequential(backbone, projector, predictor)
        self.teacher = copy.deepcopy(self.student[:2]).requires_grad_(False)  # no predictor on the teacher

    def step(self, views, progress):
        ema_update(self.teacher, self.student[:2], cosine_momentum(self.cfg.momentum, progress))  # before its forward
        x = (views["view1"], views["view2"])
        with torch.no_grad():
            z = [self.teacher(v) for v in x]
        p = self.student_forward(*x)  # one forward per view: BN per view
        return byol_loss(p[0], z[1]) + byol_loss(p[1], z[0]), {}
