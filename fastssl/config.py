"""Run settings: `TrainConfig` (the run's) and the method's own options, filled from defaults, a YAML/TOML file,
then the command line. Files, the command line and checkpoints hold them flat, side by side (`queue_size: 4096`
beside `epochs: 200`); `settings` sorts them into a TrainConfig whose `options` the method's Options check.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from . import methods
from .errors import UserError
from .loggers import parse_kinds
from .optim import OPTIMIZERS
from .options import check_ranges, check_types, option

KNN_K, KNN_T = 200, 0.1  # the standard weighted kNN monitor (InstDisc): 200 neighbours, temperature 0.1


@dataclass
class TrainConfig:
    """The run's settings, one meaning each whatever the method; the method's own options (its recipe: schedule,
    temperatures, queue, heads) sit in `options`, by name, as given (a built run holds all of them)."""

    method: str = option("ressl", "self-supervised method (its own options below name it)", fixed=True)
    arch: str = option("resnet18", "backbone: resnet18 | resnet34 | resnet50 (or r18 | r34 | r50), narrowed as "
                                   "resnet18-w16 (base width 16, not 64); inputs of at most 64 px get the 3x3 "
                                   "stride-1 stem without max-pool | vit-t16 | vit-s16 | vit-b16 (timm's ViT-Tiny/"
                                   "Small/Base: 16 px patches, 4 px on images of at most 64 px) | timm:NAME (any "
                                   "timm model)", fixed=True)
    drop_path: float = option(0.0, "stochastic depth rate of a ViT or timm backbone (DINO's ViT default: 0.1)",
                              check="fraction", fixed=True)
    data: str = option("fashion-mnist", "fashion-mnist | cifar10 | cifar100 | imagenet, or a path: an ImageFolder "
                                        "root (train/ and optional val/), a folder of images (labels unused), a "
                                        "folder holding a named set, or a .beton from `fastssl convert`", fixed=True)
    data_val: str = option("", "the evaluation split (kNN monitor queries) when not beside --data (val/ or test/, "
                               "NAME_val.beton, a named set's test split); 'none': no monitor")
    pipeline: str = option("torch", "data pipeline making the views: torch (torchvision workers) | tensor (small "
                                    "sets on the device) | dali (folders and named sets) | ffcv (a .beton) | nvjpeg "
                                    "(folders: JPEGs decoded on the GPU by torchvision, no extra package)")
    image_size: int | None = option(None, "training view side in pixels (default: from the data: a named set's "
                                          "size, the images' own side up to 64 px, else 224)", fixed=True)
    epochs: int = option(100, "training epochs", check="positive")
    batch_size: int = option(256, "global batch size (split across processes under torchrun)", check="positive",
                             fixed=True)
    optimizer: str = option("sgd", "sgd (momentum 0.9, the ResNet recipes) | lars (timm's; BYOL at large batches) | "
                                   "adamw (ReSA's ViT row); lars and adamw exempt biases and norms from weight decay; "
                                   "the methods' built-in lr and weight decay are SGD's: a recipe file sets them",
                            fixed=True)
    encoder_ema: float = option(0.0, "evaluate and export a running average of the encoder's weights and BN "
                                     "statistics, updated every step with this decay (e.g. 0.997); 0: the encoder",
                                fixed=True)
    view_changes: str = option("", "changes to the method's view recipe: space-separated ROLE.FIELD=VALUE, e.g. "
                                   "'weak.crop_scale=1,1' (the teacher sees whole images); roles: the method's "
                                   "views (ressl: weak, strong), fields: those of fastssl.views.ViewSpec", fixed=True)
    bn_splits: int = option(8, "BatchNorm statistics in this many groups of the global batch, as that many GPUs "
                               "with per-GPU BN compute them (split BN); each process takes bn_splits/processes "
                               "groups (at least 1: per-process BN); 1: BN over each process's batch",
                            check="positive", fixed=True)
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (torch's SyncBatchNorm without its "
                                  "host sync; replaces --bn-splits; not with --compile). At scale, byol syncs BN "
                                  "(its paper); mocov2 shuffles the teacher's batch across ranks (shuffle-BN, always "
                                  "on); ressl, isd and resa use per-GPU BN, which split BN reproduces in one process",
                            fixed=True)
    out: str = option("runs/fastssl", "run folder: checkpoint.pt (and the one before, checkpoint-prev.pt), "
                                      "backbone.pt, metrics.csv, tb/, knn.png, summary.json", per_command=True)
    resume: bool = option(False, "continue the run in --out from its checkpoint, with its settings; options given "
                                 "on the command line change those that may change (--epochs, --max-steps, "
                                 "--device, ...)", per_command=True)
    auto_resume: bool = option(False, "resume when --out holds a checkpoint, start afresh otherwise (for jobs "
                                      "that a cluster requeues with the same command)", per_command=True)
    device: str = option("auto", "auto | cpu | cuda", per_command=True)
    precision: str = option("auto", "auto | fp32 | bf16 (auto: bf16 autocast on CUDA and on CPUs with native bf16)")
    channels_last: bool = option(True, "channels_last memory format for the convolutions")
    compile: bool = option(False, "torch.compile the networks (slow first steps; pays off on GPUs)")
    workers: int | None = option(None, "data loading workers (DataLoader processes, DALI and FFCV threads) per "
                                       "process (default: the CPU cores / the processes on this machine)",
                                check="non-negative", per_command=True)
    seed: int = option(0, "random seed (model init, order and augmentations)", fixed=True)
    knn_every: int | None = option(None, "epochs between weighted-kNN monitors (0: only at the end; default: "
                                         "every epoch if the monitor reads at most a fifth of an epoch's images, "
                                         "else spaced to cost about 5% of the training time)", check="non-negative")
    knn_k: int = option(KNN_K, "kNN neighbours")
    knn_t: float = option(KNN_T, "kNN temperature")
    knn_bank: int = option(100_000, "kNN bank: a fixed random subset of the train split of at most this many "
                                    "images (0: all)", check="non-negative")
    knn_queries: int = option(0, "kNN queries: a fixed random subset of the evaluation split (0: all)",
                              check="non-negative")
    online_probe: bool = option(False, "train a linear classifier beside pretraining on the student's detached "
                                       "features of its first view (solo-learn's online probe; labelled data): its "
                                       "training top-1 per epoch, its top-1 on the kNN queries at each kNN pass")
    log_every: int = option(20, "steps between progress/CSV/TensorBoard updates (and the non-finite loss check)",
                            check="positive")
    # no brackets in help text: the CLI's rich markup would eat `fastssl[wandb]`
    logger: str = option("tensorboard,csv", "where metrics go, comma-separated: tensorboard, csv, wandb (the wandb "
                                            "extra: pip install wandb; WANDB_MODE=offline works without a network), "
                                            "mlflow (the mlflow extra: pip install mlflow-skinny; a local folder "
                                            "OUT/mlruns unless MLFLOW_TRACKING_URI is set)")
    checkpoint_every: int = option(0, "steps between mid-epoch checkpoints (0: at epoch ends and by time only)",
                                   check="non-negative")
    checkpoint_minutes: float = option(30.0, "minutes between time-based checkpoints (0: off)", check="non-negative")
    max_steps: int = option(0, "stop after this many steps (0: run every epoch)", check="non-negative",
                            per_command=True)
    train_subset: int = option(0, "train on a fixed random subset of this many images (0: all)", check="non-negative",
                               fixed=True)
    skip_bad_images: bool = option(False, "replace an unreadable image by another one and go on (counted and "
                                          "listed in bad_images.txt and the summary); default: stop, naming it")
    dist_timeout: float = option(10.0, "minutes a process waits for the others in a collective before it stops "
                                       "with an error (a dead or hung rank)", check="positive")
    options: dict = field(default_factory=dict)


FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "options"}


def known_names() -> set[str]:
    """Every setting a file or the command line may give: the run's and every method's options."""
    return {*FIELDS, *(name for cls in methods.METHODS.values() for name in cls.Options.names())}


def load_file(path: str) -> dict:
    """Settings from a YAML or TOML file, flat, keys as on the command line (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else yaml.safe_load(p.read_text())
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
    out, known = {}, known_names()
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"unknown setting {key!r} in {path}; valid keys: {', '.join(sorted(known))}")
        out[name] = value
    return out


def settings(**values) -> TrainConfig:
    """A TrainConfig from flat settings, as files and the command line give them: the run's fields, and the
    method's options (checked against the method when the run is set up: a resumed run's method is the saved one)."""
    unknown = values.keys() - known_names()
    if unknown:
        raise UserError(f"unknown setting {sorted(unknown)[0]!r}; valid settings: {', '.join(sorted(known_names()))}")
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in FIELDS},
                      options={k: v for k, v in values.items() if k not in FIELDS})
    check_types(cfg)
    return cfg


def merge(file_values: dict, cli_values: dict) -> TrainConfig:
    """Defaults < config file < command line (only options given explicitly count as command line)."""
    return settings(**{**file_values, **cli_values})


def check(cfg: TrainConfig) -> None:
    """The run's settings within their ranges, and options its method has, of their types (the method's Options
    check their ranges when built)."""
    check_ranges(cfg)
    methods.get(cfg.method).Options.check_given(cfg.options)
    if not 0 <= cfg.encoder_ema < 1:
        raise UserError(f"encoder_ema={cfg.encoder_ema} must be in [0, 1) (0 turns the average off)")
    for name, choices in (("device", ("auto", "cpu", "cuda")), ("precision", ("auto", "fp32", "bf16")),
                          ("optimizer", OPTIMIZERS)):
        if getattr(cfg, name) not in choices:
            raise UserError(f"unknown {name} {getattr(cfg, name)!r}; choose {' | '.join(choices)}")
    parse_kinds(cfg.logger)


def to_dict(cfg: TrainConfig) -> dict:
    """Flat, as files give settings: what config.json and checkpoints hold."""
    return {**{name: getattr(cfg, name) for name in FIELDS}, **cfg.options}


def from_saved(saved: dict) -> TrainConfig:
    """The settings of a checkpoint. fastssl 0.2 saved every method's options in every run (None, or crops 1 and
    proj_bn false, where the method had no such option): those its method does not have are dropped; its `views`
    is view_changes."""
    own = methods.get(saved["method"]).Options.names()
    renamed = {"view_changes": saved["views"]} if "views" in saved else {}  # 0.2's name
    return settings(**{k: v for k, v in {**saved, **renamed}.items() if k in FIELDS or k in own})


def fixed_on_resume(method: str) -> set[str]:
    """Settings that define what a run trains: a resumed run must keep them (a one-line error names the one given)."""
    return {n for n, f in FIELDS.items() if f.metadata["fixed"]} | methods.get(method).Options.fixed()


PER_COMMAND = {n for n, f in FIELDS.items() if f.metadata["per_command"]}


def resume_config(saved: dict, cfg: TrainConfig, given: dict) -> tuple[TrainConfig, list[str]]:
    """The resumed run's settings: the saved ones, this command's PER_COMMAND ones, and the settings `given`
    explicitly (flat) for the others that may change; and a line per change. UserError for a change to a
    setting fixed on resume."""
    resumed = {**to_dict(from_saved(saved)), **{name: getattr(cfg, name) for name in PER_COMMAND}}
    changes, fixed = [], fixed_on_resume(resumed["method"])
    for name, value in given.items():
        old = resumed.get(name)
        if name in PER_COMMAND or value == old:
            continue
        if name in fixed:
            raise UserError(f"cannot resume with {name}={value!r}: the run in {cfg.out} trained with {name}={old!r}, "
                            f"which a run keeps; drop the option, or start a new run with another --out")
        changes.append(f"{name} {old!r} -> {value!r}")
    return settings(**{**resumed, **{k: v for k, v in given.items() if k not in PER_COMMAND}}), changes


def explicit(cfg: TrainConfig) -> dict:
    """The settings of cfg that differ from the defaults, flat: what a caller of train() 'gave'."""
    defaults = TrainConfig()
    return {**{n: getattr(cfg, n) for n in FIELDS if getattr(cfg, n) != getattr(defaults, n)}, **cfg.options}
