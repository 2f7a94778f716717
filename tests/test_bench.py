"""bench/throughput.py runs end to end and writes well-formed results (its speed is the benchmark's business)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SECTIONS = ("loader", "loss", "step", "end_to_end")


def _numbers(tree, path=""):
    """(path, value) of every number in a JSON tree (bools are not numbers)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--smoke", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_results_have_every_section_and_the_run_context(smoke):
    out, results, stdout = smoke
    assert results["mode"] == "smoke" and results["device"].startswith("cpu")
    assert results["versions"]["torch"] and results["versions"]["dali"] and results["versions"]["ffcv"]
    assert set(SECTIONS) <= results.keys()
    loader = results["loader"]["sizes"]
    assert {"torch", "dali", "ffcv", "decode"} <= loader["224"]["rows"].keys()
    assert {"torch", "dali", "ffcv", "tensor"} <= loader["32"]["rows"].keys()
    assert {c["impl"] for c in results["loss"]["cases"]} == {"reference", "cpu"}
    step_cases = {(c["method"], c["setting"]) for c in results["step"]["cases"]}
    assert {m for m, _ in step_cases} == {"ressl", "isd", "resa", "mocov2", "byol"}
    assert set(results["step"]["ressl_over_byol_step_time"]) == {s for _, s in step_cases}
    assert set(results["end_to_end"]["images_per_s"]) == {"torch", "tensor", "dali", "ffcv"}
    assert (out / "throughput.png").stat().st_size > 0
    markdown = (out / "results.md").read_text()
    assert markdown in stdout and all(f"## {title}" in markdown for title in ("Loaders", "Relational loss",
                                                                              "Training step", "End to end"))


def test_every_figure_is_a_positive_number(smoke):
    _, results, _ = smoke
    figures = dict(_numbers({k: results[k] for k in SECTIONS}))
    assert len(figures) > 100
    for path, value in figures.items():
        assert math.isfinite(value), path
        if "memory" in path or "peak_extra" in path:  # memory above a tiny step's inputs may round to nothing
            assert value >= 0, path
        else:
            assert value > 0, path
