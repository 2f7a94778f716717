"""`fastssl convert SRC --to ffcv`: a data set as an FFCV .beton (fields image and label) for --pipeline ffcv.

SRC is a named set (fashion-mnist, cifar10, cifar100), a folder holding one, an ImageFolder root with train/
and val/ (an ImageNet tree), or a folder of class folders. Files with an image extension are checked first,
in worker processes (opened and converted to RGB by PIL; JPEGs decoded at 1/8 scale, which still reads every
coefficient): the unreadable ones (corrupt, truncated, not an image at all) are left out, and so are files
without an image extension; both are counted and listed in the summary and in FILE.beton.json, which also
records the source, kind and classes that `fastssl.data.load` reads back. CMYK, grayscale, palette and alpha
images are stored as RGB (alpha dropped, as torchvision's RGB decoding does). The .beton is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastssl import data
from fastssl.data import ImageSet
from fastssl.errors import UserError

from .common import optional

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
SMART_RAW_PIXELS = 64 * 64  # write mode smart: raw pixels up to this size (small sets decode for free), JPEG above
LISTED = 10  # unreadable and skipped files printed in the summary; the JSON lists them all


@dataclass
class Report:
    out: Path
    images: int
    classes: int
    unreadable: list[tuple[str, str]]  # (file, why)
    skipped: list[str]  # files without an image extension
    seconds: float

    def summary(self) -> str:
        mib = self.out.stat().st_size / 2**20
        lines = [f"wrote {self.images} images of {self.classes} classes to {self.out} ({mib:.1f} MiB) "
                 f"in {self.seconds:.0f} s"]
        if self.unreadable:
            lines.append(f"left out {len(self.unreadable)} unreadable file(s):")
            lines += [f"  {file}: {why}" for file, why in self.unreadable[:LISTED]]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s) without an image extension:")
            lines += [f"  {file}" for file in self.skipped[:LISTED]]
        if len(self.unreadable) > LISTED or len(self.skipped) > LISTED:
            lines.append(f"  ... all of them are listed in {data.beton_info_path(self.out)}")
        return "\n".join(lines)


def source(src: str, split: str) -> tuple[ImageSet, Path | None]:
    """The split of SRC to convert and, for image folders, the folder of class folders it was listed from."""
    data_split = "train" if split == "train" else "test"
    path = Path(src).expanduser()
    if src.lower() in data.NAMED or not path.is_dir() or data.detect(path) != "imagefolder":
        return data.load(src, data_split), None
    if any((path / name).is_dir() for name in ("train", "val", "test")):
        folder = data.split_folder(path, data_split)
    else:  # a folder of class folders is converted whole, whatever the split
        folder = path
    return data.folder_set(folder, str(path), data_split), folder


def check(path: str) -> tuple[str | None, int]:
    """(why PIL cannot read the image, or None; its pixel count)."""
    try:
        with Image.open(path) as im:
            pixels = im.width * im.height
            if im.format == "JPEG":
                im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.convert("RGB")
        return None, pixels
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {e}", 0


class _Samples:
    """FFCV writer's indexable input: (RGB uint8 [H,W,3], label) of each readable image."""

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
    if max_resolution:
        largest_pixels = min(largest_pixels, max_resolution**2)
    return max(1 << 21, 1 << (6 * largest_pixels - 1).bit_length())  # FFCV's minimum: 2 MiB


def _check_options(out: Path, max_resolution: int, jpeg_quality: int, write_mode: str, compress_probability: float):
    if out.suffix != ".beton":
        raise UserError(f"--out {out} must end in .beton, which is how --data recognises it")
    if write_mode not in WRITE_MODES:
        raise UserError(f"unknown write mode {write_mode!r}; choose {' | '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100 or max_resolution < 0 or not 0 <= compress_probability <= 1:
        raise UserError(f"--jpeg-quality {jpeg_quality} must be in 1..100, --max-resolution {max_resolution} >= 0 "
                        f"(0: keep), --compress-probability {compress_probability} in [0, 1]")


def convert(src: str, out: str | Path | None = None, *, to: str = "ffcv", split: str = "train",
            max_resolution: int = 512, jpeg_quality: int = 90, write_mode: str = "smart",
            compress_probability: float = 0.5, workers: int = os.cpu_count() or 1, force: bool = False) -> Report:
    """Check and write the split of SRC to `out` (default SRC_SPLIT.beton); see the module's docstring."""
    if to != "ffcv":
        raise UserError(f"unknown output format {to!r}; --to ffcv is the one there is")
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}; choose train or val")
    out = Path(out or f"{Path(src).resolve().name if Path(src).exists() else src}_{split}.beton")
    _check_options(out, max_resolution, jpeg_quality, write_mode, compress_probability)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    start = time.perf_counter()
    images, folder = source(src, split)
    keep, unreadable, largest = None, [], None
    if not images.in_memory:
        with Pool(max(1, workers)) as pool:
            checks = list(tqdm(pool.imap(check, images.files, chunksize=16), total=len(images),
                               desc=f"checking {len(images)} images", unit="img"))
        keep = [i for i, (why, _) in enumerate(checks) if why is None]
        largest = max(pixels for _, pixels in checks)
        unreadable = [(file, why) for file, (why, _) in zip(images.files, checks) if why is not None]
        if not keep:
            raise UserError(f"no readable images in {src}: all {len(unreadable)} failed (e.g. {unreadable[0][0]}: "
                            f"{unreadable[0][1]})")
    listed = set(images.files or [])
    skipped = sorted(str(p) for c in images.classes for p in (folder / c).rglob("*")
                     if p.is_file() and str(p) not in listed) if folder else []
    info = {"source": str(src), "split": split, "unreadable": [{"file": f, "error": why} for f, why in unreadable],
            "skipped": skipped}
    count = write_beton(images, out, keep=keep, largest=largest, info=info, max_resolution=max_resolution,
                        jpeg_quality=jpeg_quality, write_mode=write_mode, compress_probability=compress_probability,
                        workers=workers)
    return Report(out, count, len(images.classes), unreadable, skipped, time.perf_counter() - start)


def write_beton(images: ImageSet, out: Path, *, keep: list[int] | None = None, largest: int | None = None,
                info: dict | None = None, max_resolution: int = 512, jpeg_quality: int = 90,
                write_mode: str = "smart", compress_probability: float = 0.5, workers: int = 1) -> int:
    """Write images[keep] (all by default) to `out` and its JSON (kind, classes, side, `info`); returns the count.

    `largest`: pixels of the largest image (needed for image files, to size FFCV's pages). Written under a
    temporary name and renamed when complete.
    """
    _check_options(out, max_resolution, jpeg_quality, write_mode, compress_probability)
    optional("ffcv", "ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    keep = list(range(len(images))) if keep is None else keep
    native = images.native_size
    largest = native**2 if native else largest
    side = native and min(native, max_resolution or native)
    info = {"kind": images.kind, "classes": images.classes, "images": len(keep), "side": side,
            "max_resolution": max_resolution, "write_mode": write_mode, "jpeg_quality": jpeg_quality, **(info or {})}
    field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution or None,
                          smart_threshold=3 * SMART_RAW_PIXELS, jpeg_quality=jpeg_quality,
                          compress_probability=compress_probability)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    info_tmp, info_path = tmp.with_name(tmp.name + ".json"), data.beton_info_path(out)
    try:
        writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()}, num_workers=max(1, workers),
                               page_size=_page_size(largest, max_resolution))
        writer.from_indexed_dataset(_Samples(images, keep))
        info_tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(info_tmp, info_path)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        info_tmp.unlink(missing_ok=True)
    return len(keep)
