"""Backbones (torchvision ResNets, timm's Vision Transformers and any timm model), MLP heads, split BatchNorm, the EMA
teacher update and the encoder's average."""

from __future__ import annotations

import copy
import itertools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

from .data import is_small
from .errors import UserError

ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
         "resnet50": (Bottleneck, [3, 4, 6, 3])}
# ViT-Tiny/Small/Base (timm's definitions): patch 16 px at ImageNet sizes, VIT_SMALL_PATCH px on small images
VITS = {"vit-t16": "vit_tiny_patch16_224", "vit-s16": "vit_small_patch16_224", "vit-b16": "vit_base_patch16_224"}
VIT_SMALL_PATCH = 4  # images of at most 64 px: 4 px patches keep 7x7 to 16x16 tokens (16 px patches: 2x2 to 4x4)
ARCH_HELP = ("resnet18 | resnet34 | resnet50 (or r18 | r34 | r50), optionally narrowed: resnet18-w16 (base width 16 "
             "instead of 64) | vit-t16 | vit-s16 | vit-b16 | timm:NAME (any timm model, e.g. timm:resnet50)")


class _NarrowResNet(resnet.ResNet):
    """torchvision's ResNet with every stage's width scaled by width/64 (same blocks, same init)."""

    def __init__(self, block, layers, width: int):
        self._scale = width / 64
        super().__init__(block, layers)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage: its input is the (narrowed) stem
            self.inplanes = int(64 * self._scale)
        return super()._make_layer(block, int(planes * self._scale), blocks, stride, dilate)


def build_backbone(arch: str, image_size: int, drop_path: float = 0.0) -> nn.Module:
    """A backbone returning pooled features; `.out_dim` is their width. ResNets are torchvision's: inputs of at
    most 64 px get the small-image stem (3x3 stride-1 conv1, no max-pool), as in the CIFAR recipes of every paper
    here. ViTs and timm:NAME are timm's, without a classifier (ViTs: the class token's features), with stochastic
    depth `drop_path`."""
    if arch in VITS or arch.startswith("timm:"):
        return subsample_strided_pointwise(timm_backbone(arch, image_size, drop_path))
    if drop_path:
        raise UserError(f"--drop-path {drop_path}: the torchvision ResNets have no stochastic depth; use a ViT or "
                        f"timm:NAME (e.g. timm:resnet50), or leave it at 0")
    m = re.fullmatch(r"(?:resnet|r)(\d+)(?:-w(\d+))?", arch)
    name = m and f"resnet{m.group(1)}"
    if not m or name not in ARCHS or (m.group(2) and not 4 <= int(m.group(2)) <= 256):
        raise UserError(f"unknown arch {arch!r}; choose {ARCH_HELP}")
    block, layers = ARCHS[name]
    width = int(m.group(2) or 64)
    net = _NarrowResNet(block, layers, width) if width != 64 else resnet.ResNet(block, layers)
    if is_small(image_size):
        net.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif width != 64:
        net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.bn1 = nn.BatchNorm2d(width)
    net.out_dim = int(512 * width / 64) * block.expansion
    net.fc = nn.Identity()
    return subsample_strided_pointwise(net)


def timm_backbone(arch: str, image_size: int, drop_path: float) -> nn.Module:
    """vit-t16 | vit-s16 | vit-b16 (position embeddings interpolated for other input sizes: multi-crop) or timm:NAME,
    from timm, without a classifier; `.patch` is a ViT's patch side."""
    try:
        import timm
    except ImportError:
        raise UserError(f"--arch {arch} needs timm: pip install 'fastssl[timm]' (or timm)") from None
    name, options = arch.removeprefix("timm:"), {"drop_path_rate": drop_path} if drop_path else {}
    if arch in VITS:
        name = VITS[arch]
        options.update(img_size=image_size, patch_size=VIT_SMALL_PATCH if is_small(image_size) else 16,
                       dynamic_img_size=True, dynamic_img_pad=True)
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}; timm.list_models('PATTERN') lists them (e.g. 'resnet*')")
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, **options)
    except TypeError as e:  # a model without stochastic depth refuses drop_path_rate
        raise UserError(f"timm model {name}: {e}; leave --drop-path at 0 for it") from None
    net.out_dim, net.patch = net.num_features, options.get("patch_size")
    return net


def convolutional(net: nn.Module) -> bool:
    """Whether channels_last memory helps: a convolutional network, not a ViT (whose one convolution embeds patches)."""
    return sum(isinstance(m, nn.Conv2d) for m in net.modules()) > 1


# CPUs with AVX-512 (F, BW, VL, DQ: oneDNN's avx512_core kernels), as ATen reports them. ATEN_CPU_CAPABILITY=avx2
# lowers ATen's kernels but not oneDNN's: whoever sets it on such a CPU sets ONEDNN_MAX_CPU_ISA=AVX2 too.
AVX512_CPU = torch.backends.cpu.get_cpu_capability() == "AVX512"


class SubsampledPointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution with stride s that, on a CPU with AVX-512, subsamples every s-th pixel and then convolves
    with stride 1: the same arithmetic and the same weights (state_dict keys unchanged, so checkpoints and
    backbone.pt stay torchvision's). Elsewhere (GPUs, other CPUs) it runs the strided convolution as it is.

    Why: the oneDNN inside torch 2.13 and 2.14 (CPU builds and CUDA builds alike) corrupts the heap in the backward of
    1x1 stride-2 channels_last convolutions of narrow layers (e.g. 8 -> 16 channels at 48 px; irregularly up to 12
    input channels) on CPUs with AVX-512 (its avx512_core kernels; capped at AVX2 it is fine): a segfault or
    "double free" that takes the process down. That is the downsample shortcut of the narrowed ResNets at 48-64 px.
    The subsample costs 5-9% of such a network's CPU step. tests/test_torch_canary.py runs torch's bare layer in a
    subprocess: when an upgrade turns that strict xfail red, torch is fixed and this class can go.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not AVX512_CPU:
            return super().forward(x)
        return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]], self.weight, self.bias, 1, 0, 1, self.groups)


def subsample_strided_pointwise(module: nn.Module) -> nn.Module:
    """Every unpadded 1x1 strided Conv2d in `module` becomes a SubsampledPointwiseConv2d holding the same parameters."""
    for name, child in module.named_children():
        if (type(child) is nn.Conv2d and child.kernel_size == (1, 1) and child.stride != (1, 1)
                and child.padding == (0, 0) and child.dilation == (1, 1) and child.padding_mode == "zeros"):
            child.__class__ = SubsampledPointwiseConv2d  # the same parameters, not new ones: no init draws the seed
        else:
            subsample_strided_pointwise(child)
    return module


def mlp(dims: list[int], hidden_bn: bool = False, last_bn: bool = False) -> nn.Sequential:
    """Linear layers with ReLU between (and BN before each ReLU if hidden_bn); last_bn adds a non-affine BN."""
    layers: list[nn.Module] = []
    pairs = list(zip(dims[:-1], dims[1:]))
    for i, (a, b) in enumerate(pairs):
        last = i == len(pairs) - 1
        layers.append(nn.Linear(a, b, bias=not (last_bn if last else hidden_bn)))  # no bias right before a BN
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)] if hidden_bn else [nn.ReLU(inplace=True)]
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


class _SplitBatchNorm:
    """BatchNorm whose training statistics come from `splits` groups of the batch.

    One process sees the whole batch; the papers' single-GPU recipes split BN statistics into groups to
    mimic per-GPU BN (MoCo's shuffle-BN), which stops the batch statistics leaking across samples.
    Groups are consecutive slices of the batch (as the GPUs' shares would be); the batch must be a multiple
    of `splits`. The running statistics are the mean of the groups' updates. In eval it is a plain BatchNorm.
    """

    def __init__(self, num_features: int, splits: int, **kw):
        super().__init__(num_features, **kw)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        g = self.splits
        if x.shape[0] % g:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of the {g} BatchNorm splits")
        # One native BN call per slice: a slice of a channels_last batch is still channels_last, where folding
        # the groups into channels would copy the batch to NCHW and back (1.3x slower steps, ResNet-18-w16).
        mean_g, var_g = self.running_mean.repeat(g, 1), self.running_var.repeat(g, 1)
        out = torch.cat([F.batch_norm(part, mean_g[i], var_g[i], self.weight, self.bias, True, self.momentum, self.eps)
                         for i, part in enumerate(x.chunk(g))])
        with torch.no_grad():
            self.running_mean.copy_(mean_g.mean(0))
            self.running_var.copy_(var_g.mean(0))
            self.num_batches_tracked += 1
        return out


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    """Split BatchNorm of the heads' [B, C] features."""


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    """Split BatchNorm of the backbone's [B, C, H, W] maps."""


def split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm1d/2d in `module` (backbone and heads) by its split version with the same state."""
    if splits <= 1:
        return module
    for name, child in module.named_children():
        kind = {nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d}.get(type(child))
        if kind is not None:
            new = kind(child.num_features, splits, eps=child.eps, momentum=child.momentum, affine=child.affine)
            new.load_state_dict(child.state_dict())
            new.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, new)
        else:
            split_batchnorm(child, splits)
    return module


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over parameters (buffers follow the teacher's own forwards)."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


class EncoderAverage(nn.Module):
    """A running average of an encoder's weights and float buffers (BN statistics): `update` after every optimiser
    step, copying the encoder on its first call and moving `1 - decay` of the way towards it after that.

    One foreach lerp over the tensors and a counter kept on the host (nothing read back from the device). The copy
    lives in `module`; the counter travels in the state_dict as extra state, so a resumed run continues exactly.
    """

    def __init__(self, encoder: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(encoder).requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        mine = list(itertools.chain(self.module.parameters(), self.module.buffers()))
        theirs = [t.detach() for t in itertools.chain(encoder.parameters(), encoder.buffers())]
        if self.updates == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay)
            for a, b in zip(mine, theirs):
                if not a.is_floating_point():
                    a.copy_(b)
        self.updates += 1

    def get_extra_state(self) -> dict:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict) -> None:
        self.updates = state["updates"]
