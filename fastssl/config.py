"""Run settings: one dataclass, filled from defaults, a YAML/TOML file, then the command line.

Fields left at None are method- or data-dependent: `resolve` fills them from the method's recipe
(the CIFAR recipe for images of at most 64 px, the ImageNet recipe above).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from .errors import UserError


@dataclass
class TrainConfig:
    method: str = "ressl"
    arch: str = "resnet18"
    data: str = "fashion-mnist"
    pipeline: str = "torch"
    image_size: int | None = None  # None: the named set's native size, 224 for folders
    epochs: int = 100
    batch_size: int = 256  # global batch (split across ranks under DDP)
    lr: float | None = None  # per 256 images; the trainer scales it by batch/256
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    final_lr_ratio: float | None = None  # cosine ends at lr * this
    queue_size: int | None = None
    tau_s: float | None = None
    tau_t: float | None = None
    momentum: float | None = None  # teacher EMA momentum (start value of a cosine schedule where the method uses one)
    proj_hidden: int | None = None
    proj_dim: int | None = None
    bn_splits: int = 8  # BN statistics groups in one process (ignored under DDP, where each GPU is a group)
    out: str = "runs/fastssl"
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    channels_last: bool = True
    compile: bool = False
    workers: int = 2
    seed: int = 0
    knn_every: int = 1  # epochs between kNN monitors (0: only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    log_every: int = 20  # steps between CSV/TensorBoard rows
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    max_steps: int = 0  # stop after this many steps (0: run all epochs); for smoke tests and benchmarks
    train_subset: int = 0  # train on a fixed random subset of this many images (0: all)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def load_file(path: str) -> dict:
    """Settings from a YAML or TOML file, keys as in TrainConfig (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else yaml.safe_load(p.read_text())
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"unknown setting {key!r} in {path}; valid keys: {', '.join(FIELDS)}")
        out[name] = value
    return out


def merge(file_values: dict, cli_values: dict) -> TrainConfig:
    """Defaults < config file < command line (only options given explicitly count as command line)."""
    cfg = dataclasses.replace(TrainConfig(), **{**file_values, **cli_values})
    _check_types(cfg)
    return cfg


def _check_types(cfg: TrainConfig) -> None:
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        kind = {"int": int, "float": (int, float), "str": str, "bool": bool}[str(f.type).split(" ")[0]]
        if value is None and "None" in str(f.type):
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"setting {name}={value!r} must be {str(f.type).split(' ')[0]}")


def resolve(cfg: TrainConfig, method_defaults: dict) -> TrainConfig:
    """Fill the None fields from the method's recipe and check the result."""
    filled = {k: v for k, v in method_defaults.items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **filled)
    if cfg.tau_s is not None and cfg.tau_t is not None and cfg.tau_t >= cfg.tau_s:
        raise UserError(f"tau_t={cfg.tau_t} must be smaller than tau_s={cfg.tau_s}: the teacher's distribution "
                        f"is the sharper one")
    positive = ["epochs", "batch_size", "lr", "queue_size", "tau_s", "tau_t", "workers", "bn_splits"]
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value <= 0 and not (name == "workers" and value == 0):
            raise UserError(f"{name}={value} must be positive")
    if cfg.momentum is not None and not 0 <= cfg.momentum <= 1:
        raise UserError(f"momentum={cfg.momentum} must be in [0, 1]")
    for name, choices in (("device", ("auto", "cpu", "cuda")), ("precision", ("auto", "fp32", "bf16"))):
        if getattr(cfg, name) not in choices:
            raise UserError(f"unknown {name} {getattr(cfg, name)!r}; choose {' | '.join(choices)}")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in d.items() if k in FIELDS})
