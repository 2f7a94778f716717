"""Image fixtures shared by the pipeline tests, written once per session under pytest's temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from crash_checks import BACKBONES, how_it_ended, run_python
from PIL import Image
from pipeline_checks import COLOURS


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> Path:
    """ImageFolder root: train/<class>/ holds flat images of the class's colour, of varying sizes, PNG and JPEG."""
    root = tmp_path_factory.mktemp("colours")
    for c, colour in enumerate(COLOURS):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (40 + 7 * i, 30 + 5 * c), colour).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="session")
def fashion_folder(tmp_path_factory) -> Path:
    """ImageFolder root (train/, val/) of Fashion-MNIST slices as 28 px grayscale PNGs: 2048 + 512 images."""
    from fastssl import data
    root = tmp_path_factory.mktemp("fashion")
    for split, name, n in (("train", "train", 2048), ("test", "val", 512)):
        images = data.load("fashion-mnist", split).subset(n, seed=0)
        for i, (image, label) in enumerate(zip(images.images.numpy(), images.labels.tolist())):
            folder = root / name / images.classes[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0]).save(folder / f"{i}.png")
    return root


def pytest_sessionfinish(session, exitstatus):
    """A child process left running (a library's worker that was never joined) would hang the interpreter's exit
    for ever, and CI with it: name each one, end it, and fail the session."""
    import multiprocessing
    left = multiprocessing.active_children()
    for p in left:
        target = getattr(p, "_target", None)
        print(f"\nleft running after the tests: {p.name} (pid {p.pid}, target {getattr(target, '__qualname__', target)}"
              f" in {getattr(target, '__module__', '?')}); terminated")
        p.terminate()
        p.join(5)
    if left:
        session.exitstatus = 1


@pytest.fixture(scope="session")
def backbones_train_here():
    """fastssl's backbones at the shapes the tests train, first in a subprocess (crash_checks.py): where torch crashes
    on them, each test that trains in this process fails by name instead of taking the whole run down."""
    done = run_python("-c", BACKBONES)
    if done.returncode:
        pytest.fail(f"fastssl's backbones crash torch {torch.__version__} on this CPU ({how_it_ended(done)}); nothing "
                    f"is trained in the test process: see tests/test_torch_canary.py", pytrace=False)
