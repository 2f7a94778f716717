"""Tensor pipeline benchmark: two-view (ReSSL weak + strong) images/s at 32 px against torchvision workers.

    python bench/tensor_pipeline.py [--quick] [--device auto|cpu|cuda] [--out DIR]

Writes tensor_pipeline.json and tensor_pipeline.md to DIR (default bench/results/) and prints the table.
Fashion-MNIST train split, 32 px views (RandomResizedCrop upsamples the 28 px images in both pipelines),
batches of 256 delivered normalised on the device. Baseline: TorchLoader, torchvision v2 transforms in 2
DataLoader workers. Loader images/s: median (min-max) over timed runs after a warm-up, the pipelines taking
turns run by run so that load from other processes hits both alike; every torch run starts a fresh epoch
(workers forked anew) and drops its first batches, so no run reads batches prefetched during another one.
On CPU the main process uses one intra-op thread throughout (on a small, shared machine two threads contend
badly; the torchvision workers are processes of their own).
Also end-to-end ReSSL training images/s with each pipeline (`train(cfg)` with max_steps; the rate the trainer
reports over its steps).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
import time

import torch
from common import RESULTS, pick_device, summary, sync, write

from fastssl import data
from fastssl.config import TrainConfig
from fastssl.methods.ressl import ReSSL
from fastssl.pipelines.tensor_loader import TensorLoader
from fastssl.pipelines.torch_loader import TorchLoader

SIZE, BATCH, WORKERS = 32, 256, 2
TARGET_SPEEDUP = 10.0  # the bar: two-view 32 px images/s against the torchvision baseline


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed_run(loader, device: torch.device, epoch: int, skip: int, batches: int) -> float:
    """Images/s over `batches` batches of one epoch, after `skip` untimed ones."""
    it = loader.epoch(epoch)
    for _ in itertools.islice(it, skip):
        pass
    sync(device.type)
    start = time.perf_counter()
    for batch in itertools.islice(it, batches):
        pass
    sync(device.type)
    elapsed = time.perf_counter() - start
    it.close()  # a torch epoch's workers stop here, before the other pipeline's run
    return batches * BATCH / elapsed


def _loader_rates(device: torch.device, quick: bool) -> dict:
    images = data.load("fashion-mnist")
    views = ReSSL.views(TrainConfig(), SIZE, *images.mean_std)
    kw = dict(batch_size=BATCH, device=device, workers=WORKERS, seed=0)
    loaders = {"tensor": TensorLoader(images, views, **kw), "torch": TorchLoader(images, views, **kw)}
    # (untimed batches, timed batches) per run: torch's first batches wait for the workers to start
    plan = {"tensor": (2, 20 if quick else 60), "torch": (4, 6 if quick else 16)}
    reps = 3 if quick else 5
    rates = {name: [] for name in loaders}
    for rep in range(reps + 1):  # run 0 is the warm-up
        for name, loader in loaders.items():
            with _threads(1 if device.type == "cpu" else None):
                rate = _timed_run(loader, device, rep, *plan[name])
            if rep:
                rates[name].append(rate)
    return {name: summary(r) for name, r in rates.items()}


def _training_rates(device: torch.device, quick: bool) -> dict | None:
    """End-to-end ReSSL images/s with each pipeline."""
    from fastssl.train import train
    arch = "resnet18" if device.type == "cuda" else "resnet18-w16"  # a full ResNet-18 takes minutes on a CPU
    steps = (50 if quick else 200) if device.type == "cuda" else (6 if quick else 12)
    out = {"arch": arch, "steps": steps}
    for pipeline in ("tensor", "torch"):
        with tempfile.TemporaryDirectory() as tmp, _threads(1 if device.type == "cpu" else None):
            cfg = TrainConfig(method="ressl", arch=arch, data="fashion-mnist", pipeline=pipeline, image_size=SIZE,
                              batch_size=BATCH, epochs=1, max_steps=steps, knn_every=0, knn_bank=1000,
                              knn_queries=500, workers=WORKERS, device=device.type, out=tmp)
            out[pipeline] = train(cfg)["images_per_s"]
    return out


def run(quick: bool = False, device: str = "auto", out_dir: str | None = None) -> dict:
    """Benchmark both pipelines and training with each; write results to out_dir if given."""
    device = pick_device(device)
    dev = torch.device(device)
    loaders = _loader_rates(dev, quick)
    speedup = loaders["tensor"]["median"] / loaders["torch"]["median"]
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu, 1 intra-op thread",
        "torch": torch.__version__, "size": SIZE, "batch": BATCH, "workers": WORKERS, "views": "ReSSL weak + strong",
        "loaders": loaders, "speedup": speedup,
        "target": {"speedup": TARGET_SPEEDUP, "met": speedup >= TARGET_SPEEDUP},
        "training": _training_rates(dev, quick),
    }
    write(out_dir, "tensor_pipeline", results, to_markdown(results))
    return results


def to_markdown(results: dict) -> str:
    lines = [f"Two-view (ReSSL weak + strong) {results['size']} px loading, Fashion-MNIST, batch {results['batch']}; "
             f"{results['device']}, torch {results['torch']}; images/s, median (min-max) of "
             f"{len(results['loaders']['tensor']['runs'])} runs.", "",
             "| pipeline | images/s | vs torchvision |", "|---|---:|---:|"]
    base = results["loaders"]["torch"]["median"]
    names = {"tensor": "tensor (on-device batched ops)",
             "torch": f"torchvision DataLoader, {results['workers']} workers"}
    for name, r in results["loaders"].items():
        lines.append(f"| {names[name]} | {r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) | "
                     f"{r['median'] / base:.1f}x |")
    target = results["target"]
    lines += ["", f"Target: tensor >= {target['speedup']:.0f}x torchvision: "
                  f"{results['speedup']:.1f}x, {'met' if target['met'] else 'NOT met'}."]
    training = results["training"]
    lines += ["", f"End-to-end ReSSL training, {training['arch']}, {training['steps']} steps (trainer's images/s): "
                  f"tensor {training['tensor']:.0f}, torch {training['torch']:.0f} "
                  f"({training['tensor'] / training['torch']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (about a minute on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default=str(RESULTS),
                        help="folder for tensor_pipeline.json and tensor_pipeline.md")
    args = parser.parse_args()
    print(to_markdown(run(args.quick, args.device, args.out)), end="")


if __name__ == "__main__":
    main()
