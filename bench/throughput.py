"""The whole trainer measured on this machine: loaders, the relational loss, the training step, end to end.

    python bench/throughput.py [--quick | --smoke] [--device auto|cpu|cuda] [--data DIR] [--out DIR]

Runs the four benchmarks in turn (each also runs alone: bench/loaders.py, bench/loss.py, bench/step.py,
bench/end_to_end.py) and writes `results.json` (device, versions, settings, every figure), `results.md` (their
tables) and `throughput.png` (bar charts) to --out (default bench/results/), and prints the tables. Every figure
is the median of repeated timed runs after warm-up, with its spread; ratios are taken within this run.
`--quick` runs fewer shapes, settings and repetitions (about 5 minutes on 2 CPU cores). `--smoke` is the test
suite's check that every section runs and writes its results: tiny shapes, one run each; its figures mean nothing.
bf16 cases run only where bf16 is native (CUDA, CPUs with AVX512-BF16 or AMX); elsewhere bf16 is emulated and
slow, and they are reported as "skipped: no native bf16". FASTSSL_BENCH_NO_BF16=1 makes a run behave as on a CPU
without native bf16, to test that path on one that has it.
"""

from __future__ import annotations

import contextlib
import platform
import time
from importlib import metadata
from pathlib import Path

import end_to_end
import loaders
import loss
import step
import torch
from common import arguments, device_name, mode_of, pick_device, pyplot, save_figure, write


def versions() -> dict:
    """Installed versions, from the package metadata (FFCV 1.0.2's own __version__ says 0.0.3rc1)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name, dists in (("triton", ["triton"]), ("dali", ["nvidia-dali-cuda130", "nvidia-dali-cuda120"]),
                        ("ffcv", ["ffcv"])):
        out[name] = None
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
    return out


def run(mode: str, device: str, data: str | None, out_dir: str) -> dict:
    """mode: full | quick | smoke."""
    device = pick_device(device)
    sections = {}
    for name, fn in (("loader", lambda: loaders.run(mode, device=device, data_dir=data, out_dir=out_dir)),
                     ("loss", lambda: loss.run(mode, device=device, out_dir=out_dir)),
                     ("step", lambda: step.run(mode, device=device, out_dir=out_dir, backbones=True)),
                     ("end_to_end", lambda: end_to_end.run(mode, device=device, out_dir=out_dir))):
        start = time.perf_counter()
        sections[name] = fn()
        sections[name]["seconds"] = time.perf_counter() - start
        print(f"[{name}: {sections[name]['seconds']:.0f} s]", flush=True)
    results = {"device": device_name(device), "machine": platform.processor() or platform.machine(),
               "versions": versions(), "mode": mode, **sections}
    write(out_dir, "results", results, to_markdown(results), plot, "throughput.png")
    return results


def to_markdown(results: dict) -> str:
    v = results["versions"]
    head = [f"# fastssl throughput on {results['device']}", "",
            "Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + ". Made by `python bench/throughput.py"
            + ("" if results["mode"] == "full" else f" --{results['mode']}") + "`.", ""]
    parts = [("Loaders: two views per image", loaders.to_markdown(results["loader"])),
             ("Relational loss: reference vs fused", loss.to_markdown(results["loss"])),
             ("Training step: 1x vs 2x backprop, precision and layout", step.to_markdown(results["step"])),
             ("End to end: `fastssl train` per pipeline", end_to_end.to_markdown(results["end_to_end"]))]
    return "\n".join(head + [f"## {title}\n\n{table}" for title, table in parts])


def plot(results: dict, path: Path) -> None:
    fig, axes = pyplot().subplots(1, 4, figsize=(20, 4.5))

    def bars(ax, labels, values, title, unit):
        ax.barh(labels, values, color="tab:blue")
        ax.set(title=title, xlabel=unit)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}" if v >= 100 else f" {v:.3g}", va="center", fontsize=8)  # 1360, not 1.36e+03

    rows = results["loader"]["sizes"]["224"]["rows"]
    bars(axes[0], list(rows), [r["median"] for r in rows.values()], "loaders, two views at 224 px", "images/s")
    target = [c for c in results["loss"]["cases"] if (c["K"], c["D"]) == (65536, 256)] or results["loss"]["cases"]
    bars(axes[1], [c["impl"] for c in target], [c["ms"]["median"] for c in target],
         f"relational loss fwd+bwd, K={target[0]['K']} D={target[0]['D']}", "ms")
    cases = [c for c in results["step"]["cases"] if "skipped" not in c]
    bars(axes[2], [f"{c['method']} {c['setting']}" for c in cases], [c["images_per_s"]["median"] for c in cases],
         f"training step, {results['step']['arch']} {results['step']['size']} px", "images/s")
    e2e = results["end_to_end"]["images_per_s"]
    bars(axes[3], list(e2e), [r["median"] for r in e2e.values()], "fastssl train, end to end", "images/s")
    fig.suptitle(f"fastssl on {results['device']}")
    save_figure(fig, path, dpi=110)


def main():
    parser = arguments(__doc__, "results.json, results.md, throughput.png",
                       quick="fewer shapes, settings and repetitions (~5 min on CPU)",
                       smoke="tiny shapes, one run each: checks that it all runs")
    parser.add_argument("--data", help="an ImageNet-layout folder of JPEGs for the loaders (default: built from "
                                       "Fashion-MNIST, upscaled to ImageNet-like sizes)")
    args = parser.parse_args()
    print(to_markdown(run(mode_of(args), args.device, args.data, args.out)), end="")


if __name__ == "__main__":
    main()
