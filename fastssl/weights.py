"""Trained weights in and out. In: a fastssl training checkpoint (its settings say what it is), or plain weights of
an --arch (fastssl's backbone.pt, a torchvision or timm ResNet or ViT state_dict, .pt or .safetensors), as an
encoder ready to evaluate with the images it expects. Out: a checkpoint's encoder as a torchvision-named
state_dict, .pt or .safetensors.

Nothing is unpickled but tensors and plain containers (torch.load's weights_only, through `checkpoint.load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, methods, pipelines
from .config import TrainConfig, from_saved
from .data import ImageSet
from .device import pick_device, pick_precision
from .errors import UserError
from .evaluate import extract_features
from .models import build_backbone, convolutional
from .monitor import EVAL_BATCH
from .pipelines.common import Loader, Shard
from .views import weak

FORMATS = (".pt", ".safetensors")
NESTED = ("state_dict", "model")  # where training scripts (timm's, torchvision's references) keep the weights
WRAPPERS = ("backbone.", "encoder.")  # a whole model's state_dict: its backbone's keys carry one of these
CLASSIFIERS = ("fc.", "head.")  # torchvision's and timm's classifiers: an encoder has none


def read(path: str | Path) -> dict:
    """What a weights file holds: a .safetensors file's tensors, else torch.load's weights_only result."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return checkpoint.load(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # a truncated or foreign file: say which and why, once
        raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def is_run_checkpoint(saved) -> bool:
    return isinstance(saved, dict) and {"config", "method"} <= saved.keys()


def load_method(path: str | Path, saved: dict | None = None) -> tuple[TrainConfig, methods.base.Method]:
    """The run's settings and its method (on CPU) with the weights of a fastssl training checkpoint."""
    saved = read(path) if saved is None else saved
    if not is_run_checkpoint(saved):
        raise UserError(f"{path} is not a fastssl training checkpoint (no config and method); pass a run's "
                        f"checkpoint.pt or checkpoint-prev.pt")
    cfg, method = methods.build(from_saved(saved["config"]))  # BN groups only matter in training
    method.load_state_dict(saved["method"])
    return cfg, method


def backbone_tensors(saved: dict) -> dict[str, torch.Tensor]:
    """A plain state_dict's backbone tensors under the names build_backbone's modules have: out of a "state_dict" or
    "model" entry, without DDP's "module." and a whole model's "backbone."/"encoder." prefix, without classifier."""
    for key in NESTED:
        if isinstance(saved.get(key), dict):
            saved = saved[key]
    tensors = {k.removeprefix("module."): v for k, v in saved.items() if isinstance(v, torch.Tensor)}
    for prefix in WRAPPERS:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in tensors.items() if not k.startswith(CLASSIFIERS)}


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_backbone(net: nn.Module, tensors: dict[str, torch.Tensor], path: Path, arch: str, size: int) -> None:
    """`tensors` into `net`, or one line naming the first keys missing, unexpected or of another shape."""
    own = net.state_dict()
    # BatchNorm's batch counter is missing from older files, and nothing reads it in evaluation
    tensors = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **tensors}
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [f"{k} {list(tensors[k].shape)} (--arch {arch}: {list(own[k].shape)})" for k in own
              if k in tensors and tensors[k].shape != own[k].shape]
    problems = [f"{what} {_listed(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                             ("shape of", shapes)) if keys]
    if problems:
        raise UserError(f"{path} does not fit --arch {arch} at {size} px: {'; '.join(problems)}; pass the --arch the "
                        f"weights are (e.g. --arch r50) and their --image-size (e.g. --image-size 224: up to 64 px a "
                        f"ResNet has the 3x3 stem, a ViT 4 px patches)")
    net.load_state_dict(tensors)


@dataclass
class FrozenEncoder:
    """An encoder to evaluate, in eval mode on its device, and the images it expects."""

    encoder: nn.Module
    images: ImageSet  # the train split of `data`
    data: str  # what to evaluate on: --data, else the run's
    image_size: int
    channels_last: bool
    pipeline: str  # whose readers decode the images
    device: torch.device
    precision: str
    workers: int
    step: int = 0  # a training checkpoint's
    run_dir: Path | None = None  # the run folder of a checkpoint evaluated on its own data: results go in its logs

    def features(self, images: ImageSet) -> torch.Tensor:
        """Pooled features [N,D] of the evaluation view (the centre crop) of every image, in order."""
        batches = pipelines.eval_reader(self.pipeline, images, self.image_size, batch_size=EVAL_BATCH,
                                        workers=self.workers)
        return extract_features(self.encoder, batches, self.images.mean_std, self.device, precision=self.precision,
                                channels_last=self.channels_last)

    def augmented(self, images: ImageSet, batch_size: int, seed: int) -> Loader:
        """A loader of random resized crops (torchvision's default scale, 0.08 to 1, as MoCo's linear evaluation)
        with flips of `images`, {"weak": views, "label": labels}, new crops every epoch."""
        spec = weak(self.image_size, crop_scale=(0.08, 1.0), mean=self.images.mean_std[0],
                    std=self.images.mean_std[1])
        return pipelines.build(self.pipeline, images, {"weak": spec}, Shard(0, 1, seed, batch_size), self.device,
                               workers=self.workers, channels_last=self.channels_last)


def load(path: str | Path, *, arch: str | None = None, data: str | None = None, image_size: int | None = None,
         pipeline: str | None = None, device: str = "auto", precision: str = "auto", workers: int = 2
         ) -> FrozenEncoder:
    """The encoder in `path`: a training checkpoint's evaluated encoder (its running average with --encoder-ema) with
    the run's settings, or plain weights of `arch` (required then, as `data`). The image size: `image_size`, else
    the run's, else the data's (its own side up to 64 px, else 224)."""
    path = Path(path)
    saved = read(path)
    found = (_run_encoder if is_run_checkpoint(saved) else _plain_encoder)(path, saved, arch, data, image_size,
                                                                            pipeline)
    pipelines.check(found["pipeline"], found["images"])
    dev = pick_device(device)
    found["encoder"] = found["encoder"].eval().to(dev)
    return FrozenEncoder(**found, device=dev, precision=pick_precision(precision, dev), workers=workers)


def _run_encoder(path: Path, saved: dict, arch, data, image_size, pipeline) -> dict:
    """A training checkpoint's evaluated encoder and the run's settings (FrozenEncoder's fields but the device's);
    the checkpoint knows its arch."""
    cfg, method = load_method(path, saved)
    in_run = any((path.parent / name).is_file() for name in ("metrics.csv", "config.json"))
    return dict(encoder=method.evaluated_encoder(), images=pipelines.load_images(data or cfg.data, "train"),
                data=data or cfg.data, image_size=image_size or cfg.image_size, channels_last=cfg.channels_last,
                pipeline=pipeline or cfg.pipeline, step=saved.get("step", 0),
                run_dir=path.parent if in_run and data in (None, cfg.data) else None)


def _plain_encoder(path: Path, saved: dict, arch, data, image_size, pipeline) -> dict:
    """Plain weights in a fresh backbone of `arch` at the image size (FrozenEncoder's fields but the device's)."""
    if not arch or not data:
        raise UserError(f"{path} holds plain weights, not a fastssl run's checkpoint: pass --arch (what they are, "
                        f"e.g. r18, r50, vit-s16) and --data (the images to evaluate)")
    images = pipelines.load_images(data, "train")
    size = image_size or images.native_size or 224
    encoder = build_backbone(arch, size)
    load_backbone(encoder, backbone_tensors(saved), path, arch, size)
    return dict(encoder=encoder, images=images, data=data, image_size=size, channels_last=convolutional(encoder),
                pipeline=pipeline or "torch")


def save(tensors: dict[str, torch.Tensor], to: Path) -> None:
    """A state_dict as `to`, written whole or not at all: .pt by torch.save, .safetensors by safetensors."""
    if to.suffix == ".pt":
        checkpoint.atomic_save(tensors, to)
        return
    from safetensors.torch import save
    tensors = {k: v.contiguous() for k, v in tensors.items()}  # channels_last weights are not contiguous
    checkpoint.atomic_save(tensors, to, write=lambda t, f: f.write(save(t)))


def export(path: Path, to: Path, encoder_ema: bool = False) -> tuple[TrainConfig, int]:
    """The encoder of a checkpoint (the method's encoder(), or with `encoder_ema` its running average) as a
    torchvision-named state_dict in `to`; returns the run's settings and the number of tensors."""
    if to.suffix not in FORMATS:
        raise UserError(f"--to {to}: name a .pt (a torch state_dict) or a .safetensors file")
    cfg, method = load_method(path)
    if encoder_ema and method.encoder_average is None:
        raise UserError(f"{path} holds no running average of the encoder (its run trained without --encoder-ema); "
                        f"export without --encoder-ema")
    tensors = checkpoint.backbone_state_dict(method.encoder_average.module if encoder_ema else method.encoder())
    to.parent.mkdir(parents=True, exist_ok=True)
    save(tensors, to)
    return cfg, len(tensors)
