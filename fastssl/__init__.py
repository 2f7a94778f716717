"""fastssl: a high-throughput trainer for relational self-supervised learning (ReSSL, ISD, ReSA; MoCo v2 and BYOL
as baselines) of image encoders.

The installed package is one namespace: `fastssl.pipelines` and `fastssl.kernels` live in the top-level folders
pipelines/ and kernels/ of the repository. The public names below load on first use, so that `import fastssl`
(and `fastssl --help`) stays quick.
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

_PUBLIC = {"TrainConfig": "config", "settings": "config", "train": "train", "METHODS": "methods",
           "UserError": "errors", "relational_loss": "kernels"}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'fastssl' has no attribute {name!r}")
