"""`fastssl convert SRC --to ffcv`: a data set as an FFCV .beton (fields image and label) for --pipeline ffcv, and
`fastssl check DATA`: the image files of a folder that convert would leave out.

SRC is a named set (fashion-mnist, cifar10, cifar100, imagenet), a folder holding one, an ImageFolder root with
train/ and val/, a folder of class folders, or a folder of images (unlabelled: stored with label -1). Image files
are checked first, in worker processes, by `fastssl.data.check_image`, the rule both commands share: empty,
unreadable (corrupt, not an image at all), truncated, not convertible to RGB, or smaller than 8 px on a side. Bad
files are left out, and so are files without an image extension; both are counted and listed in the summary and in
FILE.beton.json, which also records the source, kind, classes and side that `fastssl.pipelines.load_images` reads
back. CMYK, grayscale, palette and alpha images are stored as RGB (alpha dropped, as torchvision's RGB decoding
does).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from fastssl import data
from fastssl.data import ImageSet, check_image
from fastssl.errors import UserError

from .beton import check_options, info_path, is_beton, write_beton

LISTED = 10  # bad and skipped files printed in convert's summary; the JSON lists them all
NOT_IMAGE = "not an image: no image extension"
# how a why starts: check_image's problems, then a file without an image extension
PROBLEMS = ("unreadable", "truncated", "empty", "not RGB", "too small", "not an image")


def _check_all(files: list[str], workers: int) -> list[tuple[str | None, tuple[int, int]]]:
    with Pool(max(1, workers)) as pool:
        return list(tqdm(pool.imap(check_image, files, chunksize=16), total=len(files),
                         desc=f"checking {len(files)} images", unit="img"))


@dataclass
class Report:
    out: Path
    images: int
    classes: int  # 0: unlabelled
    bad: list[tuple[str, str]]  # (file, why)
    skipped: list[str]  # files without an image extension
    seconds: float

    def summary(self) -> str:
        mib = self.out.stat().st_size / 2**20
        what = f"{self.images} images of {self.classes} classes" if self.classes else f"{self.images} images"
        lines = [f"wrote {what} to {self.out} ({mib:.1f} MiB) in {self.seconds:.0f} s"]
        if not self.classes:
            lines.append(f"unlabelled: {self.images} images, labels stored as -1")
        if self.bad:
            lines.append(f"left out {len(self.bad)} bad file(s):")
            lines += [f"  {file}: {why}" for file, why in self.bad[:LISTED]]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s) without an image extension:")
            lines += [f"  {file}" for file in self.skipped[:LISTED]]
        if len(self.bad) > LISTED or len(self.skipped) > LISTED:
            lines.append(f"  ... all of them are listed in {info_path(self.out)}")
        return "\n".join(lines)


def source(src: str, split: str) -> tuple[ImageSet, Path | None]:
    """The split of SRC to convert and, for image folders, the folder it was listed from."""
    data_split = "train" if split == "train" else "test"
    name = src.lower()
    root = data.find_named(name) if name == "imagenet" else Path(src).expanduser()
    if is_beton(root):
        raise UserError(f"{src} is already an FFCV .beton; convert the folder or named set it was written from")
    if name in data.IN_MEMORY or not root.is_dir() or data.detect(root) != "imagefolder":
        return data.load(src, data_split), None
    # a folder without train/ and val/ is converted whole, whatever the split
    folder = data.split_folder(root, data_split if data.has_splits(root) else "train")
    return data.folder_set(folder, str(root), data_split), folder


def convert(src: str, out: str | Path | None = None, *, to: str = "ffcv", split: str = "train",
            max_resolution: int = 512, jpeg_quality: int = 90, write_mode: str = "smart",
            compress_probability: float = 0.5, workers: int = os.cpu_count() or 1, force: bool = False) -> Report:
    """Check and write the split of SRC to `out` (default SRC_SPLIT.beton); see the module's docstring."""
    if to != "ffcv":
        raise UserError(f"unknown output format {to!r}; --to ffcv is the one there is")
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}; choose train or val")
    out = Path(out or f"{Path(src).resolve().name if Path(src).exists() else src}_{split}.beton")
    check_options(out, max_resolution, jpeg_quality, write_mode, compress_probability)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    start = time.perf_counter()
    images, folder = source(src, split)
    keep, bad, largest, side = None, [], None, None
    if not images.in_memory:
        checks = _check_all(images.files, workers)
        keep = [i for i, (why, _) in enumerate(checks) if why is None]
        bad = [(file, why) for file, (why, _) in zip(images.files, checks) if why is not None]
        if not keep:
            raise UserError(f"no usable images in {src}: all {len(bad)} are bad (e.g. {bad[0][0]}: {bad[0][1]})")
        sizes = [checks[i][1] for i in keep]
        largest = max(w * h for w, h in sizes)
        longest = max(max(size) for size in sizes)
        side = longest if data.is_small(longest) else None
    skipped = []
    if folder:  # what the listing passed over: files without an image extension where the images are
        where = [folder / c for c in images.classes] if images.classes else [folder]
        skipped = [f for d in where for f in data.files_under(d) if not data.is_image_file(f)]
    info = {"source": str(src), "split": split, "bad": [{"file": f, "error": why} for f, why in bad],
            "skipped": skipped}
    count = write_beton(images, out, keep=keep, largest=largest, side=side, info=info, max_resolution=max_resolution,
                        jpeg_quality=jpeg_quality, write_mode=write_mode, compress_probability=compress_probability,
                        workers=workers)
    return Report(out, count, len(images.classes), bad, skipped, time.perf_counter() - start)


@dataclass
class CheckReport:
    root: Path
    files: int
    bad: list[tuple[str, str]]  # (file, why), sorted by file
    seconds: float

    def summary(self) -> str:
        """Every bad file on its own line, then the counts."""
        if not self.bad:
            return f"checked {self.files} files under {self.root} in {self.seconds:.0f} s: all usable"
        counts = Counter(why.split(":")[0] for _, why in self.bad)
        lines = [f"{file}: {why}" for file, why in self.bad]
        lines.append(f"checked {self.files} files under {self.root} in {self.seconds:.0f} s: {len(self.bad)} bad ("
                     f"{', '.join(f'{counts[p]} {p}' for p in PROBLEMS if counts[p])})")
        return "\n".join(lines)


def check_tree(src: str, workers: int = os.cpu_count() or 1) -> CheckReport:
    """`fastssl check`: every file under a folder (or the imagenet tree), by check_image's rules; files without
    an image extension count as bad too."""
    start = time.perf_counter()
    root = data.find_named("imagenet") if src.lower() == "imagenet" else Path(src).expanduser()
    if not root.is_dir():
        raise UserError(f"{src} is not a folder; `fastssl check` scans a folder of images in any layout (an "
                        f"ImageFolder root, class folders, images)")
    if data.detect(root) in data.IN_MEMORY:
        raise UserError(f"{root} holds {data.detect(root)} as arrays, not image files: nothing to check")
    files = data.files_under(root)
    images = [f for f in files if data.is_image_file(f)]
    whys = {f: why for f, (why, _) in zip(images, _check_all(images, workers))}
    bad = [(f, whys.get(f, NOT_IMAGE)) for f in files if whys.get(f, NOT_IMAGE)]
    return CheckReport(root, len(files), bad, time.perf_counter() - start)
