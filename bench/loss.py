"""Relational loss benchmark: forward+backward time and peak extra memory, reference against the fast paths.

    python bench/loss.py [--quick] [--device auto|cpu|cuda] [--out DIR]

Writes loss.json and loss.md to DIR (default bench/results/) and prints the table. B=256, fp32, unit rows.

Each shape is measured in a fresh subprocess, so the caller's threads and allocator state do not leak in.
Time: median, min and max over repeated runs after a warm-up; the implementations take turns run by run, so
load from other processes hits them alike. Peak extra memory is what one forward+backward needs above its
inputs: on CUDA from torch.cuda.max_memory_allocated; on CPU from the resident set of one more fresh subprocess
per case (VmHWM, reset through /proc/self/clear_refs just before the call), with glibc told to mmap every
allocation over 64 KiB so that a freed tensor leaves the resident set.
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F
from common import (answer, arguments, can_measure_cpu_memory, cpu_peak, device_name, mode_of, pick_device,
                    reset_cpu_peak, run_script, spread, summary, sync, table, write)

from fastssl.kernels import relational as R

BATCH, TAU_S, TAU_T = 256, 0.1, 0.04
# (K, D) per mode; smoke: the test suite's check that the script runs (its figures mean nothing)
SHAPES = {"full": [(keys, dim) for keys in (4096, 16384, 65536, 131072) for dim in (128, 256, 512)],
          "quick": [(4096, 128), (65536, 256)], "smoke": [(1024, 64)]}
REPS = {"full": 7, "quick": 3, "smoke": 1}
TARGET = {"K": 65536, "D": 256, "max_memory_ratio": 1 / 8, "max_time_ratio": 1.0}  # the issue's bar, B=256 fp32


def _inputs(keys: int, dim: int, device: str):
    g = torch.Generator(device).manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, device=device), dim=-1)  # noqa: E731
    return unit(BATCH, dim).requires_grad_(), unit(BATCH, dim), unit(keys, dim)


def _impls(device: str) -> dict:
    impls = {name: partial(R.relational_loss, impl=name) for name in ("reference", "cpu")}
    if device == "cuda":
        if R.TRITON_AVAILABLE:
            impls["triton"] = partial(R.relational_loss, impl="triton")
        impls["compiled reference"] = torch.compile(R.relational_loss_reference, dynamic=False)
    return impls


def _step(fn, q, k, queue):
    q.grad = None
    fn(q, k, queue, TAU_S, TAU_T).backward()


def _peak_extra_cuda(fn, inputs) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(fn, *inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _measure_shape(keys: int, dim: int, device: str, reps: int) -> dict:
    """Subprocess side: {impl: {"ms": {median, min, max}, "peak_extra": bytes (CUDA only)}}."""
    impls = _impls(device)
    inputs = _inputs(keys, dim, device)
    for fn in impls.values():  # warm-up: compilation, autotuning, first-touch page faults
        for _ in range(3 if device == "cuda" else 1):
            _step(fn, *inputs)
    times = {name: [] for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            sync(device)
            start = time.perf_counter()
            _step(fn, *inputs)
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"ms": summary(t), "peak_extra": _peak_extra_cuda(impls[name], inputs) if device == "cuda" else None}
            for name, t in times.items()}


def _peak_extra_cpu(impl: str, keys: int, dim: int) -> int:
    """Subprocess side: bytes of resident memory one CPU forward+backward needs above its inputs."""
    fn = _impls("cpu")[impl]
    inputs = _inputs(keys, dim, "cpu")
    _step(fn, *_inputs(64, dim, "cpu"))  # load libraries and start threads outside the measurement
    rss = reset_cpu_peak()
    _step(fn, *inputs)
    return cpu_peak() - rss


def run(mode: str = "full", device: str = "auto", out_dir: str | None = None,
        shapes: list[tuple[int, int]] | None = None) -> dict:
    """Benchmark every implementation on every shape of `mode` (full | quick | smoke), or on `shapes` ((K, D) pairs);
    write loss.json and loss.md to out_dir if given."""
    device = pick_device(device)
    reps = REPS[mode]
    memory_on_cpu = device == "cpu" and can_measure_cpu_memory()
    cases = []
    for keys, dim in shapes or SHAPES[mode]:
        measured = run_script(__file__, "shape", keys, dim, device, reps)
        shape_cases = []
        for impl, m in measured.items():
            peak = m["peak_extra"]
            if memory_on_cpu:
                peak = run_script(__file__, "memory", impl, keys, dim, MALLOC_MMAP_THRESHOLD_="65536")
            shape_cases.append({"K": keys, "D": dim, "impl": impl, "ms": m["ms"],
                                "peak_extra_mib": None if peak is None else peak / 2**20})
        ref = shape_cases[0]
        for case in shape_cases:
            case["time_vs_reference"] = case["ms"]["median"] / ref["ms"]["median"]
            case["memory_vs_reference"] = (None if ref["peak_extra_mib"] is None
                                           else case["peak_extra_mib"] / ref["peak_extra_mib"])
        cases += shape_cases
    results = {
        "device": device_name(device),
        "torch": torch.__version__, "B": BATCH, "dtype": "float32", "tau_s": TAU_S, "tau_t": TAU_T, "reps": reps,
        "cases": cases, "target": _target(cases, "triton" if device == "cuda" and R.TRITON_AVAILABLE else "cpu"),
    }
    write(out_dir, "loss", results, to_markdown(results))
    return results


def _target(cases: list, impl: str) -> dict | None:
    """The issue's bar for the fast path at its shape, if the run measured that shape."""
    case = next((c for c in cases if (c["K"], c["D"], c["impl"]) == (TARGET["K"], TARGET["D"], impl)), None)
    if case is None:
        return None
    memory, time_ratio = case["memory_vs_reference"], case["time_vs_reference"]
    met = memory is not None and memory <= TARGET["max_memory_ratio"] and time_ratio <= TARGET["max_time_ratio"]
    return {**TARGET, "impl": impl, "memory_ratio": memory, "time_ratio": time_ratio, "met": met}


def to_markdown(results: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [f"Relational loss forward+backward, B={results['B']}, {results['dtype']}, tau_s={results['tau_s']}, "
             f"tau_t={results['tau_t']}; {results['device']}, "
             f"torch {results['torch']}; median (min-max) of {results['reps']} runs.", ""]
    lines += table(["K", "D", "impl", "ms", "time / ref", "peak extra MiB", "memory / ref"], "rrlrrrr",
                   [[c["K"], c["D"], c["impl"], spread(c["ms"], ".1f"), f"{c['time_vs_reference']:.2f}",
                     fmt(c["peak_extra_mib"], ".1f"), fmt(c["memory_vs_reference"], ".3f")] for c in results["cases"]])
    target = results["target"]
    if target is not None:
        lines += ["", f"Target at K={target['K']}, D={target['D']} ({target['impl']}): memory / ref "
                      f"{fmt(target['memory_ratio'], '.3f')} (bar {target['max_memory_ratio']:.3f}), time / ref "
                      f"{target['time_ratio']:.2f} (bar {target['max_time_ratio']:.2f}): "
                      f"{'met' if target['met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main():
    parser = arguments(__doc__, "loss.json and loss.md", quick="two shapes, fewer runs (about a minute on CPU)",
                       sub=True)
    parser.add_argument("--shapes", help="comma-separated KxD shapes instead of the mode's, e.g. 65536x128,65536x512")
    args = parser.parse_args()
    shapes = args.shapes and [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    if args._sub:
        answer(args._sub, shape=_measure_shape, memory=_peak_extra_cpu)
        return
    print(to_markdown(run(mode_of(args), args.device, args.out, shapes)), end="")


if __name__ == "__main__":
    main()
