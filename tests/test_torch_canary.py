"""The oneDNN crash of narrow 1x1 stride-2 convolutions (crash_checks.py): torch's bare layer as a canary, fastssl's
workaround against the strided convolution it replaces, and fastssl training the crash-prone shapes, each in a
subprocess where it could crash."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from crash_checks import BARE_TORCH, how_it_ended, run_python
from PIL import Image

from fastssl import models
from fastssl.models import AVX512_CPU, SubsampledPointwiseConv2d, build_backbone


@pytest.mark.xfail(AVX512_CPU, strict=True, reason="torch 2.13-2.14's oneDNN corrupts the heap on AVX-512 CPUs; when "
                   "this passes, the installed torch is fixed and fastssl.models.SubsampledPointwiseConv2d can go")
def test_torch_trains_a_narrow_strided_pointwise_conv():
    done = run_python("-c", BARE_TORCH)
    assert done.returncode == 0, how_it_ended(done)


@pytest.mark.parametrize("cin, cout, side, stride", [(8, 16, 48, 2), (3, 4, 47, 2), (16, 32, 9, 3)])
def test_the_workaround_is_the_strided_conv(cin, cout, side, stride, monkeypatch):
    """Outputs and both gradients equal the strided convolution's (odd sides included), computed in float64, where
    torch's CPU convolution does not go through oneDNN. The subsample runs on every host here (safe without
    AVX-512 too), though fastssl takes it only on AVX-512 CPUs."""
    monkeypatch.setattr(models, "AVX512_CPU", True)
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, 1, stride=stride, bias=True).double()
    ours = nn.Conv2d(cin, cout, 1, stride=stride, bias=True)
    ours.load_state_dict(plain.state_dict())
    ours.__class__ = SubsampledPointwiseConv2d
    ours.to(memory_format=torch.channels_last)
    x = torch.randn(4, cin, side, side, dtype=torch.float64)
    x64, x32 = x.clone().requires_grad_(), x.float().to(memory_format=torch.channels_last).requires_grad_()
    y64, y32 = plain(x64), ours(x32)
    assert y32.shape == y64.shape
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)
    (y64 * y64.detach()).sum().backward()
    (y32 * y32.detach()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad.double(), plain.weight.grad, rtol=1e-4, atol=1e-4)


def test_backbones_keep_torchvisions_keys_and_use_the_workaround():
    net = build_backbone("r18-w8", 48)
    shortcuts = [m for name, m in net.named_modules() if name.endswith("downsample.0")]
    assert len(shortcuts) == 3 and all(type(m) is SubsampledPointwiseConv2d for m in shortcuts)
    assert sum(type(m) is SubsampledPointwiseConv2d for m in net.modules()) == 3  # the shortcuts only
    assert "layer2.0.downsample.0.weight" in net.state_dict()


COMPILED = """
import torch, torch.nn as nn
from fastssl.models import subsample_strided_pointwise
torch.manual_seed(0)
layer = subsample_strided_pointwise(nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False)))
layer.to(memory_format=torch.channels_last)
compiled = torch.compile(layer)
x = torch.randn(16, 8, 48, 48).to(memory_format=torch.channels_last).requires_grad_()
for bf16 in (False, True):
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y, eager = compiled(x), layer(x)
        y.float().square().sum().backward()
    torch.testing.assert_close(y.float(), eager.float(), rtol=1e-2 if bf16 else 1e-5, atol=1e-2 if bf16 else 1e-5)
"""


def test_the_workaround_compiles():
    done = run_python("-c", COMPILED)
    assert done.returncode == 0, how_it_ended(done)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_8_wide_resnet_trains_at_48_and_64_px(tmp_path, precision):
    """The newcomer's flat folder through `fastssl train --arch r18-w8` at the sizes where torch's layer crashes."""
    for i in range(24):
        Image.new("RGB", (80, 72), (9 * i % 256, 90, 40 * (i % 5))).save(tmp_path / f"{i}.jpg")
    for size in (48, 64):
        done = run_python("-m", "fastssl.cli", "train", "--data", str(tmp_path), "--out", str(tmp_path / f"run{size}"),
                          "--arch", "r18-w8", "--image-size", str(size), "--precision", precision, "--batch-size", "8",
                          "--max-steps", "3", "--queue-size", "16", "--pipeline", "torch", "--workers", "1",
                          "--device", "cpu")
        assert done.returncode == 0, f"{size} px: {how_it_ended(done)}"
        assert (tmp_path / f"run{size}" / "backbone.pt").exists()
