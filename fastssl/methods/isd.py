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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import relational_loss
from ..models import ema_update, mlp
from ..options import recipe
from ..queue import EmbeddingQueue
from ..views import strong, weak
from .base import Method, Options, check_temperatures, register

PAPER, CODE = "ISD (Tejankar et al., ICCV 2021)", "the official code (github.com/UMBCvision/ISD)"


@dataclass
class ISDOptions(Options):
    lr: float = recipe(0.05, 0.05, "", f"{PAPER} §3.1, ResNet-50 experiments: cosine from 0.05")
    weight_decay: float = recipe(5e-4, 1e-4, "", f"{PAPER} §3.1 (ImageNet); small images: ReSSL's and MoCo's CIFAR "
                                                 "value (ISD has no CIFAR recipe)", check="non-negative")
    warmup_epochs: float = recipe(0, 0, "", f"{CODE}: no warm-up", check="non-negative")
    final_lr_ratio: float = recipe(0.0, 0.0, "", f"{PAPER} §3.1: cosine to 0", check="fraction")
    queue_size: int = recipe(4096, 128000, "queue length K (anchors)", f"{PAPER} §3.1 (128K); small sets: ReSSL's")
    tau_s: float = recipe(0.2, 0.1, "student temperature",
                          f"{PAPER} §3.1 (0.1); small images: {CODE}'s ResNet-18 script (0.2)")
    tau_t: float = recipe(0.02, 0.01, "teacher temperature (below tau_s: the sharper one)",
                          f"{PAPER} §3.1 (0.01); small images: {CODE}'s ResNet-18 script (0.02)")
    momentum: float = recipe(0.99, 0.99, "teacher EMA momentum", f"{PAPER} §3.1", check="fraction")
    proj_hidden: int | None = recipe(None, None, "projector and predictor hidden width (unset: 2x the backbone "
                                                 "width)", f"{CODE}: 2 x feature width (4096 for ResNet-50)")
    proj_dim: int | None = recipe(None, None, "projection (embedding) dimension (unset: 1/4 of the backbone width)",
                                  f"{CODE}: feature width / 4 (512 for ResNet-50)")

    def __post_init__(self):
        super().__post_init__()
        check_temperatures(self)


@register
class ISD(Method):
    name = "isd"
    backprops_per_image = 1
    Options = ISDOptions

    @staticmethod
    def view_specs(opts, size, mean, std):
        return {"weak": weak(size, mean=mean, std=std), "strong": strong(size, mean=mean, std=std)}

    def __init__(self, opts, backbone, **run):
        super().__init__(opts, backbone, **run)
        hidden = opts.proj_hidden or 2 * backbone.out_dim
        dim = opts.proj_dim or backbone.out_dim // 4
        projector = mlp([backbone.out_dim, hidden, dim], hidden_bn=True)
        self.student = nn.Sequential(backbone, projector, mlp([dim, hidden, dim], hidden_bn=True))
        self.teacher = copy.deepcopy(self.student[:2]).requires_grad_(False)  # no predictor on the teacher
        self.queue = EmbeddingQueue(opts.queue_size, dim, seed=self.seed)

    def step(self, views, progress):
        ema_update(self.teacher, self.student[:2], self.opts.momentum)  # before the teacher forward
        with torch.no_grad():
            k = F.normalize(self.teacher(views["weak"]).float(), dim=1)
        (q,) = self.student_forward(views["strong"])
        loss = relational_loss(F.normalize(q.float(), dim=1), k, self.queue.rows, self.opts.tau_s, self.opts.tau_t)
        self.queue.stage(k)  # enqueued after the optimiser step: a sample is never its own anchor
        self.last_pair = (q.detach(), k)
        return loss, {}
