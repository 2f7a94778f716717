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
    image_size: int | None = None
    epochs: int = 100
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    final_lr_ratio: float | None = None
    queue_size: int | None = None
    tau_s: float | None = None
    tau_t: float | None = None
    momentum: float | None = None
    encoder_ema: float = 0.0
    proj_hidden: int | None = None
    proj_dim: int | None = None
    proj_bn: bool = False
    crops: int = 1
    views: str = ""
    bn_splits: int = 8
    out: str = "runs/fastssl"
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    workers: int = 2
    seed: int = 0
    knn_every: int = 1
    knn_k: int = 200
    knn_t: float = 0.1
    knn_bank: int = 0
    knn_queries: int = 0
    log_every: int = 20
    checkpoint_every: int = 0
    max_steps: int = 0
    train_subset: int = 0


HELP = {
    "method": "self-supervised method (see the README's table)",
    "arch": "backbone: resnet18 | resnet34 | resnet50, or narrowed as resnet18-w16 (base width 16, not 64); "
            "inputs of at most 64 px get the 3x3 stride-1 stem without max-pool",
    "data": "fashion-mnist | cifar10 | cifar100, or a folder: an ImageFolder root with train/ and val/, or a "
            "folder holding one of the named sets; or NAME_train.beton from `fastssl convert` (test split: "
            "NAME_val.beton beside it)",
    "pipeline": "data pipeline making the views: torch (torchvision workers) | tensor (small sets on the device) "
                "| dali (folders and named sets) | ffcv (a .beton)",
    "image_size": "training view side in pixels (default: the named set's own size, 224 for folders)",
    "epochs": "training epochs",
    "batch_size": "global batch size (split across processes under torchrun)",
    "lr": "base learning rate per 256 images; the trainer scales it by batch/256",
    "weight_decay": "SGD weight decay",
    "warmup_epochs": "linear warm-up epochs before the per-iteration cosine",
    "final_lr_ratio": "the cosine ends at lr x this",
    "queue_size": "queue length K (ReSSL/ISD anchors, MoCo negatives)",
    "tau_s": "student temperature (mocov2: the InfoNCE one; resa: the softmax over the batch)",
    "tau_t": "teacher temperature (must be below tau_s)",
    "momentum": "teacher EMA momentum (the start of the cosine schedule where the method uses one)",
    "encoder_ema": "evaluate and export a running average of the encoder's weights and BN statistics, updated "
                   "every step with this decay (e.g. 0.997); 0: the encoder itself",
    "proj_hidden": "projection head hidden width (isd: 2x the backbone width when unset)",
    "proj_dim": "projection (embedding) dimension (isd: 1/4 of the backbone width when unset)",
    "proj_bn": "ressl: BatchNorm after the projection head's hidden layer, as in BYOL's projector (the ReSSL "
               "paper's head has none)",
    "crops": "student crops per image for ReSSL multi-crop: 1 = the strong view only, up to 5 = ReSSL's "
             "224/192/160/128/96 px set scaled to the image size",
    "views": "changes to the method's view recipe: space-separated ROLE.FIELD=VALUE, e.g. 'weak.crop_scale=1,1' "
             "(the teacher sees whole images); roles: the method's views (ressl: weak, strong), fields: those of "
             "fastssl.views.ViewSpec",
    "bn_splits": "BatchNorm statistics groups in one process (split-BN; 1 = plain BN; unused under torchrun)",
    "out": "run folder: checkpoint.pt, backbone.pt, metrics.csv, tb/, knn.png, summary.json",
    "resume": "continue the run in --out from its checkpoint, with its settings (but --epochs, --max-steps, "
              "--device, --workers)",
    "device": "auto | cpu | cuda",
    "precision": "auto | fp32 | bf16 (auto: bf16 autocast on CUDA and on CPUs with native bf16)",
    "channels_last": "channels_last memory format for the convolutions",
    "compile": "torch.compile the networks (slow first steps; pays off on GPUs)",
    "workers": "data loading worker processes",
    "seed": "random seed (model init, order and augmentations)",
    "knn_every": "epochs between weighted-kNN monitors (0: only at the end)",
    "knn_k": "kNN neighbours",
    "knn_t": "kNN temperature",
    "knn_bank": "kNN bank: a fixed random subset of the train split (0: all)",
    "knn_queries": "kNN queries: a fixed random subset of the test split (0: all)",
    "log_every": "steps between progress/CSV/TensorBoard updates",
    "checkpoint_every": "steps between mid-epoch checkpoints (0: at epoch ends only)",
    "max_steps": "stop after this many steps (0: run every epoch)",
    "train_subset": "train on a fixed random subset of this many images (0: all)",
}
assert HELP.keys() == {f.name for f in fields(TrainConfig)}


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
    if not 0 <= cfg.encoder_ema < 1:
        raise UserError(f"encoder_ema={cfg.encoder_ema} must be in [0, 1) (0 turns the average off)")
    for name, choices in (("device", ("auto", "cpu", "cuda")), ("precision", ("auto", "fp32", "bf16"))):
        if getattr(cfg, name) not in choices:
            raise UserError(f"unknown {name} {getattr(cfg, name)!r}; choose {' | '.join(choices)}")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in d.items() if k in FIELDS})
