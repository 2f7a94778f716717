"""ReSA: the encoder's own clustering of the batch, balanced by Sinkhorn-Knopp, is the target of the projections.

Target: A = SinkhornKnopp(H Hm^T) (eps 0.05, 3 iterations) from the L2-normalised *encoder* features of the
weak view, online (H, detached) against momentum (Hm); each row of A sums to 1. Loss: for the two view orders
(q, v) = (weak, strong), (strong, weak), the cross-entropy between A and softmax_j(z_q . zm_v_j / 0.4) over the
batch, where z are the online projections (through the predictor on ImageNet) and zm the momentum ones; the
two orders are averaged. The student backpropagates through both views: 2x backprop. No queue.

The momentum network (encoder + projector, cosine momentum 0.996 -> 1) is the one evaluated and exported.
Under DDP each process keeps its own rows (its images) and all-gathers the momentum side as the columns; the
Sinkhorn sums over images are all-reduced (fastssl.dist.all_reduce). In one process both are no-ops.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import dist
from ..kernels import resa_target, soft_cross_entropy
from ..models import ema_update, mlp
from ..options import recipe
from ..views import resa_strong, weak
from .base import Method, Options, cosine_momentum, register

SINKHORN_EPS, SINKHORN_ITERS = 0.05, 3
PAPER, CODE = "ReSA (Weng et al., ICML 2025)", "the official code (github.com/winci-ai/resa)"


@dataclass
class ReSAOptions(Options):
    lr: float = recipe(0.3, 0.5, "", f"{PAPER} Table 8")
    weight_decay: float = recipe(1e-4, 1e-5, "", f"{PAPER} Table 8", check="non-negative")
    warmup_epochs: float = recipe(2, 2, "", f"{PAPER} Table 8", check="non-negative")
    final_lr_ratio: float = recipe(0.1, 0.1, "", f"{CODE}'s CIFAR recipe (no source gives ImageNet's)",
                                   check="fraction")
    tau_s: float = recipe(0.4, 0.4, "temperature of the softmax over the batch", f"{PAPER}, pseudo-code")
    momentum: float = recipe(0.996, 0.996, "momentum encoder EMA at the start of its cosine schedule to 1",
                             f"{PAPER}, pseudo-code", check="fraction")
    proj_hidden: int = recipe(2048, 2048, "projector (3 layers) and predictor hidden width", f"{PAPER}, setup")
    proj_dim: int = recipe(512, 512, "projection (embedding) dimension", f"{PAPER}, setup")
    predictor: bool = recipe(False, True, "a predictor after the online projector", f"{PAPER}, setup: ImageNet only",
                             check="none")


class EncoderHead(nn.Module):
    """Encoder, projector and predictor in one forward that returns the encoder features and the output."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.projector, self.predictor = encoder, projector, predictor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.predictor(self.projector(h))


@register
class ReSA(Method):
    name = "resa"
    backprops_per_image = 2
    Options = ReSAOptions

    @staticmethod
    def view_specs(opts, size, mean, std):
        return {"weak": weak(size, mean=mean, std=std), "strong": resa_strong(size, mean=mean, std=std)}

    def __init__(self, opts, backbone, **run):
        super().__init__(opts, backbone, **run)
        hidden, dim = opts.proj_hidden, opts.proj_dim
        projector = mlp([backbone.out_dim, hidden, hidden, dim], hidden_bn=True, last_bn=True)
        predictor = mlp([dim, hidden, dim], hidden_bn=True) if opts.predictor else nn.Identity()
        self.student = EncoderHead(backbone, projector, predictor)
        momentum_net = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(projector))  # encoder + projector
        self.teacher = momentum_net.requires_grad_(False)

    def online_encoder(self):
        return self.student.encoder

    def encoder(self):
        return self.teacher[0]  # the momentum encoder is the one evaluated

    def networks(self):
        return [self.student, self.teacher[0], self.teacher[1]]  # the step calls the momentum net's parts apart

    def step(self, views, progress):
        m = cosine_momentum(self.opts.momentum, progress)
        ema_update(self.teacher, nn.Sequential(self.student.encoder, self.student.projector), m)  # before its forward
        x = (views["weak"], views["strong"])
        online = self.student_forward(*x)  # (features, projection) per view: BN sees one view at a time
        with torch.no_grad():
            hm = [self.teacher[0](v) for v in x]
            zm = [dist.all_gather_cat(self.teacher[1](h)) for h in hm]  # all columns (the global batch)
            target = resa_target(online[0][0], dist.all_gather_cat(hm[0]), SINKHORN_EPS, SINKHORN_ITERS,
                                 all_reduce=dist.all_reduce)
        z = [p for _, p in online]
        tau = self.opts.tau_s
        mine = slice(dist.rank() * len(z[0]), (dist.rank() + 1) * len(z[0]))  # this rank's rows of the gathered batch
        self.last_pair = (z[0].detach(), zm[1][mine])
        return (soft_cross_entropy(target, z[0], zm[1], tau) + soft_cross_entropy(target, z[1], zm[0], tau)) / 2, {}
