"""Atomic checkpoints (write, fsync, rename), exact resume, and the plain backbone export."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, fsync it, rename over `path`, fsync the directory:
    a crash at any point leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why, once
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def backbone_state_dict(encoder: torch.nn.Module) -> dict:
    """The encoder's weights under torchvision's ResNet names (no fc), on CPU, loadable with strict=False
    into `torchvision.models.resnetXX()` (the small-image stem has a 3x3 conv1)."""
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
