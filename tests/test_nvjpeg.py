"""The nvJPEG pipeline on the CPU (the same decode_jpeg call, libjpeg-turbo behind it), and on CUDA where there is one.

Views: each sample's views those device_augment makes of it alone (images of many sizes padded and grouped), a set
in memory viewed as --pipeline tensor views it, ops at the spec's rates; files: JPEGs (RGB, grey, CMYK, progressive)
and other formats decoded as PIL decodes them, the next batch's files read while one decodes; unreadable files
replaced and reported, JPEGs the device decoder rejects handed to PIL; on CUDA, the decode and the batches on the GPU;
a short run learns. The loader contract (epochs, shards, resume; from files and from memory), the views' layout and
labels and the evaluation reader against torchvision's: tests/test_loaders.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_checks import (CPU, PROBE_VIEWS, check_colour_views, check_probe_rates, check_short_run_learns,
                             probe_image, unique_set)
from PIL import Image

from fastssl import data
from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.pipelines import build, nvjpeg_loader
from fastssl.pipelines.common import SampleRandom, Shard
from fastssl.pipelines.device_augment import photometric, resized_crop, sample_params
from fastssl.pipelines.nvjpeg_loader import EvalReader, FileDecoder, padded_side
from fastssl.views import ViewSpec, normalize, resa_strong, strong, weak

VIEWS = {"weak": weak(24), "strong": resa_strong(24, blur_p=0.5), "crop1": ViewSpec(12, crop_scale=(0.1, 0.5))}


def loader(images, batch, views=VIEWS, rank=0, world=1, seed=1, device=CPU, **kw):
    return build("nvjpeg", images, views, Shard(rank, world, seed, batch), device, **kw)


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    """The same batch (bad_files: the same list), bitwise unless atol."""
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol)
                                        if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def save(image: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def smooth(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colourful RGB image (JPEG keeps it well): random colours at a 4 x 3 grid, interpolated."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (1, 3, 3, 4), generator=g, dtype=torch.uint8).float()
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    return Image.fromarray(x[0].round().to(torch.uint8).permute(1, 2, 0).numpy())


def jpeg_kinds(folder: Path) -> list[Path]:
    """One smooth 64 x 48 image as RGB, grey, CMYK and progressive JPEGs."""
    rgb = smooth(64, 48, seed=0)
    return [save(rgb, folder / "rgb.jpg"), save(rgb.convert("L"), folder / "grey.jpg"),
            save(rgb.convert("CMYK"), folder / "cmyk.jpg"), save(rgb, folder / "progressive.jpg", progressive=True)]


@pytest.fixture(scope="module")
def unique_folder(tmp_path_factory) -> ImageSet:
    """30 image files, each its own class and colour, of sizes 10-18 px a side; JPEG and PNG in turn."""
    root = tmp_path_factory.mktemp("unique")
    for i in range(30):
        image = Image.new("RGB", (12 + i % 7, 10 + i % 5), (8 * i, 100, 255 - 8 * i))
        save(image, root / "train" / f"{i:03d}" / f"x.{'jpg' if i % 2 else 'png'}")
    return data.load(str(root))


def test_padded_sides_are_few_and_at_most_a_quarter_larger():
    assert all(side <= padded_side(side) <= 1.25 * side for side in range(1, 5000))
    assert len({padded_side(side) for side in range(257, 513)}) == 4  # ImageNet's sides share four
    assert [padded_side(side) for side in (8, 28, 32, 375, 500)] == [8, 28, 32, 384, 512]


def views_alone(image: torch.Tensor, key: int, seed: int, epoch: int, views: dict[str, ViewSpec]) -> dict:
    """The views device_augment makes of one uint8 [3,H,W] image alone, with the draws of sample `key`."""
    rnd, x = SampleRandom(seed, epoch, torch.tensor([key])), image[None]
    out = {}
    for role, spec in views.items():
        p = sample_params(x.shape[2], x.shape[3], spec, rnd)
        out[role] = normalize(photometric(resized_crop(x, p["boxes"], p["flip"], spec.size), spec, p), spec.mean,
                              spec.std, True)[0]
    return out


def test_each_samples_views_are_those_device_augment_makes_of_it_alone(unique_folder):
    """Padding to shared shapes and cropping by groups leave every sample's views as its own: the draws keyed by its
    slot, crops of its own pixels (PIL's decode: libjpeg-turbo too)."""
    run = loader(unique_folder, 10, seed=4)
    for batch, idx in zip(run.epoch(3), run.indices(3).tolist(), strict=True):
        for row, i in enumerate(idx):
            alone = views_alone(unique_folder.read(i), i, 4, 3, VIEWS)
            assert all(torch.allclose(batch[role][row], alone[role], rtol=0, atol=1e-5) for role in VIEWS), i


def test_sets_in_memory_get_the_tensor_pipelines_views():
    images = unique_set(40, side=16)
    ours, tensor = (list(build(kind, images, VIEWS, Shard(0, 1, 2, 8), CPU).epoch(1)) for kind in ("nvjpeg", "tensor"))
    assert all(same(a, b) for a, b in zip(ours, tensor, strict=True))


def test_ops_fire_at_the_specs_rates_and_crops_stay_in_range(tmp_path):
    probe = Image.fromarray(probe_image())
    for i in range(2048):
        save(probe, tmp_path / "train" / "probe" / f"{i:04d}.png")
    check_probe_rates(list(loader(data.load(str(tmp_path)), 256, PROBE_VIEWS, seed=0).epoch(0)))


def test_every_format_pil_reads_is_decoded_as_pil_decodes_it(tmp_path, monkeypatch):
    """JPEGs, whatever their colour format, in one decode_jpeg call, as RGB; the rest by PIL (GIF: DALI fails on it)."""
    rgb = smooth(64, 48, seed=0)
    files = jpeg_kinds(tmp_path) + [save(rgb.convert("RGBA"), tmp_path / "rgba.png"), save(rgb, tmp_path / "x.gif"),
                                    save(rgb.convert("P"), tmp_path / "palette.png"), save(rgb, tmp_path / "x.bmp"),
                                    save(rgb, tmp_path / "x.tiff")]
    images = ImageSet("imagefolder", str(tmp_path), "train", [], torch.full((len(files),), -1),
                      files=[str(f) for f in files])
    calls = []
    decode_jpeg = nvjpeg_loader.decode_jpeg
    monkeypatch.setattr(nvjpeg_loader, "decode_jpeg", lambda encoded, **kw: calls.append(len(encoded)) or
                        decode_jpeg(encoded, **kw))
    decoder = FileDecoder(images, CPU, workers=2)
    samples = list(range(len(files)))
    decoded = decoder.decode(samples, decoder.read(samples))
    assert calls == [4]
    for i, image in enumerate(decoded):
        assert image.shape == (3, 48, 64) and torch.equal(image, images.read(i)), files[i].name


def test_the_next_batchs_files_are_read_while_one_decodes(colour_folder, monkeypatch):
    events = []
    read, decode = FileDecoder.read, FileDecoder.decode
    monkeypatch.setattr(FileDecoder, "read", lambda self, samples: events.append("read") or read(self, samples))
    monkeypatch.setattr(FileDecoder, "decode", lambda self, *a: events.append("decode") or decode(self, *a))
    assert len(list(loader(data.load(str(colour_folder)), 12).epoch(0))) == 4
    assert events == ["read", "read", "decode", "read", "decode", "read", "decode", "decode"]


def test_unreadable_images_are_replaced_by_the_next_readable_one_and_reported(tmp_path):
    """bad.jpg is no image (PIL reads it in the reading thread and fails), truncated.jpg a JPEG cut short (it fails
    the decode of its batch's JPEGs, then alone, then in PIL), corrupt.png a PNG with a broken pixel stream: each slot
    takes the next readable image of the set (and its label) and the batch names the file; nothing else changes."""
    folder = tmp_path / "train" / "a"
    for i in range(9):
        save(Image.new("RGB", (16, 16), (20 * i, 0, 0)), folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    (folder / "3b_bad.jpg").write_text("not an image")
    truncated = save(smooth(16, 16, seed=1), folder / "5b_truncated.jpg").read_bytes()
    (folder / "5b_truncated.jpg").write_bytes(truncated[:len(truncated) // 2])
    corrupt = bytearray(save(Image.new("RGB", (16, 16), (0, 0, 200)), folder / "6b_corrupt.png").read_bytes())
    corrupt[60:80] = bytes(20)  # inside the pixel data
    (folder / "6b_corrupt.png").write_bytes(bytes(corrupt))
    images = data.load(str(tmp_path))
    names = ("3b_bad.jpg", "5b_truncated.jpg", "6b_corrupt.png")
    bad = {images.files.index(str(folder / name)): str(folder / name) for name in names}
    # weak: the whole image; strong: jitter shows the draws on flat images
    views = {"weak": weak(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0), "strong": strong(16)}
    colour = {i: 20.0 * int(Path(f).stem) for i, f in enumerate(images.files) if i not in bad}  # R of each image
    spec = views["weak"]
    for batch_size in (3, 6):
        run = loader(images, batch_size, views, seed=2)
        batches = list(run.epoch(0))
        for batch, idx in zip(batches, run.indices(0).tolist(), strict=True):
            assert batch.get("bad_files", []) == [bad[i] for i in idx if i in bad]
            fed = [i + 1 if i in bad else i for i in idx]
            red = (batch["weak"][:, 0] * spec.std[0] + spec.mean[0]).mean((1, 2)) * 255
            assert (red - torch.tensor([colour[i] for i in fed])).abs().max() < 3
            for row, (i, j) in enumerate(zip(idx, fed)):  # the next image, with the slot's own draws
                alone = views_alone(images.read(j), i, 2, 0, views)
                assert all(torch.allclose(batch[role][row], alone[role], rtol=0, atol=1e-5) for role in views), i
        assert sum(len(b.get("bad_files", [])) for b in batches) == 3  # 12 images: every one in an epoch
        resumed = list(loader(images, batch_size, views, seed=2).epoch(0, start_batch=1))  # knowing no bad file yet
        assert all(same(a, b) for a, b in zip(batches[1:], resumed, strict=True))
    assert max(len(b.get("bad_files", [])) for b in batches) >= 2  # batches of 6: two in one somewhere


def test_jpegs_the_device_decoder_rejects_are_decoded_by_pil_and_not_reported(tmp_path, monkeypatch):
    """As nvJPEG may reject a JPEG that PIL reads (a colour format it lacks): PIL decodes it, from then on."""
    folder = tmp_path / "train" / "a"
    for i in range(8):
        image = Image.new("RGB", (16, 16), (20 * i, 0, 0))
        save(image.convert("CMYK") if i == 3 else image, folder / f"{i}.jpg")
    rejected = (folder / "3.jpg").read_bytes()
    decode_jpeg, offered = nvjpeg_loader.decode_jpeg, []

    def device_decoder(encoded, **kw):
        given = [e.numpy().tobytes() for e in (encoded if isinstance(encoded, list) else [encoded])]
        offered.extend(given)
        if rejected in given:
            raise RuntimeError("nvJPEG: unsupported")
        return decode_jpeg(encoded, **kw)

    monkeypatch.setattr(nvjpeg_loader, "decode_jpeg", device_decoder)
    views = {"weak": weak(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))}
    run = loader(data.load(str(tmp_path)), 4, views)
    for epoch in range(2):
        offered.clear()
        for batch, idx in zip(run.epoch(epoch), run.indices(epoch).tolist(), strict=True):
            assert "bad_files" not in batch
            red = batch["weak"][:, 0].mean((1, 2)) * 255
            assert (red - 20 * torch.tensor(idx)).abs().max() < 3
        assert (rejected in offered) == (epoch == 0)  # offered in epoch 0, then read by PIL directly


def test_evaluation_names_an_unreadable_file(tmp_path):
    for i in range(3):
        save(Image.new("RGB", (16, 16)), tmp_path / "val" / "a" / f"{i}.jpg")
    (tmp_path / "val" / "a" / "1.jpg").write_bytes(b"\xff\xd8\xff and nothing else")
    images = data.folder_set(tmp_path / "val", str(tmp_path), "test")
    with pytest.raises(UserError, match="1.jpg") as err:
        list(EvalReader(images, 8, 2, workers=1))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decodes_on_the_gpu_and_batches_arrive_there(colour_folder, tmp_path, monkeypatch):
    decode_jpeg, devices = nvjpeg_loader.decode_jpeg, []

    def spy(encoded, **kw):
        out = decode_jpeg(encoded, **kw)
        devices.append((len(encoded), {image.device.type for image in out}))
        return out

    monkeypatch.setattr(nvjpeg_loader, "decode_jpeg", spy)
    cuda = torch.device("cuda")
    views = {"weak": weak(24), "strong": strong(24, blur_p=0.5)}
    batch = next(loader(data.load(str(colour_folder)), 16, views, device=cuda).epoch(0))
    check_colour_views({k: v.cpu() for k, v in batch.items()}, views)
    assert all(v.is_cuda for v in batch.values()) and batch["weak"].is_contiguous(memory_format=torch.channels_last)
    assert devices and all(n > 1 and kinds == {"cuda"} for n, kinds in devices)  # whole batches, decoded on the GPU
    # the colour formats nvJPEG decodes, as PIL decodes them (up to the decoders' rounding)
    files = jpeg_kinds(tmp_path)
    images = ImageSet("imagefolder", str(tmp_path), "train", [], torch.full((4,), -1), files=[str(f) for f in files])
    decoder = FileDecoder(images, cuda, workers=2)
    for i, image in enumerate(decoder.decode([0, 1, 2, 3], decoder.read([0, 1, 2, 3]))):
        assert image.is_cuda and (image.cpu().float() - images.read(i).float()).abs().mean() < 3, files[i].name
    evaluated = next(iter(EvalReader(data.load(str(colour_folder)), 24, 20, workers=2)))
    assert evaluated.is_cuda and evaluated.dtype == torch.uint8


@pytest.fixture(scope="module")
def fashion_jpegs(fashion_folder, tmp_path_factory) -> Path:
    """fashion_folder with every image a JPEG (quality 95), so that the run decodes them with decode_jpeg."""
    root = tmp_path_factory.mktemp("fashion-jpegs")
    for png in fashion_folder.rglob("*.png"):
        save(Image.open(png), (root / png.relative_to(fashion_folder)).with_suffix(".jpg"), quality=95)
    return root


@pytest.mark.slow
@pytest.mark.usefixtures("backbones_train_here")
def test_a_short_run_learns(fashion_jpegs, tmp_path):
    check_short_run_learns(str(fashion_jpegs), "nvjpeg", tmp_path / "run")
