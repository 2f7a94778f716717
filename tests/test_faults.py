"""Runs that survive: preemption signals, kill -9, a NaN loss, unreadable images, a full disk, and resuming with
settings that differ. Each fault: what the user sees (one line, an exit status) and what is kept (the checkpoint,
and that the resumed run equals an uninterrupted one, bit for bit on a CPU)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_checks import losses, wait_for_steps
import torch

from fastssl import checkpoint
from fastssl.config import settings
from fastssl.errors import EXIT_STOPPED, UserError
from fastssl.methods.ressl import ReSSL
from fastssl.pipelines.common import Shard, epoch_indices
from fastssl.train import train

pytestmark = pytest.mark.usefixtures("backbones_train_here")

# 16 steps an epoch of an 8-wide ResNet-18 on a Fashion-MNIST slice, no kNN monitor: every step logged.
RUN = dict(method="ressl", arch="resnet18-w8", data="fashion-mnist", data_val="none", pipeline="tensor",
           train_subset=512, batch_size=32, queue_size=128, epochs=4, log_every=1, device="cpu")


def cli_args(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def start(out: Path, **settings) -> subprocess.Popen:
    """`fastssl train` in its own process, as a cluster runs it; its output in out.log (a pipe nobody reads would
    fill up and block it)."""
    cmd = [sys.executable, "-m", "fastssl.cli", "train", *cli_args({**RUN, **settings}), "--out", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, Path(f"{out}.log").read_text()


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "%|" not in line]  # tqdm's bar shares stderr
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[tuple[int, float]]:
    out = tmp_path_factory.mktemp("whole") / "run"
    code, err = finish(start(out), out)
    assert code == 0, err[-2000:]
    assert len(losses(out)) == 64
    return losses(out)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_checkpoints_its_step_and_resumes_exactly(tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_steps(out, 10, proc)
    proc.send_signal(getattr(signal, sig))
    code, err = finish(proc, out)
    assert code == EXIT_STOPPED, err[-2000:]
    state = checkpoint.load(out / "checkpoint.pt")
    assert f"stopped by {sig} at step {state['step']}" in err and "--resume" in error_line(err)
    assert losses(out)[-1][0] == state["step"] < 64  # the checkpoint holds the last step done: nothing lost
    code, err = finish(start(out, resume=True), out)
    assert code == 0, err[-2000:]
    assert losses(out) == uninterrupted  # bit-exact


def test_kill_9_loses_at_most_the_checkpoint_interval(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(out, checkpoint_minutes=0.002)  # a checkpoint every 0.12 s (by time; --checkpoint-every: by step)
    wait_for_steps(out, 20, proc)
    proc.kill()
    proc.wait()
    killed_at = losses(out)[-1][0]
    state = checkpoint.load(out / "checkpoint.pt")
    assert (out / "checkpoint-prev.pt").is_file()  # the one before it is kept too
    assert 0 <= killed_at - state["step"] <= 10, (killed_at, state["step"])  # 0.12 s: a few steps of this run
    code, err = finish(start(out, resume=True), out)
    assert code == 0, err[-2000:]
    assert losses(out) == uninterrupted


def poison_after(monkeypatch, calls: int) -> None:
    """ReSSL's loss becomes NaN from its `calls`-th step on."""
    original, count = ReSSL.step, [0]

    def step(self, views, progress):
        count[0] += 1
        loss, stats = original(self, views, progress)
        return (loss * float("nan") if count[0] >= calls else loss), stats

    monkeypatch.setattr(ReSSL, "step", step)


@pytest.mark.parametrize("log_every, checkpoint_every, caught_at", [(1, 4, "at step 7"), (10, 3, "before step 9")])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, log_every,
                                                                     checkpoint_every, caught_at):
    poison_after(monkeypatch, 7)
    cfg = settings(**{**RUN, "log_every": log_every, "checkpoint_every": checkpoint_every, "out": str(tmp_path)})
    with pytest.raises(UserError, match="loss is not finite") as error:
        train(cfg)
    message = str(error.value)
    good = (6 // checkpoint_every) * checkpoint_every  # the last checkpoint before the poisoned step 7
    assert caught_at in message and f"{tmp_path / 'checkpoint.pt'}" in message and "\n" not in message
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["step"] == good
    assert all(t.isfinite().all() for t in state["method"].values() if isinstance(t, torch.Tensor) and t.is_floating_point())


@pytest.fixture
def folder_with_a_bad_jpeg(fashion_folder, tmp_path) -> tuple[Path, Path]:
    """A copy of 512 training images of the Fashion-MNIST folder, one of them a corrupt JPEG."""
    root = tmp_path / "data"
    for i, src in enumerate(sorted((fashion_folder / "train").rglob("*.png"))[:512]):
        dst = root / "train" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    bad = root / "train" / "Bag" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, bad


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_an_unreadable_image_stops_with_its_name_and_a_checkpoint_or_is_skipped(folder_with_a_bad_jpeg, tmp_path,
                                                                                 pipeline):
    root, bad = folder_with_a_bad_jpeg
    given = {**RUN, "data": str(root), "pipeline": pipeline, "train_subset": 0, "epochs": 1, "workers": 1}
    with pytest.raises(UserError, match="cannot decode image") as error:
        train(settings(**given, out=str(tmp_path / "stop")))
    assert str(bad) in str(error.value) and "--skip-bad-images" in str(error.value)
    # the batch holding it was not trained on: the checkpoint is at the step before it
    from fastssl import data
    files = data.load(str(root)).files
    order = epoch_indices(len(files), Shard(seed=0, rank_batch=32), 0).view(-1, 32)
    bad_batch = next(b for b, idx in enumerate(order.tolist()) if files.index(str(bad)) in idx)
    assert checkpoint.load(tmp_path / "stop" / "checkpoint.pt")["step"] == bad_batch
    summary = train(settings(**given, skip_bad_images=True, out=str(tmp_path / "skip")))
    assert summary["steps"] == 513 // 32 and summary["bad_images"] == 1
    assert (tmp_path / "skip" / "bad_images.txt").read_text() == f"{bad}\n"


def test_a_failed_checkpoint_write_stops_with_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    saves, save = [], torch.save

    def full_disk(obj, f):  # the third checkpoint: half written, then the disk is full
        saves.append(1)
        if len(saves) == 3:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device") as error:
        train(settings(**{**RUN, "checkpoint_every": 3, "out": str(tmp_path)}))
    monkeypatch.undo()
    assert "is intact" in str(error.value) and "\n" not in str(error.value)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 6
    assert checkpoint.load(tmp_path / "checkpoint-prev.pt")["step"] == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no torn temporary file left


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("short")
    train(settings(**{**RUN, "max_steps": 3, "out": str(out)}))
    return out


@pytest.mark.parametrize("change, message", [
    ({"method": "byol"}, "cannot resume with method='byol'"),
    ({"arch": "r50"}, "cannot resume with arch='r50'"),
    ({"data": "cifar10"}, "cannot resume with data='cifar10'"),
    ({"batch_size": 64}, "cannot resume with batch_size=64"),
])
def test_resuming_with_a_setting_a_run_keeps_is_one_line_naming_it(short_run, change, message):
    with pytest.raises(UserError, match=message) as error:
        train(settings(**{**RUN, **change, "out": str(short_run), "resume": True}))
    assert "the run in" in str(error.value) and "\n" not in str(error.value)


def test_resume_keeps_the_runs_settings_and_takes_the_ones_given(short_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.csv"):
        (out / name).write_bytes((short_run / name).read_bytes())
    # as the CLI calls it: only --resume, --out and --max-steps given; the run's 4 epochs, lr, queue... are kept
    summary = train(settings(resume=True, out=str(out), max_steps=5), given={"resume": True, "out": str(out),
                                                                             "max_steps": 5})
    assert summary["steps"] == 5
    assert checkpoint.load(out / "checkpoint.pt")["config"]["epochs"] == 4
    train(settings(resume=True, out=str(out), epochs=6, max_steps=6), given={"epochs": 6, "max_steps": 6})
    assert "epochs 4 -> 6" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "foreign"])
def test_a_truncated_or_foreign_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "foreign":
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as error:
        train(settings(**{**RUN, "out": str(tmp_path), "resume": True}))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_auto_resume_starts_afresh_then_continues(tmp_path):
    cfg = dict(RUN, out=str(tmp_path), auto_resume=True, epochs=1)
    assert train(settings(**cfg, max_steps=4))["steps"] == 4  # nothing there: a fresh run
    assert train(settings(**cfg))["steps"] == 16  # a checkpoint there: continued to the end
    with pytest.raises(UserError, match="already holds a run"):
        train(settings(**{**cfg, "auto_resume": False}))


def test_a_checkpoint_written_on_gpus_resumes_where_there_are_none(short_run, tmp_path):
    """A checkpoint carrying CUDA generator states (fastssl 0.2 wrote one per visible GPU) resumes on a CPU."""
    out = tmp_path / "run"
    out.mkdir()
    state = checkpoint.load(short_run / "checkpoint.pt")
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    checkpoint.save_run(state, out)
    assert train(settings(resume=True, out=str(out), max_steps=4), given={"max_steps": 4})["steps"] == 4


@pytest.mark.parametrize("saved, expected", [("one", "one"), (["first", "second"], "second"), (["first"], "first")])
def test_the_cuda_generator_state_goes_to_this_processs_device(monkeypatch, saved, expected):
    """This process's GPU (device 1 here) gets its own saved state, or the first one where fewer were saved."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    checkpoint.set_rng_state({**checkpoint.rng_state(), "cuda": saved})
    assert restored == [expected]
