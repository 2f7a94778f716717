"""Clustering quality (k-means on frozen features against the classes): NMI, ARI, cluster accuracy."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fastssl import cli
from fastssl.config import settings
from fastssl.evaluate import assignment_scores, cluster_scores
from fastssl.train import train

pytestmark = pytest.mark.usefixtures("backbones_train_here")


def blobs(labels: torch.Tensor, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """One tight, well-separated blob per class."""
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(int(labels.max()) + 1, dim, generator=g)
    return centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=g)


def test_perfect_clusters_score_one():
    labels = torch.arange(6).repeat_interleave(50)
    scores = cluster_scores(blobs(labels), labels)
    assert scores["k"] == 6
    assert scores["nmi"] == pytest.approx(1) and scores["ari"] == pytest.approx(1) and scores["acc"] == 1


def test_renaming_the_clusters_changes_nothing():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    clusters = np.where(rng.random(400) < 0.7, labels, rng.integers(0, 5, 400))  # 70% right, the rest noise
    permuted = rng.permutation(5)[clusters]
    assert assignment_scores(labels, permuted) == pytest.approx(assignment_scores(labels, clusters))
    assert 0.6 < assignment_scores(labels, clusters)["acc"] < 1


def test_clusters_unrelated_to_the_classes_score_near_zero():
    g = torch.Generator().manual_seed(1)
    clusters_of = torch.arange(10).repeat_interleave(200)
    labels = torch.randint(0, 10, (2000,), generator=g)  # classes drawn independently of the blobs
    scores = cluster_scores(blobs(clusters_of), labels)
    assert abs(scores["nmi"]) < 0.02 and abs(scores["ari"]) < 0.01
    assert scores["acc"] < 0.15  # chance: 0.1 (the best matching of noise sits a little above)


def test_more_clusters_than_classes_leave_some_unmatched():
    labels = np.repeat(np.arange(2), 50)
    clusters = np.repeat(np.arange(4), 25)  # each class split in two: half of it is matched
    assert assignment_scores(labels, clusters)["acc"] == 0.5


def test_eval_cluster_prints_the_three_scores(tmp_path, capsys, monkeypatch, fashion_folder):
    train(settings(method="ressl", arch="resnet18-w8", data="fashion-mnist", pipeline="tensor", image_size=16,
                   batch_size=64, queue_size=512, train_subset=128, epochs=1, knn_every=0, data_val="none",
                   device="cpu", out=str(tmp_path)))
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["fastssl", "eval", "cluster", "--checkpoint", str(tmp_path / "checkpoint.pt"),
                                      "--data", str(fashion_folder), "--device", "cpu", "--k", "12"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "k=12" in out and "query split" in out and "512 images" in out
    for name in ("NMI", "ARI", "cluster accuracy"):
        assert name in out
