"""Results a researcher can compare and reuse: the papers' linear protocols, weights in (a run's checkpoint, its
backbone.pt, torchvision's and timm's state_dicts) and out (`fastssl export`, `fastssl embed`), and evaluations
of a run's checkpoint logged in the run's metrics.csv."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from test_cluster import blobs
from test_train import _RunsCode, run_cli

from fastssl import checkpoint, data, pipelines
from fastssl.config import from_saved, settings, to_dict
from fastssl.evaluate import PROTOCOLS, extract_features, linear_on_features, linear_on_views, lr_factor
from fastssl.methods import build as build_method
from fastssl.models import build_backbone
from fastssl.monitor import EVAL_BATCH
from fastssl.train import train

pytestmark = pytest.mark.usefixtures("backbones_train_here")

CPU = torch.device("cpu")
SIZE = 16  # the run's image side: a third of the cost of Fashion-MNIST's 28 px
FAST = ["--device", "cpu", "--precision", "fp32", "--workers", "0"]


def write_idx(folder: Path, stem: str, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships them (gzip; magic 0 0 8 ndim, then the sides)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(folder / f"{stem}.gz", "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """A Fashion-MNIST folder holding 512 train and 256 test images: read into memory like the whole set."""
    root = tmp_path_factory.mktemp("fashion-idx")
    for split, prefix, n in (("train", "train", 512), ("test", "t10k", 256)):
        images = data.load("fashion-mnist", split).subset(n, seed=0)
        write_idx(root, f"{prefix}-images-idx3-ubyte", images.images[..., 0].numpy())
        write_idx(root, f"{prefix}-labels-idx1-ubyte", images.labels.numpy())
    return root


@pytest.fixture(scope="module")
def run(fashion, tmp_path_factory) -> Path:
    """A run folder: two steps of ReSSL, r18-w16, with the encoder's running average (--encoder-ema)."""
    out = tmp_path_factory.mktemp("run")
    train(settings(method="ressl", arch="r18-w16", data=str(fashion), pipeline="tensor", image_size=SIZE,
                   batch_size=64, queue_size=256, epochs=1, max_steps=2, knn_every=0, data_val="none",
                   encoder_ema=0.5, device="cpu", precision="fp32", out=str(out)))
    return out


def fastssl(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The command line's exit status, stdout and stderr."""
    try:
        run_cli(monkeypatch, *args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(code: int, err: str, *words: str) -> bool:
    return code == 2 and err.count("\n") == 1 and err.startswith("error: ") and all(w in err for w in words)


def logged(run_dir: Path) -> dict[str, tuple[int, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {row["key"]: (int(row["step"]), float(row["value"])) for row in csv.DictReader(f)}


def reference_features(encoder: torch.nn.Module, images, size: int) -> torch.Tensor:
    """The features the library gives, in the batches `fastssl eval` reads (the same arithmetic)."""
    batches = pipelines.eval_reader("torch", images, size, batch_size=EVAL_BATCH, workers=0)
    return extract_features(encoder, batches, images.mean_std, CPU)


def run_method(run_dir: Path):
    state = checkpoint.load(run_dir / "checkpoint.pt")
    _, method = build_method(from_saved(state["config"]))
    method.load_state_dict(state["method"])
    return method


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_each_protocol_evaluates_a_run_and_logs_its_result(protocol, run, fashion, monkeypatch, capsys):
    p, chosen = PROTOCOLS[protocol], dict(epochs=2, batch_size=64)
    code, out, err = fastssl(monkeypatch, capsys, "eval", "linear", "--weights", str(run / "checkpoint.pt"),
                             "--protocol", protocol, "--epochs", "2", "--batch-size", "64", "--train-subset", "256",
                             *FAST)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["linear probe top-5", "linear probe top-1"]  # 10 classes
    assert all(f"({protocol}: 2 epochs, batch 64" in line and "256 training images" in line for line in lines)
    top5, top1 = (float(line.rsplit(": ", 1)[1].rstrip("%")) for line in lines)
    assert 0 < top1 <= top5 <= 100
    metrics = logged(run)
    key = f"eval/{protocol.replace('-', '_')}"
    assert metrics[f"{key}_top1"] == (2, pytest.approx(top1, abs=0.005))  # at the checkpoint's step
    assert metrics[f"{key}_top5"] == (2, pytest.approx(top5, abs=0.005))
    if p.features != "views":  # cached features: what the library gives on the run's encoder, the same subset
        encoder = run_method(run).evaluated_encoder()
        train_set, queries = data.load(str(fashion), "train").subset(256, seed=0), data.load(str(fashion), "test")
        expected = linear_on_features(p, reference_features(encoder, train_set, SIZE), train_set.labels,
                                      reference_features(encoder, queries, SIZE), queries.labels, lr=p.lr,
                                      **chosen)
        assert metrics[f"{key}_top1"][1] == pytest.approx(expected["top1"])


def test_the_help_names_each_protocol_and_its_source(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = fastssl(monkeypatch, capsys, "eval", "linear", "--help")
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and "frozen-aug (default): 100 epochs, batch 256, SGD lr 30 per 256 images" in flat
    for name, p in PROTOCOLS.items():
        assert f"{name}: {p.epochs} epochs" in flat.replace(" (default)", "") and p.source.split(",")[0] in flat
    code, _, err = fastssl(monkeypatch, capsys, "eval", "linear", "--weights", "x.pt", "--protocol", "imagenet")
    assert refused(code, err, "unknown protocol 'imagenet'; choose frozen-aug | frozen-features | quick")


class BlobViews:
    """A stand-in for a pipeline's loader: "views" that are separable features already (the encoder: identity)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.x, self.images, self.batch_size = x, data.ImageSet("fashion-mnist", "", "train", [], labels), batch_size

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def epoch(self, epoch: int):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        for idx in order[:len(self) * self.batch_size].view(len(self), -1):
            yield {"weak": self.x[idx], "label": self.images.labels[idx]}


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_each_protocol_separates_separable_classes(protocol):
    p = PROTOCOLS[protocol]
    labels = torch.arange(10).repeat(40)
    x = (blobs(labels, dim=32) + torch.randn(400, 32, generator=torch.Generator().manual_seed(1))).relu()

    def scores(y: torch.Tensor, epochs: int) -> dict:
        if p.features == "views":
            return linear_on_views(p, torch.nn.Identity(), BlobViews(x[:300], y[:300], 50), x[300:], y[300:], CPU,
                                   "fp32", epochs=epochs, lr=p.lr, batch_size=50)
        return linear_on_features(p, x[:300], y[:300], x[300:], y[300:], epochs=epochs, lr=p.lr, batch_size=50)

    ten = scores(labels, 20)
    assert ten["top1"] > 95 and ten["top5"] >= ten["top1"]
    assert scores(labels % 3, 1).keys() == {"top1"}  # top-5 of 3 classes says nothing


def test_schedules_follow_the_papers():
    steps = [lr_factor("steps", e, 100) for e in (0, 59.9, 60, 79, 80, 99.5)]
    assert steps == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])  # ReSSL / MoCo: x0.1 at epochs 60 and 80
    assert lr_factor("exponential", 500, 500) * 1e-2 == pytest.approx(1e-6)  # W-MSE: 1e-2 to 1e-6 over the run
    assert lr_factor("exponential", 0.9, 500) == 1  # per epoch
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)


def test_embed_writes_the_features_labels_and_files_of_a_split(run, fashion, tmp_path, monkeypatch, capsys):
    out = tmp_path / "feats.npy"
    code, _, err = fastssl(monkeypatch, capsys, "embed", str(run / "checkpoint.pt"), "--out", str(out), "--split",
                           "val", *FAST)
    assert code == 0, err
    queries = data.load(str(fashion), "test")
    expected = reference_features(run_method(run).evaluated_encoder(), queries, SIZE)
    assert torch.allclose(torch.from_numpy(np.load(out)), expected, atol=1e-5)
    labels = np.load(tmp_path / "feats.labels.npy")
    assert labels.dtype == np.int64 and (labels == queries.labels.numpy()).all()
    assert (tmp_path / "feats.files.txt").read_text().splitlines() == [f"{fashion}#{i}" for i in range(256)]


def test_embed_names_the_files_of_a_folder(run, fashion, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "photos"
    for i, image in enumerate(data.load(str(fashion), "test").images[:6].numpy()):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"class{i % 2}" / f"{i}.png")
    code, _, err = fastssl(monkeypatch, capsys, "embed", str(run / "checkpoint.pt"), "--data", str(folder), "--out",
                           str(tmp_path / "photos.npy"), *FAST)
    assert code == 0, err
    files = (tmp_path / "photos.files.txt").read_text().splitlines()
    assert files == sorted(str(p) for p in folder.rglob("*.png")) and np.load(tmp_path / "photos.npy").shape == (6, 128)
    assert np.load(tmp_path / "photos.labels.npy").tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("average", [False, True])
def test_an_export_reproduces_the_checkpoint_encoder(suffix, average, run, tmp_path, monkeypatch, capsys):
    to = tmp_path / f"encoder{suffix}"
    code, out, err = fastssl(monkeypatch, capsys, "export", str(run / "checkpoint.pt"), "--to", str(to),
                             *(["--encoder-ema"] if average else []))
    assert code == 0 and f"{to}: 120 tensors" in out, err
    net = build_backbone("r18-w16", SIZE).eval()
    net.load_state_dict(torch.load(to, weights_only=True) if suffix == ".pt" else load_file(to))
    method = run_method(run)
    expected, other = (method.encoder_average.module, method.encoder()) if average else (
        method.encoder(), method.encoder_average.module)
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net(x), expected.eval()(x), atol=1e-6)
        assert not torch.allclose(net(x), other.eval()(x), atol=1e-3)  # the test tells the two apart


def test_export_with_encoder_ema_needs_an_average(tmp_path, monkeypatch, capsys):
    cfg, method = build_method(settings(method="ressl", arch="r18-w16", image_size=SIZE, queue_size=256))
    checkpoint.atomic_save({"config": to_dict(cfg), "method": method.state_dict(), "step": 0},
                           tmp_path / checkpoint.PREVIOUS)
    code, _, err = fastssl(monkeypatch, capsys, "export", str(tmp_path / checkpoint.PREVIOUS), "--to",
                           str(tmp_path / "average.pt"), "--encoder-ema")
    assert refused(code, err, "no running average", "--encoder-ema") and not (tmp_path / "average.pt").exists()
    code, _, err = fastssl(monkeypatch, capsys, "export", str(tmp_path / checkpoint.PREVIOUS), "--to",
                           str(tmp_path / "encoder.pt"))
    assert code == 0 and (tmp_path / "encoder.pt").is_file(), err


def timm_style(weights: dict) -> dict:
    """A training script's file: under "state_dict", DDP's "module." and the model's "backbone." on every key,
    a classifier head beside the backbone."""
    model = {**{f"backbone.{k}": v for k, v in weights.items()}, "head.weight": torch.zeros(10, 512)}
    return {"state_dict": {f"module.{k}": v for k, v in model.items()}, "epoch": 90, "arch": "resnet18"}


@pytest.mark.parametrize("layout", ["torchvision", "timm-style"])
def test_plain_state_dicts_load_as_their_arch(layout, fashion, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()  # ImageNet's stem (7x7, max-pool): above 64 px
    weights = resnet.state_dict()  # with fc
    torch.save(weights if layout == "torchvision" else timm_style(weights), tmp_path / "r18.pth")
    out = tmp_path / "feats.npy"
    code, _, err = fastssl(monkeypatch, capsys, "embed", str(tmp_path / "r18.pth"), "--arch", "r18", "--data",
                           str(fashion), "--image-size", "72", "--out", str(out), "--split", "val", *FAST)
    assert code == 0, err
    resnet.fc = torch.nn.Identity()
    expected = reference_features(resnet, data.load(str(fashion), "test"), 72)
    assert torch.allclose(torch.from_numpy(np.load(out)), expected, atol=1e-4)


def test_a_backbone_pt_evaluates_as_its_checkpoint(run, fashion, tmp_path, monkeypatch, capsys):
    args = ["--data", str(fashion), *FAST]
    code, from_checkpoint, err = fastssl(monkeypatch, capsys, "eval", "knn", "--checkpoint",
                                         str(run / "checkpoint.pt"), *args)
    assert code == 0 and "kNN top-1 (k=200, T=0.1)" in from_checkpoint, err
    code, from_backbone, err = fastssl(monkeypatch, capsys, "eval", "knn", "--weights", str(run / "backbone.pt"),
                                       "--arch", "r18-w16", "--image-size", str(SIZE), *args)
    assert code == 0 and from_backbone == from_checkpoint and "logged" not in err, err  # not a run's checkpoint


@pytest.mark.parametrize("args, words", [
    (["--arch", "r18", "--image-size", "16"], ["does not fit --arch r18 at 16 px", "conv1.weight [16, 3, 3, 3]",
                                               "pass the --arch"]),
    (["--arch", "r18-w16", "--image-size", "224"], ["conv1.weight", "[16, 3, 7, 7]", "--image-size"]),
    ([], ["plain weights", "pass --arch"]),
])
def test_weights_that_do_not_fit_are_one_line_naming_keys(args, words, run, fashion, monkeypatch, capsys):
    code, _, err = fastssl(monkeypatch, capsys, "eval", "cluster", "--weights", str(run / "backbone.pt"), "--data",
                           str(fashion), *args, *FAST)
    assert refused(code, err, *words), err


def test_weights_carrying_code_are_refused_without_running_it(fashion, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"conv1.weight": _RunsCode(marker)}}, tmp_path / "evil.pth")
    code, _, err = fastssl(monkeypatch, capsys, "eval", "knn", "--weights", str(tmp_path / "evil.pth"), "--arch",
                           "r18", "--data", str(fashion), *FAST)
    assert refused(code, err, "refusing to unpickle it") and not marker.exists()

