"""DALI pipeline: one graph decodes each image once and makes every view from that decode.

What runs where. Python (the loader's thread, a small pool reading files) picks the samples of each batch in
the shared order (common.epoch_indices: global batches, this rank's slice), reads them (image files: the encoded
bytes and, from the header alone, the size; in-memory sets: the uint8 HWC arrays) and draws every random
parameter of every view with device_augment.sample_params, keyed by sample (common.SampleRandom), as --pipeline
tensor draws them. All of it enters the graph through one external_source, the parameters as
per-sample arguments, so DALI draws nothing and the pipeline keeps no state: a sample's views are the same
whatever its batch, rank or resume point, and a pipeline is built afresh for every epoch (and after a failed
batch). The graph decodes (nvJPEG, "mixed", on CUDA, every op after it on the GPU; with no GPU the same graph
runs CPU-only, device_id=None), then for each view:
    resize of the crop box (ROI, antialiased) -> color_twist (jitter; grayscale as saturation 0)
    -> gaussian_blur (window 1 where off) -> solarize -> crop_mirror_normalize (flip, mean/std, float,
    NHWC memory = the trainer's channels_last)
Where DALI differs from torchvision: color_twist applies brightness, contrast, saturation and hue in one fixed
order (torchvision draws an order per image; the order drawn is unused here), contrast pivots around mid-grey
(torchvision: the image's mean grey), hue is a rotation about the grey axis (a linear approximation of HSV's),
the blur kernel is cut at 3 sigma, the crop's resampling reads pixels just outside the box (torchvision crops
first) and the resampling and grey weights differ slightly. Images are decoded as stored, without EXIF rotation,
as PIL reads them. Rates, ranges and crop boxes are the spec's, drawn as the other pipelines draw them.

DALI fails a whole batch when a file cannot be decoded. The loader then finds the batch's unreadable files
(convert.check_image), gives each such slot the next readable sample of the set (the slot's own draws, that
image and label), reruns the batch on a new pipeline and reports the files in the batch's "bad_files"; the
trainer decides whether to go on. Files whose header PIL cannot read are found, and replaced, before DALI sees
them. A failure with no unreadable file in the batch is a one-line UserError.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from fastssl.data import ImageSet
from fastssl.errors import UserError
from fastssl.extras import optional
from fastssl.views import ViewSpec

from .common import Loader, Shard
from .device_augment import sample_params

optional("nvidia.dali", "dali")  # a one-line error naming the extra when DALI is missing
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

# nvJPEG's buffers sized for ImageNet up front (DALI's ResNet-50 example), so they are not regrown mid-epoch.
MIXED_DECODER_PADDING = {"device_memory_padding": 211_025_920, "host_memory_padding": 140_544_512}


def _decode(encoded, gpu: bool):
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                             adjust_orientation=False, **(MIXED_DECODER_PADDING if gpu else {}))


def view_inputs(spec: ViewSpec) -> list[str]:
    """The per-sample inputs of a view's ops, in the order the feed gives them."""
    names = ["roi_start", "roi_end", "mirror"]
    if spec.jitter_p or spec.grayscale_p:
        names += ["brightness", "contrast", "saturation", "hue"]
    if spec.blur_p:
        names += ["sigma", "window"]
    if spec.solarize_p:
        names.append("solarize")
    return names


def inputs_of(spec: ViewSpec, p: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """sample_params' draws as the arrays of view_inputs(spec)."""
    x0, y0, w, h = p["boxes"].unbind(1)
    out = {"roi_start": torch.stack([y0, x0], 1), "roi_end": torch.stack([y0 + h, x0 + w], 1),
           "mirror": p["flip"].int()}
    if spec.jitter_p or spec.grayscale_p:
        jitter = p.get("jitter", torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(len(x0), 4))
        out["brightness"], out["contrast"], saturation, out["hue"] = jitter.unbind(1)
        # grayscale (after jitter in torchvision) as saturation 0: brightness and contrast treat every channel
        # alike, so they keep grey grey whichever comes first
        out["saturation"] = saturation * ~p["gray"] if "gray" in p else saturation
        out["hue"] = out["hue"] * 360  # turns -> degrees
    if spec.blur_p:
        # The spec's kernel cut at 3 sigma (DALI's default window): what that leaves out is < 0.2% of the kernel's
        # weight, and the blur, the costliest op on CPU, runs 2-3x faster. A window of 1 leaves a sample untouched.
        radius = (3 * p["sigma"]).ceil().clamp(max=(spec.blur_kernel - 1) // 2)
        out["sigma"], out["window"] = p["sigma"], torch.where(p["blur"], 2 * radius + 1, 1).int()
    if spec.solarize_p:
        out["solarize"] = p["solarize"].to(torch.uint8)
    return [np.ascontiguousarray(out[name].float() if out[name].is_floating_point() else out[name])
            for name in view_inputs(spec)]


def _view(images, spec: ViewSpec, a: dict, gpu: bool, channels_last: bool):
    """One view of uint8 HWC images with its per-sample inputs `a`: float [H,W,3] or [3,H,W] per sample."""
    x = fn.resize(images, roi_start=a["roi_start"], roi_end=a["roi_end"], roi_relative=False,
                  size=[spec.size, spec.size], antialias=True)
    if "hue" in a:
        x = fn.color_twist(x, brightness=a["brightness"], contrast=a["contrast"], saturation=a["saturation"],
                           hue=a["hue"], dtype=types.FLOAT)
        # Written as float, color_twist runs 3x faster on CPU than writing uint8 itself; the cast saturates and rounds.
        x = fn.cast(x, dtype=types.UINT8)
    if "sigma" in a:
        x = fn.gaussian_blur(x, window_size=a["window"], sigma=a["sigma"])
    if "solarize" in a:  # 255 - x == x ^ 255 on uint8: flip every bit where the pixel is >= threshold
        mask = (x >= round(spec.solarize_threshold * 255)) * (a["solarize"].gpu() if gpu else a["solarize"])
        x = x ^ fn.cast(mask * 255, dtype=types.UINT8)
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                    mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std],
                                    mirror=a["mirror"])


def views_graph(views: list[ViewSpec], gpu: bool, channels_last: bool, files: bool, feed):
    """Outputs: one float view per spec, then the labels. `feed(batch_info)` gives the encoded files (`files`) or
    the uint8 HWC images, the labels, then each view's view_inputs."""
    names = [view_inputs(spec) for spec in views]
    n = sum(map(len, names))
    images, label, *inputs = fn.external_source(source=feed, num_outputs=2 + n, batch=True, batch_info=True,
                                                layout=["" if files else "HWC"] + [""] * (1 + n))
    images = _decode(images, gpu) if files else images.gpu() if gpu else images
    out = []
    for spec, keys in zip(views, names):
        out.append(_view(images, spec, dict(zip(keys, inputs)), gpu, channels_last))
        inputs = inputs[len(keys):]
    return (*out, label)


views_pipeline = pipeline_def(views_graph)


def _read(path: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    """A file's bytes and the (height, width) its header gives, without decoding (None: PIL cannot read it)."""
    data = np.fromfile(path, dtype=np.uint8)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return data, (im.height, im.width)
    except (OSError, SyntaxError, ValueError):  # what PIL raises for files it cannot read
        return data, None


def eval_graph(size: int, gpu: bool, feed):
    """uint8 [3,size,size] per sample: `feed(batch_info)` gives the encoded files, each one's resized (height,
    width) and the corner of its centre crop."""
    encoded, resized, corner = fn.external_source(source=feed, num_outputs=3, batch=True, batch_info=True)
    x = fn.resize(_decode(encoded, gpu), size=resized, antialias=True)
    x = fn.slice(x, start=corner, shape=[size, size], axis_names="HW")
    return fn.transpose(x, perm=[2, 0, 1])


eval_pipeline = pipeline_def(eval_graph)


def _failure(root: str, error: RuntimeError, checked: bool = False) -> UserError:
    """DALI's failure as one line that says what to do; `checked`: PIL reads every file of the failed batch."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]  # the cause follows "encountered:"
    cause = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0]
    why = ("PIL reads every file of the batch (a format DALI does not decode?), --pipeline torch reads them"
           if checked else "an unreadable image is the usual cause")
    return UserError(f"DALI failed reading {root} ({cause}); {why}; `fastssl check {root}` lists unreadable "
                     f"files, `fastssl convert {root} --to ffcv` leaves them out")


def _dali_options(device: torch.device, workers: int) -> dict:
    gpu = device.type == "cuda"
    return {"num_threads": max(1, workers), "device_id": (device.index or 0) if gpu else None}


class DaliLoader(Loader):
    def __init__(self, images: ImageSet, views: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
                 workers: int = 2, channels_last: bool = True):
        super().__init__(images, views, shard, device, channels_last)
        self.workers = workers
        self.pool = None if images.in_memory else ThreadPoolExecutor(max(1, workers))  # file reads release the GIL
        self.bad: set[int] = set()  # samples known to be unreadable

    def _readable(self, idx: list[int]) -> list[int]:
        """idx with each known-bad sample replaced by the next sample of the set not known to be bad."""
        if len(self.bad) >= len(self.images):
            raise UserError(f"none of the images of {self.images.root} can be read; check it with `fastssl check`")
        out = []
        for i in idx:
            while i in self.bad:
                i = (i + 1) % len(self.images)
            out.append(i)
        return out

    def _feed(self, epoch: int, order: torch.Tensor, info) -> list:
        """Batch info.iteration of `order` as views_graph takes it."""
        if info.iteration >= len(order):
            raise StopIteration
        idx = order[info.iteration]
        while True:  # until every file fed has a header PIL reads: the others are replaced before DALI sees them
            fed = self._readable(idx.tolist())
            if self.images.in_memory:
                pixels = self.images.images[fed].numpy()
                sizes = torch.tensor(pixels.shape[1:3]).expand(len(fed), 2)
                break
            pixels, sizes = zip(*self.pool.map(_read, [self.images.files[i] for i in fed]))
            unreadable = {i for i, size in zip(fed, sizes) if size is None}
            if not unreadable:
                sizes = torch.tensor(sizes)
                break
            self.bad |= unreadable
        rnd = self.random(epoch, idx)  # keyed by the slot: a replaced sample keeps its draws
        out = [list(pixels) if not self.images.in_memory else pixels, self.images.labels[fed].numpy()]
        for spec in self.views.values():
            out += inputs_of(spec, sample_params(sizes[:, 0], sizes[:, 1], spec, rnd))
        return out

    def _batches(self, epoch: int, order: torch.Tensor):
        """DALI's batches of `order` ([batches, batch] sample indices) from a new pipeline."""
        pipe = views_pipeline(list(self.views.values()), self.device.type == "cuda", self.channels_last,
                              not self.images.in_memory, lambda info: self._feed(epoch, order, info),
                              batch_size=self.batch_size, **_dali_options(self.device, self.workers))
        for (batch,) in DALIGenericIterator(pipe, [*self.views, "label"]):
            yield batch

    def _find_bad(self, idx: torch.Tensor, error: RuntimeError) -> None:
        """The unreadable files of a batch DALI failed on, added to self.bad; UserError when there are none."""
        from .convert import check_image

        def unreadable(path: str) -> bool:  # too small for convert, but DALI decodes it
            why = check_image(path)[0]
            return why is not None and not why.startswith("too small")

        bad = {i for i in self._readable(idx.tolist()) if unreadable(self.images.files[i])}
        if not bad:
            raise _failure(self.images.root, error, checked=True) from None
        self.bad |= bad

    def epoch(self, epoch: int, start_batch: int = 0):
        order = self.indices(epoch, start_batch)
        done = 0
        batches = self._batches(epoch, order)
        while done < len(order):
            try:
                batch = next(batches)
            except RuntimeError as e:  # DALI failed batch `done`: replace its unreadable files, run it again
                if self.images.in_memory:
                    raise
                self._find_bad(order[done], e)
                batches = self._batches(epoch, order[done:])
                continue
            # HWC memory read as NCHW is channels_last; CHW output is already contiguous NCHW
            out = {role: batch[role].permute(0, 3, 1, 2) if self.channels_last else batch[role]
                   for role in self.views}
            out["label"] = batch["label"].view(-1).to(self.device, non_blocking=True)
            bad = [self.images.files[i] for i in order[done].tolist() if i in self.bad]
            if bad:
                out["bad_files"] = bad
            yield out
            done += 1


class EvalReader:
    """Every image of an image folder, in order, as uint8 [B,3,size,size] batches (the last one may be partial):
    torch_loader's evaluation view (the shorter side resized to size*256/224, the centre size x size, with
    torchvision's rounding of both), decoded by DALI. Iterable again at every evaluation."""

    def __init__(self, images: ImageSet, size: int, batch_size: int, workers: int):
        self.images, self.size, self.batch_size, self.workers = images, size, batch_size, workers
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")

    def _feed(self, pool: ThreadPoolExecutor, info) -> list:
        files = self.images.files[info.iteration * self.batch_size:(info.iteration + 1) * self.batch_size]
        if not files:
            raise StopIteration
        encoded, sizes = zip(*pool.map(_read, files))
        side, resized, corners = round(self.size * 256 / 224), [], []
        for path, size in zip(files, sizes):
            if size is None:
                raise UserError(f"cannot read image {path}; `fastssl check {self.images.root}` lists the unreadable "
                                f"files, `fastssl convert` leaves them out")
            h, w = size  # v2.Resize(side): the longer side truncated; v2.CenterCrop: the corner rounded
            h, w = (int(side * h / w), side) if w <= h else (side, int(side * w / h))
            resized.append((h, w))
            corners.append((round((h - self.size) / 2), round((w - self.size) / 2)))
        return [list(encoded), np.array(resized, dtype=np.float32), np.array(corners, dtype=np.int32)]

    def __iter__(self):
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            pipe = eval_pipeline(self.size, self.device.type == "cuda", lambda info: self._feed(pool, info),
                                 batch_size=self.batch_size, **_dali_options(self.device, self.workers))
            try:
                for (batch,) in DALIGenericIterator(pipe, ["image"]):
                    yield batch["image"]
            except RuntimeError as e:
                raise _failure(self.images.root, e) from None
