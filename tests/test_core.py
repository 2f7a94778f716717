"""The foundation's pieces: reference loss, queue, EMA, split BN, view specs through torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from fastssl.kernels import relational_loss, relational_loss_reference
from fastssl.models import SplitBatchNorm2d, build_backbone, ema_update, split_batchnorm
from fastssl.pipelines.torch_loader import to_torchvision
from fastssl.queue import EmbeddingQueue
from fastssl.errors import UserError
from fastssl.views import ViewSpec, apply_overrides, multi_crop, strong, weak

pytestmark = pytest.mark.usefixtures("backbones_train_here")


def unit(*shape, seed=0, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


# ---- the reference relational loss ----

def test_reference_loss_equals_the_sum_written_out():
    q, k, queue = unit(3, 8, seed=1), unit(3, 8, seed=2), unit(11, 8, seed=3)
    tau_s, tau_t = 0.1, 0.04
    expected = []
    for i in range(3):
        s = [math.exp(q[i] @ queue[j] / tau_s) for j in range(11)]
        t = [math.exp(k[i] @ queue[j] / tau_t) for j in range(11)]
        expected.append(-sum(t[j] / sum(t) * math.log(s[j] / sum(s)) for j in range(11)))
    per_row = relational_loss_reference(q, k, queue, tau_s, tau_t, reduction="none")
    torch.testing.assert_close(per_row, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(relational_loss_reference(q, k, queue, tau_s, tau_t), per_row.mean())


def test_reference_loss_gradcheck_and_teacher_side_without_gradient():
    q, k, queue = unit(4, 6, seed=1).requires_grad_(), unit(4, 6, seed=2).requires_grad_(), unit(9, 6, seed=3)
    # the reference computes in fp32; check its gradient in float64 on a float64 copy of the same formula
    fn = lambda q: -(F.softmax(k.detach() @ queue.T / 0.04, -1) * F.log_softmax(q @ queue.T / 0.1, -1)).sum(-1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q,))
    relational_loss_reference(q, k, queue, 0.1, 0.04).backward()
    torch.testing.assert_close(q.grad, torch.autograd.grad(fn(q).mean(), q)[0].float().double(), rtol=1e-4, atol=1e-6)
    assert k.grad is None


def test_reference_loss_is_finite_at_sharp_temperature_in_bf16():
    q, k, queue = unit(4, 16, dtype=torch.bfloat16), unit(4, 16, seed=1, dtype=torch.bfloat16), unit(50, 16, seed=2)
    loss = relational_loss_reference(q, k, queue.bfloat16(), 0.1, 0.01)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_relational_loss_logits_stay_fp32_under_autocast(impl):
    q, k, queue = unit(8, 32, dtype=torch.float32), unit(8, 32, seed=1, dtype=torch.float32), unit(300, 32, seed=2)
    queue = queue.float()
    plain = relational_loss(q, k, queue, 0.1, 0.01, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(relational_loss(q, k, queue, 0.1, 0.01, impl=impl), plain)


# ---- queue ----

def test_queue_starts_unit_norm_and_is_a_fifo_that_wraps_around():
    queue = EmbeddingQueue(size=10, dim=4, seed=0)
    torch.testing.assert_close(queue.rows.norm(dim=1), torch.ones(10))
    batches = [torch.full((4, 4), float(i)) for i in range(1, 4)]  # 12 rows into 10 slots
    for b in batches:
        queue.enqueue(b)
    assert queue.ptr.item() == 2
    # the third batch filled slots 8-9 and wrapped around to overwrite the oldest rows, slots 0-1
    assert queue.rows[:, 0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]
    queue.enqueue(torch.arange(25.0).view(25, 1).expand(25, 4))  # longer than the queue: its last 10 rows
    assert queue.rows[:, 0].tolist() == [23, 24, 15, 16, 17, 18, 19, 20, 21, 22] and queue.ptr.item() == 2


def test_queue_state_travels_with_state_dict():
    a, b = EmbeddingQueue(8, 3, seed=0), EmbeddingQueue(8, 3, seed=1)
    a.enqueue(unit(5, 3, dtype=torch.float32))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.rows, b.rows) and a.ptr.item() == b.ptr.item() == 5


# ---- EMA and split BN ----

def test_ema_update_arithmetic():
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    ema_update(teacher, student, 1.0)  # momentum 1 freezes the teacher
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_split_batchnorm_normalises_each_group_alone():
    x = torch.randn(8, 3, 4, 4) + torch.arange(8.0).view(8, 1, 1, 1)  # every sample a different offset
    bn = SplitBatchNorm2d(3, splits=2)
    out = bn(x)
    plain = [nn.BatchNorm2d(3), nn.BatchNorm2d(3)]
    expected = torch.empty_like(x)
    expected[:4], expected[4:] = plain[0](x[:4]), plain[1](x[4:])  # groups: consecutive halves of the batch
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for stat in ("running_mean", "running_var"):  # the mean of the groups' updates
        expected_stat = (getattr(plain[0], stat) + getattr(plain[1], stat)) / 2
        torch.testing.assert_close(getattr(bn, stat), expected_stat, rtol=1e-6, atol=1e-6)
    cl = SplitBatchNorm2d(3, splits=2)  # a channels_last batch stays channels_last, same values
    out_cl = cl(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, expected, rtol=1e-5, atol=1e-5)
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False))


def test_split_batchnorm_replaces_every_bn_and_keeps_its_state():
    net = build_backbone("resnet18-w8", 32)
    net.bn1.running_mean.fill_(0.5)
    split_batchnorm(net, 4)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is SplitBatchNorm2d and m.splits == 4 for m in bns)
    assert (net.bn1.running_mean == 0.5).all()
    with pytest.raises(ValueError, match="multiple of the 4"):
        net(torch.randn(6, 3, 32, 32))


# ---- backbones ----

@pytest.mark.parametrize("arch, size, dim", [("resnet18", 32, 512), ("resnet18-w16", 28, 128),
                                             ("resnet50", 96, 2048), ("resnet34-w8", 64, 64)])
def test_backbone_stem_and_feature_width(arch, size, dim):
    net = build_backbone(arch, size)
    small = size <= 64
    assert net.conv1.kernel_size == ((3, 3) if small else (7, 7)) and isinstance(net.maxpool, nn.Identity) == small
    assert net.out_dim == dim and net(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_exported_backbone_loads_into_torchvision():
    from fastssl.checkpoint import backbone_state_dict
    net = build_backbone("resnet18", 32)
    tv = torchvision.models.resnet18()
    tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()  # the small-image stem
    result = tv.load_state_dict(backbone_state_dict(net), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    tv.fc, _ = nn.Identity(), (net.eval(), tv.eval())
    torch.testing.assert_close(tv(x), net(x))


# ---- view specs through torchvision ----

def test_view_presets_follow_the_papers():
    w, s = weak(224), strong(224)
    assert not w.is_photometric and w.crop_scale == (0.2, 1.0) and w.flip_p == 0.5
    assert s.jitter == (0.4, 0.4, 0.4, 0.1) and s.jitter_p == 0.8 and s.grayscale_p == 0.2 and s.blur_p == 0.5
    assert s.blur_kernel == 23 and s.solarize_p == 0
    crops = multi_crop(s, 5)
    assert [c.size for c in crops] == [224, 192, 160, 128, 96] and crops[4].crop_scale == (0.086, 0.429)
    assert [c.size for c in multi_crop(strong(32), 5)] == [32, 27, 23, 18, 14]
    with pytest.raises(ValueError, match="probability"):
        ViewSpec(32, grayscale_p=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        ViewSpec(32, crop_scale=(0.5, 0.2))


def test_view_overrides_change_only_the_named_fields():
    views = {"weak": weak(28), "strong": strong(28)}
    changed = apply_overrides(views, "weak.crop_scale=1,1 weak.flip_p=0 strong.jitter_p=0.5")
    assert changed["weak"] == ViewSpec(28, crop_scale=(1.0, 1.0), flip_p=0.0)
    assert changed["strong"] == ViewSpec(**{**strong(28).__dict__, "jitter_p": 0.5})
    assert apply_overrides(views, "") == views and views["weak"] == weak(28)  # the input is left as it was
    # whole-image crop, no flip: the view is the image itself
    img = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    assert torch.equal(to_torchvision(changed["weak"])(img), img)
    for bad, message in [("weak.crop_scale=1", "takes 2 comma-separated numbers"), ("weak", "ROLE.FIELD=VALUE"),
                         ("weak.colour=1", "no field 'colour'"), ("weak.flip_p=2", "not a probability")]:
        with pytest.raises(UserError, match=message):
            apply_overrides(views, bad)


def test_torchvision_views_have_the_right_shape_and_statistics():
    img = torch.zeros(3, 40, 48, dtype=torch.uint8)
    img[0], img[1, :20], img[2, :, :24] = 200, 120, 60  # colourful: grayscale and jitter show
    torch.manual_seed(0)
    weak_t, strong_t = to_torchvision(weak(24)), to_torchvision(strong(24, blur_p=0.5))
    weak_views = torch.stack([weak_t(img) for _ in range(300)])
    strong_views = torch.stack([strong_t(img) for _ in range(1000)])
    assert weak_views.shape == (300, 3, 24, 24) and weak_views.dtype == torch.uint8
    # the weak view only moves pixels: every output colour is one of the image's (up to resampling blends)
    assert set(weak_views[:, 0].unique().tolist()) == {200}
    grey = (strong_views.float().amax(1) - strong_views.float().amin(1)).amax((1, 2)) < 1
    n = len(strong_views)
    assert abs(grey.float().mean().item() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)  # grayscale p 0.2
    red = strong_views[~grey, 0].float().mean((1, 2))
    assert (red != 200).float().mean() > 0.6  # jitter p 0.8 changes the red plane (brightness/contrast/...)
