"""The weighted-kNN monitor of a training run, shared out over the processes.

Bank: a fixed random subset of the train split (unaugmented, the evaluation view); queries: the evaluation
split. Every rank extracts the features of its slice of both with the pipeline's own evaluation reader; the
bank is gathered on every rank, each rank scores its queries, and the counts are summed. Readers are made once
(FFCV and DALI build theirs in seconds) and read again at every pass.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn as nn

from . import dist, pipelines
from .config import TrainConfig
from .data import ImageSet
from .evaluate import extract_features, knn_predict, with_data_bn_stats

EVAL_BATCH = 512
# A monitor image costs about a quarter of a training image (one forward of one view, against a teacher forward
# and a student forward and backward of two views); the automatic interval keeps the monitor near 5% of the time.
MONITOR_SHARE, MONITOR_IMAGE_COST = 0.05, 0.25


def auto_interval(monitor_images: int, train_images: int) -> int:
    """Epochs between monitor passes: 1 when a pass reads at most a fifth of an epoch's images, else spaced so
    that the monitor costs about MONITOR_SHARE of the training time."""
    return max(1, math.ceil(MONITOR_IMAGE_COST / MONITOR_SHARE * monitor_images / max(1, train_images)))


def _my_slice(images: ImageSet) -> ImageSet:
    """This rank's contiguous share of `images` (all of it in one process)."""
    return images.take(torch.arange(len(images)).tensor_split(dist.world_size())[dist.rank()])


class KnnMonitor:
    def __init__(self, cfg: TrainConfig, train_set: ImageSet, queries: ImageSet, size: int, device: torch.device,
                 precision: str, workers: int):
        self.bank, self.queries = train_set.subset(cfg.knn_bank, cfg.seed), queries.subset(cfg.knn_queries, cfg.seed)
        self.mine = {name: _my_slice(s) for name, s in (("bank", self.bank), ("queries", self.queries))}
        self.readers = {name: pipelines.eval_reader(cfg.pipeline, s, size, batch_size=EVAL_BATCH, workers=workers)
                        for name, s in self.mine.items()}
        self.size, self.device, self.precision, self.channels_last = size, device, precision, cfg.channels_last
        self.kind, self.k, self.t = cfg.pipeline, cfg.knn_k, cfg.knn_t
        self.seconds = 0.0
        self.auto = False  # the interval is the automatic one (no --knn-every)

    def describe(self, train_images: int, every: int) -> str:
        when = f"every {every} epoch(s)" if every else "at the end"
        return (f"kNN monitor (k={self.k}, T={self.t:g}): bank {len(self.bank)} of {train_images} train images, "
                f"{len(self.queries)} queries from {self.queries.root}, {when}"
                f"{' (auto: ~5% of the time)' if self.auto and every > 1 else ''}")

    def _features(self, encoder: nn.Module, name: str) -> torch.Tensor:
        return extract_features(encoder, self.readers[name], self.bank.mean_std, self.device,
                                precision=self.precision, channels_last=self.channels_last)

    def _calibrated(self, encoder: nn.Module) -> nn.Module:
        """The encoder with the BN statistics of one batch of the bank (the random-init reference point)."""
        splits = max([getattr(m, "splits", 1) for m in encoder.modules()])
        n = min(EVAL_BATCH, len(self.bank)) // splits * splits
        batch = next(iter(pipelines.eval_reader(self.kind, self.bank.subset(n), self.size, batch_size=n, workers=0)))
        return with_data_bn_stats(encoder, batch, self.bank.mean_std, self.device, channels_last=self.channels_last)

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, data_bn_stats: bool = False) -> float:
        """Weighted kNN top-1 (%) of the encoder; every rank calls it and gets the same figure."""
        start = time.perf_counter()
        if data_bn_stats:
            encoder = self._calibrated(encoder)
        bank = dist.all_gather_uneven(self._features(encoder, "bank"))
        labels = dist.all_gather_uneven(self.mine["bank"].labels.to(self.device))
        accuracy = self._top1(knn_predict(bank, labels, self._features(encoder, "queries"), self.k, self.t))
        self.seconds += time.perf_counter() - start
        return accuracy

    @torch.no_grad()
    def classifier_accuracy(self, encoder: nn.Module, predict: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Top-1 (%) of a classifier of the encoder's features (the online probe's `predict`) on the queries; every
        rank calls it and gets the same figure."""
        start = time.perf_counter()
        accuracy = self._top1(predict(self._features(encoder, "queries")))
        self.seconds += time.perf_counter() - start
        return accuracy

    def _top1(self, predictions: torch.Tensor) -> float:
        """The share (%) of this rank's queries predicted right, summed over the ranks."""
        correct = (predictions == self.mine["queries"].labels.to(self.device)).sum().float()
        return 100.0 * dist.all_reduce(correct).item() / len(self.queries)
