"""Data sets: named small sets held in memory (Fashion-MNIST, CIFAR-10/100) and ImageFolder trees.

Every split is an `ImageSet`: labels plus either a uint8 [N,H,W,3] tensor (small sets, grayscale
expanded to RGB) or a list of image files decoded on demand; a `BetonSet` is a split stored as an FFCV
.beton by `fastssl convert`. Bad input raises `UserError` naming the path and what to do.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from .errors import UserError
from .views import IMAGENET_MEAN, IMAGENET_STD

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
NAMED = ("fashion-mnist", "cifar10", "cifar100")
# Per-channel mean/std of each named set's training images (Fashion-MNIST is gray, repeated on 3 channels).
STATS = {
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}


@dataclass
class ImageSet:
    """One split: `labels` [N] int64 and either `images` uint8 [N,H,W,3] or `files` (paths)."""

    kind: str  # a key of STATS
    root: str
    split: str
    classes: list[str]
    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[str] | None = None

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
        """Side of the stored images for in-memory sets; None for files (sizes vary)."""
        return self.images.shape[1] if self.images is not None else None

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
            raise UserError(f"cannot decode image {path} ({str(e).splitlines()[0]}); remove or replace it, "
                            f"or convert the set with `fastssl convert`, which skips and lists bad files") from None

    def subset(self, n: int, seed: int = 0) -> "ImageSet":
        """A fixed random subset of n samples (all of them if n <= 0 or n >= len)."""
        if n <= 0 or n >= len(self):
            return self
        return self.take(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values)

    def take(self, idx: torch.Tensor) -> "ImageSet":
        """The samples at positions idx (int64 [n])."""
        return replace(self, labels=self.labels[idx], images=None if self.images is None else self.images[idx],
                       files=None if self.files is None else [self.files[i] for i in idx.tolist()])


@dataclass
class BetonSet(ImageSet):
    """A split stored as an FFCV .beton (`fastssl convert`): `root` is the file, `rows` each sample's row in it.
    Training reads it with --pipeline ffcv, evaluation with an FFCV centre-crop decoder."""

    rows: torch.Tensor | None = None
    side: int | None = None  # the stored side of a set converted from a named set (None: sizes vary)

    @property
    def native_size(self) -> int | None:
        return self.side

    def read(self, i: int) -> torch.Tensor:
        raise UserError(f"{self.root} is an FFCV .beton: train on it with --pipeline ffcv")

    def take(self, idx: torch.Tensor) -> "BetonSet":
        return replace(super().take(idx), rows=self.rows[idx])


def load(data: str, split: str = "train") -> ImageSet:
    """`data` is a named set (fashion-mnist, cifar10, cifar100) or a directory; split is train or test.

    A directory may hold Fashion-MNIST IDX files, CIFAR python batches, or an ImageFolder tree with
    train/ and val/ (or test/) class-per-folder subdirectories. A .beton file is the train split; its test
    split is the file of the same name with val (or test) in place of train, beside it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    name = data.lower()
    if name in NAMED:
        return _load_named(name, _find_named(name), split)
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"data path {data} does not exist; pass an ImageFolder root (with train/ and val/) "
                        f"or one of: {', '.join(NAMED)}")
    if root.suffix == ".beton":
        return _load_beton(root, split)
    if not root.is_dir():
        raise UserError(f"data path {data} is a file; pass a directory, or a .beton written by `fastssl convert`")
    kind = detect(root)
    return _load_named(kind, root, split) if kind in NAMED else _load_folder(root, split)


def _find_named(name: str) -> Path:
    folder = {"fashion-mnist": "fashion-mnist", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    candidates = [Path(os.environ.get("FASTSSL_DATA", "data")) / folder, Path("data") / folder,
                  Path.home() / "data" / folder]
    if name == "fashion-mnist":
        candidates.insert(0, FASHION_MNIST_DEBIAN)
    for c in candidates:
        if c.is_dir() and detect(c) == name:
            return c
    hint = ("`apt-get install dataset-fashion-mnist`, or pass its folder as --data" if name == "fashion-mnist"
            else f"pass the folder holding the python batches as --data (e.g. --data path/to/{folder})")
    raise UserError(f"{name} not found in {', '.join(str(c) for c in candidates)}; {hint}")


def detect(root: Path) -> str:
    """What a folder holds: one of NAMED (by its files), else "imagefolder"."""
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


def _load_folder(root: Path, split: str) -> ImageSet:
    return folder_set(split_folder(root, split), str(root), split)


def split_folder(root: Path, split: str) -> Path:
    """An ImageFolder root's folder of class folders for split: train/, or val/ (else test/) for test."""
    names = ("train",) if split == "train" else ("val", "test")
    sub = next((root / n for n in names if (root / n).is_dir()), None)
    if sub is None:
        raise UserError(f"{root} has no {' or '.join(n + '/' for n in names)} folder; an ImageFolder root holds "
                        f"train/ and val/, each with one folder per class")
    return sub


def folder_set(folder: Path, root: str, split: str) -> ImageSet:
    """The images in folder/<class>/... (files with an image extension), labelled by sorted class name."""
    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError:
        raise UserError(f"{folder} has no class folders; put images in {folder}/<class>/...") from None
    if not samples:
        raise UserError(f"no images found under {folder} (looked for {', '.join(IMG_EXTENSIONS)})")
    files, labels = zip(*samples)
    return ImageSet("imagefolder", root, split, classes, torch.tensor(labels, dtype=torch.int64), files=list(files))


def beton_info_path(beton: Path) -> Path:
    """The JSON written beside a .beton by `fastssl convert`: source, kind, classes, bad and skipped files."""
    return beton.with_name(beton.name + ".json")


def _beton_split(beton: Path, split: str) -> Path:
    """The file holding `split`: the given one for train; for test, its name with val (or test) for train."""
    if split == "train":
        return beton
    head, found, tail = beton.name.rpartition("train")
    if not found:
        raise UserError(f"cannot tell where the test split of {beton} is: name the files NAME_train.beton and "
                        f"NAME_val.beton, side by side (`fastssl convert SRC --split val`)")
    candidates = [beton.with_name(f"{head}{name}{tail}") for name in ("val", "test")]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"no test split beside {beton} (looked for {candidates[0].name} and {candidates[1].name}); "
                    f"write it with `fastssl convert SRC --split val --out {candidates[0]}`")


def _load_beton(beton: Path, split: str) -> BetonSet:
    path = _beton_split(beton, split)
    from .pipelines.common import optional
    try:
        reader = optional("ffcv.reader", "ffcv").Reader(str(path))
    except (AssertionError, ValueError, IndexError, OSError) as e:
        raise UserError(f"{path} is not a readable FFCV file ({e}); write it again with `fastssl convert`") from None
    if not {"image", "label"} <= set(reader.field_names):
        raise UserError(f"{path} has fields {reader.field_names}, not image and label; write it with `fastssl convert`")
    labels = torch.from_numpy(reader.metadata[f"f{reader.field_names.index('label')}"].astype(np.int64))
    info_path = beton_info_path(path)
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    classes = info.get("classes") or [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    return BetonSet(info.get("kind", "imagefolder"), str(path), split, classes, labels,
                    rows=torch.arange(len(labels)), side=info.get("side"))


def eval_split(data: str, data_val: str = "") -> tuple[ImageSet | None, str]:
    """The labelled split that the kNN monitor and `fastssl eval` query: --data-val, else the test split beside
    --data. (None, why) when there is none."""
    if data_val.lower() == "none":
        return None, "--data-val none"
    if data_val:
        return load(data_val, "test"), ""
    try:
        return load(data, "test"), ""
    except UserError as e:
        return None, str(e)
