"""Training under torchrun, as gloo processes on this CPU: every pipeline and method, one process at batch B
against two at B/2 (the same losses, queues and weights), checkpoints moving between process counts, a killed
rank, two "nodes" over loopback, and a preempted job resumed exactly."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from method_options import own
from pipeline_checks import wait_for_steps

from fastssl import checkpoint
from fastssl.config import settings
from fastssl.train import train

pytestmark = pytest.mark.usefixtures("backbones_train_here")

TESTS = Path(__file__).resolve().parent
# 8 steps an epoch of an 8-wide ResNet-18 on a Fashion-MNIST slice, in fp32, every step logged, no kNN monitor.
BASE = dict(data="fashion-mnist", pipeline="tensor", arch="resnet18-w8", train_subset=256, batch_size=32, epochs=1,
            log_every=1, data_val="none", precision="fp32", queue_size=64, device="cpu")


def cli_args(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [] if value is False else [flag, str(value)]
    return args


def torchrun(*args: str, nproc: int = 2, launcher: tuple = ("--standalone",)) -> list[str]:
    """The command that starts `fastssl train` (or a script) in `nproc` processes on this machine."""
    program = ["-m", "fastssl.cli", "train", *args] if not args or not args[0].endswith(".py") else list(args)
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node", str(nproc), *program]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["key"] == "loss"]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- every pipeline and every method under torchrun ----

@pytest.fixture(scope="module")
def fashion_beton(fashion_folder, tmp_path_factory) -> Path:
    from fastssl.pipelines.convert import convert
    folder = tmp_path_factory.mktemp("beton")
    for split in ("train", "val"):
        convert(str(fashion_folder), folder / f"fashion_{split}.beton", split=split, workers=2)
    return folder / "fashion_train.beton"


@pytest.mark.parametrize("pipeline", ["torch", "tensor", "dali", "ffcv"])
def test_every_pipeline_trains_in_two_processes_with_the_knn_monitor(pipeline, fashion_folder, fashion_beton,
                                                                      tmp_path):
    data = {"ffcv": fashion_beton, "tensor": "fashion-mnist"}.get(pipeline, fashion_folder)
    settings = {**BASE, "pipeline": pipeline, "data": str(data), "data_val": "", "max_steps": 4, "knn_every": 1,
                "knn_bank": 256, "knn_queries": 128, "workers": 1, "precision": "auto"}
    run(torchrun(*cli_args(settings), "--out", str(tmp_path)))
    result = summary(tmp_path)
    assert result["processes"] == 2 and result["steps"] == 4
    (_, at_init), (_, at_end) = result["knn_history"]  # the monitor, shared out over both ranks
    assert 10 < at_init <= 100 and 10 < at_end <= 100


@pytest.mark.parametrize("method", ["isd", "resa", "byol"])  # ressl, mocov2: the invariance test below
def test_every_method_trains_in_two_processes(method, tmp_path):
    settings = {**BASE, "method": method, "max_steps": 3, "online_probe": True}  # the probe's head under DDP too
    settings = {k: v for k, v in settings.items() if k != "queue_size"} | own(method, queue_size=64)
    run(torchrun(*cli_args(settings), "--out", str(tmp_path)))
    assert summary(tmp_path)["steps"] == 3 and all(map(torch.isfinite, torch.tensor(losses(tmp_path))))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["probe"]["head"]["1.weight"].isfinite().all()


# ---- one process at batch B = two processes at B/2 ----

# ReSSL's first steps amplify rounding about a hundredfold per step once the queue holds the first keys (two runs of
# one process that differ only in their thread count drift apart to 1e-3 within 10 steps): three steps, which already
# involve the sharding and views (step 1), gradient averaging, lr scaling and the gathered queue (steps 2 and 3).
STEPS, LOSS_RTOL, WEIGHT_ATOL = 3, 1e-5, 5e-4


def one_and_two_runs(name: str, one_settings: dict, two_settings: dict, tmp_path_factory) -> tuple[Path, Path]:
    """The same run in one process and in two: its folders (the two processes also save their queues)."""
    one, two = (tmp_path_factory.mktemp(f"{name}-{n}") for n in ("one", "two"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: a thread count alone changes the rounding
    try:
        train(settings(**one_settings, out=str(one)))
    finally:
        torch.set_num_threads(threads)
    run(torchrun(str(TESTS / "distributed_worker.py"), json.dumps({**two_settings, "out": str(two)})))
    return one, two


@pytest.fixture(scope="module", params=["ressl", "mocov2"])
def one_and_two(request, tmp_path_factory) -> tuple[Path, Path]:
    """The same run in one process (split BN in 2 groups) and in two (each its own BN): its folders."""
    settings = {**BASE, "method": request.param, "bn_splits": 2, "max_steps": STEPS}
    return one_and_two_runs(request.param, settings, settings, tmp_path_factory)


def test_two_processes_train_as_one_at_twice_the_batch(one_and_two):
    one, two = one_and_two
    assert len(losses(one)) == len(losses(two)) == STEPS
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=LOSS_RTOL, atol=0)
    queues = [torch.load(two / f"queue-rank{r}.pt") for r in range(2)]
    assert torch.equal(queues[0], queues[1])  # every rank holds the same queue
    a, b = (checkpoint.load(d / "checkpoint.pt")["method"] for d in (one, two))
    assert a.keys() == b.keys()  # no DDP copy of the student in the checkpoint
    torch.testing.assert_close(b["queue.rows"], queues[0])
    for name, value in a.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(b[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_checkpoints_move_between_process_counts_and_evaluate_in_one(one_and_two, fashion_folder, tmp_path, capsys):
    one, two = one_and_two
    from_two, from_one = tmp_path / "from_two", tmp_path / "from_one"
    shutil.copytree(two, from_two)
    shutil.copytree(one, from_one)
    train(settings(out=str(from_two), resume=True, max_steps=STEPS + 2), given={"max_steps": STEPS + 2})
    run(torchrun("--out", str(from_one), "--resume", "--max-steps", str(STEPS + 2)))
    for folder in (from_two, from_one):
        assert checkpoint.load(folder / "checkpoint.pt")["step"] == STEPS + 2 and len(losses(folder)) == STEPS + 2
    from fastssl import cli
    sys_argv = sys.argv
    try:
        sys.argv = ["fastssl", "eval", "knn", "--checkpoint", str(from_one / "checkpoint.pt"), "--device", "cpu",
                    "--data", str(fashion_folder)]  # a slice: the whole set takes minutes on two cores
        with pytest.raises(SystemExit) as done:
            cli.main()
        assert done.value.code == 0
    finally:
        sys.argv = sys_argv
    assert 10 < float(capsys.readouterr().out.split(":")[-1].strip().rstrip("%")) <= 100


def test_sync_bn_in_two_processes_is_bn_over_the_global_batch(tmp_path_factory):
    """--sync-bn on two processes at B/2 trains as one process with BN over the whole batch B (no split BN)."""
    settings = {**BASE, "method": "ressl", "bn_splits": 1, "max_steps": STEPS}
    one, two = one_and_two_runs("sync-bn", settings, {**settings, "sync_bn": True}, tmp_path_factory)
    # The statistics combined from two halves round differently from one pass over the batch: 4e-7 at step 1, 3e-5 by
    # step 3; BN over each half alone differs by 2e-3 at step 1.
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=10 * LOSS_RTOL, atol=0)
    a, b = (checkpoint.load(d / "checkpoint.pt")["method"] for d in (one, two))
    for name in ("student.0.bn1.running_var", "student.0.layer4.1.bn2.running_mean", "teacher.0.bn1.running_mean"):
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_sync_bn_with_compile_is_a_one_line_error(tmp_path):
    proc = subprocess.run(torchrun(*cli_args({**BASE, "sync_bn": True, "compile": True, "max_steps": 1}), "--out",
                                   str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "error: --sync-bn with --compile" in proc.stderr


# ---- faults and clusters ----

def rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the training processes the torchrun process `parent` started."""
    pids = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0")
                           if "=" in item)
                pids[int(env["RANK"])] = int(entry.name)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return pids


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """cmd in the background, its output in a file (a pipe nobody reads would fill up and block it)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_stderr(log_dir: Path, rank: int) -> list[str]:
    (path,) = log_dir.glob(f"*/attempt_0/{rank}/stderr.log")
    return [line for line in path.read_text().splitlines() if line.strip() and "%|" not in line]


def test_a_killed_rank_stops_the_other_with_a_one_line_error(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    cmd = torchrun(*cli_args({**BASE, "epochs": 100}), "--out", str(out),
                   launcher=("--standalone", "--log-dir", str(logs), "--redirects", "3"))
    proc = start(cmd, tmp_path / "torchrun.log")
    wait_for_steps(out, 3, proc)
    os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    proc.wait(timeout=180)
    assert time.monotonic() - killed < 120 and proc.returncode != 0
    last = rank_stderr(logs, 0)[-1]
    assert last.startswith("error: rank 0 lost contact with the other processes") and "--resume" in last, last


def test_two_nodes_over_loopback(tmp_path):
    port = free_port()
    launcher = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two")
    cmd = torchrun(*cli_args({**BASE, "max_steps": 3}), "--out", str(tmp_path), nproc=1, launcher=launcher)
    nodes = [start(cmd, tmp_path / f"node{n}.log") for n in range(2)]
    for n, node in enumerate(nodes):
        assert node.wait(timeout=600) == 0, (tmp_path / f"node{n}.log").read_text()[-3000:]
    assert summary(tmp_path)["processes"] == 2 and summary(tmp_path)["steps"] == 3


def test_a_preempted_torchrun_job_resumes_exactly(tmp_path):
    settings = {**BASE, "epochs": 3}  # 24 steps
    whole, part, logs = tmp_path / "whole", tmp_path / "part", tmp_path / "logs"
    run(torchrun(*cli_args(settings), "--out", str(whole)))
    cmd = torchrun(*cli_args(settings), "--out", str(part),
                   launcher=("--standalone", "--log-dir", str(logs), "--redirects", "3"))
    proc = start(cmd, tmp_path / "torchrun.log")
    wait_for_steps(part, 4, proc)
    proc.send_signal(signal.SIGTERM)  # what a cluster sends the job; torchrun passes it on to every rank
    proc.wait(timeout=180)
    stopped_at = checkpoint.load(part / "checkpoint.pt")["step"]
    assert 4 <= stopped_at < 24 and f"stopped by SIGTERM at step {stopped_at}" in "\n".join(rank_stderr(logs, 0))
    run(torchrun(*cli_args(settings), "--out", str(part), "--resume"))
    assert losses(part) == losses(whole)  # bit-exact
