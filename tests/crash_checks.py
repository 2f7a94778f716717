"""What can take the interpreter down (a fault in torch's native code) runs here in a subprocess, so that a crash fails
its test by name and the rest of the run goes on. torch 2.13-2.14's oneDNN corrupts the heap in the backward of narrow
1x1 stride-2 channels_last convolutions on AVX-512 CPUs; fastssl.models.SubsampledPointwiseConv2d works around it."""

from __future__ import annotations

import signal
import subprocess
import sys


# torch alone: the ResNet downsample shortcut of an 8-wide network at 48 px, fp32, channels_last.
BARE_TORCH = """
import torch, torch.nn as nn
x = torch.randn(16, 8, 48, 48).to(memory_format=torch.channels_last).requires_grad_()
m = nn.Conv2d(8, 16, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
for _ in range(5):
    m(x).pow(2).sum().backward()
"""

# fastssl's backbones at the shapes the in-process tests train, forward and backward in fp32 and under bf16 autocast.
BACKBONES = """
import torch
from fastssl.models import build_backbone
for arch, sizes in (("resnet18-w8", (16, 28, 32, 48, 64)), ("resnet18-w16", (16, 28, 32, 48)), ("r50", (32,))):
    for size in sizes:
        torch.manual_seed(0)
        net = build_backbone(arch, size).to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, size, size).to(memory_format=torch.channels_last)
        for bf16 in (False, True):
            for _ in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = net(x)
                y.float().square().sum().backward()
"""


def run_python(*args: str) -> subprocess.CompletedProcess:
    """`python args...` in a fresh interpreter, its output captured."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def how_it_ended(done: subprocess.CompletedProcess) -> str:
    """'exit 0', or the signal or exit status and the last line it wrote, for an assertion message."""
    code = done.returncode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
    return f"{how}: {last[0][-300:]}" if code and last else how
