"""The backbone families: timm's ViTs (patches, multi-crop sizes, the exported weights in timm's own model) and any
timm model, each trained by every method for a few steps; the optimisers the papers use, built as they do."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn
from method_options import own

from fastssl import checkpoint, cli
from fastssl.config import settings
from fastssl.errors import UserError
from fastssl.methods import METHODS
from fastssl.models import VITS, build_backbone, convolutional
from fastssl.optim import build_optimizer
from fastssl.train import train

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("backbones_train_here")


def test_a_vit_takes_small_patches_on_small_images_and_any_crop_size():
    small, large = build_backbone("vit-t16", 16), build_backbone("vit-s16", 224)
    assert (small.patch, small.out_dim, large.patch, large.out_dim) == (4, 192, 16, 384)
    assert not convolutional(small) and convolutional(build_backbone("resnet18-w8", 16))
    with torch.no_grad():
        for side in (16, 12, 10):  # multi-crop's smaller crops: position embeddings interpolated, odd sides padded
            assert small(torch.randn(2, 3, side, side)).shape == (2, 192)


def test_the_exported_vit_loads_into_timms_own_model():
    net = build_backbone("vit-s16", 32, drop_path=0.1)
    exported = checkpoint.backbone_state_dict(net)
    theirs = timm.create_model(VITS["vit-s16"], num_classes=0, img_size=32, patch_size=4, dynamic_img_size=True)
    theirs.load_state_dict(exported)  # strict: the same keys and shapes
    net.eval(), theirs.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), net(x))


@pytest.mark.parametrize("arch, message", [("timm:no_such_net", "unknown timm model 'no_such_net'"),
                                           ("vit-x16", "unknown arch 'vit-x16'")])
def test_an_unknown_backbone_is_one_line(arch, message):
    with pytest.raises(UserError, match=message):
        build_backbone(arch, 32)


def test_drop_path_needs_a_backbone_that_has_it():
    with pytest.raises(UserError, match="no stochastic depth"):
        build_backbone("resnet18", 32, drop_path=0.1)
    blocks = build_backbone("vit-t16", 16, drop_path=0.1).blocks
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # timm's linear rule: the last block gets the rate


def test_lars_and_adamw_exempt_biases_and_norms_from_weight_decay():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    for name in ("lars", "adamw"):
        groups = build_optimizer(name, net, lr=0.1, weight_decay=0.05).param_groups
        decay = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
        assert decay == {0.05: 4 * 8 + 8 * 2, 0.0: 8 + 8 + 8 + 2}, name
    sgd = build_optimizer("sgd", net, lr=0.1, weight_decay=0.05)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.05]  # the ResNet recipes decay every parameter


TINY = dict(data="fashion-mnist", pipeline="tensor", image_size=16, batch_size=16, train_subset=32, epochs=1,
            knn_every=0, data_val="none", device="cpu", log_every=1)


@pytest.mark.parametrize("arch, precision", [("vit-t16", "bf16"), ("timm:resnet18", "fp32")])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_each_backbone_family(method, arch, precision, tmp_path):
    crops = {"crops": 2} if method == "ressl" and arch.startswith("vit") else {}  # a smaller crop through the ViT
    summary = train(settings(**TINY, method=method, arch=arch, precision=precision, out=str(tmp_path),
                             **own(method, queue_size=32), **crops))
    assert summary["steps"] == 2 and summary["precision"] == precision
    logged = (tmp_path / "metrics.csv").read_text().splitlines()
    assert all(torch.tensor(float(row.split(",")[2])).isfinite() for row in logged[1:] if ",loss," in row)


def test_a_vit_run_evaluates_from_its_checkpoint(tmp_path, fashion_folder, capsys, monkeypatch):
    out = tmp_path / "run"
    train(settings(**{**TINY, "data": str(fashion_folder), "train_subset": 64}, method="resa", arch="vit-t16",
                   optimizer="adamw", lr=5e-4, weight_decay=0.1, out=str(out)))
    assert json.loads((out / "config.json").read_text())["channels_last"] is False  # not for a ViT
    for kind in ("knn", "linear", "cluster"):
        linear = ["--epochs", "5", "--protocol", "quick"] if kind == "linear" else []
        monkeypatch.setattr(sys, "argv", ["fastssl", "eval", kind, "--checkpoint", str(out / "checkpoint.pt"),
                                          "--device", "cpu", "--workers", "0", *linear])
        with pytest.raises(SystemExit) as done:
            cli.main()
        assert done.value.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "linear probe top-1" in printed and "NMI" in printed


def test_without_timm_its_backbones_and_lars_are_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what a missing package looks like to `import timm`
    monkeypatch.setitem(sys.modules, "timm.optim", None)
    with pytest.raises(UserError, match=r"--arch vit-s16 needs timm: pip install 'fastssl\[timm\]'"):
        build_backbone("vit-s16", 224)
    with pytest.raises(UserError, match="--optimizer lars needs timm"):
        build_optimizer("lars", nn.Linear(2, 2), lr=0.1, weight_decay=0.0)
    build_optimizer("adamw", nn.Linear(2, 2), lr=0.1, weight_decay=0.0)  # torch's own
