"""Run settings: one dataclass, filled from defaults, a YAML/TOML file, then the command line.

Fields left at None are method- or data-dependent: `resolve` fills them from the method's recipe
(the CIFAR recipe for images of at most 64 px, the ImageNet recipe above).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import UserError


KNN_K, KNN_T = 200, 0.1  # the standard weighted kNN monitor (InstDisc): 200 neighbours, temperature 0.1


def option(default, help: str):
    """A setting: its default and its --help text, declared together."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    method: str = option("ressl", "self-supervised method: ressl | isd | resa | mocov2 | byol")
    arch: str = option("resnet18", "backbone: resnet18 | resnet34 | resnet50 (or r18 | r34 | r50), narrowed as "
                                   "resnet18-w16 (base width 16, not 64); inputs of at most 64 px get the 3x3 "
                                   "stride-1 stem without max-pool")
    data: str = option("fashion-mnist", "fashion-mnist | cifar10 | cifar100 | imagenet, or a path: an ImageFolder "
                                        "root (train/ and optional val/), a folder of images (labels unused), a "
                                        "folder holding a named set, or a .beton from `fastssl convert`")
    data_val: str = option("", "the evaluation split (kNN monitor queries) when not beside --data (val/ or test/, "
                               "NAME_val.beton, a named set's test split); 'none': no monitor")
    pipeline: str = option("torch", "data pipeline making the views: torch (torchvision workers) | tensor (small "
                                    "sets on the device) | dali (folders and named sets) | ffcv (a .beton) | nvjpeg "
                                    "(folders: JPEGs decoded on the GPU by torchvision, no extra package)")
    image_size: int | None = option(None, "training view side in pixels (default: from the data: a named set's "
                                          "size, the images' own side up to 64 px, else 224)")
    epochs: int = option(100, "training epochs")
    batch_size: int = option(256, "global batch size (split across processes under torchrun)")
    lr: float | None = option(None, "base learning rate per 256 images; the trainer scales it by batch/256")
    weight_decay: float | None = option(None, "SGD weight decay")
    warmup_epochs: float | None = option(None, "linear warm-up epochs before the per-iteration cosine")
    final_lr_ratio: float | None = option(None, "the cosine ends at lr x this")
    queue_size: int | None = option(None, "queue length K (ReSSL/ISD anchors, MoCo negatives)")
    tau_s: float | None = option(None, "student temperature (mocov2: the InfoNCE one; resa: the softmax over the "
                                       "batch)")
    tau_t: float | None = option(None, "teacher temperature (must be below tau_s)")
    momentum: float | None = option(None, "teacher EMA momentum (the start of the cosine schedule where the method "
                                          "uses one)")
    encoder_ema: float = option(0.0, "evaluate and export a running average of the encoder's weights and BN "
                                     "statistics, updated every step with this decay (e.g. 0.997); 0: the encoder")
    proj_hidden: int | None = option(None, "projection head hidden width (isd: 2x the backbone width when unset)")
    proj_dim: int | None = option(None, "projection (embedding) dimension (isd: 1/4 of the backbone width when "
                                        "unset)")
    proj_bn: bool = option(False, "ressl: BatchNorm after the projection head's hidden layer, as in BYOL's "
                                  "projector (the ReSSL paper's head has none)")
    crops: int = option(1, "student crops per image for ReSSL multi-crop: 1 = the strong view only, up to 5 = "
                           "ReSSL's 224/192/160/128/96 px set scaled to the image size")
    views: str = option("", "changes to the method's view recipe: space-separated ROLE.FIELD=VALUE, e.g. "
                            "'weak.crop_scale=1,1' (the teacher sees whole images); roles: the method's views "
                            "(ressl: weak, strong), fields: those of fastssl.views.ViewSpec")
    bn_splits: int = option(8, "BatchNorm statistics in this many groups of the global batch, as that many GPUs "
                               "with per-GPU BN compute them (split BN); each process takes bn_splits/processes "
                               "groups (at least 1: per-process BN); 1: BN over each process's batch")
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (torch's SyncBatchNorm without its "
                                  "host sync; replaces --bn-splits; not with --compile). At scale, byol syncs BN "
                                  "(its paper); mocov2 shuffles the teacher's batch across ranks (shuffle-BN, always "
                                  "on); ressl, isd and resa use per-GPU BN, which split BN reproduces in one process")
    out: str = option("runs/fastssl", "run folder: checkpoint.pt (and the one before, checkpoint-prev.pt), "
                                      "backbone.pt, metrics.csv, tb/, knn.png, summary.json")
    resume: bool = option(False, "continue the run in --out from its checkpoint, with its settings; options given "
                                 "on the command line change those that may change (--epochs, --max-steps, "
                                 "--device, ...)")
    auto_resume: bool = option(False, "resume when --out holds a checkpoint, start afresh otherwise (for jobs "
                                      "that a cluster requeues with the same command)")
    device: str = option("auto", "auto | cpu | cuda")
    precision: str = option("auto", "auto | fp32 | bf16 (auto: bf16 autocast on CUDA and on CPUs with native bf16)")
    channels_last: bool = option(True, "channels_last memory format for the convolutions")
    compile: bool = option(False, "torch.compile the networks (slow first steps; pays off on GPUs)")
    workers: int | None = option(None, "data loading workers (DataLoader processes, DALI and FFCV threads) per "
                                       "process (default: the CPU cores / the processes on this machine)")
    seed: int = option(0, "random seed (model init, order and augmentations)")
    knn_every: int | None = option(None, "epochs between weighted-kNN monitors (0: only at the end; default: "
                                         "every epoch if the monitor reads at most a fifth of an epoch's images, "
                                         "else spaced to cost about 5% of the training time)")
    knn_k: int = option(KNN_K, "kNN neighbours")
    knn_t: float = option(KNN_T, "kNN temperature")
    knn_bank: int = option(100_000, "kNN bank: a fixed random subset of the train split of at most this many "
                                    "images (0: all)")
    knn_queries: int = option(0, "kNN queries: a fixed random subset of the evaluation split (0: all)")
    log_every: int = option(20, "steps between progress/CSV/TensorBoard updates (and the non-finite loss check)")
    checkpoint_every: int = option(0, "steps between mid-epoch checkpoints (0: at epoch ends and by time only)")
    checkpoint_minutes: float = option(30.0, "minutes between time-based checkpoints (0: off)")
    max_steps: int = option(0, "stop after this many steps (0: run every epoch)")
    train_subset: int = option(0, "train on a fixed random subset of this many images (0: all)")
    skip_bad_images: bool = option(False, "replace an unreadable image by another one and go on (counted and "
                                          "listed in bad_images.txt and the summary); default: stop, naming it")
    dist_timeout: float = option(10.0, "minutes a process waits for the others in a collective before it stops "
                                       "with an error (a dead or hung rank)")


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
    positive = ["epochs", "batch_size", "lr", "queue_size", "tau_s", "tau_t", "bn_splits", "log_every",
                "dist_timeout"]
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"{name}={value} must be positive")
    for name in ("workers", "knn_every", "knn_bank", "knn_queries", "checkpoint_every", "checkpoint_minutes",
                 "max_steps", "train_subset"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise UserError(f"{name}={value} must be 0 or more")
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


# Settings that define what a run trains: a resumed run must keep them (a one-line error names the one given).
FIXED_ON_RESUME = ("method", "arch", "data", "batch_size", "image_size", "crops", "proj_hidden", "proj_dim",
                   "proj_bn", "queue_size", "views", "bn_splits", "sync_bn", "seed", "train_subset", "tau_s",
                   "tau_t", "momentum", "encoder_ema")
# Settings of one command rather than of the run: a resumed run takes them from its own command line.
PER_COMMAND = ("max_steps", "device", "workers", "resume", "auto_resume", "out")


def resume_config(saved: dict, cfg: TrainConfig, given: dict) -> tuple[TrainConfig, list[str]]:
    """The resumed run's settings: the saved ones, this command's PER_COMMAND ones, and the options `given`
    explicitly for the others that may change; and a line per change. UserError for a change to a
    FIXED_ON_RESUME setting."""
    resumed = from_dict({**saved, **{name: getattr(cfg, name) for name in PER_COMMAND}})
    changes = []
    for name, value in given.items():
        old = getattr(resumed, name)
        if name in PER_COMMAND or value == old:
            continue
        if name in FIXED_ON_RESUME:
            raise UserError(f"cannot resume with {name}={value!r}: the run in {cfg.out} trained with {name}={old!r}, "
                            f"which a run keeps; drop the option, or start a new run with another --out")
        changes.append(f"{name} {old!r} -> {value!r}")
    return dataclasses.replace(resumed, **{k: v for k, v in given.items() if k not in PER_COMMAND}), changes


def explicit(cfg: TrainConfig) -> dict:
    """The settings of cfg that differ from the defaults: what a caller of train() 'gave'."""
    defaults = TrainConfig()
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
