"""Side-by-side study: ReSSL, ISD, ReSA, MoCo v2 and BYOL trained the same way on Fashion-MNIST.

    python bench/methods_study.py [--epochs N] [--arch A] [--batch-size B] [--train-subset N] [--quick] [--out DIR]

Every method trains with the same backbone, epochs, batch and images through `--pipeline tensor`, each with its
own recipe defaults (lr, temperatures, heads, momentum), in a fresh subprocess so that peak memory is its own.
Per method: weighted kNN top-1 (k=200, T=0.1) after every epoch; at the end, the clustering quality of the same
queries' features (ReSA's lens: k-means with k = 10 classes on the L2-normalised features, NMI, ARI and cluster
accuracy, fastssl.evaluate.cluster_scores); training images/s (steps only, not the kNN monitor), peak memory (the
process's max RSS on CPU, torch.cuda.max_memory_allocated on CUDA) and student backward passes per image. Writes
methods_study.json, methods_study.md (table) and methods_study.png (kNN vs epoch) to --out; each run's folder
(metrics.csv, checkpoint, config.json) goes to --out/methods_study_runs/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import arguments, device_name, pick_device, pyplot, save_figure, table, write

METHOD_ORDER = ("ressl", "isd", "resa", "mocov2", "byol")
QUICK = dict(epochs=1, arch="resnet18-w8", batch_size=64, train_subset=1024, knn_bank=1000, knn_queries=500)


def _train_one(settings: dict) -> dict:
    """Subprocess side: one training run; its summary, clustering scores, peak memory and cost per image."""
    import resource

    from fastssl import pipelines
    from fastssl.config import settings as config
    from fastssl.evaluate import cluster_scores, extract_features
    from fastssl.methods import METHODS
    from fastssl.train import loop, setup
    cuda = settings["device"] == "cuda"
    start = time.perf_counter()
    run = setup(config(**settings))
    summary = loop(run)
    run.logger.close()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queries = run.knn.queries  # the kNN monitor's
    reader = pipelines.eval_reader(run.cfg.pipeline, queries, run.cfg.image_size, batch_size=512, workers=0)
    features = extract_features(run.method.evaluated_encoder(), reader, queries.mean_std, run.device,
                                precision=run.precision, channels_last=run.cfg.channels_last)
    return {"knn_history": summary["knn_history"],
            "cluster": cluster_scores(features, queries.labels, seed=run.cfg.seed),
            "images_per_s": summary["images_per_s"], "steps": summary["steps"], "precision": summary["precision"],
            "wall_s": time.perf_counter() - start, "peak_memory_mib": peak / 2**20,
            "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
            "backprops_per_image": METHODS[settings["method"]].backprops_per_image,
            "config": json.loads((Path(settings["out"]) / "config.json").read_text())}


def _run_method(settings: dict) -> dict:
    """One method in a fresh interpreter: its progress bar on stderr, its result as the last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_sub", json.dumps(settings)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{settings['method']} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    *log, result = proc.stdout.strip().splitlines()
    print("\n".join(log), file=sys.stderr, flush=True)  # the trainer's own lines: settings, kNN per epoch
    return json.loads(result)


def run(epochs: int, arch: str, batch_size: int, train_subset: int, knn_bank: int, knn_queries: int,
        methods: list[str], device: str, precision: str, out_dir: str) -> dict:
    device = pick_device(device)
    runs_dir = Path(out_dir) / "methods_study_runs"
    common = dict(arch=arch, data="fashion-mnist", pipeline="tensor", epochs=epochs, batch_size=batch_size,
                  train_subset=train_subset, knn_bank=knn_bank, knn_queries=knn_queries, knn_every=1,
                  device=device, precision=precision, log_every=50)
    results = {**common, "device": device_name(device), "torch": torch.__version__, "methods": {}}
    for method in methods:
        run_dir = runs_dir / method
        shutil.rmtree(run_dir, ignore_errors=True)  # the trainer refuses to start over an earlier run
        print(f"== {method}", file=sys.stderr, flush=True)
        results["methods"][method] = _run_method({**common, "method": method, "out": str(run_dir)})
    write(out_dir, "methods_study", results, to_markdown(results), plot)
    return results


def to_markdown(results: dict) -> str:
    subset = f"{results['train_subset']} training images" if results["train_subset"] else "all training images"
    bank = results["knn_bank"] or "all train"
    queries = results["knn_queries"] or "all test"
    precision = " / ".join(sorted({r["precision"] for r in results["methods"].values()}))
    lines = [f"Fashion-MNIST, {results['arch']}, {results['epochs']} epochs, batch {results['batch_size']}, {subset}, "
             f"--pipeline tensor, {precision} (--precision {results['precision']}); {results['device']}, "
             f"torch {results['torch']}. Weighted kNN "
             f"top-1 (k=200, T=0.1; bank {bank}, queries {queries}) and, at the end, k-means on the queries' "
             f"L2-normalised features (k = 10 classes): NMI, ARI, cluster accuracy (Hungarian matching); each method "
             f"with its own recipe defaults.", ""]
    rows = []
    for method, r in results["methods"].items():
        history = r["knn_history"]
        best_epoch, best = max(history, key=lambda h: h[1])
        c = r["cluster"]
        rows.append([method, f"{history[-1][1]:.2f}", f"{best:.2f} ({best_epoch})", f"{history[0][1]:.2f}",
                     f"{c['nmi']:.3f}", f"{c['ari']:.3f}", f"{100 * c['acc']:.2f}", f"{r['images_per_s']:.0f}",
                     f"{r['peak_memory_mib']:.0f}", r["backprops_per_image"]])
    lines += table(["method", "kNN top-1 (final)", "best (epoch)", "random init", "NMI", "ARI", "cluster acc",
                    "images/s", "peak memory (MiB)", "backprops/image"], "l" + "r" * 9, rows)
    kinds = {r["peak_memory_kind"] for r in results["methods"].values()}
    lines += ["", f"Peak memory: {', '.join(sorted(kinds))} of each method's own process (data set and kNN monitor "
                  f"included on CPU). images/s counts training steps only. Random init: the monitor's epoch-0 point, "
                  f"the untrained encoder with the BatchNorm statistics of the data."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for method, r in results["methods"].items():
        ax.plot([e for e, _ in r["knn_history"]], [a for _, a in r["knn_history"]], marker="o", label=method)
    ax.set(xlabel="epoch", ylabel="weighted kNN top-1 (%)",
           title=f"Fashion-MNIST, {results['arch']}, batch {results['batch_size']}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120)


def main():
    quick = ", ".join(f"{k} {v}" for k, v in QUICK.items())
    parser = arguments(__doc__, "methods_study.{json,md,png} and the runs",
                       quick=f"a check of the script in a few minutes: {quick}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arch", default="resnet18-w16", help="backbone, the same for every method")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-subset", type=int, default=20000, help="training images (0: all 60000)")
    parser.add_argument("--knn-bank", type=int, default=10000, help="kNN bank from the train split (0: all)")
    parser.add_argument("--knn-queries", type=int, default=2000, help="kNN queries from the test split (0: all)")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated, in table order")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA and on CPUs with native bf16, as `fastssl train` picks")
    parser.add_argument("--_sub", help=argparse.SUPPRESS)  # one training run's settings, run by _run_method
    args = parser.parse_args()
    if args._sub:
        print(json.dumps(_train_one(json.loads(args._sub))))
        return
    settings = dict(epochs=args.epochs, arch=args.arch, batch_size=args.batch_size, train_subset=args.train_subset,
                    knn_bank=args.knn_bank, knn_queries=args.knn_queries)
    if args.quick:
        settings.update(QUICK)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHOD_ORDER)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHOD_ORDER)}")
    results = run(**settings, methods=methods, device=args.device, precision=args.precision, out_dir=args.out)
    print(to_markdown(results), end="")


if __name__ == "__main__":
    main()
