"""Loss kernels: pure functions of torch tensors, each fast path beside its exact reference."""

from .relational import relational_loss, relational_loss_reference
from .sinkhorn import sinkhorn_knopp

__all__ = ["relational_loss", "relational_loss_reference", "sinkhorn_knopp"]
