"""A training run: `setup` builds a Run (settings, device, method, loader, optimiser, schedule, state) and
`loop` trains it, top to bottom. Everything method-specific lives in the method, everything about data in the
pipelines; this module holds the order of things and what makes a run survive (checkpoints, signals, faults).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, data, dist, methods, pipelines
from .config import TrainConfig, explicit, resolve, resume_config, to_dict
from .device import autocast, pick_device, pick_precision
from .errors import Stopped, UserError
from .models import build_backbone, split_batchnorm
from .monitor import KnnMonitor, auto_interval
from .pipelines.common import Loader, Shard
from .views import apply_overrides, is_small

def build_method(cfg: TrainConfig, bn_groups: int = 1) -> tuple[TrainConfig, methods.base.Method]:
    """Resolve the recipe defaults and build the method (student, teacher, heads, queue) on CPU, with its
    BatchNorm statistics in `bn_groups` groups of each process's batch (split BN)."""
    method_cls = methods.get(cfg.method)
    cfg = resolve(cfg, method_cls.defaults(small=is_small(cfg.image_size)))
    torch.manual_seed(cfg.seed)
    method = method_cls(cfg, build_backbone(cfg.arch, cfg.image_size))
    return cfg, split_batchnorm(method, bn_groups)


def bn_groups(cfg: TrainConfig, world: int) -> int:
    """Split-BN groups per process: bn_splits over the global batch, shared by the processes (1 with SyncBN)."""
    if cfg.sync_bn:
        return 1
    groups = max(1, round(cfg.bn_splits / world))
    if (cfg.batch_size // world) % groups:
        where = f" per process ({world} processes share bn_splits={cfg.bn_splits})" if world > 1 else ""
        raise UserError(f"batch size {cfg.batch_size // world}{where} is not a multiple of bn_splits={groups}; "
                        f"change either (--bn-splits 1 turns split BatchNorm off)")
    return groups


def default_workers() -> int:
    """Loader workers per process: this machine's cores shared by its processes."""
    return max(1, (os.cpu_count() or 1) // dist.local_world_size())


def warmup_cosine(warmup_steps: int, total_steps: int, final_ratio: float):
    """LR multiplier per iteration: linear warm-up, then cosine down to `final_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def train_step(method, views: dict, opt: torch.optim.Optimizer, amp, progress: float):
    """One optimisation step: the method's loss under autocast, backward, optimiser step, then the method's
    post-step updates (queue, the encoder's running average). Returns the loss (not synchronised) and the
    method's extra statistics."""
    with amp:
        loss, stats = method.step(views, progress)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    method.after_step()
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


class StopSignals:
    """SIGTERM and SIGUSR1 (a cluster's preemption notices) and Ctrl-C ask the run to stop after its current step;
    a second Ctrl-C interrupts at once."""

    NAMES = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self.previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        for name in self.NAMES:
            try:
                self.previous[name] = signal.signal(getattr(signal, name), self._handle)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        return self

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)


@dataclass
class Run:
    """Everything a training run is made of, and where it stands (step, epoch, batch within the epoch)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    precision: str
    method: methods.base.Method
    loader: Loader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    monitor: KnnMonitor | None
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list = field(default_factory=list)  # (epoch, kNN top-1 %); epochs are fractional mid-epoch
    monitored_at: int = -1  # the step of the last kNN pass
    bad_files: list = field(default_factory=list)  # replaced with --skip-bad-images
    saved: Path | None = None  # the newest checkpoint, known good

    @property
    def main(self) -> bool:
        return dist.rank() == 0

    def state(self) -> dict:
        return {"config": to_dict(self.cfg), "method": self.method.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "knn_history": self.history, "monitored_at": self.monitored_at, "bad_files": self.bad_files,
                "rng": checkpoint.rng_state()}

    def load_state(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.history, self.monitored_at = state["knn_history"], state["monitored_at"]
        self.bad_files = state["bad_files"]
        checkpoint.set_rng_state(state["rng"])


def _resume(cfg: TrainConfig, given: dict) -> tuple[TrainConfig, dict | None, Path | None, list[str]]:
    """The settings to run with, and the checkpoint to continue from (None: a fresh run)."""
    out = Path(cfg.out)
    if cfg.resume or (cfg.auto_resume and checkpoint.has_run(out)):
        state, path = checkpoint.load_run(out)
        cfg, changes = resume_config(state["config"], cfg, given)
        return cfg, state, path, changes
    if checkpoint.has_run(out):
        raise UserError(f"{out} already holds a run ({out / checkpoint.LATEST}); continue it with --resume, or pass "
                        f"another --out")
    return cfg, None, None, []


def setup(cfg: TrainConfig, given: dict | None = None) -> Run:
    """Build the run: settings (resumed ones from the checkpoint), process group, data, method, loader,
    optimiser, schedule, monitor; restore the checkpoint's state; print the banner."""
    cfg, state, resumed_from, changes = _resume(cfg, explicit(cfg) if given is None else given)
    device = pick_device(cfg.device)
    dist.init_from_env(device, cfg.dist_timeout)
    rank, world = dist.rank(), dist.world_size()
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    if cfg.sync_bn and cfg.compile and world > 1:
        raise UserError("--sync-bn with --compile: the BatchNorm layers' collectives would split the compiled graph at "
                        "every layer; drop one (split BN, the default, compiles whole)")
    precision = pick_precision(cfg.precision, device)

    train_set = data.load(cfg.data, "train").subset(cfg.train_subset, cfg.seed)
    size, size_from = ((cfg.image_size, "as set") if cfg.image_size else
                       (train_set.native_size or 224, train_set.size_note))
    cfg, method = build_method(dataclasses.replace(cfg, image_size=size), bn_groups(cfg, world))
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if world > 1:
        method.distribute(device, cfg.sync_bn)
    if cfg.compile:
        method.compile()
    views = apply_overrides(method.views(cfg, size, *train_set.mean_std), cfg.views)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    loader = pipelines.build(cfg.pipeline, train_set, views, Shard(rank, world, cfg.seed, cfg.batch_size // world),
                             device, workers=workers, channels_last=cfg.channels_last)

    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(method.trainable().parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    # A run shorter than a few warm-ups (a quick look, a test) still gets its cosine: warm-up <= a fifth of the run.
    recipe_warmup = round(cfg.warmup_epochs * steps_per_epoch)
    warmup_steps = min(recipe_warmup, total_steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, total_steps, cfg.final_lr_ratio))

    queries, no_monitor = data.eval_split(cfg.data, cfg.data_val) if train_set.labelled else (None, "no labels")
    monitor, auto = None, cfg.knn_every is None
    if queries is not None:
        monitor = KnnMonitor(cfg, train_set, queries, size, device, precision, workers)
        cfg = dataclasses.replace(cfg, knn_every=auto_interval(len(monitor.bank) + len(monitor.queries),
                                                               len(train_set)) if auto else cfg.knn_every)
    run = Run(cfg, Path(cfg.out), device, precision, method, loader, opt, sched, monitor, steps_per_epoch,
              total_steps)
    if state is not None:
        run.load_state(state)
        run.saved = resumed_from
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        _banner(run, train_set, size_from, workers, (warmup_steps, recipe_warmup), changes, no_monitor, auto)
    return run


def _banner(run: Run, train_set, size_from: str, workers: int, warmups: tuple[int, int], changes: list[str],
            no_monitor: str, auto: bool) -> None:
    """What the run is, in three lines: data, model, device and processes; the schedule; the kNN monitor."""
    cfg, world, (warmup_steps, recipe_warmup) = run.cfg, dist.world_size(), warmups
    capped = f" (a fifth of the run; the recipe's {cfg.warmup_epochs:g})" if warmup_steps < recipe_warmup else ""
    groups = "SyncBatchNorm over the global batch" if cfg.sync_bn else (
        f"BN in {bn_groups(cfg, world) * world} groups of {cfg.batch_size // world // bn_groups(cfg, world)}")
    loader = "" if cfg.pipeline == "tensor" else f", {workers} workers"  # the tensor pipeline has no workers
    loader += f", {run.loader.scratch_note()}" if hasattr(run.loader, "scratch_note") else ""  # FFCV's decode buffers
    print(f"fastssl: {cfg.method} | {cfg.arch} @ {cfg.image_size}px ({size_from}) | "
          f"{len(train_set)} images from {train_set.root} | pipeline {cfg.pipeline}{loader} | {run.device} "
          f"{run.precision}{' channels_last' if cfg.channels_last else ''}{' compiled' if cfg.compile else ''} | "
          f"{world} process(es), {groups}"
          f"{f' | views changed: {cfg.views}' if cfg.views else ''}"
          f"{f' | evaluating the encoder average (decay {cfg.encoder_ema:g})' if cfg.encoder_ema else ''}")
    print(f"lr {cfg.lr * cfg.batch_size / 256:.4g} = {cfg.lr} x batch {cfg.batch_size} / 256 | {cfg.epochs} epochs x "
          f"{run.steps_per_epoch} steps | warm-up {warmup_steps / run.steps_per_epoch:.3g} epochs{capped}, then "
          f"{'constant' if cfg.final_lr_ratio == 1 else f'cosine to {cfg.final_lr_ratio:g} x lr'}"
          f"{f' | resuming at step {run.step} from {run.saved}' if run.saved else ''}"
          f"{''.join(f' | {c}' for c in changes)}")
    print(run.monitor.describe(len(train_set), cfg.knn_every, auto) if run.monitor else
          f"kNN monitor off: {no_monitor.rstrip('.')}")


@contextlib.contextmanager
def _writing(run: Run, what: Path):
    """An OSError while writing the run's files (a full disk, a folder gone) as a one-line error."""
    try:
        yield
    except OSError as e:
        kept = f"the last checkpoint, {run.saved}, is intact" if run.saved else "no checkpoint was written yet"
        raise UserError(f"cannot write {what} ({e.strerror or e}); {kept}; free some space or fix the folder, then "
                        f"run the same command with --resume") from None


def _non_finite(run: Run, where: str) -> UserError:
    kept = f"the last good checkpoint, {run.saved}, is left as it was" if run.saved else "no checkpoint was written"
    return UserError(f"the loss is not finite {where}; stopped at step {run.step}: {kept}; lower --lr (or check the "
                     f"data), then resume from it with --resume or start again")


def save(run: Run, loss_sum: torch.Tensor) -> None:
    """Every rank: BN statistics averaged over ranks; rank 0 writes the checkpoint, after checking that nothing in
    it (loss since the last check, weights, teacher, queue) is NaN or infinite: a poisoned state never replaces
    a good checkpoint."""
    dist.average_batchnorm_statistics(run.method)
    state = run.state()
    tensors = [t for t in state["method"].values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    finite = torch.stack([loss_sum.isfinite(), *[t.isfinite().all() for t in tensors]]).all().float()
    if dist.all_reduce(finite).item() < dist.world_size():
        raise _non_finite(run, f"in the steps before step {run.step}")
    if run.main:
        with _writing(run, run.out / checkpoint.LATEST):
            checkpoint.save_run(state, run.out)
    run.saved = run.out / checkpoint.LATEST


def monitor(run: Run, data_bn_stats: bool = False) -> None:
    dist.average_batchnorm_statistics(run.method)
    accuracy = run.monitor(run.method.evaluated_encoder(), data_bn_stats=data_bn_stats)
    epoch = run.epoch + run.batch / run.steps_per_epoch
    run.history.append((epoch, accuracy))
    run.monitored_at = run.step
    if run.main:
        tqdm.write(f"epoch {epoch:g}: kNN top-1 {accuracy:.2f}%")


def log_window(run: Run, logger: Logger, bar: tqdm, loss_sum: torch.Tensor, window: int, seconds: float,
               stats: dict) -> None:
    """The loop's only host sync, every --log-every steps: the loss of the window, averaged over the ranks,
    checked for NaN/Inf, shown and logged."""
    mean_loss = dist.all_reduce(loss_sum, "mean").item() / window
    if not math.isfinite(mean_loss):
        raise _non_finite(run, f"at step {run.step} (mean loss {mean_loss} over the last {window})")
    rate, lr = window * run.cfg.batch_size / seconds, run.sched.get_last_lr()[0]
    # shown at the bar's next refresh: a refresh here would print a stale count
    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}", refresh=False)
    with _writing(run, run.out / "metrics.csv"):
        logger.log(run.step, loss=mean_loss, lr=lr, images_per_s=rate, **{k: float(v) for k, v in stats.items()})


def _stopped(run: Run, signal_name: str | None, unreadable: list[str]) -> Exception:
    if unreadable:
        return UserError(f"cannot decode image {unreadable[0]}; stopped at step {run.step} with a checkpoint; "
                         f"remove or replace it (`fastssl check DATA` lists every bad file), or pass "
                         f"--skip-bad-images, then run the same command with --resume")
    return Stopped(f"stopped by {signal_name or 'another process'} at step {run.step}; checkpoint {run.saved}; "
                   f"continue with the same command and --resume (or --auto-resume)")


def loop(run: Run) -> dict:
    """Train to the end of the last epoch (or --max-steps); returns the run's summary. Every rank agrees, step by
    step, whether to stop (a signal, an unreadable image) or checkpoint (--checkpoint-minutes) before the step."""
    cfg, main = run.cfg, run.main
    amp = autocast(run.precision, run.device)
    logger = Logger(run.out, main, run.step)
    vote, last_save, unreadable = dist.Vote(), time.monotonic(), []
    if run.monitor and cfg.knn_every and not run.history:
        monitor(run, data_bn_stats=True)  # the random-init reference point of the curve (BN statistics of the data)
    step_start, train_seconds, stopped = run.step, 0.0, False
    with StopSignals() as signals:
        while run.epoch < cfg.epochs and not stopped:
            run.method.train()
            # closed on any exit, an exception included: a DataLoader worker (it ignores the stop signals) left
            # behind would hang the interpreter's exit
            with contextlib.closing(run.loader.epoch(run.epoch, run.batch)) as batches:
                bar = tqdm(batches, total=run.steps_per_epoch, initial=run.batch,
                           desc=f"epoch {run.epoch + 1}/{cfg.epochs}", disable=not main, dynamic_ncols=True,
                           mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line per 30 s
                epoch_start = window_start = time.perf_counter()
                loss_sum, window = torch.zeros((), device=run.device), 0
                for views in bar:
                    bad = views.pop("bad_files", [])
                    unreadable += [] if cfg.skip_bad_images else bad
                    stopped, due = vote(signals.received or unreadable,
                                        main and time.monotonic() - last_save > 60 * cfg.checkpoint_minutes > 0)
                    if stopped or due:
                        save(run, loss_sum)
                        last_save = time.monotonic()
                    if stopped:
                        break
                    run.bad_files += bad  # replaced by other images (a stand-in also under torchrun, for one step)
                    loss, stats = train_step(run.method, views, run.opt, amp, run.step / run.total_steps)
                    run.sched.step()
                    run.step, run.batch, window, loss_sum = run.step + 1, run.batch + 1, window + 1, loss_sum + loss
                    if run.step % cfg.log_every == 0:
                        log_window(run, logger, bar, loss_sum, window, time.perf_counter() - window_start, stats)
                        window_start, loss_sum, window = time.perf_counter(), torch.zeros_like(loss_sum), 0
                    if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                        save(run, loss_sum)
                        last_save = time.monotonic()
                    if cfg.max_steps and run.step >= cfg.max_steps:
                        break
                bar.close()
            train_seconds += time.perf_counter() - epoch_start
            if stopped:
                break
            if cfg.max_steps and run.step >= cfg.max_steps and run.batch < run.steps_per_epoch:  # mid-epoch
                save(run, loss_sum)
                break
            run.epoch, run.batch = run.epoch + 1, 0
            save(run, loss_sum)
            last_save = time.monotonic()
            if run.monitor and cfg.knn_every and (run.epoch % cfg.knn_every == 0 or run.epoch == cfg.epochs):
                monitor(run)
            if cfg.max_steps and run.step >= cfg.max_steps:
                break
        vote.close()
    logger.close()
    if stopped:
        raise _stopped(run, signals.received, unreadable)
    return finish(run, (run.step - step_start) * cfg.batch_size / max(train_seconds, 1e-9), train_seconds)


def finish(run: Run, images_per_s: float, train_seconds: float) -> dict:
    """The last kNN pass, the exported backbone, the curve and the summary."""
    if run.monitor and run.monitored_at != run.step:
        monitor(run)
    bad_files = sorted({f for files in dist.all_gather_objects(run.bad_files) for f in files})
    summary = {"steps": run.step, "epochs": run.epoch, "images_per_s": images_per_s, "precision": run.precision,
               "processes": dist.world_size(), "knn_history": run.history, "train_seconds": train_seconds,
               "monitor_seconds": run.monitor.seconds if run.monitor else 0.0, "bad_images": len(bad_files)}
    if run.history:
        summary["knn_top1"] = run.history[-1][1]
    if run.main:
        with _writing(run, run.out):
            checkpoint.atomic_save(checkpoint.backbone_state_dict(run.method.evaluated_encoder()),
                                   run.out / "backbone.pt")
            if run.history:
                _plot_knn(run.history, run.out / "knn.png", f"{run.cfg.method} {run.cfg.arch} on {run.cfg.data}")
            if bad_files:
                (run.out / "bad_images.txt").write_text("".join(f"{f}\n" for f in bad_files))
            (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
        knn = f"kNN top-1 (k={run.cfg.knn_k}, T={run.cfg.knn_t}) {summary['knn_top1']:.2f}% | " if run.history else ""
        replaced = f" | {len(bad_files)} unreadable images replaced (bad_images.txt)" if bad_files else ""
        print(f"{knn}{run.epoch} epochs ({run.step} steps) | {images_per_s:.0f} images/s{replaced} | "
              f"backbone: {run.out / 'backbone.pt'}")
    return summary


def train(cfg: TrainConfig, given: dict | None = None) -> dict:
    """Train a run (or continue one). `given`: the settings set explicitly (the CLI's options); by default every
    setting that differs from TrainConfig's defaults. A lost process becomes a one-line error."""
    try:
        return loop(setup(cfg, given))
    except (RuntimeError, dist.DistError) as e:
        if dist.is_dist() and dist.is_lost_peer(e):
            raise dist.lost_peer(e) from None
        raise
    finally:
        dist.destroy()


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
