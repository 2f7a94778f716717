"""The GPU check: what fastssl can only show on a CUDA device, as one time-boxed command that can fail.

    python bench/gpu_check.py [--budget SECONDS] [--only STEP,...] [--out DIR]   # on a GPU machine
    python bench/gpu_check.py --smoke --out DIR                                  # the same steps, tiny, on a CPU

Cheapest and most telling first, each step a subprocess with its own time limit (capped by what is left of the
budget) and exit status:
  env            torch, Triton, the device
  cuda-tests     the CUDA tests: compiled Triton kernels against the reference, the sync-debug step of every
                 pipeline x method (and --sync-bn), the loaders' device paths
  step           model-only training step, ResNet-50 at 224 px, batch 256, bf16 channels_last, ReSSL and BYOL,
                 eager and compiled: images/s, MFU against a bf16 matmul peak measured in the same run (bench/step.py)
  loss           the fused loss, Triton against the reference: B=256, K 65536 and 131072, D 128 and 512 (bench/loss.py)
  torchrun-nccl  `torchrun --nproc-per-node 1` over NCCL with --sync-bn, a few steps
  jpeg-tree      ImageNet-sized photo-like JPEGs for the end-to-end runs
  train-torch    `fastssl train`, ResNet-50 at 224 px: --pipeline torch (a DataLoader process per CPU core) ...
  train-nvjpeg   ... --pipeline nvjpeg (GPU decode), images/s and their share of the model-only figure, ...
  train-dali     ... DALI and (convert-ffcv, train-ffcv) FFCV, where installed
  torchrun-2-gpus  two ranks over NCCL with --sync-bn, where 2 GPUs are visible
  fashion-mnist  the README's Fashion-MNIST command on the GPU: wall time and kNN accuracy
A step that needs a missing package or more GPUs is skipped and says so; that is not a failure. The command exits 1
when any step failed or ran out of time. Results: DIR/gpu_check.json and DIR/gpu_check.md (a table, one row a step),
each step's log in DIR/logs/. Fashion-MNIST is found as --data fashion-mnist finds it (./data/fashion-mnist holding its
four .gz files will do on a machine without Debian's package).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from common import RESULTS, arguments, table, write

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass
class Step:
    name: str
    limit: int  # seconds, at most
    command: list[str]
    skip: str = ""  # why it is skipped, if it is
    figures: Callable[[Path], dict] | None = None  # the step's output folder -> its figures, after a passing run


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | timed out | skipped: why
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


def shapes(smoke: bool) -> dict:
    """The sizes of every step: an H200's, or a CPU's smoke test of the steps themselves."""
    if smoke:
        return dict(device="cpu", arch="resnet18-w8", size=32, batch=16, step_settings="fp32", loss_shapes="1024x32",
                    steps=4, log_every=2, workers=1, images=64, side=(64, 96), fm_epochs=1,
                    fm_extra=["--train-subset", "1024", "--knn-bank", "512", "--knn-queries", "256"])
    return dict(device="cuda", arch="resnet50", size=224, batch=256,
                step_settings="bf16 channels_last,bf16 channels_last compiled",
                loss_shapes="65536x128,65536x512,131072x128,131072x512", steps=60, log_every=10,
                workers=os.cpu_count() or 8, images=256 * 64, side=(320, 500), fm_epochs=20, fm_extra=[])


def plan(s: dict, out: Path, smoke: bool) -> list[Step]:
    fastssl = [PYTHON, "-m", "fastssl.cli"]
    train = [*fastssl, "train", "--method", "ressl", "--arch", s["arch"], "--image-size", str(s["size"]),
             "--batch-size", str(s["batch"]), "--epochs", "1", "--max-steps", str(s["steps"]), "--log-every",
             str(s["log_every"]), "--knn-every", "0", "--data-val", "none", "--device", s["device"]]
    jpegs, beton = out / "work" / "jpegs", out / "work" / "jpegs_train.beton"
    nccl = "" if smoke else "needs 1 GPU and NCCL"
    return [
        Step("env", 60, [PYTHON, __file__, "--_env", s["device"], "{dir}"], figures=lambda d: _json(d / "env.json")),
        Step("cuda-tests", 240, [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests",
                                 *(["--collect-only"] if smoke else [])]),
        Step("step", 300, [PYTHON, "bench/step.py", "--device", s["device"], "--arch", s["arch"], "--size",
                           str(s["size"]), "--batch", str(s["batch"]), "--methods", "ressl,byol", "--settings",
                           s["step_settings"], "--out", "{dir}"], figures=_step_figures),
        Step("loss", 120, [PYTHON, "bench/loss.py", "--quick", "--device", s["device"], "--shapes", s["loss_shapes"],
                           "--out", "{dir}"], figures=_loss_figures),
        Step("torchrun-nccl", 120, [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                    "-m", "fastssl.cli", "train", "--data", "fashion-mnist", "--pipeline", "tensor",
                                    "--arch", "resnet18-w16", "--epochs", "1", "--max-steps", "30", "--log-every",
                                    "10", "--knn-every", "0", "--data-val", "none", "--sync-bn", "--device",
                                    s["device"], "--out", "{dir}"],
             skip="" if smoke or _has_gpus(1) else nccl, figures=_run_figures),
        Step("jpeg-tree", 120, [PYTHON, __file__, "--_jpegs", str(jpegs), str(s["images"]), *map(str, s["side"])]),
        Step("train-torch", 180, [*train, "--data", str(jpegs), "--pipeline", "torch", "--workers",
                                  str(s["workers"]), "--out", "{dir}"], figures=_run_figures),
        Step("train-nvjpeg", 180, [*train, "--data", str(jpegs), "--pipeline", "nvjpeg", "--workers",
                                   str(min(s["workers"], 8)), "--out", "{dir}"], figures=_run_figures),
        Step("train-dali", 180, [*train, "--data", str(jpegs), "--pipeline", "dali", "--workers",
                                 str(min(s["workers"], 8)), "--out", "{dir}"], skip=_missing("nvidia.dali"),
             figures=_run_figures),
        Step("convert-ffcv", 120, [*fastssl, "convert", str(jpegs), "--to", "ffcv", "--out", str(beton), "--workers",
                                   str(s["workers"]), "--force"], skip=_missing("ffcv")),
        Step("train-ffcv", 180, [*train, "--data", str(beton), "--pipeline", "ffcv", "--workers",
                                 str(min(s["workers"], 8)), "--out", "{dir}"], skip=_missing("ffcv"),
             figures=_run_figures),
        Step("torchrun-2-gpus", 180, [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                      *train[1:], "--data", str(jpegs), "--pipeline", "nvjpeg", "--sync-bn", "--out",
                                      "{dir}"], skip="" if _has_gpus(2) else "needs 2 GPUs", figures=_run_figures),
        Step("fashion-mnist", 300, [*fastssl, "train", "--config", "recipes/fashion-mnist-ressl-r18w16.yaml",
                                    "--epochs", str(s["fm_epochs"]), *s["fm_extra"], "--device", s["device"],
                                    "--out", "{dir}"], figures=_run_figures),
    ]


def run_step(step: Step, out: Path, limit: float) -> Outcome:
    """The step's command in its own process group (killed whole when over its limit), its output in logs/; the
    step's folder starts empty (a training run refuses a folder that holds one)."""
    folder = out / step.name
    shutil.rmtree(folder, ignore_errors=True)
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(folder) if part == "{dir}" else part for part in step.command]
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_group(proc)
    seconds = time.monotonic() - start
    if code is None:
        return Outcome(step.name, f"timed out after {limit:.0f} s", seconds)
    if code:
        return Outcome(step.name, f"failed (exit {code}): {_last_line(log)}", seconds)
    try:
        figures = step.figures(folder) if step.figures else {}
    except (OSError, ValueError, KeyError, StopIteration) as e:  # the command passed but wrote no results
        return Outcome(step.name, f"failed: no results ({type(e).__name__}: {e})", seconds)
    return Outcome(step.name, "passed", seconds, figures)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's process and everything it started (torchrun's ranks, DataLoader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip() and "%|" not in line]
    return lines[-1][-200:] if lines else ""


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _missing(package: str) -> str:
    import importlib.util
    return "" if importlib.util.find_spec(package) else f"{package} is not installed"


def _has_gpus(n: int) -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.device_count() >= n


def _run_figures(run_dir: Path) -> dict:
    """A `fastssl train` run's images/s (the median logged window after the first, else the whole run's) and its
    summary."""
    summary = _json(run_dir / "summary.json")
    windows = []
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv") as f:
            windows = [float(r["value"]) for r in csv.DictReader(f) if r["key"] == "images_per_s"]
    rate = statistics.median(windows[1:] or windows) if windows else summary["images_per_s"]
    figures = {"images_per_s": rate, "steps": summary["steps"],
               "processes": summary["processes"], "precision": summary["precision"]}
    if "knn_top1" in summary:
        figures["knn_top1"] = summary["knn_top1"]
    return figures


def _step_figures(folder: Path) -> dict:
    results = _json(folder / "step.json")
    figures = {f"{c['method']} {c['setting']}": {"images_per_s": c["images_per_s"]["median"], "mfu": c["mfu"]}
               for c in results["cases"] if "skipped" not in c}
    return {**figures, "ressl_over_byol_step_time": results["ressl_over_byol_step_time"],
            "matmul_peak_flops": results["matmul_peak_flops"]}


def _loss_figures(folder: Path) -> dict:
    return {f"K={c['K']} D={c['D']} {c['impl']}": {"ms": c["ms"]["median"], "time_vs_reference":
                                                  c["time_vs_reference"], "peak_extra_mib": c["peak_extra_mib"]}
            for c in _json(folder / "loss.json")["cases"]}


def model_only_share(outcomes: list[Outcome]) -> None:
    """End-to-end images/s as a share of the model-only eager ReSSL step (the end-to-end runs are eager)."""
    step = next((o for o in outcomes if o.name == "step" and o.status == "passed"), None)
    model = step and next((v["images_per_s"] for k, v in step.figures.items()
                           if k.startswith("ressl ") and "compiled" not in k), None)
    for o in outcomes:
        if model and o.name.startswith("train-") and o.status == "passed":
            o.figures["share_of_model_only"] = o.figures["images_per_s"] / model


def to_markdown(outcomes: list[Outcome], context: str) -> str:
    lines = [f"GPU check: {context}", ""]
    lines += table(["step", "status", "seconds", "figures"], "llrl",
                   [[o.name, o.status, f"{o.seconds:.0f}", _brief(o.figures)] for o in outcomes])
    return "\n".join(lines) + "\n"


def _brief(figures: dict) -> str:
    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} {value(x)}" for k, x in v.items()) + "}"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "; ".join(f"{k} {value(v)}" for k, v in figures.items())


def failed(outcomes: list[Outcome]) -> list[str]:
    return [o.name for o in outcomes if not (o.status == "passed" or o.status.startswith("skipped"))]


def main() -> int:
    parser = arguments(__doc__, "gpu_check.json/.md and logs/", device=False, out=RESULTS / "gpu_check",
                       smoke="every step, tiny, on the CPU: checks the script itself")
    parser.add_argument("--budget", type=float, default=520, help="seconds for all the steps together")
    parser.add_argument("--only", help="comma-separated steps to run (the others are reported as not asked for)")
    parser.add_argument("--_env", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_jpegs", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._env:
        return _env(args._env[0], Path(args._env[1]))
    if args._jpegs:
        root, n, low, high = args._jpegs
        return _write_jpegs(Path(root), int(n), int(low), int(high))
    out = Path(args.out).resolve()
    s = shapes(args.smoke)
    steps = plan(s, out, args.smoke)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {step.name for step in steps}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; the steps are {', '.join(step.name for step in steps)}")
    if not args.smoke and not _has_gpus(1):
        print("error: no CUDA device is visible; these are the GPU checks (--smoke runs them tiny on a CPU)")
        return 1
    start, outcomes = time.monotonic(), []
    for step in steps:
        left = args.budget - (time.monotonic() - start)
        if only is not None and step.name not in only:
            outcome = Outcome(step.name, "skipped: not asked for (--only)")
        elif step.skip:
            outcome = Outcome(step.name, f"skipped: {step.skip}")
        elif left < 20:
            outcome = Outcome(step.name, f"skipped: the budget is spent ({left:.0f} s left)")
        else:
            outcome = run_step(step, out, min(step.limit, left))
        outcomes.append(outcome)
        print(f"=== {outcome.name}: {outcome.status} ({outcome.seconds:.0f} s) {_brief(outcome.figures)}", flush=True)
    model_only_share(outcomes)
    context = (f"{s['device']} {s['arch']} at {s['size']} px, batch {s['batch']}{' (smoke)' if args.smoke else ''}; "
               f"{time.monotonic() - start:.0f} s of a {args.budget:.0f} s budget")
    markdown = to_markdown(outcomes, context)
    write(out, "gpu_check", {"context": context, "steps": [asdict(o) for o in outcomes]}, markdown)
    print(markdown, end="")
    bad = failed(outcomes)
    if bad:
        print(f"error: {len(bad)} step(s) failed: {', '.join(bad)} (their logs: {out / 'logs'})")
    return 1 if bad else 0


def _env(device: str, folder: Path) -> int:
    """The env step: versions and the device, into folder/env.json."""
    import torch
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": device}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "env.json").write_text(json.dumps(info, indent=2))
    print(info)
    return 0


def _write_jpegs(root: Path, n: int, low: int, high: int) -> int:
    """root/train/c<k>/<i>.jpg: n photo-like JPEGs (smooth random colour fields with grain, quality 90) with sides in
    [low, high], as ImageNet's are; written once (a .complete marker), by every core."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    done = root / "train" / ".complete"
    if not done.exists():
        for c in range(10):
            (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(mp_context=mp.get_context("fork")) as pool:
            list(pool.map(_write_jpeg, [(root, i, low, high) for i in range(n)], chunksize=64))
        done.touch()
    print(f"{n} JPEGs of {low}-{high} px in {root}/train")
    return 0


def _write_jpeg(job: tuple) -> None:
    import numpy as np
    from PIL import Image
    root, i, low, high = job
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(low, high + 1, 2))
    field = rng.uniform(0, 255, (*rng.integers(2, 9, 2), 3)).astype(np.uint8)
    x = np.asarray(Image.fromarray(field).resize((w, h), Image.BICUBIC), np.float32)
    x += rng.normal(0, 12, x.shape)  # grain: about a photo's JPEG size
    Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(root / "train" / f"c{i % 10}" / f"{i}.jpg", quality=90)


if __name__ == "__main__":
    sys.exit(main())
