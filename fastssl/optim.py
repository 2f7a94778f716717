"""The optimisers the papers use, and the schedule every method follows.

SGD (momentum 0.9, weight decay on every parameter) as the ResNet recipes of ReSSL, ISD, MoCo v2 and ReSA; LARS
(timm's, with the `timm` extra) as BYOL at large batches; AdamW (torch's) as ReSA's ViT-S/16 row. LARS and AdamW
leave biases and normalisation parameters (every 1-D parameter) out of weight decay, and so out of LARS's
adaptation (timm's Lars adapts only parameters with weight decay), as BYOL and the ViT recipes do.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import UserError

OPTIMIZERS = ("sgd", "lars", "adamw")
MOMENTUM = 0.9  # SGD's and LARS's
LARS_TRUST = 1e-3  # LARS's trust coefficient (BYOL, §3.3 / You et al.)


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]  # biases, norms
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name != "lars":
        raise UserError(f"unknown optimizer {name!r}; choose {' | '.join(OPTIMIZERS)}")
    try:
        from timm.optim import Lars
    except ImportError:
        raise UserError("--optimizer lars needs timm: pip install 'fastssl[timm]' (or timm)") from None
    return Lars(groups, lr=lr, momentum=MOMENTUM, trust_coeff=LARS_TRUST)


def cosine(progress: float) -> float:
    """Half a cosine from 1 (progress 0) to 0 (progress 1 and beyond): the schedules' shape."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(warmup_steps: int, total_steps: int, final_ratio: float):
    """LR multiplier per iteration: linear warm-up, then cosine down to `final_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_ratio + (1 - final_ratio) * cosine(t)
    return factor
