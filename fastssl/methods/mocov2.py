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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..kernels import infonce_loss
from ..models import ema_update, mlp
from ..options import recipe
from ..queue import EmbeddingQueue
from ..views import symmetric
from .base import Method, Options, register

MOCO, V2 = "MoCo (He et al., CVPR 2020)", "MoCo v2 (Chen et al., arXiv:2003.04297)"
SMALL = "small images: the CIFAR setting of ReSSL's baselines (ReSSL, NeurIPS 2021, §4)"


@dataclass
class MoCoV2Options(Options):
    lr: float = recipe(0.06, 0.03, "", f"{MOCO} §3.3 (0.03); {SMALL}")
    weight_decay: float = recipe(5e-4, 1e-4, "", f"{MOCO} §3.3 (1e-4); {SMALL}", check="non-negative")
    warmup_epochs: float = recipe(0, 0, "", f"{V2}: no warm-up", check="non-negative")
    final_lr_ratio: float = recipe(0.0, 0.0, "", f"{V2}: cosine to 0", check="fraction")
    queue_size: int = recipe(4096, 65536, "queue length K (negatives)", f"{MOCO} §3.3 (65536); {SMALL}")
    tau_s: float = recipe(0.2, 0.2, "the InfoNCE temperature", f"{V2}")
    momentum: float = recipe(0.99, 0.999, "teacher (key encoder) EMA momentum", f"{MOCO} §3.3 (0.999); {SMALL}",
                             check="fraction")
    proj_hidden: int = recipe(2048, 2048, "MLP head hidden width", f"{V2}: MLP head 2048 -> 128")
    proj_dim: int = recipe(128, 128, "projection (embedding) dimension", f"{V2}: MLP head 2048 -> 128")


@register
class MoCoV2(Method):
    name = "mocov2"
    backprops_per_image = 1
    Options = MoCoV2Options

    @staticmethod
    def view_specs(opts, size, mean, std):
        return symmetric(size, mean=mean, std=std)

    def __init__(self, opts, backbone, **run):
        super().__init__(opts, backbone, **run)
        self.student = nn.Sequential(backbone, mlp([backbone.out_dim, opts.proj_hidden, opts.proj_dim]))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.queue = EmbeddingQueue(opts.queue_size, opts.proj_dim, seed=self.seed)
        self.shuffle = torch.Generator().manual_seed(self.seed)  # shuffle-BN's permutations

    def step(self, views, progress):
        ema_update(self.teacher, self.student, self.opts.momentum)  # before the teacher forward
        with torch.no_grad():
            k = dist.shuffled_forward(self.teacher, views["view2"], self.shuffle)
        (q,) = self.student_forward(views["view1"])
        loss = infonce_loss(q, k, self.queue.rows, self.opts.tau_s)
        self.queue.stage(F.normalize(k.float(), dim=1))  # after the optimiser step: not this batch's own negatives
        self.last_pair = (q.detach(), k)
        return loss, {}

    def get_extra_state(self) -> dict:
        return {"shuffle": self.shuffle.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.shuffle.set_state(state["shuffle"])
