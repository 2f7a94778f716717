"""Optional dependencies (DALI, FFCV): imported on demand, with a one-line error saying how to install them."""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType

import torch

from .errors import UserError

# What installs each optional dependency (DALI wheels are per CUDA major version).
EXTRAS = {"dali": "pip install 'fastssl[dali]' ('fastssl[dali-cuda120]' with a CUDA 12 build of torch)",
          "ffcv": "pip install 'fastssl[ffcv]'"}


@contextlib.contextmanager
def torch_threads_kept():
    """Undo what the block does to torch's intra-op threads: FFCV sets them to 1 on import and to its worker
    count making a Loader and starting an epoch, which would leave a CPU run training on one core."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def optional(module: str, extra: str) -> ModuleType:
    """Import an optional dependency (DALI, FFCV), or say in one line how to install it; torch's threads kept."""
    try:
        with torch_threads_kept():
            return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{extra.upper()} is not installed ({e}); {EXTRAS[extra]}") from None
