"""A training run: `setup` builds a Run (settings, device, method, loader, optimiser, schedule, state) and
`loop` trains it, top to bottom. Everything method-specific lives in the method, everything about data in the
pipelines; this module holds the order of things and what makes a run survive (checkpoints, signals, faults).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, dist, methods, pipelines
from .config import TrainConfig, check, explicit, resume_config, to_dict
from .data import is_small
from .device import autocast, pick_device, pick_precision
from .errors import UserError
from .loggers import Logger
from .models import convolutional
from .monitor import KnnMonitor, auto_interval
from .optim import build_optimizer, warmup_cosine
from .probe import OnlineProbe
from .pipelines.common import Loader, Shard
from .stopping import Stops
from .views import apply_overrides

def default_workers() -> int:
    """Loader workers per process: this machine's cores shared by its processes."""
    return max(1, (os.cpu_count() or 1) // dist.local_world_size())


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


@dataclass
class Run:
    """Everything a training run is made of, and where it stands (step, epoch, batch within the epoch)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    precision: str
    split: dist.BatchSplit
    method: methods.base.Method
    loader: Loader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    knn: KnnMonitor | None
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list = field(default_factory=list)  # (epoch, kNN top-1 %); epochs are fractional mid-epoch
    monitored_at: int = -1  # the step of the last kNN pass
    bad_files: list = field(default_factory=list)  # replaced with --skip-bad-images
    saved: Path | None = None  # the newest checkpoint, known good
    logger: Logger | None = None  # metrics.csv and TensorBoard (rank 0)
    probe: OnlineProbe | None = None  # --online-probe

    @property
    def main(self) -> bool:
        return dist.rank() == 0

    def state(self) -> dict:
        return {"config": to_dict(self.cfg), "method": self.method.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "knn_history": self.history, "monitored_at": self.monitored_at, "bad_files": self.bad_files,
                "rng": checkpoint.rng_state(), **({"probe": self.probe.state_dict()} if self.probe else {})}

    def load_state(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.history, self.monitored_at = state["knn_history"], state["monitored_at"]
        self.bad_files = state["bad_files"]
        if self.probe and "probe" in state:  # else a probe added on resume starts afresh
            self.probe.load_state_dict(state["probe"])
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
    optimiser, schedule, kNN monitor; restore the checkpoint's state; print the banner."""
    cfg, state, resumed_from, changes = _resume(cfg, explicit(cfg) if given is None else given)
    check(cfg)
    device = pick_device(cfg.device)
    dist.init_from_env(device, cfg.dist_timeout)
    split = dist.BatchSplit(cfg.batch_size, dist.world_size(), cfg.bn_splits, cfg.sync_bn)
    if cfg.sync_bn and cfg.compile and split.world > 1:
        raise UserError("--sync-bn with --compile: the BatchNorm layers' collectives would split the compiled graph at "
                        "every layer; drop one (split BN, the default, compiles whole)")
    precision = pick_precision(cfg.precision, device)

    train_set = pipelines.load_images(cfg.data, "train").subset(cfg.train_subset, cfg.seed)
    size, size_from = image_size(cfg, train_set)
    cfg, method = methods.build(dataclasses.replace(cfg, image_size=size), split.bn_groups)
    if cfg.channels_last and not convolutional(method.encoder()):  # a ViT: channels_last speeds up nothing
        cfg = dataclasses.replace(cfg, channels_last=False)
    method.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    if split.world > 1:
        method.distribute(device, cfg.sync_bn)
    if cfg.compile:
        method.compile()
    specs = apply_overrides(method.view_specs(method.opts, size, *train_set.mean_std), cfg.view_changes)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    loader = pipelines.build(cfg.pipeline, train_set, specs, Shard(dist.rank(), split.world, cfg.seed,
                                                                   split.rank_batch), device,
                             workers=workers, channels_last=cfg.channels_last)
    steps_per_epoch = len(loader)
    total_steps, opts = cfg.epochs * steps_per_epoch, method.opts
    opt = build_optimizer(cfg.optimizer, method.trainable(), split.lr(opts.lr), opts.weight_decay)
    # A run shorter than a few warm-ups (a quick look, a test) still gets its cosine: warm-up <= a fifth of the run.
    warmups = (min(round(opts.warmup_epochs * steps_per_epoch), total_steps // 5),
               round(opts.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmups[0], total_steps, opts.final_lr_ratio))
    cfg, knn, no_monitor = _knn_monitor(cfg, train_set, size, device, precision, workers)
    run = Run(cfg, Path(cfg.out), device, precision, split, method, loader, opt, sched, knn, steps_per_epoch,
              total_steps, probe=_online_probe(cfg, method, train_set, device))
    if state is not None:
        run.load_state(state)
        run.saved = resumed_from
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        _banner(run, train_set, size_from, workers, warmups, changes, no_monitor)
    run.logger = Logger(run.out, cfg.logger, enabled=run.main, start_step=run.step, config=to_dict(cfg))
    return run


def image_size(cfg: TrainConfig, train_set) -> tuple[int, str]:
    """The training view side, and where it comes from: --image-size, else the data's (its native side up to 64 px,
    else 224)."""
    return (cfg.image_size, "as set") if cfg.image_size else (train_set.native_size or 224, train_set.size_note)


def resolved_settings(cfg: TrainConfig, given: dict) -> dict:
    """The settings a run of `cfg` would train with, flat (--print-config): a resumed run's, the image size from the
    data when not set, every option of the method (the recipe's at that size where not given)."""
    cfg = _resume(cfg, given)[0]
    check(cfg)
    size = image_size(cfg, pipelines.load_images(cfg.data, "train"))[0]
    opts = methods.get(cfg.method).Options.resolve(cfg.options, small=is_small(size))
    return to_dict(dataclasses.replace(cfg, image_size=size, options=dataclasses.asdict(opts)))


def _online_probe(cfg: TrainConfig, method, train_set, device) -> OnlineProbe | None:
    """--online-probe's head on the student's encoder (None without it)."""
    if not cfg.online_probe:
        return None
    if not train_set.labelled:
        raise UserError(f"--online-probe needs labels, and {train_set.root} has none (a folder without class "
                        f"folders, or a .beton of unlabelled images); drop --online-probe or pass labelled --data")
    encoder, classes = method.online_encoder(), max(len(train_set.classes), int(train_set.labels.max()) + 1)
    return OnlineProbe(encoder, encoder.out_dim, classes, cfg.batch_size, device)


def _knn_monitor(cfg: TrainConfig, train_set, size: int, device, precision: str, workers: int):
    """The kNN monitor of a labelled set's evaluation split (None, and why, without one), and cfg with its
    interval (--knn-every, or the automatic one)."""
    queries, no_monitor = pipelines.eval_split(cfg.data, cfg.data_val) if train_set.labelled else (None, "no labels")
    if queries is None:
        return cfg, None, no_monitor
    knn = KnnMonitor(cfg, train_set, queries, size, device, precision, workers)
    if cfg.knn_every is None:
        knn.auto = True
        cfg = dataclasses.replace(cfg, knn_every=auto_interval(len(knn.bank) + len(knn.queries), len(train_set)))
    return cfg, knn, no_monitor


def _banner(run: Run, train_set, size_from: str, workers: int, warmups: tuple[int, int], changes: list[str],
            no_monitor: str) -> None:
    """What the run is, in three lines: data, model, device and processes; the schedule; the kNN monitor."""
    cfg, opts, (warmup_steps, recipe_warmup) = run.cfg, run.method.opts, warmups
    capped = f" (a fifth of the run; the recipe's {opts.warmup_epochs:g})" if warmup_steps < recipe_warmup else ""
    loader = "" if cfg.pipeline == "tensor" else f", {workers} workers"  # the tensor pipeline has no workers
    loader += f", {run.loader.scratch_note()}" if hasattr(run.loader, "scratch_note") else ""  # FFCV's decode buffers
    patch = getattr(run.method.encoder(), "patch", None)
    print(f"fastssl: {cfg.method} | {cfg.arch} @ {cfg.image_size}px ({size_from})"
          f"{f', {patch} px patches, no channels_last' if patch else ''} | "
          f"{len(train_set)} images from {train_set.root} | pipeline {cfg.pipeline}{loader} | {run.device} "
          f"{run.precision}{' channels_last' if cfg.channels_last else ''}{' compiled' if cfg.compile else ''} | "
          f"{run.split.world} process(es), {run.split.describe()}"
          f"{f' | view changes: {cfg.view_changes}' if cfg.view_changes else ''}"
          f"{f' | evaluating the encoder average (decay {cfg.encoder_ema:g})' if cfg.encoder_ema else ''}")
    print(f"{cfg.optimizer} lr {run.split.lr(opts.lr):.4g} = {opts.lr} x batch {cfg.batch_size} / 256, weight decay "
          f"{opts.weight_decay:g} | {cfg.epochs} epochs x "
          f"{run.steps_per_epoch} steps | warm-up {warmup_steps / run.steps_per_epoch:.3g} epochs{capped}, then "
          f"{'constant' if opts.final_lr_ratio == 1 else f'cosine to {opts.final_lr_ratio:g} x lr'}"
          f"{f' | resuming at step {run.step} from {run.saved}' if run.saved else ''}"
          f"{''.join(f' | {c}' for c in changes)}")
    print(run.knn.describe(len(train_set), cfg.knn_every) if run.knn else
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


def knn_pass(run: Run, data_bn_stats: bool = False) -> None:
    """The kNN monitor on the evaluated encoder, recorded in the run's history; with --online-probe, the probe's
    top-1 on the same queries (not at the random-init reference point: the probe has not trained yet)."""
    dist.average_batchnorm_statistics(run.method)
    values = {"knn_top1": run.knn(run.method.evaluated_encoder(), data_bn_stats=data_bn_stats)}
    if run.probe and not data_bn_stats:
        values["probe_top1"] = run.knn.classifier_accuracy(run.method.online_encoder(), run.probe.predict)
    epoch = run.epoch + run.batch / run.steps_per_epoch
    run.history.append((epoch, values["knn_top1"]))
    run.monitored_at = run.step
    with _writing(run, run.out / "metrics.csv"):
        run.logger.log(run.step, **values)
    if run.main:
        probe = f", online probe top-1 {values['probe_top1']:.2f}%" if "probe_top1" in values else ""
        tqdm.write(f"epoch {epoch:g}: kNN top-1 {values['knn_top1']:.2f}%{probe}")


def epoch_end(run: Run) -> None:
    """The online probe's training top-1 over the epoch, then the kNN pass when one is due."""
    if run.probe:
        with _writing(run, run.out / "metrics.csv"):
            run.logger.log(run.step, probe_train_top1=run.probe.train_accuracy())
    if knn_due(run):
        knn_pass(run)


def knn_due(run: Run) -> bool:
    """At an epoch's end: a kNN pass every --knn-every epochs and after the last."""
    every = run.cfg.knn_every
    return bool(run.knn and every) and (run.epoch % every == 0 or run.epoch == run.cfg.epochs)


class Epochs:
    """The run's batches from where it stands, epoch after epoch, each epoch followed by None (run.epoch has moved
    on); a progress bar per epoch (`bar`) and the seconds spent in the epochs (`seconds`: the kNN passes at their
    ends not counted). Closing it closes the loader: a DataLoader worker (it ignores the stop signals) left behind
    would hang the interpreter's exit."""

    def __init__(self, run: Run):
        self.run, self.bar, self.seconds = run, None, 0.0

    def __iter__(self):
        run = self.run
        while run.epoch < run.cfg.epochs:
            run.method.train()
            start = time.perf_counter()
            try:
                with contextlib.closing(run.loader.epoch(run.epoch, run.batch)) as batches, tqdm(
                        batches, total=run.steps_per_epoch, initial=run.batch, disable=not run.main,
                        desc=f"epoch {run.epoch + 1}/{run.cfg.epochs}", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30) as self.bar:  # a log file: a line per 30 s
                    yield from self.bar
            finally:
                self.seconds += time.perf_counter() - start
            run.epoch, run.batch = run.epoch + 1, 0
            yield None


class LossWindow:
    """The losses since the last log line, summed on the device (no host sync) with the time they took."""

    def __init__(self, device: torch.device):
        self.sum, self.steps, self.start = torch.zeros((), device=device), 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.sum, self.steps = self.sum + loss, self.steps + 1

    def log(self, run: Run, bar: tqdm, stats: dict) -> None:
        """The loop's only host sync, every --log-every steps: the window's loss averaged over the ranks, checked
        for NaN/Inf, shown and logged with the method's statistics and diagnostics (rank 0's batch; read in the
        same transfer); then a new window."""
        values = {"loss": dist.all_reduce(self.sum, "mean") / self.steps,
                  **stats, **(run.method.diagnostics() if run.main else {})}
        values = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist()))
        mean_loss = values["loss"]
        if not math.isfinite(mean_loss):
            raise _non_finite(run, f"at step {run.step} (mean loss {mean_loss} over the last {self.steps})")
        rate, lr = self.steps * run.cfg.batch_size / (time.perf_counter() - self.start), run.sched.get_last_lr()[0]
        # shown at the bar's next refresh: a refresh here would print a stale count
        bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}", refresh=False)
        with _writing(run, run.out / "metrics.csv"):
            run.logger.log(run.step, **values, lr=lr, images_per_s=rate)
        self.__init__(self.sum.device)


def loop(run: Run) -> dict:
    """Train to the end of the last epoch (or --max-steps) and return the run's summary: batch -> step -> schedule
    -> log, with a checkpoint or a stop where `Stops` says (the same on every rank)."""
    cfg, amp, first_step = run.cfg, autocast(run.precision, run.device), run.step
    losses, epochs = LossWindow(run.device), Epochs(run)
    if run.knn and cfg.knn_every and not run.history:
        knn_pass(run, data_bn_stats=True)  # the random-init reference point of the curve (BN statistics of the data)
    with Stops(cfg, run.main, run.step) as stops, contextlib.closing(iter(epochs)) as batches:
        for views in batches:  # None at each epoch's end
            checkpoint_now, stop = stops.before(run, views)
            if checkpoint_now:
                save(run, losses.sum)
            if stop:
                break
            if views is None:
                epoch_end(run)
                continue
            loss, stats = train_step(run.method, views, run.opt, amp, run.step / run.total_steps)
            run.probe.step(views["label"], run.step / run.total_steps) if run.probe else None
            run.sched.step()
            run.step, run.batch = run.step + 1, run.batch + 1
            losses.add(loss)
            if run.step % cfg.log_every == 0:
                losses.log(run, epochs.bar, stats)
    if stops.stopped:
        raise stops.error(run.step, run.saved)
    return finish(run, (run.step - first_step) * cfg.batch_size / max(epochs.seconds, 1e-9), epochs.seconds)


def finish(run: Run, images_per_s: float, train_seconds: float) -> dict:
    """The last kNN pass, the exported backbone, the curve and the summary."""
    if run.knn and run.monitored_at != run.step:
        knn_pass(run)
    bad_files = sorted({f for files in dist.all_gather_objects(run.bad_files) for f in files})
    summary = {"steps": run.step, "epochs": run.epoch, "images_per_s": images_per_s, "precision": run.precision,
               "processes": dist.world_size(), "knn_history": run.history, "train_seconds": train_seconds,
               "monitor_seconds": run.knn.seconds if run.knn else 0.0, "bad_images": len(bad_files)}
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
        run = setup(cfg, given)
        with contextlib.closing(run.logger):
            return loop(run)
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
