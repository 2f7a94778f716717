"""What a run reports about itself besides the loss: the online linear probe and the methods' diagnostics."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from PIL import Image
from test_train import SMALL, losses, run_cli

from fastssl import checkpoint
from fastssl import data as fastssl_data
from fastssl.config import settings
from fastssl.methods import build as build_method
from fastssl.probe import OnlineProbe
from fastssl.queue import EmbeddingQueue
from fastssl.train import train

pytestmark = pytest.mark.usefixtures("backbones_train_here")


def logged(run_dir, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [(int(row["step"]), float(row["value"])) for row in csv.DictReader(f) if row["key"] == key]


def test_the_online_probe_learns_from_what_the_encoder_computes_in_training():
    """The probe's mechanics on an encoder whose features are informative (a fixed random projection of the
    pixels): the hook keeps the first training-mode forward of each step, the head learns the classes."""
    images = fastssl_data.load("fashion-mnist", "train").subset(4096, 0)
    pixels, labels = images.images.float().mean(-1).flatten(1) / 255, images.labels
    encoder = torch.nn.Linear(784, 64).requires_grad_(False)
    probe = OnlineProbe(encoder, 64, 10, batch_size=128, device=torch.device("cpu"))
    accuracy = []  # per epoch
    for epoch in range(3):
        for idx in torch.randperm(4096, generator=torch.Generator().manual_seed(epoch)).split(128):
            encoder(pixels[idx])  # the step's student forward
            encoder(pixels[idx.flip(0)])  # a second view: not the one the probe reads
            probe.step(labels[idx], progress=epoch / 3)
        accuracy.append(probe.train_accuracy())
    encoder.eval()
    encoder(pixels[:8])  # an evaluation forward is not captured, nor a copy's (the kNN monitor's calibrated one)
    copy.deepcopy(encoder).train()(pixels[:8])
    assert probe.captured == []
    assert accuracy[-1] > max(60.0, accuracy[0]), accuracy  # ten classes: chance is 10%
    # evaluated with the BatchNorm statistics of training, which an evaluation leaves as they were
    statistics = [t.clone() for t in probe.head[0].buffers()]
    predicted = probe.predict(encoder(pixels[:512]))
    assert all(torch.equal(a, b) for a, b in zip(statistics, probe.head[0].buffers())) and probe.head.training
    assert torch.equal(predicted, probe.head.eval()(encoder(pixels[:512])).argmax(1))


def test_the_online_probe_does_not_change_the_run_and_resumes_exactly(tmp_path):
    run = dict(SMALL, train_subset=512, epochs=2, knn_every=1, log_every=4)
    plain = train(settings(**run, out=str(tmp_path / "plain")))
    probed = train(settings(**run, online_probe=True, out=str(tmp_path / "probed")))
    # the probe reads detached features and draws its own initialisation: the pretraining is the same
    assert losses(tmp_path / "probed") == losses(tmp_path / "plain")
    assert probed["knn_history"] == plain["knn_history"]
    top1 = logged(tmp_path / "probed", "probe_top1")
    assert [step for step, _ in top1] == [8, 16]  # each kNN pass but the random-init one
    assert [step for step, _ in logged(tmp_path / "probed", "probe_train_top1")] == [8, 16]
    # stopped mid-epoch and resumed: the head and its optimiser continue where they were
    part = tmp_path / "part"
    train(settings(**run, online_probe=True, max_steps=11, out=str(part)))
    assert "probe" in checkpoint.load(part / "checkpoint.pt")
    train(settings(**run, online_probe=True, resume=True, out=str(part)))
    assert logged(part, "probe_top1")[-1] == top1[-1]


def test_the_online_probe_needs_labels(tmp_path, monkeypatch, capsys):
    (tmp_path / "photos").mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(tmp_path / "photos" / f"{i}.png")
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, "train", "--data", str(tmp_path / "photos"), "--online-probe", "--device", "cpu",
                "--batch-size", "8", "--bn-splits", "1", "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--online-probe needs labels" in err, err


def test_every_method_logs_its_diagnostics(tmp_path):
    for method in ("ressl", "isd", "mocov2", "byol", "resa"):
        small = {**SMALL, "method": method, "train_subset": 64, "batch_size": 32, "image_size": 16, "epochs": 1,
                 "knn_every": 0}
        if method in ("byol", "resa"):
            del small["queue_size"]
        train(settings(**small, out=str(tmp_path / method)))
        for key in ("embedding_std", "effective_rank", "agreement") + (("queue_fill", "queue_age")
                                                                         if "queue_size" in small else ()):
            values = [v for _, v in logged(tmp_path / method, key)]
            assert len(values) == 2 and all(v == v for v in values), (method, key, values)  # each step, not NaN


def test_diagnostics_tell_collapse_from_spread():
    cfg, method = build_method(settings(**{**SMALL, "batch_size": 16, "queue_size": 64}, image_size=16))
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 32, generator=g)
    method.last_pair = (spread, spread)
    healthy = method.diagnostics()
    assert healthy["embedding_std"] == pytest.approx(1.0, abs=0.1)  # x sqrt(dim): 1 when spread evenly
    assert healthy["effective_rank"] > 25 and healthy["agreement"] == pytest.approx(1.0)
    collapsed = spread[:1].expand(256, 32) + 1e-4 * torch.randn(256, 32, generator=g)
    method.last_pair = (collapsed, -collapsed)
    sick = method.diagnostics()
    assert sick["embedding_std"] < 0.01 and sick["effective_rank"] < 1.5
    assert sick["agreement"] == pytest.approx(-1.0)


def test_the_queue_knows_its_fill_and_age():
    queue = EmbeddingQueue(64, 4)
    assert queue.diagnostics()["queue_fill"] == 0
    for step in range(1, 11):
        queue.enqueue(torch.nn.functional.normalize(torch.randn(8, 4), dim=1))
        fill, age = (queue.diagnostics()[k].item() for k in ("queue_fill", "queue_age"))
        assert (fill, age) == (min(8 * step, 64) / 64, min(step, 8))  # full after 8 batches: the oldest is 8 old
    old = {k: v for k, v in queue.state_dict().items() if k != "enqueued"}  # fastssl 0.3 saved no count
    fresh = EmbeddingQueue(64, 4)
    fresh.load_state_dict(old)
    assert fresh.diagnostics()["queue_fill"] == 1 and torch.equal(fresh.rows, queue.rows)

