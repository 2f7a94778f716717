"""End-to-end benchmark: `fastssl train` images/s through each pipeline, loader and step together.

    python bench/end_to_end.py [--quick] [--device auto|cpu|cuda] [--out DIR]

Runs `fastssl train --max-steps N` once per pipeline in a fresh process, on Fashion-MNIST (FFCV reads a .beton
that `fastssl convert` makes first, in a temporary folder). The trainer logs images/s per window of `--log-every`
steps (the step time only: kNN monitoring and start-up are left out); the figure is the median over the windows
after the first, which holds the warm-up (FFCV's and torch.compile's compilation, DataLoader workers starting).
A pipeline whose package is not installed is reported as skipped. The runs are bf16 where it is native, else fp32
(what `--precision auto` picks; common.native_bf16 can also be told to act as without it).
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from common import arguments, device_name, mode_of, native_bf16, pick_device, spread, summary, table, write

PIPELINES = {"torch": None, "tensor": None, "dali": "nvidia.dali", "ffcv": "ffcv"}  # name: the package it needs


def defaults(device: str, mode: str) -> dict:
    """Backbone, batch and timed windows of `window` steps (smoke: the test suite's check that the script runs)."""
    if mode == "smoke":
        return {"arch": "resnet18-w8", "batch": 32, "windows": 1, "window": 2}
    if device == "cuda":
        return {"arch": "resnet18", "batch": 256, "windows": 3 if mode == "quick" else 6, "window": 20}
    return {"arch": "resnet18-w16", "batch": 128, "windows": 2 if mode == "quick" else 4, "window": 5}


def _fastssl(*args: str) -> None:
    cmd = [sys.executable, "-m", "fastssl.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def _window_rates(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["key"] == "images_per_s"]


def run(mode: str = "full", device: str = "auto", out_dir: str | None = None) -> dict:
    device = pick_device(device)
    shape = defaults(device, mode)
    windows = shape["windows"]
    precision = "bf16" if native_bf16(device) else "fp32"
    rates, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for pipeline, package in PIPELINES.items():
            if package and importlib.util.find_spec(package) is None:
                skipped[pipeline] = f"{package} is not installed"
                continue
            data = "fashion-mnist"
            if pipeline == "ffcv":  # the train split alone: without a val one the trainer's kNN is off (untimed)
                data = str(tmp / "fashion-mnist_train.beton")
                _fastssl("convert", "fashion-mnist", "--to", "ffcv", "--split", "train", "--out", data)
            run_dir = tmp / pipeline
            _fastssl("train", "--data", data, "--pipeline", pipeline, "--arch", shape["arch"], "--batch-size",
                     str(shape["batch"]), "--max-steps", str((windows + 1) * shape["window"]), "--log-every",
                     str(shape["window"]), "--knn-every", "0", "--knn-bank", "1000", "--knn-queries", "200",
                     "--device", device, "--precision", precision, "--out", str(run_dir))
            rates[pipeline] = summary(_window_rates(run_dir)[1:])
    results = {"device": device_name(device), "data": "fashion-mnist (28 px)", "method": "ressl", **shape,
               "precision": precision,
               "windows": windows, "images_per_s": rates, "skipped": skipped}
    write(out_dir, "end_to_end", results, to_markdown(results))
    return results


def to_markdown(results: dict) -> str:
    lines = [f"End-to-end `fastssl train` (ReSSL, {results['arch']}, batch {results['batch']}, {results['data']}, "
             f"{results['precision']}); "
             f"{results['device']}; images/s, median (min-max) of {results['windows']} windows of {results['window']} "
             f"steps after a warm-up window.", ""]
    rows = [[name, spread(r, ".0f")] for name, r in results["images_per_s"].items()]
    rows += [[name, f"skipped: {why}"] for name, why in results["skipped"].items()]
    lines += table(["pipeline", "images/s"], "lr", rows)
    return "\n".join(lines) + "\n"


def main():
    args = arguments(__doc__, "end_to_end.json and end_to_end.md", quick="fewer timed windows").parse_args()
    print(to_markdown(run(mode_of(args), args.device, args.out)), end="")


if __name__ == "__main__":
    main()
