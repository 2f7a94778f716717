"""The online linear probe (solo-learn's): a linear classifier trained beside pretraining on the student's
features, detached, so that it measures the representation without shaping it.

The features are those the student's encoder computes anyway in the step (a forward hook keeps the first view's,
in training mode only: the kNN monitor's evaluation passes are not captured), so the probe costs one small matmul
and its backward per step. Its accuracy is counted on the device and read once per epoch.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import dist
from .optim import cosine

# SGD with momentum 0.9, no weight decay, per 256 images, cosine over the run (solo-learn's classifier defaults).
PROBE_LR, PROBE_MOMENTUM = 0.1, 0.9


class OnlineProbe:
    def __init__(self, encoder: nn.Module, dim: int, classes: int, batch_size: int, device: torch.device):
        with torch.random.fork_rng(devices=[]):  # its own draws: the run trains the same with or without it
            torch.manual_seed(0)
            # BatchNorm without affine first (MAE's linear probe, He et al. 2022, A.2): the head sees the features
            # at one scale however much they drift while the encoder trains
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, classes)).to(device)
        self.lr = PROBE_LR * batch_size / 256
        self.opt = torch.optim.SGD(self.head.parameters(), lr=self.lr, momentum=PROBE_MOMENTUM)
        # Under torchrun the head's gradients are averaged like the student's (every rank keeps the same head).
        self.train_head = DistributedDataParallel(self.head) if dist.is_dist() else self.head
        self.captured: list[torch.Tensor] = []
        captured = self.captured

        # A function, not a method: a deep copy of the encoder (the kNN monitor's BN-calibrated one) shares it
        # without copying the probe, and `module is encoder` leaves the copy's forwards out.
        def capture(module: nn.Module, inputs, features: torch.Tensor) -> None:
            if module is encoder and module.training and not captured:
                captured.append(features.detach())

        encoder.register_forward_hook(capture)
        self.correct, self.seen = torch.zeros((), device=device), 0

    def step(self, labels: torch.Tensor, progress: float) -> None:
        """One SGD step of the head on the features the step's student forward left, against their labels."""
        features = self.captured.pop().float()
        for group in self.opt.param_groups:
            group["lr"] = self.lr * cosine(progress)
        logits = self.train_head(features)
        labels = labels.to(logits.device, non_blocking=True)
        loss = F.cross_entropy(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The head's classes of `features`, in evaluation mode: BatchNorm's running statistics, not the batch's,
        which it leaves as they are."""
        self.head.eval()
        try:
            return self.head(features.float()).argmax(1)
        finally:
            self.head.train()

    def train_accuracy(self) -> float:
        """Top-1 (%) of the head on the training batches since the last call, over all ranks."""
        correct, seen = dist.all_reduce(torch.stack([self.correct, self.correct.new_tensor(self.seen)])).tolist()
        self.correct, self.seen = torch.zeros_like(self.correct), 0
        return 100.0 * correct / max(seen, 1)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])
