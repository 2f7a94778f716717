"""FFCV .beton files (fields image and label), as `fastssl convert` writes them: `BetonSet` (a split stored in one),
reading one with the JSON written beside it (kind, classes, side, the files left out), and writing one.

Splits sit side by side: NAME_train.beton and NAME_val.beton (or NAME_test.beton). Unlabelled images are stored
with label -1. A .beton is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastssl.data import SMALL_IMAGE_MAX, ImageSet
from fastssl.errors import UserError
from fastssl.extras import optional

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
SMART_RAW_PIXELS = 64 * 64  # write mode smart: raw pixels up to this size (small sets decode for free), JPEG above


@dataclass
class BetonSet(ImageSet):
    """A split stored as an FFCV .beton: `root` is the file, `rows` each sample's row in it. Training reads it with
    --pipeline ffcv, evaluation with an FFCV centre-crop decoder."""

    rows: torch.Tensor | None = None
    side: int | None = None  # the stored images' side when all are small (<= 64 px); None: larger

    @property
    def native_size(self) -> int | None:
        return self.side

    @property
    def size_note(self) -> str:
        return ("the side stored in the .beton" if self.side else
                f"the default: the .beton stores images above {SMALL_IMAGE_MAX} px (or no side)")

    def read(self, i: int) -> torch.Tensor:
        raise UserError(f"{self.root} is an FFCV .beton: train on it with --pipeline ffcv")

    def take(self, idx: torch.Tensor) -> "BetonSet":
        return replace(super().take(idx), rows=self.rows[idx])


def is_beton(data: str | Path) -> bool:
    """Whether --data (or --data-val) names a .beton: by its suffix."""
    return Path(data).suffix == ".beton"


def info_path(beton: Path) -> Path:
    """The JSON written beside a .beton: source, kind, classes, side, the files left out."""
    return beton.with_name(beton.name + ".json")


def read_info(beton: Path) -> dict:
    """What the JSON beside `beton` records ({} when there is none)."""
    path = info_path(beton)
    return json.loads(path.read_text()) if path.is_file() else {}


def eval_path(beton: Path) -> tuple[Path | None, str]:
    """The evaluation split beside NAME_train.beton: NAME_val.beton, else NAME_test.beton; (None, why) if neither."""
    head, found, tail = beton.name.rpartition("train")
    if not found:
        return None, f"no evaluation split known for {beton} (not named NAME_train.beton)"
    candidates = [beton.with_name(f"{head}{name}{tail}") for name in ("val", "test")]
    path = next((c for c in candidates if c.is_file()), None)
    return path, "" if path else f"no {candidates[0].name} or {candidates[1].name} beside {beton}"


def load(beton: Path, split: str) -> BetonSet:
    """Split train (the file itself) or test (the one beside it, see eval_path) of NAME_train.beton."""
    path, why = (beton, "") if split == "train" else eval_path(beton)
    if path is None:
        raise UserError(f"{why}; name the files NAME_train.beton and NAME_val.beton, side by side "
                        f"(`fastssl convert SRC --split val --out NAME_val.beton`)")
    return read(path, split)


def read(path: Path, split: str) -> BetonSet:
    """The .beton at `path` as a BetonSet, with the kind, classes and side its JSON records."""
    try:
        reader = optional("ffcv.reader", "ffcv").Reader(str(path))
    except (AssertionError, ValueError, IndexError, OSError) as e:
        raise UserError(f"{path} is not a readable FFCV file ({e}); write it again with `fastssl convert`") from None
    if not {"image", "label"} <= set(reader.field_names):
        raise UserError(f"{path} has fields {reader.field_names}, not image and label; write it with `fastssl convert`")
    labels = torch.from_numpy(reader.metadata[f"f{reader.field_names.index('label')}"].astype(np.int64))
    info = read_info(path)
    classes = info.get("classes") or [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    return BetonSet(info.get("kind", "imagefolder"), str(path), split, classes, labels,
                    rows=torch.arange(len(labels)), side=info.get("side"))


def check_options(out: Path, max_resolution: int, jpeg_quality: int, write_mode: str, compress_probability: float):
    """A one-line error for a bad output name or write setting (checked before a long conversion starts)."""
    if out.suffix != ".beton":
        raise UserError(f"--out {out} must end in .beton, which is how --data recognises it")
    if write_mode not in WRITE_MODES:
        raise UserError(f"unknown write mode {write_mode!r}; choose {' | '.join(WRITE_MODES)}")
    if max_resolution < 1:
        raise UserError(f"--max-resolution {max_resolution}: a .beton needs a bound on its images' longest side (the "
                        f"FFCV loader's decode buffers hold the largest image for every sample of its batches in "
                        f"flight); pass the longest side to keep, e.g. 512 (the default)")
    if not 1 <= jpeg_quality <= 100 or not 0 <= compress_probability <= 1:
        raise UserError(f"--jpeg-quality {jpeg_quality} must be in 1..100, --compress-probability "
                        f"{compress_probability} in [0, 1]")


class _Samples:
    """FFCV writer's indexable input: (RGB uint8 [H,W,3], label) of each image kept."""

    def __init__(self, images: ImageSet, keep: list[int]):
        self.images, self.keep = images, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        j = self.keep[i]
        label = int(self.images.labels[j])
        if self.images.in_memory:
            return self.images.images[j].numpy(), label
        try:
            with Image.open(self.images.files[j]) as im:
                return np.asarray(im.convert("RGB")), label
        except Exception as e:  # read fine when checked; a raising worker would hang FFCV's writer
            print(f"warning: {self.images.files[j]} became unreadable ({e}); stored as a black image", file=sys.stderr)
            return np.zeros((8, 8, 3), np.uint8), label


def _page_size(largest_pixels: int, max_resolution: int) -> int:
    """FFCV page for the largest image: a power of two, twice its raw size (JPEG of noise can exceed raw)."""
    largest_pixels = min(largest_pixels, max_resolution**2)
    return max(1 << 21, 1 << (6 * largest_pixels - 1).bit_length())  # FFCV's minimum: 2 MiB


def write_beton(images: ImageSet, out: Path, *, keep: list[int] | None = None, largest: int | None = None,
                side: int | None = None, info: dict | None = None, max_resolution: int = 512, jpeg_quality: int = 90,
                write_mode: str = "smart", compress_probability: float = 0.5, workers: int = 1) -> int:
    """Write images[keep] (all by default) to `out` and its JSON (kind, classes, side, `info`); returns the count.

    For image files, `largest` (pixels of the largest image, to size FFCV's pages) and `side` (the longest side when
    no image exceeds 64 px, else None) are what `fastssl convert` saw checking them; sets held in memory have theirs.
    """
    check_options(out, max_resolution, jpeg_quality, write_mode, compress_probability)
    optional("ffcv", "ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    keep = list(range(len(images))) if keep is None else keep
    if images.in_memory:
        side = images.native_size
        largest = side**2
    side = side and min(side, max_resolution)
    info = {"kind": images.kind, "classes": images.classes, "images": len(keep), "side": side,
            "max_resolution": max_resolution, "write_mode": write_mode, "jpeg_quality": jpeg_quality, **(info or {})}
    field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                          smart_threshold=3 * SMART_RAW_PIXELS, jpeg_quality=jpeg_quality,
                          compress_probability=compress_probability)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    info_tmp = tmp.with_name(tmp.name + ".json")
    try:
        writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()}, num_workers=max(1, workers),
                               page_size=_page_size(largest, max_resolution))
        writer.from_indexed_dataset(_Samples(images, keep))
        info_tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(info_tmp, info_path(out))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        info_tmp.unlink(missing_ok=True)
    return len(keep)
