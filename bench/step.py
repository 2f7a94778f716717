"""Training-step benchmark: images/s, peak memory and model-FLOP utilisation per method and setting.

    python bench/step.py [--quick] [--device auto|cpu|cuda] [--arch A] [--size S] [--batch B] [--out DIR]

Times `fastssl.train.train_step` (the loop's own step: the method's loss under autocast, backward, SGD, queue)
on random views of the method's view sizes, so the pipeline is left out; the method is built as the trainer
builds it (`fastssl.methods.build` with the default split BN, `method.compile()` for the compiled setting). Every
(method, setting) runs in a fresh subprocess: warm-up steps (torch.compile compiles there), then `reps` timed runs of
`steps` steps; images/s is the median with its spread. Peak memory is what training needs above the built model
(activations, gradients, optimizer state): torch.cuda.max_memory_allocated on CUDA, the resident-set high-water
mark on CPU.
Model FLOPs per image are counted by torch's FlopCounterMode over the first warm-up step (forward, backward and
the teacher's forward; the compiled setting, which the counter cannot see into, takes the eager count); MFU = FLOPs
per image x images/s / the matmul peak measured in the same run, in the setting's dtype.
Where bf16 is not native (a CPU without AVX512-BF16 or AMX, where it is emulated and slow) the bf16 settings and
the bf16 peak are reported as skipped (common.native_bf16).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time

import torch

from common import (NO_BF16, answer, arguments, can_measure_cpu_memory, cpu_peak, device_name, mode_of, native_bf16,
                    pick_device, reset_cpu_peak, run_script, spread, summary, sync, table, write)

# name: (precision, channels_last, compile)
SETTINGS = {"fp32": ("fp32", False, False), "fp32 channels_last": ("fp32", True, False),
            "bf16 channels_last": ("bf16", True, False), "bf16 channels_last compiled": ("bf16", True, True)}
METHOD_ORDER = ("ressl", "isd", "resa", "mocov2", "byol")
# A cold torch.compile of one method's step takes ~9 minutes on a 2-core CPU (and runs slower than eager there):
# on CPUs the full run measures the compiled setting for ReSSL alone.
CPU_COMPILED_METHODS = ("ressl",)
# ReSA's two backbone families side by side, one setting, same run: (ResNet, ViT, view side, batch) per device / mode
BACKBONES = {"cpu": ("resnet50", "vit-s16", 32, 32), "cuda": ("resnet50", "vit-s16", 224, 128),
             "smoke": ("resnet18-w8", "vit-t16", 16, 16)}


def defaults(device: str, mode: str) -> dict:
    """A CIFAR-sized ResNet-18 on a CPU; ImageNet-sized ResNet-50 on a GPU (smoke: tiny, for the test suite). Quick
    on a CPU: the Fashion-MNIST command's 16-wide ResNet-18, whose steps take a tenth of the full-width one's (the
    five methods in under two minutes on 2 cores)."""
    if mode == "smoke":
        return {"arch": "resnet18-w8", "size": 16, "batch": 16}
    if device == "cuda":
        return {"arch": "resnet50", "size": 224, "batch": 128}
    if mode == "quick":
        return {"arch": "resnet18-w16", "size": 32, "batch": 128}
    return {"arch": "resnet18", "size": 32, "batch": 64}


def _build(method: str, arch: str, size: int, batch: int, device: str, setting: str):
    from fastssl.config import TrainConfig
    from fastssl.device import autocast
    from fastssl.dist import BatchSplit
    from fastssl.methods import build
    from fastssl.models import convolutional
    precision, channels_last, compiled = SETTINGS[setting]
    dev = torch.device(device)
    cfg = TrainConfig(method=method, arch=arch, image_size=size, batch_size=batch)
    cfg, m = build(cfg, BatchSplit(batch, bn_splits=cfg.bn_splits).bn_groups)
    channels_last = channels_last and convolutional(m.encoder())  # as the trainer: not for a ViT
    m.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if compiled:
        m.compile()
    g = torch.Generator(dev).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = {role: torch.randn(batch, 3, spec.size, spec.size, generator=g, device=dev).contiguous(memory_format=fmt)
             for role, spec in m.view_specs(m.opts, size, (0.5,) * 3, (0.25,) * 3).items()}
    opt = torch.optim.SGD(m.trainable().parameters(), lr=0.01, momentum=0.9, weight_decay=m.opts.weight_decay)
    return m, views, opt, autocast(precision, dev)


def _measure(method: str, arch: str, size: int, batch: int, device: str, setting: str, steps: int, reps: int) -> dict:
    """Subprocess side: images/s runs, peak extra memory and model FLOPs per image of one (method, setting)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastssl.train import train_step
    compiled = SETTINGS[setting][2]
    m, views, opt, amp = _build(method, arch, size, batch, device, setting)
    base = torch.cuda.memory_allocated() if device == "cuda" else reset_cpu_peak()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with contextlib.nullcontext() if compiled else FlopCounterMode(display=False) as counter:
        train_step(m, views, opt, amp, 0.5)
    for _ in range(2 if compiled else 1):  # the rest of the warm-up (and compilation)
        train_step(m, views, opt, amp, 0.5)
    rates = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss, _ = train_step(m, views, opt, amp, 0.5)
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else cpu_peak() - base
    return {"images_per_s": summary(rates), "peak_extra_mib": peak / 2**20, "loss": float(loss),
            "backprops_per_image": type(m).backprops_per_image,
            "flops_per_image": counter.get_total_flops() / batch if counter is not None else None}


def _matmul_peak(device: str, dtype: str, reps: int) -> float:
    """Subprocess side: the best FLOP/s of large square matmuls in this dtype, over a few sizes, each run as
    torch.mm and as a 1x1 convolution (on this AMD CPU torch.mm is MKL's, whose fp32 runs at half the rate of
    oneDNN's, the library the convolutions run on; on CPUs a 1024-side matmul also runs below the larger ones)."""
    best = 0.0
    for n in (4096, 8192) if device == "cuda" else (1024, 2048, 4096):
        a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
        image = a.view(n // 16, 4, 4, n).permute(0, 3, 1, 2)  # the same n x n product: n pixels, n channels
        calls = max(1, 2**33 // n**3)  # about 16 GFLOP per timed run
        for product in (lambda: torch.mm(a, b), lambda: torch.nn.functional.conv2d(image, b.view(n, n, 1, 1))):
            for _ in range(reps + 1):
                sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    product()
                sync(device)
                best = max(best, calls * 2 * n**3 / (time.perf_counter() - start))
    return best


def methods_available() -> dict[str, type]:
    from fastssl.methods import METHODS
    return {m: METHODS[m] for m in METHOD_ORDER if m in METHODS}


def run(mode: str = "full", device: str = "auto", arch: str | None = None, size: int | None = None,
        batch: int | None = None, out_dir: str | None = None, methods: list[str] | None = None,
        settings: list[str] | None = None, backbones: bool = False) -> dict:
    """mode: full (every setting; on CPUs the compiled one for CPU_COMPILED_METHODS only) | quick (fp32 and
    bf16 channels_last, fewer runs; on CPUs a narrower network) | smoke (the test suite's check that the script
    runs: a tiny network, one run of one step). `methods`, `settings`: a subset (default: all methods, the mode's
    settings). bf16 settings are measured only where bf16 is native. backbones: also ReSA's step with a ResNet and
    a ViT (BACKBONES)."""
    device = pick_device(device)
    shape = {**defaults(device, mode), **{k: v for k, v in dict(arch=arch, size=size, batch=batch).items() if v}}
    steps, reps = {"full": (5, 5), "quick": (5, 3), "smoke": (1, 1)}[mode]
    if device == "cuda" and mode != "smoke":
        steps *= 4
    settings = settings or (list(SETTINGS) if mode == "full" else ["fp32", "bf16 channels_last"])
    methods = {m: cls for m, cls in methods_available().items() if not methods or m in methods}
    bf16 = native_bf16(device)
    peaks = {dt: run_script(__file__, "peak", device, dt, reps) if dt == "float32" or bf16 else None
             for dt in ("float32", "bfloat16")}
    cases, flops = [], {}  # flops: per method, counted in its first (eager) setting
    for method, cls in methods.items():
        for setting in settings:
            if SETTINGS[setting][2] and device == "cpu" and method not in CPU_COMPILED_METHODS:
                continue
            if SETTINGS[setting][0] == "bf16" and not bf16:
                cases.append({"method": method, "setting": setting, "skipped": NO_BF16,
                              "backprops_per_image": cls.backprops_per_image})
                continue
            m = run_script(__file__, "step", method, shape["arch"], shape["size"], shape["batch"], device, setting,
                           steps, reps)
            peak = peaks["bfloat16" if SETTINGS[setting][0] == "bf16" else "float32"]
            m["flops_per_image"] = flops.setdefault(method, m["flops_per_image"])
            cases.append({"method": method, "setting": setting, **m,
                          "mfu": m["flops_per_image"] * m["images_per_s"]["median"] / peak})
    backbones = _backbones(device, mode, bf16, steps, reps) if backbones else {}
    ratios = {}
    for setting in settings:  # the 1x-backprop claim: ReSSL's step time over BYOL-symmetric's, same run
        rate = {c["method"]: c["images_per_s"]["median"] for c in cases if c["setting"] == setting
                and "skipped" not in c}
        if "ressl" in rate and "byol" in rate:
            ratios[setting] = rate["byol"] / rate["ressl"]
    results = {"device": device_name(device), "torch": torch.__version__, **shape, "steps": steps, "reps": reps,
               "native_bf16": bf16, "matmul_peak_flops": peaks,
               "memory_measured": device == "cuda" or can_measure_cpu_memory(),
               "cases": cases, "backbones": backbones, "ressl_over_byol_step_time": ratios,
               "target": {"max_ressl_over_byol": 0.55,
                          "met": bool(ratios) and all(r <= 0.55 for r in ratios.values())}}
    write(out_dir, "step", results, to_markdown(results))
    return results


def _backbones(device: str, mode: str, bf16: bool, steps: int, reps: int) -> dict:
    """ReSA's step with a ResNet and with a ViT (timm's, the `timm` extra), at bf16 where it is native."""
    resnet, vit, size, batch = BACKBONES["smoke" if mode == "smoke" else device]
    setting = "bf16 channels_last" if bf16 else "fp32 channels_last"
    shape = {"method": "resa", "setting": setting, "size": size, "batch": batch}
    if importlib.util.find_spec("timm") is None:
        return {**shape, "skipped": "no timm (pip install 'fastssl[timm]')"}
    rates = {arch: run_script(__file__, "step", "resa", arch, size, batch, device, setting, steps, reps)["images_per_s"]
             for arch in (resnet, vit)}
    return {**shape, "images_per_s": rates}


def to_markdown(results: dict) -> str:
    peaks = results["matmul_peak_flops"]
    bf16 = f"{peaks['bfloat16'] / 1e9:.0f} GFLOP/s" if peaks["bfloat16"] else NO_BF16
    lines = [f"Training step, {results['arch']} at {results['size']} px, batch {results['batch']}; "
             f"{results['device']}, torch {results['torch']}; images/s median (min-max) of {results['reps']} runs of "
             f"{results['steps']} steps. Matmul peak measured in this run: fp32 {peaks['float32'] / 1e9:.0f} "
             f"GFLOP/s, bf16 {bf16}.", ""]
    rows = []
    for c in results["cases"]:
        figures = ([c["skipped"], "", "", ""] if "skipped" in c else
                   [spread(c["images_per_s"], ".1f"), f"{c['peak_extra_mib']:.0f}",
                    f"{c['flops_per_image'] / 1e9:.2f}", f"{c['mfu']:.1%}"])
        rows.append([c["method"], c["setting"], c["backprops_per_image"], *figures])
    lines += table(["method", "setting", "backprops/image", "images/s", "peak extra MiB", "GFLOP/image", "MFU"],
                   "llrrrrr", rows)
    b = results["backbones"]
    if b:
        figures = b.get("skipped") or ", ".join(f"{arch} {spread(rate, '.1f')} images/s"
                                                 for arch, rate in b["images_per_s"].items())
        lines += ["", f"Backbones, ReSA {b['setting']} at {b['size']} px, batch {b['batch']}: {figures}."]
    if results["ressl_over_byol_step_time"]:
        parts = ", ".join(f"{s}: {r:.2f}" for s, r in results["ressl_over_byol_step_time"].items())
        lines += ["", f"ReSSL step time / BYOL-symmetric step time (target <= "
                      f"{results['target']['max_ressl_over_byol']}): {parts} — "
                      f"{'met' if results['target']['met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main():
    parser = arguments(__doc__, "step.json and step.md", quick="two settings, fewer runs (on CPUs a narrower network)",
                       sub=True)
    parser.add_argument("--arch", help="backbone (default: resnet18 on CPU, its 16-wide form with --quick; "
                                       "resnet50 on CUDA)")
    parser.add_argument("--size", type=int, help="view side in px (default: 32 on CPU, 224 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size (default: 64 on CPU, 128 with --quick; 128 on CUDA)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHOD_ORDER)}")
    parser.add_argument("--settings", help=f"comma-separated subset of {','.join(SETTINGS)}")
    parser.add_argument("--backbones", action="store_true", help="also ReSA's step with a ResNet-50 and a ViT-S/16 "
                                                                 "(the timm extra), same setting")
    args = parser.parse_args()
    chosen = {name: getattr(args, name).split(",") if getattr(args, name) else None for name in ("methods", "settings")}
    unknown = set(chosen["settings"] or ()) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
    if args._sub:
        answer(args._sub, peak=_matmul_peak, step=_measure)
        return
    print(to_markdown(run(mode_of(args), args.device, args.arch, args.size, args.batch, args.out, **chosen,
                          backbones=args.backbones)), end="")


if __name__ == "__main__":
    main()
