"""Atomic checkpoints (write, fsync, rename), the last two kept, read back without unpickling foreign code
(weights_only), exact resume, and the plain backbone export."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

try:  # how numpy pickles an array: numpy 2 moved it
    from numpy._core.multiarray import _reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct

from .errors import UserError


def atomic_save(obj, path: str | Path, write=None) -> None:
    """write(obj, file) (default: torch.save) to a temporary file in the same directory, fsync it, rename over `path`, fsync
    the directory: a crash at any point leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)  # looked up at the call: a test may replace torch.save
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LATEST, PREVIOUS = "checkpoint.pt", "checkpoint-prev.pt"


def save_run(state: dict, out: Path) -> None:
    """The run's checkpoint, written in full before the one it replaces becomes checkpoint-prev.pt: a write torn
    by a full disk or a dying node leaves both earlier checkpoints as they were."""
    out = Path(out)
    tmp = out / f".{LATEST}.next"
    atomic_save(state, tmp)
    if (out / LATEST).exists():
        os.replace(out / LATEST, out / PREVIOUS)
    os.replace(tmp, out / LATEST)
    _fsync_dir(out)


# Besides tensors and plain containers a checkpoint holds numpy's RNG state (rng_state): torch.load's weights_only
# unpickler takes these classes and refuses every other one.
SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:  # not a pickle at all (truncated, garbage)
            raise UserError(f"cannot read checkpoint {path} ({str(e).splitlines()[0]})") from None
        # weights_only met a class that is none of ours: never run its code
        raise UserError(f"{path} holds Python objects a fastssl checkpoint does not"
                        f" ({found.group(1)}); refusing to unpickle it (it could run code): "
                        f"pass a checkpoint written by fastssl") from None
    except Exception as e:  # a truncated or foreign file: say which and why, once
        why = str(e).splitlines()[0] if str(e) else "it ends early"  # an empty file's EOFError says nothing
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {why})") from None


def load_run(out: Path) -> tuple[dict, Path]:
    """The newest readable training checkpoint in a run folder (checkpoint.pt, else checkpoint-prev.pt) and its
    path; UserError when there is none."""
    out = Path(out)
    candidates = [out / LATEST, out / PREVIOUS]
    problems = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = load(path)
        except UserError as e:
            problems.append(str(e))
            continue
        if not isinstance(state, dict) or not {"config", "method", "step"} <= state.keys():
            problems.append(f"{path} is not a fastssl training checkpoint")
            continue
        if problems:
            print(f"warning: {problems[-1]}; resuming from {path}", flush=True)
        return state, path
    if problems:
        raise UserError(problems[0] + (f"; and {problems[1]}" if len(problems) > 1 else ""))
    raise UserError(f"checkpoint {out / LATEST} does not exist; nothing to resume in {out}")


def has_run(out: Path) -> bool:
    return any((Path(out) / name).exists() for name in (LATEST, PREVIOUS))


def rng_state() -> dict:
    """The generators' states; on CUDA, only this process's device's (a job resumes on whatever GPUs it gets)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state()'s generators. The CUDA state goes to this process's device, if it has one (a checkpoint
    written on a GPU resumes on a CPU); fastssl 0.2 saved one state per visible GPU: this device's, or the first."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def backbone_state_dict(encoder: torch.nn.Module) -> dict:
    """The encoder's weights under torchvision's ResNet names (no fc), on CPU, loadable with strict=False
    into `torchvision.models.resnetXX()` (the small-image stem has a 3x3 conv1)."""
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
