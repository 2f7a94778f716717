"""DALI pipeline: one graph decodes each image once and makes every view from that decode.

What runs where. A feeder thread (the loader's own, with a small pool reading files) prepares each batch of the
shared order (common.epoch_indices: global batches, this rank's slice) ahead of DALI: it reads the samples (image
files: the encoded bytes and, from the header alone, the size; in-memory sets: the uint8 HWC arrays) and draws every
random parameter of every view with device_augment.sample_params, keyed by sample (common.SampleRandom), as
--pipeline tensor draws them. DALI takes each prepared batch through one external_source, the parameters as
per-sample arguments: the training thread, where DALI calls that source, only hands over data that is ready (file
reads and parameters are off the step's path), and DALI draws nothing, so a sample's views are the same whatever its
batch, rank or resume point. DALI works on PREFETCH batches ahead of the trainer, the feeder FEED_AHEAD batches
ahead of DALI. A loader builds its pipeline once and runs every epoch on it, from any start batch (DALI ends a run
when the feed does, and is reset for the next); an EvalReader builds one for all its passes. A feeder thread rather
than DALI's parallel external_source (worker processes): it keeps the feed off the step's path as well (measured on
2 CPU cores, with slow reads), and the epoch, start batch and known-bad files stay in one process, with no worker
process to start once CUDA is up. The graph decodes (nvJPEG, "mixed", on CUDA, every op after it on the GPU; with
no GPU the same graph runs CPU-only, device_id=None), then for each view:
    resize of the crop box (ROI, antialiased) -> color_twist (jitter; grayscale as saturation 0)
    -> gaussian_blur (window 1 where off) -> solarize -> crop_mirror_normalize (flip, mean/std, float,
    NHWC memory = the trainer's channels_last)
Where DALI differs from torchvision: color_twist applies brightness, contrast, saturation and hue in one fixed
order (torchvision draws an order per image; the order drawn is unused here), contrast pivots around mid-grey
(torchvision: the image's mean grey), hue is a rotation about the grey axis (a linear approximation of HSV's),
the blur kernel is cut at 3 sigma, the crop's resampling reads pixels just outside the box (torchvision crops
first) and the resampling and grey weights differ slightly. Images are decoded as stored, without EXIF rotation,
as PIL reads them. Rates, ranges and crop boxes are the spec's, drawn as the other pipelines draw them.

DALI fails a whole batch when a file cannot be decoded, while it holds the batches after it too. The loader then
finds the unreadable files (fastssl.data.check_image) of every batch DALI held, gives each such slot the next
readable sample of the set (the slot's own draws, that image and label), reruns those batches on a new pipeline and
reports the files in their own batch's "bad_files"; the trainer decides whether to go on. Files whose header PIL
cannot read are found, and replaced, before DALI sees them. A failure with no unreadable file in those batches is a
one-line UserError.
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from fastssl.data import ImageSet, check_image
from fastssl.errors import UserError
from fastssl.extras import optional
from fastssl.views import ViewSpec

from .common import Loader, Shard, eval_resize
from .device_augment import sample_params

optional("nvidia.dali", "dali")  # a one-line error naming the extra when DALI is missing
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

# nvJPEG's buffers sized for ImageNet up front (DALI's ResNet-50 example), so they are not regrown mid-epoch.
MIXED_DECODER_PADDING = {"device_memory_padding": 211_025_920, "host_memory_padding": 140_544_512}
PREFETCH = 3  # batches DALI works on ahead of the trainer (DALI's default: 2), each one's views held on the device
FEED_AHEAD = 4  # batches the feeder thread prepares ahead of DALI (their encoded files held): slack for slow reads


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


def views_graph(specs: list[ViewSpec], gpu: bool, channels_last: bool, files: bool, feed):
    """Outputs: one float view per spec, then the labels. `feed()` gives the encoded files (`files`) or the uint8
    HWC images, the labels, then each view's view_inputs."""
    names = [view_inputs(spec) for spec in specs]
    n = sum(map(len, names))
    images, label, *inputs = fn.external_source(source=feed, num_outputs=2 + n, batch=True,
                                                layout=["" if files else "HWC"] + [""] * (1 + n))
    images = _decode(images, gpu) if files else images.gpu() if gpu else images
    out = []
    for spec, keys in zip(specs, names):
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
    """uint8 [3,size,size] per sample: `feed()` gives the encoded files, each one's resized (height, width) and the
    corner of its centre crop."""
    encoded, resized, corner = fn.external_source(source=feed, num_outputs=3, batch=True)
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
    return {"num_threads": max(1, workers), "device_id": (device.index or 0) if gpu else None,
            "prefetch_queue_depth": PREFETCH}


class Feeds:
    """What a pipeline's external_source calls: the feed of the run's next job, prepared ahead.

    A feeder thread prepares each job's feed (prepare(job)) FEED_AHEAD jobs ahead of DALI, so the call, which DALI
    makes in the training thread, only hands over data that is ready. It holds the run's feeder and prepare only
    while the run lasts: DALI's graph keeps its source in reference cycles, which would keep them until a gc.
    """

    def __init__(self):
        self.prepared = deque()  # (job, future of its feed), in order
        self.in_flight = deque()  # the jobs handed to DALI whose outputs have not come out yet
        self.jobs, self.prepare, self.feeder = iter(()), None, None

    def start(self, jobs: list, prepare: Callable, feeder: ThreadPoolExecutor) -> None:
        self.jobs, self.prepare, self.feeder = iter(jobs), prepare, feeder
        self.in_flight.clear()
        for _ in range(FEED_AHEAD):
            self._prepare_next()

    def _prepare_next(self) -> None:
        job = next(self.jobs, None)
        if job is not None:
            self.prepared.append((job, self.feeder.submit(self.prepare, job)))

    def __call__(self) -> list:
        if not self.prepared:
            raise StopIteration  # every job is in DALI: it ends the run once they are out
        job, feed = self.prepared.popleft()
        self._prepare_next()
        ready = feed.result()
        self.in_flight.append(job)
        return ready

    def stop(self) -> None:
        """No more jobs in this run; in_flight is kept (what a failed run held)."""
        for _, feed in self.prepared:
            feed.cancel()
        self.prepared.clear()
        self.jobs, self.prepare, self.feeder = iter(()), None, None


class RunFailed(Exception):
    """DALI failed (`error`) while it held the jobs `in_flight`: the failure may come from any of them."""

    def __init__(self, error: RuntimeError, in_flight: list):
        super().__init__(str(error))
        self.error, self.in_flight = error, in_flight


class FedPipeline:
    """A DALI pipeline built once and run again and again (an epoch, a kNN pass), fed by Feeds.

    build(feeds) makes the pipeline, whose one external_source calls feeds(); names: its outputs. After an exception
    out of DALI, the next run builds a new pipeline: a failed one is not reused.
    """

    def __init__(self, build: Callable, names: list[str]):
        self.build, self.names = build, names
        self.feeds, self.feeder = Feeds(), ThreadPoolExecutor(1)
        self.iterator = None  # over the pipeline, once built

    def run(self, jobs: list, prepare: Callable) -> Iterator[dict[str, torch.Tensor]]:
        """The pipeline's outputs for each job, in order; prepare(job) makes a job's feed (on the feeder thread).
        RunFailed when DALI fails; a feed's own exception as it is."""
        if not jobs:
            return
        self.feeds.start(jobs, prepare, self.feeder)
        try:
            if self.iterator is None:
                self.iterator = DALIGenericIterator(self.build(self.feeds), self.names, prepare_first_batch=False)
            else:
                self.iterator.reset()  # DALI ended the last run; this run's prefetch starts here
            for (batch,) in self.iterator:
                self.feeds.in_flight.popleft()
                yield batch
        except RuntimeError as e:
            self.iterator = None
            raise RunFailed(e, list(self.feeds.in_flight)) from e
        except Exception:
            self.iterator = None
            raise
        finally:
            self.feeds.stop()
            self._drain()

    def _drain(self) -> None:
        """Takes out what DALI still holds of a run left early, so that DALI ends the run and the next one resets it."""
        try:
            while self.iterator is not None and self.feeds.in_flight:
                next(self.iterator)
                self.feeds.in_flight.popleft()
        except RuntimeError:  # a file of a batch no one will use that DALI cannot decode
            self.iterator = None


class DaliLoader(Loader):
    def __init__(self, images: ImageSet, specs: dict[str, ViewSpec], shard: Shard, device: torch.device, *,
                 workers: int = 2, channels_last: bool = True):
        super().__init__(images, specs, shard, device, channels_last)
        self.pool = None if images.in_memory else ThreadPoolExecutor(max(1, workers))  # file reads release the GIL
        self.bad: set[int] = set()  # samples known to be unreadable (the feeder thread adds those it finds)
        build = partial(views_pipeline, list(specs.values()), device.type == "cuda", channels_last,
                        not images.in_memory, batch_size=self.rank_batch, **_dali_options(device, workers))
        self.pipeline = FedPipeline(build, [*specs, "label"])

    def _feed(self, epoch: int, idx: torch.Tensor) -> list:
        """The batch of samples idx as views_graph takes it (on the feeder thread)."""
        while True:  # until every file fed has a header PIL reads: the others are replaced before DALI sees them
            fed = self.readable(idx.tolist(), self.bad)
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
        for spec in self.specs.values():
            out += inputs_of(spec, sample_params(sizes[:, 0], sizes[:, 1], spec, rnd))
        return out

    def _find_bad(self, batches: list[torch.Tensor], error: RuntimeError) -> None:
        """The unreadable files of the batches DALI held when it failed, added to self.bad; UserError when there are
        none."""
        def unreadable(i: int) -> bool:  # too small for convert, but DALI decodes it
            why = check_image(self.images.files[i])[0]
            return why is not None and not why.startswith("too small")

        fed = sorted({i for idx in batches for i in self.readable(idx.tolist(), self.bad)})
        bad = {i for i, is_bad in zip(fed, self.pool.map(unreadable, fed)) if is_bad}
        if not bad:
            raise _failure(self.images.root, error, checked=True) from None
        self.bad |= bad

    def epoch(self, epoch: int, start_batch: int = 0):
        order = self.indices(epoch, start_batch)
        done = 0
        while done < len(order):
            batches = self.pipeline.run(list(order[done:]), partial(self._feed, epoch))
            try:
                with contextlib.closing(batches):
                    for batch in batches:
                        yield self._output(batch, order[done])
                        done += 1
            except RunFailed as failed:  # replace the unreadable files of the batches DALI held, rerun them
                if self.images.in_memory:
                    raise
                self._find_bad(failed.in_flight, failed.error)

    def _output(self, batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict:
        """DALI's batch of the samples idx as the contract gives it."""
        # HWC memory read as NCHW is channels_last; CHW output is already contiguous NCHW
        out = {role: batch[role].permute(0, 3, 1, 2) if self.channels_last else batch[role] for role in self.specs}
        out["label"] = batch["label"].view(-1).to(self.device, non_blocking=True)
        bad = [self.images.files[i] for i in idx.tolist() if i in self.bad]
        if bad:
            out["bad_files"] = bad
        return out


class EvalReader:
    """Every image of an image folder, in order, as uint8 [B,3,size,size] batches (the last one may be partial):
    torch_loader's evaluation view (the shorter side resized to common.eval_resize(size), the centre size x size,
    with torchvision's rounding of both), decoded by DALI. Iterable again at every evaluation, on one pipeline."""

    def __init__(self, images: ImageSet, size: int, batch_size: int, workers: int):
        self.images, self.size, self.batch_size = images, size, batch_size
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.pool = ThreadPoolExecutor(max(1, workers))
        build = partial(eval_pipeline, size, device.type == "cuda", batch_size=batch_size,
                        **_dali_options(device, workers))
        self.pipeline = FedPipeline(build, ["image"])

    def _feed(self, files: list[str]) -> list:
        encoded, sizes = zip(*self.pool.map(_read, files))
        side, resized, corners = eval_resize(self.size), [], []
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
        files = self.images.files
        batches = self.pipeline.run([files[i:i + self.batch_size] for i in range(0, len(files), self.batch_size)],
                                    self._feed)
        try:
            with contextlib.closing(batches):
                for batch in batches:
                    yield batch["image"]
        except RunFailed as failed:
            raise _failure(self.images.root, failed.error) from None
