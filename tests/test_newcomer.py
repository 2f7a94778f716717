"""Data as a newcomer has it, trained end to end a few steps through the command line: a folder of small JPEGs at
its native size (torch, tensor), a .beton without a val split (FFCV), a flat unlabelled folder (torch, DALI), the
design card's `--arch r50`; without labels or a test split the kNN monitor is off and the banner says why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastssl import cli

pytestmark = pytest.mark.usefixtures("backbones_train_here")

SMALL = dict(arch="r18-w8", batch_size=16, epochs=1, max_steps=2, log_every=1, precision="fp32", queue_size=32,
             device="cpu", workers=1)


def jpegs(folder: Path, names: list[str], side: int) -> Path:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side, side), (7 * i % 256, 90, 40 * (i % 5))).save(folder / name, quality=90)
    return folder


def fastssl(*args: str, capsys) -> str:
    argv = sys.argv
    sys.argv = ["fastssl", *args]
    try:
        with pytest.raises(SystemExit) as done:
            cli.main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    assert done.value.code == 0, err[-2000:]
    return out


def train(data, out: Path, capsys, **settings) -> tuple[str, dict, dict]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, **settings}.items()]
    printed = fastssl("train", "--data", str(data), "--out", str(out), *args, capsys=capsys)
    return printed, json.loads((out / "config.json").read_text()), json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def small_jpegs(tmp_path_factory) -> Path:
    """DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg at 32 px, as a user's CIFAR-sized photos."""
    root = tmp_path_factory.mktemp("small")
    jpegs(root, [f"{split}/c{i % 2}/{i}.jpg" for split, n in (("train", 48), ("val", 16)) for i in range(n)], 32)
    return root


@pytest.mark.parametrize("pipeline", ["torch", "tensor"])
def test_a_folder_of_small_jpegs_trains_at_its_native_size(small_jpegs, tmp_path, capsys, pipeline):
    printed, config, summary = train(small_jpegs, tmp_path, capsys, pipeline=pipeline, knn_every=1)
    assert "@ 32px (the largest side of 48 sampled images)" in printed  # all 48 train images
    assert config["image_size"] == 32 and summary["steps"] == 2
    assert len(summary["knn_history"]) == 2  # labelled, with val/: the monitor runs at the start and the end


def test_a_beton_without_a_val_split_trains_through_ffcv(small_jpegs, tmp_path, capsys):
    pytest.importorskip("ffcv")
    beton = tmp_path / "photos.beton"
    fastssl("convert", str(small_jpegs), "--to", "ffcv", "--out", str(beton), "--workers", "1", capsys=capsys)
    printed, config, summary = train(beton, tmp_path / "run", capsys, pipeline="ffcv")
    assert "kNN monitor off:" in printed and config["image_size"] == 32
    assert "decode scratch " in printed  # FFCV's buffers for the batches in flight, in the banner
    assert summary["steps"] == 2 and summary["knn_history"] == []


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_a_flat_unlabelled_folder_trains(tmp_path, capsys, pipeline):
    if pipeline == "dali":
        pytest.importorskip("nvidia.dali")
    photos = jpegs(tmp_path / "photos", [f"{'trip/' if i % 3 else ''}{i}.jpg" for i in range(40)], 80)
    printed, config, summary = train(photos, tmp_path / "run", capsys, pipeline=pipeline, image_size=48)
    assert "kNN monitor off: no labels" in printed
    assert summary["steps"] == 2 and summary["knn_history"] == []


def test_the_design_cards_r50(small_jpegs, tmp_path, capsys):
    printed, config, summary = train(small_jpegs, tmp_path, capsys, pipeline="tensor", arch="r50", batch_size=8,
                                     max_steps=1, data_val="none")
    assert "| r50 @ 32px" in printed and summary["steps"] == 1
