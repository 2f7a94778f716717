"""BYOL baseline: the student predicts the EMA teacher's projection of the other view; symmetric, 2x backprop.

loss = sum over both view orders of mean_i (2 - 2 cos(pred(proj(enc(x_a)))_i, proj_t(enc_t(x_b))_i)), as in
the paper (L + L~). Projector with BN (feat -> 4096 -> 256 on ImageNet, halved hidden width on small images),
predictor of the same shape on the student only; the teacher covers encoder + projector, momentum on a cosine
schedule from `momentum` to 1. Both views reuse views.strong (the MoCo v2 recipe) rather than BYOL's own
asymmetric blur/solarize pair, so the baselines differ only in their objective.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels import byol_loss
from ..models import ema_update, mlp
from ..options import recipe
from ..views import symmetric
from .base import Method, Options, cosine_momentum, register

PAPER = "BYOL (Grill et al., NeurIPS 2020)"
ISD = "ISD's BYOL baseline (Tejankar et al., ICCV 2021, §3.1: SGD at batch 256)"
SMALL = "small images: the CIFAR setting of ReSSL's baselines (ReSSL, NeurIPS 2021, §4)"


@dataclass
class BYOLOptions(Options):
    lr: float = recipe(0.06, 0.05, "", f"{ISD} (0.05); {SMALL}")
    weight_decay: float = recipe(5e-4, 1e-4, "", f"{ISD} (1e-4); {SMALL}", check="non-negative")
    warmup_epochs: float = recipe(5, 10, "", f"{PAPER} §3.3 (10); {SMALL}", check="non-negative")
    final_lr_ratio: float = recipe(0.0, 0.0, "", f"{PAPER} §3.3: cosine to 0", check="fraction")
    momentum: float = recipe(0.99, 0.996, "teacher EMA momentum at the start of its cosine schedule to 1",
                             f"{PAPER} §3.3 (0.996); {SMALL}", check="fraction")
    proj_hidden: int = recipe(2048, 4096, "projector and predictor hidden width",
                              f"{PAPER} §3.3 (4096); small images: half")
    proj_dim: int = recipe(256, 256, "projection (embedding) dimension", f"{PAPER} §3.3")


@register
class BYOL(Method):
    name = "byol"
    backprops_per_image = 2
    Options = BYOLOptions

    @staticmethod
    def view_specs(opts, size, mean, std):
        return symmetric(size, mean=mean, std=std)

    def __init__(self, opts, backbone, **run):
        super().__init__(opts, backbone, **run)
        projector = mlp([backbone.out_dim, opts.proj_hidden, opts.proj_dim], hidden_bn=True)
        predictor = mlp([opts.proj_dim, opts.proj_hidden, opts.proj_dim], hidden_bn=True)
        self.student = nn.Sequential(backbone, projector, predictor)
        self.teacher = copy.deepcopy(self.student[:2]).requires_grad_(False)  # no predictor on the teacher

    def step(self, views, progress):
        ema_update(self.teacher, self.student[:2], cosine_momentum(self.opts.momentum, progress))  # before its forward
        x = (views["view1"], views["view2"])
        with torch.no_grad():
            z = [self.teacher(v) for v in x]
        p = self.student_forward(*x)  # one forward per view: BN per view
        self.last_pair = (p[0].detach(), z[1])
        return byol_loss(p[0], z[1]) + byol_loss(p[1], z[0]), {}
