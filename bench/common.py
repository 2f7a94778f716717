"""What the benchmarks share: timing summaries, fresh-subprocess measurements, the CPU memory high-water mark."""

from __future__ import annotations

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


def run_script(script: str, *args: str, **env: str):
    """Run `script` with the hidden --_sub arguments in a fresh interpreter and return the JSON it prints last."""
    env = {**os.environ, **env}
    cmd = [sys.executable, str(Path(script).resolve()), "--_sub", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def write(out_dir: str | Path | None, name: str, results: dict, markdown: str) -> None:
    """results -> out_dir/name.json, markdown -> out_dir/name.md."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
