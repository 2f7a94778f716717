"""Frozen-encoder evaluation: feature extraction, weighted kNN (InstDisc style), linear evaluation by the papers'
protocols (PROTOCOLS) and clustering quality (k-means against the classes: NMI, ARI, cluster accuracy).

Functions of tensors and of batches of images: where the batches come from (a pipeline's evaluation reader)
is the caller's business.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .config import KNN_K, KNN_T
from .device import autocast
from .optim import cosine
from .views import normalize


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[torch.Tensor], mean_std, device: torch.device, *,
                     precision: str = "fp32", channels_last: bool = True) -> torch.Tensor:
    """Pooled backbone features [N,D] (fp32) of every uint8 [B,3,H,W] batch, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats = []
    for x in batches:
        x = normalize(x.to(device, non_blocking=True), *mean_std, channels_last)
        with autocast(precision, device):
            feats.append(encoder(x).float())
    encoder.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0, device=device)


@torch.no_grad()
def with_data_bn_stats(encoder: nn.Module, batch: torch.Tensor, mean_std, device: torch.device, *,
                       channels_last: bool = True) -> nn.Module:
    """A copy of the encoder whose BatchNorm running statistics are those of one uint8 batch of images.

    For the random-init reference: a fresh network's running statistics are placeholders (mean 0, var 1), and
    evaluating with them measures an unnormalised random net (Fashion-MNIST, ResNet-18-w16: 74% kNN, against 55%
    with the statistics of the data). Training replaces them within its first steps, so the curve's starting
    point is the same weights with the statistics they would have on the data.
    """
    calibrated = copy.deepcopy(encoder).train()
    for m in calibrated.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0  # running statistics := this batch's
    calibrated(normalize(batch.to(device), *mean_std, channels_last))
    return calibrated.eval()


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int = KNN_K,
                t: float = KNN_T, chunk: int = 512) -> torch.Tensor:
    """Weighted kNN classes [Q] on cosine similarity: each of the k nearest votes exp(sim / t) for its class."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    bank_labels = bank_labels.to(bank.device)
    n_classes = int(bank_labels.max()) + 1
    k = min(k, len(bank))
    predictions = []
    for i in range(0, len(queries), chunk):
        sim, idx = (queries[i:i + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / t).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long, device=bank.device)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int = KNN_K, t: float = KNN_T) -> float:
    """Weighted kNN top-1 (%)."""
    predictions = knn_predict(bank, bank_labels, queries, k, t)
    return 100.0 * (predictions == query_labels.to(predictions.device)).sum().item() / len(queries)


@dataclass(frozen=True)
class Protocol:
    """A linear evaluation: a linear classifier trained on the frozen encoder's features, as a paper trains it.
    --epochs, --lr and --batch-size override the defaults here."""

    features: str  # views: random resized crops re-encoded every epoch | raw: cached | standardised: cached, L2-normed
    epochs: int
    lr: float  # SGD's per 256 images (x batch/256, as the trainer's); Adam's as it is
    batch_size: int
    weight_decay: float
    optimizer: str  # SGD (momentum 0.9) | Adam
    schedule: str  # lr_factor's: steps | exponential | cosine
    source: str


PROTOCOLS = {
    "frozen-aug": Protocol(
        "views", 100, 30.0, 256, 0.0, "SGD", "steps",
        "ReSSL (NeurIPS 2021) §4 Evaluation Protocol, as MoCo's ImageNet protocol: average-pooled features of random "
        "resized crops and flips, new every epoch; lr x0.1 at 60% and 80% of the epochs; the centre crop at test"),
    "frozen-features": Protocol(
        "raw", 500, 1e-2, 1000, 5e-6, "Adam", "exponential",
        "ReSA (ICML 2025), the W-MSE (Ermolov et al., ICML 2021) / INTL protocol (W-MSE's eval/sgd.py): cached raw "
        "features of the unaugmented images; lr decayed exponentially to 1e-4 of it"),
    "quick": Protocol(
        "standardised", 100, 0.025, 1024, 1e-5, "SGD", "cosine",
        "ISD (Tejankar et al., ICCV 2021), its linear evaluation code: cached features of the unaugmented images, "
        "L2-normalised then standardised; a cosine schedule"),
}
EXPONENTIAL_END = 1e-4  # frozen-features: the last epoch's lr / the first's (W-MSE: 1e-2 -> 1e-6)


def lr_factor(schedule: str, epoch: float, epochs: int) -> float:
    """The lr multiplier at `epoch` (fractional: steps / steps per epoch): cosine per step, the others per epoch."""
    if schedule == "cosine":
        return cosine(epoch / epochs)
    done = math.floor(epoch)
    if schedule == "exponential":
        return EXPONENTIAL_END ** (done / epochs)
    return 0.1 ** sum(done >= m * epochs for m in (0.6, 0.8))  # steps: epochs 60 and 80 of 100


def n_classes(*labels: torch.Tensor) -> int:
    return max(int(y.max()) for y in labels) + 1


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (%) and, with more than 5 classes, top-5 (%)."""
    ks = (1, 5) if logits.shape[1] > 5 else (1,)
    hits = logits.topk(max(ks), dim=1).indices.cpu() == labels.cpu()[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(1).float().mean().item() for k in ks}


def train_linear(p: Protocol, batches: Callable[[int], Iterable], steps_per_epoch: int, test_x: torch.Tensor,
                 test_y: torch.Tensor, classes: int, *, epochs: int, lr: float, batch_size: int, seed: int = 0
                 ) -> dict[str, float]:
    """Top-1/top-5 on (test_x, test_y) of a linear classifier (fp32) trained by protocol `p` on the (features,
    labels) that `batches(epoch)` yields, `steps_per_epoch` of them."""
    torch.manual_seed(seed)
    clf = nn.Linear(test_x.shape[1], classes).to(test_x.device)
    if p.optimizer == "SGD":
        opt = torch.optim.SGD(clf.parameters(), lr * batch_size / 256, momentum=0.9, weight_decay=p.weight_decay)
    else:
        opt = torch.optim.Adam(clf.parameters(), lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(p.schedule, step / steps_per_epoch, epochs))
    # ImageNet's 100 epochs of frozen-aug take hours: a bar (in a log file, a line per 30 s)
    for epoch in tqdm(range(epochs), desc="linear classifier", unit="epoch",
                      mininterval=0.5 if sys.stderr.isatty() else 30):
        for x, y in batches(epoch):
            loss = F.cross_entropy(clf(x), y.to(x.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return topk_accuracy(clf(test_x), test_y)


def linear_on_features(p: Protocol, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                       test_y: torch.Tensor, *, epochs: int, lr: float, batch_size: int, seed: int = 0
                       ) -> dict[str, float]:
    """Protocol `p` on cached features of the unaugmented images ("raw" or "standardised": L2-normalised, then
    each dimension standardised by the training features' mean and std)."""
    if p.features == "standardised":
        train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    g, train_y = torch.Generator().manual_seed(seed), train_y.to(train_x.device)

    def batches(epoch: int):
        order = torch.randperm(len(train_x), generator=g).to(train_x.device)
        return ((train_x[idx], train_y[idx]) for idx in order.split(batch_size))

    return train_linear(p, batches, math.ceil(len(train_x) / batch_size), test_x, test_y,
                        n_classes(train_y, test_y), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


def linear_on_views(p: Protocol, encoder: nn.Module, loader, test_x: torch.Tensor, test_y: torch.Tensor,
                    device: torch.device, precision: str, *, epochs: int, lr: float, batch_size: int, seed: int = 0
                    ) -> dict[str, float]:
    """Protocol `p` on augmented views: each epoch the loader's (a pipeline's Loader) {"weak": views, "label":
    labels} batches go through the frozen encoder (eval mode, no gradient, autocast at `precision`); the classifier
    trains in fp32."""
    encoder.eval()

    def batches(epoch: int):
        for views in loader.epoch(epoch):
            with torch.no_grad(), autocast(precision, device):
                features = encoder(views["weak"])
            yield features.float(), views["label"]

    return train_linear(p, batches, len(loader), test_x, test_y, n_classes(loader.images.labels, test_y),
                        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


KMEANS_INITS = 10  # k-means++ restarts, fixed (scikit-learn's "auto" would pick 1): the best of 10 by inertia


def assignment_scores(labels, clusters) -> dict:
    """NMI, ARI and cluster accuracy (fractions) of a clustering against the classes. Accuracy: the share of
    samples whose cluster is matched to their class by the best one-to-one matching (Hungarian); with more clusters
    than classes the unmatched clusters count as wrong."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    counts = confusion_matrix(clusters, labels)  # [cluster, class] over the union of both ids
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)),
            "acc": float(counts[rows, cols].sum() / len(labels))}


def cluster_scores(features: torch.Tensor, labels: torch.Tensor, k: int | None = None, seed: int = 0) -> dict:
    """Clustering quality of frozen features (ReSA's lens): k-means on the L2-normalised features, k = the number of
    classes by default, scored against the classes by `assignment_scores`."""
    from sklearn.cluster import KMeans
    labels = labels.cpu().numpy()
    k = k or len(set(labels.tolist()))
    x = F.normalize(features.float(), dim=1).cpu().numpy()
    clusters = KMeans(n_clusters=k, n_init=KMEANS_INITS, random_state=seed).fit_predict(x)
    return {**assignment_scores(labels, clusters), "k": k}
