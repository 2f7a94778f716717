"""The house rules, checked: a method is one file plus one registry line (a toy method added to a copy of the
package trains from the command line with its own option), the training loop fits on a screen, no function in
fastssl/ runs over 50 lines, and no module of the package imports itself back."""

from __future__ import annotations

import ast
import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the installed namespace: pyproject maps pipelines/ and kernels/ into fastssl
PACKAGE = {"fastssl": REPO / "fastssl", "fastssl.pipelines": REPO / "pipelines", "fastssl.kernels": REPO / "kernels"}

TOY = '''"""A toy method: the student's embedding of the strong view regresses the EMA teacher's of the weak view."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import ema_update, mlp
from ..options import recipe
from ..views import strong, weak
from .base import Method, Options, register


@dataclass
class ToyOptions(Options):
    lr: float = recipe(0.05, 0.05, "", "this test")
    weight_decay: float = recipe(1e-4, 1e-4, "", "this test", check="non-negative")
    warmup_epochs: float = recipe(0, 0, "", "this test", check="non-negative")
    final_lr_ratio: float = recipe(0.0, 0.0, "", "this test", check="fraction")
    momentum: float = recipe(0.9, 0.99, "teacher EMA momentum", "this test", check="fraction")
    toy_dim: int = recipe(16, 64, "the toy head's embedding dimension", "this test")


@register
class Toy(Method):
    name = "toy"
    backprops_per_image = 1
    Options = ToyOptions

    @staticmethod
    def view_specs(opts, size, mean, std):
        return {"weak": weak(size, mean=mean, std=std), "strong": strong(size, mean=mean, std=std)}

    def __init__(self, opts, backbone, **run):
        super().__init__(opts, backbone, **run)
        self.student = nn.Sequential(backbone, mlp([backbone.out_dim, opts.toy_dim]))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def step(self, views, progress):
        ema_update(self.teacher, self.student, self.opts.momentum)
        with torch.no_grad():
            k = F.normalize(self.teacher(views["weak"]).float(), dim=1)
        (q,) = self.student_forward(views["strong"])
        return (2 - 2 * (F.normalize(q.float(), dim=1) * k).sum(1)).mean(), {}
'''


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the installed package: its file, and whether it is a package's __init__."""
    found = {}
    for package, folder in PACKAGE.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return found


def imports(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, at its top or inside a function (a lazy import still ties two
    modules together)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_package else name.split(".")[:-1]
            target = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]).rstrip(".") if node.level \
                else node.module
            candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def test_no_module_imports_itself_back():
    found = modules()
    graph = {name: imports(name, path, is_package, set(found)) for name, (path, is_package) in found.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles


def test_functions_are_short_and_the_loop_fits_on_a_screen():
    lengths = {}
    for path in (REPO / "fastssl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.relative_to(REPO)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert lengths["fastssl/train.py:loop"] <= 30
    assert not {name: n for name, n in lengths.items() if n > 50}


@pytest.fixture(scope="module")
def with_toy(tmp_path_factory) -> Path:
    """A copy of the installed package with a toy method: its own new file and one changed registry line."""
    root = tmp_path_factory.mktemp("toy")
    for package, folder in PACKAGE.items():
        shutil.copytree(folder, root.joinpath(*package.split(".")), ignore=shutil.ignore_patterns("__pycache__"))
    methods = root / "fastssl" / "methods"
    (methods / "toy.py").write_text(TOY)
    registry = methods / "__init__.py"
    before = registry.read_text().splitlines()
    after = [line.replace("  #", ", toy  #", 1) if line.startswith("from . import byol") else line for line in before]
    registry.write_text("\n".join(after) + "\n")
    changed = [d for d in difflib.unified_diff(before, after, lineterm="", n=0) if d[:1] in "+-" and d[:3] not in
               ("+++", "---")]
    assert len(changed) == 2, changed  # one line out, one in
    return root


def fastssl(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    code = ("import sys, fastssl, fastssl.cli; assert fastssl.__file__.startswith(sys.argv.pop(1)); "
            "fastssl.cli.main()")
    return subprocess.run([sys.executable, "-c", code, str(root), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=root)  # not the repository's folder: its fastssl/ would come first


def test_a_new_method_is_one_file_and_one_registry_line(with_toy, tmp_path):
    shown = fastssl(with_toy, "train", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "--toy-dim" in shown.stdout and "toy 16/64" in " ".join(shown.stdout.replace("│", " ").split())
    out = tmp_path / "run"
    trained = fastssl(with_toy, "train", "--method", "toy", "--toy-dim", "8", "--data", "fashion-mnist", "--pipeline",
                      "tensor", "--arch", "resnet18-w8", "--image-size", "16", "--batch-size", "32", "--train-subset",
                      "128", "--epochs", "1", "--data-val", "none", "--device", "cpu", "--precision", "fp32",
                      "--out", str(out))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert json.loads((out / "config.json").read_text())["toy_dim"] == 8
    refused = fastssl(with_toy, "train", "--method", "ressl", "--toy-dim", "8", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2 and "ressl has no option 'toy_dim'" in refused.stderr, refused.stderr
