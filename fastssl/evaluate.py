"""Frozen-encoder evaluation: feature extraction, weighted kNN (InstDisc style) and a linear probe."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .data import BetonSet, ImageSet


class _EvalViews(Dataset):
    """Deterministic eval view: resize the short side to size*256/224 and centre-crop (files only)."""

    def __init__(self, images: ImageSet, size: int):
        self.images = images
        self.transform = v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images.read(i))


def _batches(images: ImageSet, size: int, batch_size: int, workers: int):
    """uint8 [B,3,size,size] batches of the whole split, in order."""
    if isinstance(images, BetonSet):  # an FFCV file, read by FFCV with the same centre crop
        from .pipelines.ffcv_loader import eval_batches
        yield from eval_batches(images, size, batch_size, workers)
    elif images.in_memory:
        for i in range(0, len(images), batch_size):
            x = images.images[i:i + batch_size].permute(0, 3, 1, 2)
            yield x if x.shape[-1] == size else v2.functional.resize(x, [size, size], antialias=True)
    else:
        yield from DataLoader(_EvalViews(images, size), batch_size=batch_size, num_workers=workers)


@torch.no_grad()
def extract_features(encoder: nn.Module, images: ImageSet, size: int, device: torch.device, *,
                     batch_size: int = 512, workers: int = 2, precision: str = "fp32",
                     channels_last: bool = True) -> torch.Tensor:
    """Pooled backbone features [N,D] (fp32) of every image in `images`, encoder in eval mode."""
    mean = torch.tensor(images.mean_std[0], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(images.mean_std[1], device=device).view(1, 3, 1, 1) * 255
    was_training = encoder.training
    encoder.eval()
    feats = []
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    for x in _batches(images, size, batch_size, workers):
        x = (x.to(device, non_blocking=True).float() - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            feats.append(encoder(x).float())
    encoder.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def with_data_bn_stats(encoder: nn.Module, images: ImageSet, size: int, device: torch.device, *,
                       batch_size: int = 512, channels_last: bool = True) -> nn.Module:
    """A copy of the encoder whose BatchNorm running statistics are those of one batch of `images`.

    For the random-init reference: a fresh network's running statistics are placeholders (mean 0, var 1), and
    evaluating with them measures an unnormalised random net (Fashion-MNIST, ResNet-18-w16: 74% kNN, against 55%
    with the statistics of the data). Training replaces them within its first steps, so the curve's starting
    point is the same weights with the statistics they would have on the data.
    """
    splits = max([getattr(m, "splits", 1) for m in encoder.modules()])
    n = min(batch_size, len(images)) // splits * splits
    x = next(_batches(images.subset(n), size, n, 0))
    mean = torch.tensor(images.mean_std[0], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(images.mean_std[1], device=device).view(1, 3, 1, 1) * 255
    x = (x.to(device).float() - mean) / std
    calibrated = copy.deepcopy(encoder).train()
    for m in calibrated.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0  # running statistics := this batch's
    calibrated(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return calibrated.eval()


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 200, t: float = 0.1, chunk: int = 512) -> float:
    """Weighted kNN top-1 (%) on cosine similarity: each of the k nearest votes exp(sim / t) for its class."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    bank_labels, query_labels = bank_labels.to(bank.device), query_labels.to(bank.device)
    n_classes = int(bank_labels.max()) + 1
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(queries), chunk):
        sim, idx = (queries[i:i + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / t).exp())
        correct += (votes.argmax(1) == query_labels[i:i + chunk]).sum().item()
    return 100.0 * correct / len(queries)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 epochs: int = 100, batch_size: int = 1024, lr: float = 0.1, weight_decay: float = 1e-5,
                 seed: int = 0) -> float:
    """Top-1 (%) of a linear classifier on frozen features: L2-normalised then standardised (ISD protocol),
    SGD with momentum and a cosine schedule. Features are computed once, without augmentation."""
    g = torch.Generator().manual_seed(seed)
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(train_y.max()) + 1
    torch.manual_seed(seed)
    clf = nn.Linear(train_x.shape[1], n_classes).to(train_x.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * max(1, len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    train_y = train_y.to(train_x.device)
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=g).to(train_x.device)
        for i in range(0, max(1, len(train_x) // batch_size) * batch_size, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(clf(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = clf(test_x).argmax(1).cpu()
    return 100.0 * (pred == test_y.cpu()).float().mean().item()
