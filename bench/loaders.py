"""Loader benchmark: two-view (ReSSL weak + strong) images/s of each pipeline, against the decode-only limit.

    python bench/loaders.py [--quick] [--device auto|cpu|cuda] [--data DIR] [--out DIR]

Writes loaders.json and loaders.md to --out (default bench/results/) and prints the table.

224 px, from ImageNet-like JPEGs: --data (an ImageFolder root; its train/ split), or else a tree written once
under --out by upscaling Fashion-MNIST images to 400-500 px a side with a colour per image and film grain
(JPEG quality 90, ~80-100 KB a file, about ImageNet's). FFCV reads the same images from a .beton converted
from that tree (JPEG, quality 90). 32 px: a Fashion-MNIST slice in memory (FFCV: its .beton, raw pixels).
Rows: the torchvision DataLoader with 2 workers (how the official codes load: the baseline), DALI, FFCV, the
tensor pipeline (32 px only), and decode-only: DALI's reader and decoder alone on the same files (libjpeg-turbo
on CPU, nvJPEG on CUDA), the limit of any pipeline that decodes them. Every pipeline gets 2 workers/threads; the
main process keeps one intra-op thread (contending threads on a small CPU cost far more than they give), except for
the tensor pipeline, whose two threads are its workers.
Each run is one epoch; its rate counts the batches after the first, so start-up (workers forking, FFCV
starting its thread, DALI refilling its queue) is left out alike. The first run of each pipeline is a warm-up
(FFCV compiles its pipeline then); the pipelines take turns run by run, so that load from other processes hits
them alike; images/s is the median (min-max) of the timed runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, arguments, device_name, mode_of, pick_device, spread, summary, sync, table, write
from PIL import Image

from fastssl import data
from fastssl.methods.ressl import ReSSL
from fastssl.pipelines import build, load_images
from fastssl.pipelines.beton import write_beton
from fastssl.pipelines.common import Shard

WORKERS = 2
TARGET = {"vs_torchvision": 3.0, "vs_decode": 0.8}  # the bar for the best pipeline at 224 px
TENSOR_TARGET = 10.0  # the bar for the tensor pipeline at 32 px, against the torchvision baseline
NAMES = {"torch": f"torchvision DataLoader, {WORKERS} workers", "dali": "DALI", "ffcv": "FFCV",
         "tensor": "tensor (set on the device)", "decode": "decode only (the limit)"}


def imagenet_like(root: Path, n: int, seed: int = 0) -> Path:
    """root/train/<class>/*.jpg: n Fashion-MNIST images upscaled to 400-500 px, tinted, with grain (written once)."""
    done = root / "train" / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    source = data.load("fashion-mnist").subset(n, seed)
    for i, (image, label) in enumerate(zip(source.images[..., 0].numpy(), source.labels.tolist())):
        w, h = (int(s) for s in rng.integers(400, 501, 2))
        shape = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC), dtype=np.float32)[..., None] / 255
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = bg * (1 - shape) + fg * shape + rng.normal(0, 16, (h, w, 3))
        folder = root / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    done.touch()
    return root


def beton_of(images: data.ImageSet, path: Path, **options) -> data.ImageSet:
    """The same images as a .beton (written once)."""
    if not path.exists():
        largest = None if images.in_memory else max(w * h for w, h in (Image.open(f).size for f in images.files))
        write_beton(images, path, largest=largest, workers=WORKERS, **options)
    return load_images(str(path))


class DecodeOnly:
    """DALI's reader + image decoder on the files, nothing after: an epoch of decoded batches, kept on the device."""

    def __init__(self, images: data.ImageSet, batch_size: int, device: torch.device):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def
        def decode():
            encoded, _ = fn.readers.file(files=images.files, name="reader", pad_last_batch=True)
            return fn.decoders.image(encoded, device="mixed" if device.type == "cuda" else "cpu",
                                     output_type=types.RGB)

        self.pipe = decode(batch_size=batch_size, num_threads=WORKERS, seed=0,
                           device_id=(device.index or 0) if device.type == "cuda" else None)
        self.pipe.build()
        self.batches = len(images) // batch_size

    def epoch(self, epoch: int):
        for _ in range(self.batches):
            yield self.pipe.run()


def _rate(loader, epoch: int, batch_size: int, device: str) -> float:
    """Images/s over one epoch, from the first batch to the last."""
    batches = loader.epoch(epoch)
    next(batches)
    sync(device)
    start, count = time.perf_counter(), 0
    for _ in batches:
        count += 1
    sync(device)
    return count * batch_size / (time.perf_counter() - start)


def _measure(loaders: dict, batch_size: int, device: str, reps: int) -> dict:
    rates = {name: [] for name in loaders}
    for rep in range(reps + 1):  # run 0 is the warm-up
        for name, loader in loaders.items():
            # the tensor pipeline has no workers: on a CPU its share of the cores is the intra-op threads
            torch.set_num_threads(WORKERS if name == "tensor" and device == "cpu" else 1)
            rate = _rate(loader, rep, batch_size, device)
            if rep:
                rates[name].append(rate)
        print(f"  run {rep}: " + ", ".join(f"{name} {r[-1]:.0f}" for name, r in rates.items() if rep), file=sys.stderr)
    return {name: summary(r) for name, r in rates.items()}


def _available(kind: str) -> bool:
    try:
        __import__({"dali": "nvidia.dali", "ffcv": "ffcv"}[kind])
        return True
    except ImportError:
        return False


def _loaders(images: data.ImageSet, beton: data.ImageSet | None, size: int, batch_size: int,
             device: torch.device, kinds: list[str]) -> dict:
    views = ReSSL.view_specs(ReSSL.Options.resolve({}, small=data.is_small(size)), size, *images.mean_std)
    loaders = {}
    for kind in kinds:
        if kind in ("dali", "ffcv") and not _available(kind):
            continue
        loaders[kind] = build(kind, beton if kind == "ffcv" else images, views, Shard(rank_batch=batch_size), device,
                              workers=WORKERS)
    if not images.in_memory and _available("dali"):
        loaders["decode"] = DecodeOnly(images, batch_size, device)
    return loaders


# (images, batch) at 224 px, (images, batch) at 32 px, timed runs; smoke: the test suite's check that it runs
SCALE = {"full": (2048, 64, 32768, 256, 5), "quick": (384, 64, 4096, 256, 2), "smoke": (96, 16, 1024, 128, 1)}


def run(mode: str = "full", device: str = "auto", data_dir: str | None = None, out_dir: str | None = None) -> dict:
    """Benchmark the pipelines at 224 px (image files) and 32 px (a set in memory); write to out_dir if given."""
    device = pick_device(device)
    threads = torch.get_num_threads()  # _measure sets them per pipeline
    try:
        results = _run(mode, device, data_dir, Path(out_dir or RESULTS))
    finally:
        torch.set_num_threads(threads)
    write(out_dir, "loaders", results, to_markdown(results))
    return results


def _run(mode: str, device: str, data_dir: str | None, work: Path) -> dict:
    dev = torch.device(device)
    n, batch, n_small, batch_small, reps = SCALE[mode]
    results = {"device": device_name(device), "torch": torch.__version__, "workers": WORKERS,
               "views": "ReSSL weak + strong", "sizes": {}}

    root = Path(data_dir) if data_dir else imagenet_like(work / f"imagenet-like-{n}", n)
    files = data.load(str(root)).subset(n)
    beton = beton_of(files, work / f"bench-{root.name}-{len(files)}_train.beton", write_mode="jpg", jpeg_quality=90) \
        if _available("ffcv") else None
    print(f"224 px: {len(files)} images of {root}", file=sys.stderr)
    loaders = _loaders(files, beton, 224, batch, dev, ["torch", "dali", "ffcv"])
    results["sizes"]["224"] = {"images": len(files), "batch": batch, "data": str(root),
                               "rows": _measure(loaders, batch, device, reps)}

    small = data.load("fashion-mnist").subset(n_small)
    small_beton = (beton_of(small, work / f"bench-fashion-mnist-{len(small)}_train.beton") if _available("ffcv")
                   else None)
    print(f"32 px: {len(small)} Fashion-MNIST images in memory", file=sys.stderr)
    loaders = _loaders(small, small_beton, 32, batch_small, dev, ["torch", "dali", "ffcv", "tensor"])
    results["sizes"]["32"] = {"images": len(small), "batch": batch_small, "data": "fashion-mnist",
                              "rows": _measure(loaders, batch_small, device, reps)}

    rows = results["sizes"]["224"]["rows"]
    best = max((k for k in rows if k not in ("torch", "decode")), key=lambda k: rows[k]["median"], default=None)
    if best is not None:
        vs_torch = rows[best]["median"] / rows["torch"]["median"]
        vs_decode = rows[best]["median"] / rows["decode"]["median"] if "decode" in rows else None
        results["target"] = {**TARGET, "best": best, "best_vs_torchvision": vs_torch, "best_vs_decode": vs_decode,
                             "met": vs_torch >= TARGET["vs_torchvision"] and vs_decode is not None
                             and vs_decode >= TARGET["vs_decode"]}
    small_rows = results["sizes"]["32"]["rows"]
    speedup = small_rows["tensor"]["median"] / small_rows["torch"]["median"]
    results["tensor_target"] = {"vs_torchvision": TENSOR_TARGET, "tensor_vs_torchvision": speedup,
                                "met": speedup >= TENSOR_TARGET}
    return results


def to_markdown(results: dict) -> str:
    lines = [f"Two-view ({results['views']}) images/s, {results['device']}, torch {results['torch']}, "
             f"{results['workers']} workers/threads per pipeline; median (min-max) of the timed epochs.", ""]
    for size, section in results["sizes"].items():
        rows = section["rows"]
        base = rows["torch"]["median"]
        lines += [f"{size} px: {section['images']} images ({section['data']}), batch {section['batch']}", ""]
        lines += table(["pipeline", "images/s", "vs torchvision"], "lrr",
                       [[NAMES[name], spread(r, ".0f"), f"{r['median'] / base:.2f}x"] for name, r in rows.items()])
        lines.append("")
    target = results.get("target")
    if target:
        vs_decode = "n/a" if target["best_vs_decode"] is None else f"{target['best_vs_decode']:.2f}x"
        lines.append(f"Target at 224 px: best ({NAMES[target['best']]}) >= {target['vs_torchvision']:.0f}x torchvision "
                     f"and >= {target['vs_decode']}x decode-only: {target['best_vs_torchvision']:.2f}x and "
                     f"{vs_decode}, {'met' if target['met'] else 'NOT met'}.")
    tensor = results["tensor_target"]
    lines.append(f"Target at 32 px: {NAMES['tensor']} >= {tensor['vs_torchvision']:.0f}x torchvision: "
                 f"{tensor['tensor_vs_torchvision']:.1f}x, {'met' if tensor['met'] else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def main():
    parser = arguments(__doc__, "loaders.json and .md, and generated data",
                       quick="fewer images and runs (a few minutes on 2 CPU cores)")
    parser.add_argument("--data", default=None, help="ImageFolder root for the 224 px rows (default: a generated tree)")
    args = parser.parse_args()
    print(to_markdown(run(mode_of(args), args.device, args.data, args.out)), end="")


if __name__ == "__main__":
    main()
