"""bench/throughput.py runs end to end and writes well-formed results (its speed is the benchmark's business); without
native bf16 its bf16 cases are reported as skipped."""

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
    cmd = [sys.executable, str(BENCH / "throughput.py"), "--smoke", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
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
    step_cases = {(c["method"], c["setting"]) for c in results["step"]["cases"] if "skipped" not in c}
    assert {m for m, _ in step_cases} == {"ressl", "isd", "resa", "mocov2", "byol"}
    assert set(results["step"]["ressl_over_byol_step_time"]) == {s for _, s in step_cases}
    assert set(results["step"]["backbones"]["images_per_s"]) == {"resnet18-w8", "vit-t16"}  # ResNet beside a ViT
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


def test_without_native_bf16_the_bf16_cases_are_skipped(smoke, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_BENCH_NO_BF16", "1")  # the subprocesses inherit it
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import end_to_end
    import step
    import throughput
    assert not common.native_bf16("cpu")
    # the step section for two methods (the ReSSL / BYOL ratio), in smoke mode
    available = step.methods_available()
    monkeypatch.setattr(step, "methods_available", lambda: {m: available[m] for m in ("ressl", "byol")})
    results = step.run("smoke", device="cpu", out_dir=str(tmp_path))
    skipped = [c for c in results["cases"] if "skipped" in c]
    assert {c["setting"] for c in skipped} == {"bf16 channels_last"} and len(skipped) == 2
    assert all(c["skipped"] == "skipped: no native bf16" for c in skipped)
    assert results["matmul_peak_flops"]["bfloat16"] is None and results["matmul_peak_flops"]["float32"] > 0
    assert set(results["ressl_over_byol_step_time"]) == {"fp32"}
    assert "| ressl | bf16 channels_last | 1 | skipped: no native bf16 |" in (tmp_path / "step.md").read_text()
    # the whole report and its chart with that section
    whole = {**smoke[1], "step": results}
    assert "bf16 skipped: no native bf16" in throughput.to_markdown(whole)
    throughput.plot(whole, tmp_path / "throughput.png")
    assert (tmp_path / "throughput.png").stat().st_size > 0
    # end to end: the trainer runs in fp32 (the training runs themselves are the smoke run's)
    calls = []
    monkeypatch.setattr(end_to_end, "_fastssl", lambda *args: calls.append(args))
    monkeypatch.setattr(end_to_end, "_window_rates", lambda run_dir: [1.0, 1.0])
    assert end_to_end.run("smoke", device="cpu")["precision"] == "fp32"
    trains = [c for c in calls if c[0] == "train"]
    assert trains and all(c[c.index("--precision") + 1] == "fp32" for c in trains)


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--smoke", *args], capture_output=True,
                          text=True, timeout=1800)


def test_the_gpu_check_runs_every_step_tiny_on_a_cpu(tmp_path):
    """bench/gpu_check.py's steps, with CPU-sized shapes: each passes (or says why it is skipped) and reports its
    figures; the end-to-end runs get their share of the model-only step."""
    done = gpu_check("--out", str(tmp_path), "--budget", "1800")  # a busy CPU: no step left out for time
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    steps = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert {name for name, s in steps.items() if s["status"] != "passed"} == {"torchrun-2-gpus"}
    assert steps["torchrun-2-gpus"]["status"] == "skipped: needs 2 GPUs"
    assert {"ressl fp32", "byol fp32", "ressl_over_byol_step_time"} <= steps["step"]["figures"].keys()
    for name in ("train-torch", "train-nvjpeg", "train-dali", "train-ffcv"):
        figures = steps[name]["figures"]
        assert figures["steps"] == 4 and figures["images_per_s"] > 0 and figures["share_of_model_only"] > 0, name
    assert 10 < steps["fashion-mnist"]["figures"]["knn_top1"] <= 100
    assert "| fashion-mnist | passed |" in (tmp_path / "gpu_check.md").read_text()


def test_a_gpu_check_step_over_its_time_fails_the_check(tmp_path):
    done = gpu_check("--only", "step", "--budget", "21", "--out", str(tmp_path))
    assert done.returncode == 1 and "error: 1 step(s) failed: step" in done.stdout
    assert "| step | timed out after 21 s |" in (tmp_path / "gpu_check.md").read_text()
