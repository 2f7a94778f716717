"""Data sets: named sets (Fashion-MNIST, CIFAR-10/100 held in memory; ImageNet found as a folder) and image folders;
image sizes and statistics; which image files are readable.

Every split is an `ImageSet`: labels (-1: unlabelled) plus either a uint8 [N,H,W,3] tensor (small sets, grayscale
expanded to RGB) or a list of image files decoded on demand. `--data` takes any of these layouts:

- a named set: fashion-mnist, cifar10, cifar100, imagenet (looked for in $FASTSSL_DATA, ./data, ~/data);
- an ImageFolder root: train/, and val/ or test/ (optional), each with one folder per class;
- a folder of class folders (no train/): the whole folder is the labelled train split;
- a folder of images (images in the folder itself, found at any depth below it): an unlabelled train split;
- NAME_train.beton, its evaluation split NAME_val.beton (or NAME_test.beton) beside it: FFCV files, which
  fastssl.pipelines reads (`pipelines.load_images`, `pipelines.eval_split`; everything else is read here).

Bad input raises `UserError` naming the path and what to do.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from .errors import UserError

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IN_MEMORY = ("fashion-mnist", "cifar10", "cifar100")
NAMED = (*IN_MEMORY, "imagenet")
FOLDERS = {"fashion-mnist": "fashion-mnist", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
           "imagenet": "imagenet"}  # each named set's folder under $FASTSSL_DATA, ./data, ~/data
SPLIT_DIRS = ("train", "val", "test")  # what makes a folder an ImageFolder root
PROBED = 64  # image files whose headers give a folder's native size
SMALL_IMAGE_MAX = 64  # the longest side of a small image (is_small)
MIN_SIDE = 8  # smaller images (tracking pixels, icons, thumbnails gone wrong) hold nothing a crop can learn from
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel mean/std of each named set's training images (Fashion-MNIST is gray, repeated on 3 channels).
STATS = {
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}


def is_small(size: int) -> bool:
    """Images up to 64 px get the CIFAR recipes: no blur, the 3x3 stride-1 stem without max-pool, the methods'
    small-image defaults. The one place that decides it."""
    return size <= SMALL_IMAGE_MAX


class UnreadableImage(UserError):
    """An image file PIL cannot decode; `path` names it (the torch pipeline replaces such samples). Built from the
    message alone too, as torch re-raises a DataLoader worker's exception."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


@dataclass
class ImageSet:
    """One split: `labels` [N] int64 and either `images` uint8 [N,H,W,3] or `files` (paths)."""

    kind: str  # a key of STATS
    root: str
    split: str
    classes: list[str]  # [] when unlabelled
    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[str] | None = None
    # files whose headers give native_size: drawn once from the whole split, so that its subsets keep its size
    sample: tuple[str, ...] = ()

    def __post_init__(self):
        if self.files is not None and not self.sample:
            self.sample = tuple(random.Random(0).sample(self.files, min(PROBED, len(self.files))))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def labelled(self) -> bool:
        """Every sample has a class (unlabelled sets carry -1)."""
        return len(self.labels) > 0 and bool((self.labels >= 0).all())

    @property
    def native_size(self) -> int | None:
        """The side to train at when the images are small (<= 64 px): the stored side of in-memory sets, the largest
        side of a sample of image files; None for larger images (the trainer then uses 224)."""
        return self.images.shape[1] if self.images is not None else probe_side(self.sample)

    @property
    def size_note(self) -> str:
        """Where native_size comes from, for the trainer's banner."""
        if self.images is not None:
            return "the images' own side"
        return (f"the largest side of {len(self.sample)} sampled images" if self.native_size else
                f"the default: sampled images exceed {SMALL_IMAGE_MAX} px")

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return STATS[self.kind]

    def read(self, i: int) -> torch.Tensor:
        """Image i as a uint8 [3,H,W] tensor."""
        if self.images is not None:
            return self.images[i].permute(2, 0, 1)
        path = self.files[i]
        try:  # PIL, as torchvision's ImageFolder reads (torchvision.io's decoders are deprecated)
            with Image.open(path) as img:
                return pil_to_tensor(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for unreadable files
            raise UnreadableImage(f"cannot decode image {path} ({str(e).splitlines()[0]}); remove or replace it "
                                  f"(`fastssl check {self.root}` lists every bad file)", path) from None

    def subset(self, n: int, seed: int = 0) -> "ImageSet":
        """A fixed random subset of n samples (all of them if n <= 0 or n >= len)."""
        if n <= 0 or n >= len(self):
            return self
        return self.take(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values)

    def take(self, idx: torch.Tensor) -> "ImageSet":
        """The samples at positions idx (int64 [n])."""
        return replace(self, labels=self.labels[idx], images=None if self.images is None else self.images[idx],
                       files=None if self.files is None else [self.files[i] for i in idx.tolist()])


@functools.lru_cache(maxsize=8)
def probe_side(files: tuple[str, ...]) -> int | None:
    """The longest side of `files` when none exceeds 64 px, else None. Reads the headers only (PIL decodes
    nothing until asked); a file it cannot open is left out of the count."""
    longest = 0
    for f in files:
        try:
            with Image.open(f) as im:
                longest = max(longest, *im.size)
        except (OSError, SyntaxError, ValueError):
            continue
        if not is_small(longest):
            return None
    return longest or None


def load(data: str, split: str = "train") -> ImageSet:
    """Split train or test of `data`: a named set or a folder (see the module's docstring). The test split of a
    folder is its val/ (else test/)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    name = data.lower()
    if name in IN_MEMORY:
        return _load_named(name, find_named(name), split)
    root = find_named(name) if name in NAMED else existing(data)
    kind = detect(root)
    if kind in IN_MEMORY:
        return _load_named(kind, root, split)
    return folder_set(split_folder(root, split), str(root), split)


def existing(data: str, option: str = "data path") -> Path:
    """`data` as a path to a directory or a .beton, or a one-line error naming it (`option`: what gave it)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"{option} {data} does not exist; pass an ImageFolder root (with train/ and val/), a folder "
                        f"of class folders or of images, a .beton, or one of: {', '.join(NAMED)}")
    if not root.is_dir() and root.suffix != ".beton":
        raise UserError(f"{option} {data} is a file; pass a directory, or a .beton written by `fastssl convert`")
    return root


def find_named(name: str) -> Path:
    """A named set's folder: the first of $FASTSSL_DATA/<folder>, ./data/<folder>, ~/data/<folder> that holds it
    (for Fashion-MNIST, Debian's dataset-fashion-mnist first)."""
    folder = FOLDERS[name]
    bases = [Path(os.environ["FASTSSL_DATA"])] if os.environ.get("FASTSSL_DATA") else []
    candidates = [base / folder for base in (*bases, Path("data"), Path.home() / "data")]
    if name == "fashion-mnist":
        candidates.insert(0, FASHION_MNIST_DEBIAN)
    for c in candidates:
        if c.is_dir() and (detect(c) == name if name in IN_MEMORY else (c / "train").is_dir()):
            return c
    hint = {"fashion-mnist": "`apt-get install dataset-fashion-mnist`, or pass its folder as --data",
            "imagenet": "put the ImageFolder tree (train/ and val/, one folder per class) in one of them, set "
                        "FASTSSL_DATA to the folder holding imagenet/, or pass the tree's folder as --data"
            }.get(name, f"pass the folder holding the python batches as --data (e.g. --data path/to/{folder})")
    raise UserError(f"{name} not found in {', '.join(str(c) for c in candidates)}; {hint}")


def detect(root: Path) -> str:
    """What a folder holds: one of IN_MEMORY (by its files), else "imagefolder"."""
    if not root.is_dir():  # existing() lets a .beton through for fastssl.pipelines, which reads it
        raise UserError(f"{root} is an FFCV .beton: read it with fastssl.pipelines.load_images (as the trainer does)")
    names = {p.name for p in root.iterdir()}
    if {"train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"} & names:
        return "fashion-mnist"
    if "data_batch_1" in names:
        return "cifar10"
    if {"train", "meta"} <= names and (root / "train").is_file():
        return "cifar100"
    return "imagefolder"


def _load_named(kind: str, root: Path, split: str) -> ImageSet:
    if kind == "fashion-mnist":
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(root, f"{prefix}-images-idx3-ubyte")  # [N,28,28]
        labels = _read_idx(root, f"{prefix}-labels-idx1-ubyte")
        images = np.repeat(images[..., None], 3, axis=-1)
        classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
    elif kind == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        batches = [_unpickle(root / f) for f in files]
        images = np.concatenate([b[b"data"] for b in batches])
        labels = np.concatenate([b[b"labels"] for b in batches])
        classes = [c.decode() for c in _unpickle(root / "batches.meta")[b"label_names"]]
    else:  # cifar100
        batch = _unpickle(root / split)
        images, labels = batch[b"data"], np.asarray(batch[b"fine_labels"])
        classes = [c.decode() for c in _unpickle(root / "meta")[b"fine_label_names"]]
    if kind != "fashion-mnist":  # rows are R plane, G plane, B plane of a 32x32 image
        images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ImageSet(kind, str(root), split, classes, torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                    images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)))


def _read_idx(root: Path, stem: str) -> np.ndarray:
    path = root / f"{stem}.gz" if (root / f"{stem}.gz").exists() else root / stem
    if not path.exists():
        raise UserError(f"missing {path}; a Fashion-MNIST folder needs the four IDX files (train-*, t10k-*)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"{path} is not a valid IDX file ({e}); re-download or reinstall it") from None


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"missing {path}; a CIFAR folder holds the python-version batches as distributed")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{path} is not a CIFAR python batch ({e}); re-extract the archive") from None


def check_image(path: str) -> tuple[str | None, tuple[int, int]]:
    """(why the image cannot be used, or None; its (width, height)). A why starts with the problem and ':':
    empty, unreadable, truncated, not RGB or too small.

    JPEGs are decoded at 1/8 scale (draft), up to three times faster, which still reads every coefficient: a
    file cut short anywhere, even by its last two bytes, fails as truncated (tests/test_convert.py checks it)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty: 0 bytes", (0, 0)
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            try:
                im.convert("RGB")
            except ValueError as e:
                return f"not RGB: {e}", size
    except UnidentifiedImageError:
        return "unreadable: PIL cannot identify it as an image", (0, 0)
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        kind = "truncated" if "truncated" in str(e).lower() else "unreadable"
        return f"{kind}: {type(e).__name__}: {' '.join(str(e).split())}", (0, 0)
    if min(size) < MIN_SIDE:
        return f"too small: {size[0]}x{size[1]} px (under {MIN_SIDE} px on a side)", size
    return None, size


def is_image_file(path: str | Path) -> bool:
    """Whether the file's extension is an image's (torchvision's list, any case)."""
    return str(path).lower().endswith(IMG_EXTENSIONS)


def files_under(folder: Path) -> list[str]:
    """Every file below `folder`, at any depth (through links, as ImageFolder lists), sorted."""
    return sorted(os.path.join(d, f) for d, _, names in os.walk(folder, followlinks=True) for f in names)


def has_splits(root: Path) -> bool:
    """Whether `root` is an ImageFolder root: it holds train/, val/ or test/."""
    return any((root / name).is_dir() for name in SPLIT_DIRS)


def _holds_images(folder: Path) -> bool:
    """Images in the folder itself (a folder of images) rather than only in subfolders (class folders)."""
    return any(p.is_file() and is_image_file(p) for p in folder.iterdir())


def split_folder(root: Path, split: str) -> Path:
    """The folder holding `split` of a directory: train/ (for test: val/, else test/) of an ImageFolder root; for
    train, a folder without them holding class folders or images is the split itself."""
    names = ("train",) if split == "train" else ("val", "test")
    sub = next((root / n for n in names if (root / n).is_dir()), None)
    if sub is not None:
        return sub
    if split == "train" and not has_splits(root) and any(p.is_dir() or is_image_file(p) for p in root.iterdir()):
        return root
    if split == "train":
        raise UserError(f"{root} has no train/ folder, class folders or images; pass an ImageFolder root (train/ "
                        f"and val/, one folder per class), a folder of class folders, or a folder of images")
    raise UserError(f"{root} has no val/ or test/ folder; an ImageFolder root holds train/ and val/, each with one "
                    f"folder per class")


def folder_set(folder: Path, root: str, split: str) -> ImageSet:
    """The images of a split's folder: labelled by sorted class name when they sit in class folders
    (folder/<class>/...); unlabelled (-1, no classes) when the folder itself holds images, then taken at any depth."""
    if _holds_images(folder):
        files = [f for f in files_under(folder) if is_image_file(f)]
        return ImageSet("imagefolder", root, split, [], torch.full((len(files),), -1), files=files)
    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError:
        raise UserError(f"{folder} has no class folders or images; put images in {folder}/<class>/... (labelled) "
                        f"or in {folder} itself (unlabelled)") from None
    if not samples:
        raise UserError(f"no images found under {folder} (looked for {', '.join(IMG_EXTENSIONS)})")
    files, labels = zip(*samples)
    return ImageSet("imagefolder", root, split, classes, torch.tensor(labels, dtype=torch.int64), files=list(files))


def eval_split(data: str, data_val: str = "") -> tuple[ImageSet | None, str]:
    """The labelled split that the kNN monitor and `fastssl eval` query: the one --data-val names, else the one
    beside --data; (None, why) when there is none or it has no labels ('--data-val none': no split). A --data-val
    that does not exist, or an unreadable file, is an error."""
    if data_val.lower() == "none":
        return None, "--data-val none"
    return labelled_split(*((_given_split(data_val), "") if data_val else _split_beside(data)))


def labelled_split(queries: ImageSet | None, why: str) -> tuple[ImageSet | None, str]:
    """An evaluation split found (or None, and why) as eval_split gives it: None when it has no labels."""
    if queries is not None and not queries.labelled:
        return None, f"no labels in the evaluation split of {queries.root}"
    return queries, why


def _given_split(data_val: str) -> ImageSet:
    """The split --data-val names: a named set's test split, an ImageFolder root's val/ (else test/), a folder of
    class folders (or images) whole."""
    if data_val.lower() in NAMED:
        return load(data_val, "test")
    root = existing(data_val, "--data-val")
    if detect(root) in IN_MEMORY:
        return load(data_val, "test")
    return folder_set(split_folder(root, "test") if has_splits(root) else root, str(root), "test")


def _split_beside(data: str) -> tuple[ImageSet | None, str]:
    """The evaluation split beside --data: a named set's test split, the val/ (else test/) folder of an ImageFolder
    root or beside a train/ folder passed itself."""
    name = data.lower()
    if name in IN_MEMORY:
        return load(data, "test"), ""
    root = find_named(name) if name in NAMED else existing(data)
    if detect(root) in IN_MEMORY:
        return load(data, "test"), ""
    base = root.parent if root.name == "train" and not has_splits(root) else root
    folder = next((base / n for n in ("val", "test") if (base / n).is_dir()), None)
    return (folder_set(folder, str(base), "test"), "") if folder else (None, f"no val/ or test/ folder in {base}")
