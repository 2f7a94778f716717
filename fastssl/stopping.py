"""When a run checkpoints and when it stops: one object, asked once before every batch and at every epoch's end,
that gives every rank the same answer. (A non-finite loss stops the run with an error where it is seen: at a log
window or a checkpoint.)"""

from __future__ import annotations

import signal
import time

from . import dist
from .errors import Stopped, UserError


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


class Stops:
    """The checkpoint and stop policy. Before a batch: stop on a signal or an unreadable image on any rank (with a
    checkpoint), checkpoint when rank 0's --checkpoint-minutes have passed or --checkpoint-every steps were taken,
    and end (with a checkpoint) at --max-steps; at an epoch's end: checkpoint, and end at --max-steps. Ranks agree
    through a vote at every batch (dist.Vote); the rest depends only on the step, the same on every rank."""

    def __init__(self, cfg, main: bool, step: int):
        self.cfg, self.main = cfg, main
        self.signals, self.vote = StopSignals(), dist.Vote()
        self.unreadable: list[str] = []  # files that could not be decoded (without --skip-bad-images)
        self.stopped = False  # by a signal or an unreadable image, not by the run's end
        self.last_save, self.saved_step = time.monotonic(), step

    def __enter__(self):
        self.signals.__enter__()
        return self

    def __exit__(self, *exc):
        self.vote.close()
        self.signals.__exit__(*exc)

    def before(self, run, views: dict | None) -> tuple[bool, bool]:
        """(checkpoint now, stop now) before `views`, a batch, or None at the end of an epoch (run.epoch moved on).
        A batch's unreadable files (replaced by readable ones) are taken out of it and counted in the run."""
        cfg = self.cfg
        at_max = bool(cfg.max_steps) and run.step >= cfg.max_steps
        if views is None or at_max:
            save, stop = views is None or run.step != self.saved_step, at_max
        else:
            bad = views.pop("bad_files", [])
            self.unreadable += [] if cfg.skip_bad_images else bad
            timed = self.main and time.monotonic() - self.last_save > 60 * cfg.checkpoint_minutes > 0
            self.stopped, due = self.vote(self.signals.received or self.unreadable, timed)
            every = bool(cfg.checkpoint_every) and run.step % cfg.checkpoint_every == 0 and run.step != self.saved_step
            save, stop = self.stopped or due or every, self.stopped
            run.bad_files += [] if stop else bad  # replaced by other images (under torchrun a stand-in for one step)
        if save:
            self.last_save, self.saved_step = time.monotonic(), run.step
        return save, stop

    def error(self, step: int, checkpoint) -> Exception:
        """Why the run stopped early, as the exception that ends the command."""
        if self.unreadable:
            return UserError(f"cannot decode image {self.unreadable[0]}; stopped at step {step} with a checkpoint; "
                             f"remove or replace it (`fastssl check DATA` lists every bad file), or pass "
                             f"--skip-bad-images, then run the same command with --resume")
        return Stopped(f"stopped by {self.signals.received or 'another process'} at step {step}; checkpoint "
                       f"{checkpoint}; continue with the same command and --resume (or --auto-resume)")
