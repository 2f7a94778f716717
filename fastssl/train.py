"""The training loop: one screen, top to bottom. Everything method-specific lives in the method."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, data, dist, methods
from . import pipelines
from .config import TrainConfig, from_dict, resolve, to_dict
from .errors import UserError
from .evaluate import extract_features, knn_accuracy
from .models import SMALL_IMAGE_MAX, build_backbone, split_batchnorm


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_dist():
        return torch.device("cuda", torch.cuda.current_device())
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


def image_size(cfg: TrainConfig, images: data.ImageSet) -> int:
    return cfg.image_size or images.native_size or 224


def build_method(cfg: TrainConfig, size: int, world: int = 1) -> tuple[TrainConfig, methods.base.Method]:
    """Resolve the recipe defaults and build the method (student, teacher, heads, queue) on CPU."""
    method_cls = methods.get(cfg.method)
    cfg = resolve(cfg, method_cls.defaults(small=size <= SMALL_IMAGE_MAX))
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.arch, size)
    if world == 1:  # under DDP every GPU's BN already sees its own slice of the batch
        split_batchnorm(backbone, cfg.bn_splits)
    return cfg, method_cls(cfg, backbone)


class Logger:
    """CSV + TensorBoard rows on rank 0."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(out / "tb")
            self.csv_path = out / "metrics.csv"

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

    def __call__(self, encoder) -> float:
        bank = extract_features(encoder, self.bank, **self.kw)
        queries = extract_features(encoder, self.queries, **self.kw)
        return knn_accuracy(bank, self.bank.labels, queries, self.queries.labels, self.k, self.t)


def train(cfg: TrainConfig) -> dict:
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    state = None
    if cfg.resume:
        state = checkpoint.load(ckpt_path)
        cfg = from_dict({**state["config"], **{k: getattr(cfg, k) for k in ("epochs", "resume", "out")}})
    device = pick_device(cfg.device)
    dist.init_from_env(device)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    precision = pick_precision(cfg.precision, device)

    train_set = data.load(cfg.data, "train").subset(cfg.train_subset, cfg.seed)
    size = image_size(cfg, train_set)
    cfg, method = build_method(cfg, size, world)
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if world > 1:
        method.distributed_student = DistributedDataParallel(method.trainable())
    if cfg.compile:
        for module in method.children():
            module.compile()
    views = method.views(cfg, size, *train_set.mean_std)
    loader = pipelines.build(cfg.pipeline, train_set, views, batch_size=cfg.batch_size // world, device=device,
                             workers=cfg.workers, seed=cfg.seed, rank=rank, world=world,
                             channels_last=cfg.channels_last)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(method.trainable().parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch),
                                                                 total_steps, cfg.final_lr_ratio))
    step, epoch, start_batch, history = 0, 0, 0, []
    if state is not None:
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, start_batch, history = state["step"], state["epoch"], state["batch"], state["knn_history"]
        checkpoint.set_rng_state(state["rng"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        print(f"fastssl: {cfg.method} | {cfg.arch} @ {size}px | {len(train_set)} images from {train_set.root} | "
              f"pipeline {cfg.pipeline} | {device} {precision}{' channels_last' if cfg.channels_last else ''}"
              f"{' compiled' if cfg.compile else ''} | {world} process(es)")
        print(f"lr {lr:.4g} = {cfg.lr} x batch {cfg.batch_size} / 256 | {cfg.epochs} epochs x {steps_per_epoch} "
              f"steps{f', resuming at step {step}' if step else ''}")
    logger = Logger(out, main)
    monitor = KnnMonitor(cfg, size, device, precision) if main else None

    def save(epoch_: int, batch_: int) -> None:
        if main:
            checkpoint.atomic_save({"config": to_dict(cfg), "method": method.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "step": step, "epoch": epoch_, "batch": batch_,
                                    "knn_history": history, "rng": checkpoint.rng_state()}, ckpt_path)

    def monitor_knn(epoch_: int) -> None:
        if main:
            history.append((epoch_, monitor(method.encoder())))
            logger.log(step, knn_top1=history[-1][1])
            tqdm.write(f"epoch {epoch_}: kNN top-1 {history[-1][1]:.2f}%")

    if main and cfg.knn_every and not history:
        monitor_knn(0)  # the random-init reference point of the curve
    stop = cfg.max_steps and step >= cfg.max_steps
    amp = autocast(precision, device)
    t_start, step_start, loss_sum = time.perf_counter(), step, torch.zeros((), device=device)
    while epoch < cfg.epochs and not stop:
        method.train()
        bar = tqdm(loader.epoch(epoch, start_batch), total=steps_per_epoch, initial=start_batch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not main, dynamic_ncols=True)
        for batch_idx, views in enumerate(bar, start=start_batch):
            with amp:
                loss, stats = method.step(views, step / total_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            method.after_step()
            step += 1
            loss_sum += loss.detach()
            if step % cfg.log_every == 0:  # the only host sync of the loop
                rate = (step - step_start) * cfg.batch_size / (time.perf_counter() - t_start)
                mean_loss = loss_sum.item() / cfg.log_every
                loss_sum.zero_()
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}", lr=f"{sched.get_last_lr()[0]:.3g}")
                logger.log(step, loss=mean_loss, lr=sched.get_last_lr()[0], images_per_s=rate,
                           **{k: float(v) for k, v in stats.items()})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(epoch, batch_idx + 1)
            if cfg.max_steps and step >= cfg.max_steps:
                stop = True
                break
        bar.close()
        if stop and batch_idx + 1 < steps_per_epoch:
            save(epoch, batch_idx + 1)
            break
        epoch, start_batch = epoch + 1, 0
        save(epoch, 0)
        if cfg.knn_every and (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
            monitor_knn(epoch)
    images_per_s = (step - step_start) * cfg.batch_size / (time.perf_counter() - t_start)

    summary = {"steps": step, "epochs": epoch, "images_per_s": images_per_s, "knn_history": history}
    if main:
        if not history or history[-1][0] != epoch:
            monitor_knn(epoch)
        summary["knn_top1"] = history[-1][1]
        checkpoint.atomic_save(checkpoint.backbone_state_dict(method.encoder()), out / "backbone.pt")
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
