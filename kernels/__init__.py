"""Loss kernels: pure functions of torch tensors, each fast path beside its exact reference."""

from .losses import byol_loss, infonce_loss, resa_target, soft_cross_entropy
from .relational import relational_loss, relational_loss_reference
from .sinkhorn import sinkhorn_knopp

__all__ = ["byol_loss", "infonce_loss", "relational_loss", "relational_loss_reference", "resa_target",
           "sinkhorn_knopp", "soft_cross_entropy"]
