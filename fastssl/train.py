"""The training loop: one screen, top to bottom. Everything method-specific lives in the method."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, data, dist, methods
from . import pipelines
from .config import TrainConfig, from_dict, resolve, to_dict
from .errors import UserError
from .evaluate import extract_features, knn_accuracy, with_data_bn_stats
from .models import SMALL_IMAGE_MAX, build_backbone, split_batchnorm
from .views import apply_overrides


# Settings a resumed run takes from its command line; every other one comes from the checkpoint.
RESUME_OVERRIDES = ("epochs", "max_steps", "device", "workers", "resume", "out")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # torchrun starts one process per GPU and tells each its GPU by LOCAL_RANK
        index = dist.local_rank()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matmul/conv on this CPU (AVX512-BF16 or AMX): autocast then helps rather than hurts."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """bf16 autocast for convs and matmuls; BN, softmaxes and the loss stay fp32 (autocast's fp32 list + .float())."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def warmup_cosine(warmup_steps: int, total_steps: int, final_ratio: float):
    """LR multiplier per iteration: linear warm-up, then cosine down to `final_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def build_method(cfg: TrainConfig, world: int = 1) -> tuple[TrainConfig, methods.base.Method]:
    """Resolve the recipe defaults and build the method (student, teacher, heads, queue) on CPU."""
    method_cls = methods.get(cfg.method)
    size = cfg.image_size
    cfg = resolve(cfg, method_cls.defaults(small=size <= SMALL_IMAGE_MAX))
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.arch, size)
    if world == 1:  # under DDP every GPU's BN already sees its own slice of the batch
        if cfg.batch_size % cfg.bn_splits:
            raise UserError(f"batch size {cfg.batch_size} is not a multiple of bn_splits={cfg.bn_splits}; change "
                            f"either (--bn-splits 1 turns split BatchNorm off)")
        split_batchnorm(backbone, cfg.bn_splits)
    return cfg, method_cls(cfg, backbone)


def train_step(method, views: dict, opt: torch.optim.Optimizer, amp, progress: float):
    """One optimisation step: the method's loss under autocast, backward, optimiser step, then the method's
    post-step updates (queue) and the encoder's running average. Returns the loss (not synchronised) and the
    method's extra statistics."""
    with amp:
        loss, stats = method.step(views, progress)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    method.after_step()
    method.update_encoder_average()
    return loss.detach(), stats


class Logger:
    """CSV + TensorBoard rows on rank 0. A resumed run first drops the rows logged after its checkpoint."""

    def __init__(self, out: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(out / "tb", purge_step=start_step or None)
            self.csv_path = out / "metrics.csv"
            if start_step and self.csv_path.exists():
                with open(self.csv_path, newline="") as f:
                    rows = [r for r in csv.reader(f) if r[0] == "step" or int(r[0]) <= start_step]
                with open(self.csv_path, "w", newline="") as f:
                    csv.writer(f).writerows(rows)

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "key", "value"]) if new else None
            w.writerows([step, k, v] for k, v in values.items())

    def close(self):
        if self.enabled:
            self.tb.close()


class KnnMonitor:
    """Weighted kNN top-1 of the encoder: bank = unaugmented train split, queries = test split."""

    def __init__(self, cfg: TrainConfig, size: int, device: torch.device, precision: str):
        self.bank = data.load(cfg.data, "train").subset(cfg.knn_bank, cfg.seed)
        self.queries = data.load(cfg.data, "test").subset(cfg.knn_queries, cfg.seed)
        self.kw = dict(size=size, device=device, workers=cfg.workers, precision=precision,
                       channels_last=cfg.channels_last)
        self.k, self.t = cfg.knn_k, cfg.knn_t

    def __call__(self, encoder, data_bn_stats: bool = False) -> float:
        if data_bn_stats:
            encoder = with_data_bn_stats(encoder, self.bank, self.kw["size"], self.kw["device"],
                                         channels_last=self.kw["channels_last"])
        bank = extract_features(encoder, self.bank, **self.kw)
        queries = extract_features(encoder, self.queries, **self.kw)
        return knn_accuracy(bank, self.bank.labels, queries, self.queries.labels, self.k, self.t)


def train(cfg: TrainConfig) -> dict:
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    state = None
    if cfg.resume:
        state = checkpoint.load(ckpt_path)
        cfg = from_dict({**state["config"], **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}})
    elif ckpt_path.exists():
        raise UserError(f"{out} already holds a run ({ckpt_path}); continue it with --resume, or pass another --out")
    device = pick_device(cfg.device)
    dist.init_from_env(device)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    precision = pick_precision(cfg.precision, device)

    train_set = data.load(cfg.data, "train").subset(cfg.train_subset, cfg.seed)
    size = cfg.image_size or train_set.native_size or 224
    cfg, method = build_method(dataclasses.replace(cfg, image_size=size), world)
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if world > 1:
        method.distributed_student = DistributedDataParallel(method.trainable())
    if cfg.compile:
        for module in method.children():
            if module is not method.encoder_average:  # that one only runs in the kNN monitor
                module.compile()
    views = apply_overrides(method.views(cfg, size, *train_set.mean_std), cfg.views)
    loader = pipelines.build(cfg.pipeline, train_set, views, batch_size=cfg.batch_size // world, device=device,
                             workers=cfg.workers, seed=cfg.seed, rank=rank, world=world,
                             channels_last=cfg.channels_last)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(method.trainable().parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    # A run shorter than a few warm-ups (a quick look, a test) still gets its cosine: warm-up <= a fifth of the run.
    recipe_warmup = round(cfg.warmup_epochs * steps_per_epoch)
    warmup_steps = min(recipe_warmup, total_steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, total_steps, cfg.final_lr_ratio))
    step, epoch, start_batch, history = 0, 0, 0, []
    if state is not None:
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, start_batch, history = state["step"], state["epoch"], state["batch"], state["knn_history"]
        checkpoint.set_rng_state(state["rng"])
    if main:
        capped = f" (a fifth of the run; the recipe's {cfg.warmup_epochs:g})" if warmup_steps < recipe_warmup else ""
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        print(f"fastssl: {cfg.method} | {cfg.arch} @ {size}px | {len(train_set)} images from {train_set.root} | "
              f"pipeline {cfg.pipeline} | {device} {precision}{' channels_last' if cfg.channels_last else ''}"
              f"{' compiled' if cfg.compile else ''} | {world} process(es)"
              f"{f' | views changed: {cfg.views}' if cfg.views else ''}"
              f"{f' | evaluating the encoder average (decay {cfg.encoder_ema:g})' if cfg.encoder_ema else ''}")
        print(f"lr {lr:.4g} = {cfg.lr} x batch {cfg.batch_size} / 256 | {cfg.epochs} epochs x {steps_per_epoch} "
              f"steps | warm-up {warmup_steps / steps_per_epoch:.3g} epochs{capped}, then "
              f"{'constant' if cfg.final_lr_ratio == 1 else f'cosine to {cfg.final_lr_ratio:g} x lr'}"
              f"{f' | resuming at step {step}' if step else ''}")
    logger = Logger(out, main, step)
    monitor = KnnMonitor(cfg, size, device, precision) if main else None

    def save(epoch_: int, batch_: int) -> None:
        if main:
            checkpoint.atomic_save({"config": to_dict(cfg), "method": method.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "step": step, "epoch": epoch_, "batch": batch_,
                                    "knn_history": history, "rng": checkpoint.rng_state()}, ckpt_path)

    def monitor_knn(epoch_: int) -> None:
        if main:
            history.append((epoch_, monitor(method.evaluated_encoder(), data_bn_stats=step == 0)))
            logger.log(step, knn_top1=history[-1][1])
            tqdm.write(f"epoch {epoch_}: kNN top-1 {history[-1][1]:.2f}%")

    if main and cfg.knn_every and not history:
        monitor_knn(0)  # the random-init reference point of the curve (BN statistics of the data)
    stop = cfg.max_steps and step >= cfg.max_steps
    amp = autocast(precision, device)
    step_start, train_seconds = step, 0.0  # images/s counts the steps only, not the kNN monitor
    while epoch < cfg.epochs and not stop:
        method.train()
        bar = tqdm(loader.epoch(epoch, start_batch), total=steps_per_epoch, initial=start_batch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not main, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line per 30 s
        epoch_start = window_start = time.perf_counter()
        loss_sum, window_steps = torch.zeros((), device=device), 0
        for batch_idx, views in enumerate(bar, start=start_batch):
            loss, stats = train_step(method, views, opt, amp, step / total_steps)
            sched.step()
            step, window_steps, loss_sum = step + 1, window_steps + 1, loss_sum + loss
            if step % cfg.log_every == 0:  # the only host sync of the loop
                mean_loss = loss_sum.item() / window_steps
                rate = window_steps * cfg.batch_size / (time.perf_counter() - window_start)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}", lr=f"{sched.get_last_lr()[0]:.3g}",
                               refresh=False)  # shown at the next refresh: one here would print a stale count
                logger.log(step, loss=mean_loss, lr=sched.get_last_lr()[0], images_per_s=rate,
                           **{k: float(v) for k, v in stats.items()})
                window_start, loss_sum, window_steps = time.perf_counter(), torch.zeros_like(loss_sum), 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(epoch, batch_idx + 1)
            if cfg.max_steps and step >= cfg.max_steps:
                stop = True
                break
        bar.close()
        train_seconds += time.perf_counter() - epoch_start
        if stop and batch_idx + 1 < steps_per_epoch:
            save(epoch, batch_idx + 1)
            break
        epoch, start_batch = epoch + 1, 0
        save(epoch, 0)
        if cfg.knn_every and (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
            monitor_knn(epoch)
    images_per_s = (step - step_start) * cfg.batch_size / max(train_seconds, 1e-9)

    summary = {"steps": step, "epochs": epoch, "images_per_s": images_per_s, "precision": precision,
               "knn_history": history}
    if main:
        if not history or history[-1][0] != epoch:
            monitor_knn(epoch)
        summary["knn_top1"] = history[-1][1]
        checkpoint.atomic_save(checkpoint.backbone_state_dict(method.evaluated_encoder()), out / "backbone.pt")
        _plot_knn(history, out / "knn.png", f"{cfg.method} {cfg.arch} on {cfg.data}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"kNN top-1 (k={cfg.knn_k}, T={cfg.knn_t}) after {epoch} epochs ({step} steps): "
              f"{summary['knn_top1']:.2f}% | {images_per_s:.0f} images/s | backbone: {out / 'backbone.pt'}")
    logger.close()
    return summary


def _plot_knn(history: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([e for e, _ in history], [a for _, a in history], marker="o")
    ax.set(xlabel="epoch", ylabel="weighted kNN top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
