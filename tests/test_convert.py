"""`fastssl convert`: bad files are listed and counted, never fatal; every good image lands in the .beton as RGB;
an existing output survives unless --force; the named sets keep their kind, classes and side; unlabelled folders
are stored with label -1. `fastssl check` lists exactly the files convert leaves out, by the same rule."""

from __future__ import annotations

import gzip
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_checks import torch_threads_after

from fastssl import cli, data
from fastssl.data import check_image
from fastssl.errors import UserError
from fastssl.pipelines import beton, eval_split, load_images
from fastssl.pipelines.convert import convert

pytestmark = pytest.mark.usefixtures("backbones_train_here")

# file name -> the RGB colour it should hold in the .beton (None: unreadable, left out)
GOOD = {"a/red.jpg": (220, 30, 30), "a/red.png": (220, 30, 30), "b/cmyk.jpg": (255, 55, 55),
        "b/gray.png": (128, 128, 128), "b/rgba.png": (30, 200, 30), "b/palette.png": (10, 20, 200)}
BAD = {"a/corrupt.jpg": "unreadable", "a/truncated.jpg": "truncated", "b/text.jpg": "unreadable",
       "b/empty.png": "empty", "b/tiny.png": "too small"}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """train/a, train/b: good images in several colour modes, five bad files, one non-image file."""
    root = tmp_path_factory.mktemp("mixed")
    train = root / "train"
    for cls in ("a", "b"):
        (train / cls).mkdir(parents=True)
    Image.new("RGB", (40, 30), GOOD["a/red.jpg"]).save(train / "a/red.jpg", quality=95)
    Image.new("RGB", (30, 50), GOOD["a/red.png"]).save(train / "a/red.png")
    Image.new("CMYK", (33, 31), (0, 200, 200, 0)).save(train / "b/cmyk.jpg", quality=95)
    Image.new("L", (30, 30), 128).save(train / "b/gray.png")
    Image.new("RGBA", (30, 30), (30, 200, 30, 100)).save(train / "b/rgba.png")
    Image.new("RGB", (20, 20), GOOD["b/palette.png"]).quantize().save(train / "b/palette.png")
    jpeg = (train / "a/red.jpg").read_bytes()
    (train / "a/truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (train / "a/corrupt.jpg").write_bytes(jpeg[:2] + np.random.default_rng(0).bytes(2000))
    (train / "b/text.jpg").write_text("not an image")
    (train / "b/empty.png").write_bytes(b"")
    Image.new("RGB", (40, 5)).save(train / "b/tiny.png")
    (train / "b/notes.txt").write_text("not an image either")
    return root


def test_bad_files_are_listed_and_every_good_image_is_stored_as_rgb(mixed_folder, tmp_path):
    out = tmp_path / "mixed_train.beton"
    report = convert(str(mixed_folder), out, workers=2)
    assert report.images == len(GOOD) and report.classes == 2
    assert {f.split("train/")[1]: why.split(":")[0] for f, why in report.bad} == BAD
    assert [f.split("train/")[1] for f in report.skipped] == ["b/notes.txt"]
    summary = report.summary()
    assert "left out 5 bad file(s)" in summary and "skipped 1 file(s) without an image extension" in summary
    info = json.loads(beton.info_path(out).read_text())
    assert info["kind"] == "imagefolder" and info["classes"] == ["a", "b"] and len(info["bad"]) == len(BAD)
    assert info["side"] == 50  # the longest side of the images kept (30x50), all small
    stored = load_images(str(out))
    good = sorted(GOOD)  # load_images' order: by class, then by file name
    assert stored.labels.tolist() == [0 if name.startswith("a/") else 1 for name in good]
    from fastssl.pipelines import eval_reader
    pixels = torch.cat(list(eval_reader("ffcv", stored, 8, batch_size=8, workers=1))).float()
    colours = torch.tensor([GOOD[name] for name in good], dtype=torch.float32).view(-1, 3, 1, 1)
    assert (pixels - colours).abs().amax((1, 2, 3)).max() < 6  # CMYK, grey, alpha and palette as RGB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed_train.beton", "mixed_train.beton.json"]


def test_an_existing_output_survives_unless_forced(mixed_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x_train.beton"
    out.write_bytes(b"an earlier conversion")
    args = ["fastssl", "convert", str(mixed_folder), "--out", str(out), "--workers", "1"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and "pass --force to overwrite it" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier conversion"

    def crash(self, dataset, **kw):  # a conversion that dies half way leaves the old file and no temporary
        open(self.fname, "wb").write(b"half a beton")
        raise KeyboardInterrupt
    monkeypatch.setattr("ffcv.writer.DatasetWriter.from_indexed_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(str(mixed_folder), out, workers=1, force=True)
    assert out.read_bytes() == b"an earlier conversion" and len(list(tmp_path.iterdir())) == 1
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", args + ["--force"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    assert f"wrote {len(GOOD)} images of 2 classes to {out}" in capsys.readouterr().out
    assert len(load_images(str(out))) == len(GOOD)


def write_cifar10(root, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(n)]}))


def write_fashion_mnist(root, n: int = 12) -> None:
    for prefix in ("train", "t10k"):
        images = np.arange(n * 28 * 28, dtype=np.uint8).reshape(n, 28, 28)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(root / f"{prefix}-{kind}.gz", "wb") as f:
                f.write(header + array.tobytes())


@pytest.mark.parametrize("kind, write, side", [("cifar10", write_cifar10, 32),
                                               ("fashion-mnist", write_fashion_mnist, 28)])
def test_named_sets_keep_their_kind_classes_and_side(tmp_path, kind, write, side):
    (tmp_path / kind).mkdir()
    write(tmp_path / kind)
    source = data.load(str(tmp_path / kind), "test")
    report = convert(str(tmp_path / kind), tmp_path / "out" / f"{kind}_val.beton", split="val", workers=1)
    assert report.images == 12 and not report.bad and not report.skipped
    stored = load_images(str(tmp_path / "out" / f"{kind}_val.beton"))
    assert (stored.kind, stored.native_size, stored.classes) == (kind, side, source.classes)
    assert torch.equal(stored.labels, source.labels)


def test_converting_keeps_torchs_threads(tmp_path):
    # importing FFCV sets torch's threads to 1 (for every test after this one, too)
    write_fashion_mnist(tmp_path)
    assert torch_threads_after(f"from fastssl.pipelines.convert import convert; "
                               f"convert({str(tmp_path)!r}, {str(tmp_path / 'fm.beton')!r}, workers=1)") == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"to": "tfrecord"}, "--to ffcv"), ({"split": "test"}, "choose train or val"),
    ({"write_mode": "png"}, "unknown write mode 'png'"), ({"jpeg_quality": 0}, "--jpeg-quality 0 must be in 1..100"),
    ({"out": "x.ffcv"}, "must end in .beton"),
])
def test_bad_options_are_one_line(mixed_folder, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        convert(str(mixed_folder), **{"out": "never_written.beton", **kwargs})
    assert "\n" not in str(err.value)


def test_check_image_names_why_a_file_is_bad(mixed_folder, tmp_path):
    assert check_image(str(mixed_folder / "train/b/cmyk.jpg")) == (None, (33, 31))
    for name, kind in BAD.items():
        assert check_image(str(mixed_folder / "train" / name))[0].startswith(kind + ": "), name
    # a JPEG cut short anywhere fails, even by its last two bytes (the draft decode reads every coefficient)
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for progressive in (False, True):
        Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=90, progressive=progressive)
        jpeg = (tmp_path / "whole.jpg").read_bytes()
        assert check_image(str(tmp_path / "whole.jpg")) == (None, (160, 120))
        for cut in (2, 100, len(jpeg) // 2):
            (tmp_path / "cut.jpg").write_bytes(jpeg[:-cut])
            assert check_image(str(tmp_path / "cut.jpg"))[0].startswith("truncated: "), (progressive, cut)


def test_an_unlabelled_folder_is_stored_with_label_minus_one(tmp_path, capsys, monkeypatch):
    for i, folder in enumerate(("", "day1", "day2/night")):  # images at any depth
        (tmp_path / "photos" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 80), (i, 0, 0)).save(tmp_path / "photos" / folder / f"{i}.jpg")
    out = tmp_path / "photos_train.beton"
    monkeypatch.setattr(sys, "argv", ["fastssl", "convert", str(tmp_path / "photos"), "--out", str(out),
                                      "--workers", "1"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert f"wrote 3 images to {out}" in printed and "unlabelled: 3 images, labels stored as -1" in printed
    stored = load_images(str(out))
    assert stored.labels.tolist() == [-1, -1, -1] and stored.classes == [] and not stored.labelled
    assert stored.native_size is None  # 100 px: above the small-image side
    assert eval_split(str(out)) == (None, f"no photos_val.beton or photos_test.beton beside {out}")


def run_check(monkeypatch, capsys, folder) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["fastssl", "check", str(folder), "--workers", "2"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().out.splitlines()


def test_fastssl_check_lists_exactly_the_bad_files(mixed_folder, tmp_path, monkeypatch, capsys):
    code, lines = run_check(monkeypatch, capsys, mixed_folder)
    listed = {line.split(": ")[0].split("train/")[1]: line.split(": ")[1] for line in lines[:-1]}
    assert listed == {**BAD, "b/notes.txt": "not an image"} and code == 1
    assert lines[-1].startswith(f"checked {len(GOOD) + len(BAD) + 1} files under {mixed_folder}")
    assert lines[-1].endswith("6 bad (2 unreadable, 1 truncated, 1 empty, 1 too small, 1 not an image)")
    clean = tmp_path / "clean"
    for name in GOOD:  # CMYK, grayscale, RGBA and palette images are fine
        (clean / name).parent.mkdir(parents=True, exist_ok=True)
        (clean / name).write_bytes((mixed_folder / "train" / name).read_bytes())
    code, lines = run_check(monkeypatch, capsys, clean)
    assert code == 0 and lines == [f"checked {len(GOOD)} files under {clean} in 0 s: all usable"]
