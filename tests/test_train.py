"""The trainer end to end on CPU: it learns, it resumes exactly, the CLI turns bad input into one line."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import sys
from pathlib import Path

import pytest
import yaml
import torch

from fastssl import checkpoint, cli
from fastssl.config import load_file, merge, settings, to_dict
from fastssl.errors import UserError
from fastssl.methods import build as build_method
from fastssl.train import train, train_step

pytestmark = pytest.mark.usefixtures("backbones_train_here")

# A small, fast setting: 8-wide ResNet-18 on a Fashion-MNIST slice through the in-memory pipeline.
SMALL = dict(method="ressl", arch="resnet18-w8", data="fashion-mnist", pipeline="tensor", batch_size=64,
             queue_size=512, knn_bank=2000, knn_queries=500, device="cpu", log_every=1)


def losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row["value"]) for row in csv.DictReader(f) if row["key"] == "loss"]


@pytest.mark.parametrize("encoder_ema, optimizer", [(0.0, {}), (0.9, {}), (0.0, {"optimizer": "lars"}),
                                                     (0.0, {"optimizer": "adamw", "lr": 5e-4})])
def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(tmp_path, encoder_ema, optimizer):
    cfg = settings(**SMALL, train_subset=512, epochs=2, knn_every=0, encoder_ema=encoder_ema,
                   out=str(tmp_path / "whole"), **optimizer)
    whole = train(cfg)
    assert whole["steps"] == 16
    part = dict(to_dict(cfg), out=str(tmp_path / "part"))
    train(settings(**{**part, "max_steps": 5}))  # stops mid-epoch, checkpoint at epoch 0, batch 5
    state = checkpoint.load(tmp_path / "part" / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["batch"]) == (5, 0, 5)
    resumed = train(settings(**{**part, "resume": True}))
    assert resumed["steps"] == 16
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")  # bit-exact on CPU
    a, b = (torch.load(tmp_path / d / "backbone.pt") for d in ("whole", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["knn_top1"] == whole["knn_top1"]


def test_encoder_average_is_the_ema_of_the_encoder_and_is_what_is_evaluated():
    cfg = settings(**{**SMALL, "batch_size": 16, "queue_size": 64}, image_size=16, encoder_ema=0.75)
    _, plain = build_method(dataclasses.replace(cfg, encoder_ema=0.0))
    assert plain.evaluated_encoder() is plain.encoder()
    cfg, method = build_method(cfg)
    opt = torch.optim.SGD(method.trainable().parameters(), lr=0.5)

    def state(encoder):  # weights and float buffers (BN statistics)
        return [t.detach().clone() for t in [*encoder.parameters(), *encoder.buffers()] if t.is_floating_point()]

    expected = None
    for _ in range(3):
        views = {name: torch.randn(16, 3, 16, 16) for name in ("weak", "strong")}
        train_step(method, views, opt, contextlib.nullcontext(), 0.0)
        now = state(method.encoder())
        expected = now if expected is None else [0.75 * e + 0.25 * w for e, w in zip(expected, now)]
    averaged = state(method.evaluated_encoder())
    assert method.evaluated_encoder() is not method.encoder()
    assert not all(torch.equal(a, w) for a, w in zip(averaged, now))
    for a, e in zip(averaged, expected):
        torch.testing.assert_close(a, e)


def test_checkpoints_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        checkpoint.load(path)


@pytest.mark.slow
def test_a_short_run_learns_and_evaluates(tmp_path, capsys, monkeypatch):
    # 16 px views, a high learning rate and the whole-image teacher of the README's Fashion-MNIST runs: 384 steps
    # of an 8-wide ResNet-18 gain 7-13 points over seeds 0-2 (with the paper's teacher crop: -6 to +5)
    cfg = settings(**{**SMALL, "log_every": 20}, image_size=16, train_subset=4096, epochs=6, lr=0.24,
                   warmup_epochs=0.5, knn_every=6, view_changes="weak.crop_scale=1,1", out=str(tmp_path))
    summary = train(cfg)
    (_, random_init), (_, trained) = summary["knn_history"]
    assert trained > random_init + 5, summary["knn_history"]
    for name in ("checkpoint.pt", "backbone.pt", "metrics.csv", "knn.png", "summary.json", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tb").iterdir())
    capsys.readouterr()
    # the eval commands read the run's checkpoint (bank/queries here: the whole Fashion-MNIST splits)
    run_cli(monkeypatch, "eval", "knn", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu")
    knn = float(capsys.readouterr().out.split(":")[-1].strip().rstrip("%"))
    assert knn > random_init + 5
    run_cli(monkeypatch, "eval", "linear", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--device", "cpu",
            "--epochs", "5", "--protocol", "quick")
    assert float(capsys.readouterr().out.split(":")[-1].strip().rstrip("%")) > 60  # chance: 10


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["fastssl", *args])
    try:
        cli.main()
    except SystemExit as e:
        if e.code:
            raise


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/set"], "data path /nonexistent/set does not exist"),
    (["--data", "{empty}"], "has no train/ folder"),
    (["--data", "{empty_classes}"], "no images found under"),
    (["--tau-t", "0.2"], "tau_t=0.2 must be smaller than tau_s=0.1"),
    (["--encoder-ema", "1"], "encoder_ema=1.0 must be in [0, 1)"),
    (["--method", "simclr"], "unknown method 'simclr'"),
    (["--arch", "vit"], "unknown arch 'vit'"),
    (["--pipeline", "magic"], "unknown pipeline 'magic'"),
    (["--batch-size", "100"], "not a multiple of bn_splits=8"),
    (["--view-changes", "teacher.crop_scale=1,1"], "this method has no view 'teacher'; its views: weak, strong"),
    (["--resume", "--out", "{empty}"], "checkpoint.pt does not exist"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
])
def test_bad_input_is_one_line_naming_the_value(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_classes" / "train" / "cat").mkdir(parents=True)
    args = [a.format(empty=tmp_path / "empty", empty_classes=tmp_path / "empty_classes") for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(monkeypatch, "train", "--device", "cpu", "--out", str(tmp_path / "run"), *args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_config_file_is_overridden_by_the_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 7\nbatch-size: 128\ntau_t: 0.05\n")
    (tmp_path / "run.toml").write_text("epochs = 3\nlr = 0.1\n")
    cfg = merge(load_file(str(tmp_path / "run.yaml")), {"epochs": 2})
    assert (cfg.epochs, cfg.batch_size, cfg.options["tau_t"]) == (2, 128, 0.05)
    assert merge(load_file(str(tmp_path / "run.toml")), {}).options["lr"] == 0.1
    (tmp_path / "bad.yaml").write_text("epochs: 7\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rate'"):
        load_file(str(tmp_path / "bad.yaml"))
    with pytest.raises(UserError, match="epochs='many' must be int"):
        merge({"epochs": "many"}, {})


def test_help_shows_every_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    run_cli(monkeypatch, "train", "--help")
    text = capsys.readouterr().out
    for flag in ("--method", "--arch", "--data", "--pipeline", "--epochs", "--batch-size", "--lr", "--queue-size",
                 "--tau-s", "--tau-t", "--momentum", "--out", "--resume", "--config", "--device", "--precision",
                 "--compile"):
        assert flag in text, flag
    flat = " ".join(text.replace("│", " ").split())  # five methods' recipe defaults wrap across lines
    assert "[default: ressl]" in flat and "ressl 0.06/0.05" in flat and "ressl 4096/131072" in flat


# fastssl 0.2's checkpoints held one flat config with every method's options (None where the method had none)
OPTIONS_0_2 = dict(lr=None, weight_decay=None, warmup_epochs=None, final_lr_ratio=None, queue_size=None, tau_s=None,
                   tau_t=None, momentum=None, proj_hidden=None, proj_dim=None, proj_bn=False, crops=1)


@pytest.mark.parametrize("method", ["byol", "resa"])
def test_a_checkpoint_of_0_2_resumes(tmp_path, method):
    small = {**SMALL, "method": method, "train_subset": 128, "batch_size": 32, "image_size": 16, "epochs": 1,
             "knn_every": 0}
    del small["queue_size"]  # neither method has a queue
    out = tmp_path / "run"
    train(settings(**small, max_steps=2, out=str(out)))
    state = checkpoint.load(out / "checkpoint.pt")
    saved = state["config"]
    # 0.2's layout: its name for --view-changes, and no switch for ReSA's predictor (0.2 chose by the image size)
    old = {**OPTIONS_0_2, **saved, "views": saved["view_changes"]}
    del old["view_changes"]
    old.pop("predictor", None)
    checkpoint.save_run({**state, "config": old}, out)
    summary = train(settings(out=str(out), resume=True, max_steps=4, device="cpu"), given={"max_steps": 4})
    assert summary["steps"] == 4
    assert checkpoint.load(out / "checkpoint.pt")["config"] == {**saved, "max_steps": 4, "resume": True}


def test_print_config_gives_the_resolved_settings_as_a_config_file(tmp_path, monkeypatch, capsys):
    run_cli(monkeypatch, "train", "--method", "isd", "--queue-size", "1024", "--print-config")
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["image_size"] == 28 and printed["queue_size"] == 1024  # the data's side; the option given
    assert printed["tau_t"] == 0.02 and printed["proj_hidden"] is None  # ISD's small-image recipe, in full
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert to_dict(merge(load_file(str(tmp_path / "printed.yaml")), {})) == printed  # a --config file as it is
    run_cli(monkeypatch, "--version")
    assert capsys.readouterr().out.startswith("fastssl ")


def test_the_knn_curve_is_in_metrics_csv(tmp_path):
    summary = train(settings(**{**SMALL, "batch_size": 32}, train_subset=128, image_size=16, epochs=2, knn_every=1,
                             out=str(tmp_path)))
    with open(tmp_path / "metrics.csv") as f:
        logged = [(int(row["step"]), float(row["value"])) for row in csv.DictReader(f) if row["key"] == "knn_top1"]
    assert [accuracy for _, accuracy in logged] == [accuracy for _, accuracy in summary["knn_history"]]
    assert [step for step, _ in logged] == [0, 4, 8]  # random init, then each epoch's end


class _RunsCode:
    """What a malicious checkpoint carries: unpickling it would call a function of the sender's choice."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_foreign_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"config": {}, "method": {}, "step": 0, "payload": _RunsCode(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="holds Python objects a fastssl checkpoint does not"):
        checkpoint.load(tmp_path / "checkpoint.pt")
    assert not marker.exists()
