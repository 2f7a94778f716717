"""What the benchmarks share: timing summaries, fresh-subprocess measurements, the CPU memory high-water mark, the
command-line options, markdown tables and the JSON / markdown / PNG outputs."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Set to 1, the benchmarks behave as on a CPU without native bf16 (for testing that path on a CPU that has it).
NO_BF16_ENV = "FASTSSL_BENCH_NO_BF16"
NO_BF16 = "skipped: no native bf16"


def summary(values: list[float]) -> dict:
    """Median, min and max of repeated measurements, and the runs themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def spread(s: dict, spec: str) -> str:
    """A summary() as "median (min-max)", each in the format spec."""
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but no CUDA device is visible; use --device cpu or auto")
    return device


def native_bf16(device: str) -> bool:
    """Whether bf16 runs natively here: on CUDA where supported, on CPUs with AVX512-BF16 or AMX. Elsewhere it is
    emulated (an AVX2 CPU takes many times the fp32 time), so the benchmarks skip their bf16 cases."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    from fastssl.device import cpu_has_bf16
    return os.environ.get(NO_BF16_ENV, "0") != "1" and cpu_has_bf16()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores), {torch.get_num_threads()} threads, OMP_WAIT_POLICY {omp_wait_policy()}"


def omp_wait_policy() -> str:
    """As the trainer runs: no benchmark sets it. PASSIVE (sleeping OpenMP threads) suits a CPU shared with other
    busy processes; on an idle CPU it makes the trainer's many small parallel regions wait for their threads to
    wake (ReSSL, ResNet-18-w16 at 28 px: 840 against 1480 images/s here)."""
    return os.environ.get("OMP_WAIT_POLICY", "unset")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_script(script: str, kind: str, *args, **env: str):
    """Run measurement `kind` of `script` on `args` (JSON values) in a fresh interpreter, through the script's hidden
    --_sub option (see answer), and return the JSON it prints last."""
    env = {**os.environ, **env}
    cmd = [sys.executable, str(Path(script).resolve()), "--_sub", kind, *map(json.dumps, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def answer(sub: list[str], **measurements) -> None:
    """The subprocess side of run_script: --_sub KIND ARGS... -> print measurements[KIND](*ARGS) as JSON."""
    kind, *args = sub
    print(json.dumps(measurements[kind](*map(json.loads, args))))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def can_measure_cpu_memory() -> bool:
    return os.path.exists("/proc/self/clear_refs")


def reset_cpu_peak() -> int:
    """Reset this process's resident-set high-water mark (VmHWM) to its current size; return that size in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def cpu_peak() -> int:
    """This process's resident-set high-water mark in bytes."""
    return _status_kib("VmHWM") * 1024


def arguments(doc: str, outputs: str, quick: str | None = None, smoke: str | None = None, device: bool = True,
              out: Path = RESULTS, sub: bool = False) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring, with the options the benchmarks share:
    --quick and --smoke (given their help; together they exclude each other), --device, --out (`outputs`: what the
    folder gets) and, with `sub`, the hidden --_sub of the measurements that run_script runs."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    if quick:
        modes.add_argument("--quick", action="store_true", help=quick)
    if smoke:
        modes.add_argument("--smoke", action="store_true", help=smoke)
    if device:
        parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default=str(out), help=f"folder for {outputs}")
    if sub:
        parser.add_argument("--_sub", nargs="+", help=argparse.SUPPRESS)
    return parser


def mode_of(args: argparse.Namespace) -> str:
    """full | quick | smoke, from the --quick and --smoke a parser of arguments() has."""
    return "quick" if getattr(args, "quick", False) else "smoke" if getattr(args, "smoke", False) else "full"


def table(header: list[str], align: str, rows: list[list]) -> list[str]:
    """A markdown table's lines; align: l or r per column."""
    def line(cells):
        return "| " + " | ".join(map(str, cells)) + " |"
    return [line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|", *map(line, rows)]


def pyplot():
    """matplotlib.pyplot, drawing into files (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int) -> None:
    """Lay out, write and close a figure drawn with pyplot()."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write(out_dir: str | Path | None, name: str, results: dict, markdown: str, plot=None,
          png: str | None = None) -> None:
    """results -> out_dir/name.json, markdown -> out_dir/name.md and, given plot(results, path), its chart ->
    out_dir/png (default name.png); nothing without out_dir."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    if plot is not None:
        plot(results, out / (png or f"{name}.png"))
