"""ReSSL: the student matches the teacher's sharpened similarity distribution over a queue of anchors.

Student sees the strong view, the EMA teacher the weak view (crop + flip); both are compared with a FIFO
queue of past teacher embeddings; the teacher's embeddings are enqueued after the loss. 1x backprop.

Multi-crop (crops > 1): the student also gets smaller strong crops ("crop1", ...; ReSSL's 224/192/160/128/96 px
set scaled to the image size), each compared with the teacher's one weak-view distribution; losses averaged.
Each extra crop is one more (smaller) student backward pass, which backprops_per_image does not count.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..kernels import relational_loss
from ..models import ema_update, mlp
from ..options import recipe
from ..queue import EmbeddingQueue
from ..views import MULTI_CROP_224, multi_crop, strong, weak
from .base import Method, Options, check_temperatures, register

PAPER, CODE = "ReSSL (Zheng et al., NeurIPS 2021)", "the official code (github.com/KyleZheng1997/ReSSL)"


@dataclass
class ReSSLOptions(Options):
    lr: float = recipe(0.06, 0.05, "", f"{PAPER} §4 (CIFAR: 0.06 x batch/256); ImageNet: {CODE}")
    weight_decay: float = recipe(5e-4, 1e-4, "", f"{PAPER} §4, §5", check="non-negative")
    warmup_epochs: float = recipe(5, 5, "", f"{PAPER} §4: 5 linear warm-up epochs", check="non-negative")
    final_lr_ratio: float = recipe(0.0, 0.0, "", f"{PAPER} §4: cosine to 0", check="fraction")
    queue_size: int = recipe(4096, 131072, "queue length K (anchors)",
                             f"{PAPER} §4 / Table 5 (4096 for small sets); ImageNet: {CODE} (§5: 130k)")
    tau_s: float = recipe(0.1, 0.1, "student temperature", f"{PAPER} Table 2")
    tau_t: float = recipe(0.04, 0.04, "teacher temperature (below tau_s: the sharper one)", f"{PAPER} Table 2")
    momentum: float = recipe(0.99, 0.999, "teacher EMA momentum", f"{PAPER} §4 (0.99 small sets), §5 (0.999)",
                             check="fraction")
    proj_hidden: int = recipe(2048, 4096, "projection head hidden width", f"{CODE}: CIFAR 2048, ImageNet 4096")
    proj_dim: int = recipe(128, 512, "projection (embedding) dimension", f"{CODE}: CIFAR 128, ImageNet 512")
    proj_bn: bool = recipe(False, False, "BatchNorm after the projection head's hidden layer, as in BYOL's projector",
                           f"{PAPER}: the head has none", check="none")
    crops: int = recipe(1, 1, f"student crops per image: 1 = the strong view only, up to {len(MULTI_CROP_224)} = "
                              "the paper's 224/192/160/128/96 px multi-crop set scaled to the image size",
                        f"{PAPER} §5, multi-crop", check="none")

    def __post_init__(self):
        super().__post_init__()
        check_temperatures(self)
        if not 1 <= self.crops <= len(MULTI_CROP_224):
            raise UserError(f"crops={self.crops}: ressl takes 1 to {len(MULTI_CROP_224)} student crops")


@register
class ReSSL(Method):
    name = "ressl"
    backprops_per_image = 1
    Options = ReSSLOptions

    @staticmethod
    def view_specs(opts, size, mean, std):
        student = multi_crop(strong(size, mean=mean, std=std), opts.crops)  # [0] is the strong view
        return {"weak": weak(size, mean=mean, std=std), "strong": student[0],
                **{f"crop{i}": spec for i, spec in enumerate(student[1:], 1)}}

    def __init__(self, opts, backbone, **run):
        super().__init__(opts, backbone, **run)
        head = mlp([backbone.out_dim, opts.proj_hidden, opts.proj_dim], hidden_bn=opts.proj_bn)  # the paper's: no BN
        self.student = nn.Sequential(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.queue = EmbeddingQueue(opts.queue_size, opts.proj_dim, seed=self.seed)

    def step(self, views, progress):
        ema_update(self.teacher, self.student, self.opts.momentum)  # before the teacher forward, as the papers do
        with torch.no_grad():
            k = F.normalize(self.teacher(views["weak"]).float(), dim=1)
        crops = [views["strong"]] + [views[f"crop{i}"] for i in range(1, self.opts.crops)]
        qs = [F.normalize(x.float(), dim=1) for x in self.student_forward(*crops)]  # one forward per crop size
        q = torch.stack(qs) if len(qs) > 1 else qs[0]  # [C,B,D]: the kernel streams the teacher once for all
        loss = relational_loss(q, k, self.queue.rows, self.opts.tau_s, self.opts.tau_t)
        self.queue.stage(k)  # enqueued after the optimiser step: a sample is never its own anchor
        self.last_pair = (qs[0].detach(), k)
        return loss, {}
