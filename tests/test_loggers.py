"""--logger: metrics to metrics.csv, TensorBoard, wandb (offline) and MLflow (a local folder), read back from each;
a resumed run drops what it logged after its checkpoint (csv, TensorBoard), an evaluation appends."""

from __future__ import annotations

import csv
import json
import sys
from contextlib import closing
from pathlib import Path

import pytest

from fastssl.config import check, settings
from fastssl.errors import UserError
from fastssl.loggers import Logger, wandb_id
from fastssl.train import train

TINY = dict(method="ressl", arch="resnet18-w8", data="fashion-mnist", pipeline="tensor", image_size=16,
            train_subset=256, batch_size=64, queue_size=256, epochs=1, knn_bank=256, knn_queries=256, device="cpu",
            log_every=1)


@pytest.fixture
def offline(monkeypatch):
    """wandb offline and quiet, MLflow in the run folder: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so that the test's value is removed after it
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # fastssl opts in to MLflow's file store itself


def csv_rows(out: Path) -> list[tuple[int, str, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["key"], float(r["value"])) for r in csv.DictReader(f)]


def tb_scalars(out: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def wandb_history(out: Path) -> list[dict]:
    """The rows offline wandb runs logged in OUT/wandb, read back from their .wandb files (the LevelDB log format:
    a 7-byte file header, then 32 KiB blocks of records, each behind a 7-byte header: checksum, length, type)."""
    import wandb
    from wandb.proto.wandb_internal_pb2 import Record
    wandb.teardown()  # a finished run's records may still be on their way to the file: wait for wandb's service
    rows = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, record = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            record, pos = record + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last part of one
                parsed, record = Record.FromString(record), b""
                if parsed.HasField("history"):
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                 for i in parsed.history.item})
    return rows


def mlflow_history(out: Path, key: str) -> list[tuple[int, float]]:
    import mlflow
    client = mlflow.MlflowClient((out / "mlruns").resolve().as_uri())
    run_id = (out / "mlflow_run_id").read_text()
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_csv_and_tensorboard_rows_and_a_resumed_run_drops_later_steps(tmp_path):
    out = tmp_path / "run"
    with closing(Logger(out)) as logger:
        for step in (1, 2, 3):
            logger.log(step, loss=1 / step, **{"eval/frozen_aug_top1": 10.0 * step})
    assert csv_rows(out)[:2] == [(1, "loss", 1.0), (1, "eval/frozen_aug_top1", 10.0)]
    assert tb_scalars(out, "eval/frozen_aug_top1") == [(1, 10.0), (2, 20.0), (3, 30.0)]
    with closing(Logger(out, ["csv", "tensorboard"], start_step=2)) as logger:  # resumed from step 2's checkpoint
        logger.log(3, loss=7.0)
    assert [(s, v) for s, k, v in csv_rows(out) if k == "loss"] == [(1, 1.0), (2, 0.5), (3, 7.0)]
    assert tb_scalars(out, "loss") == [(1, 1.0), (2, 0.5), (3, 7.0)]
    with closing(Logger(out, "csv", start_step=3, purge=False)) as logger:  # an evaluation of the finished run
        logger.log(3, knn_top1=50.0)
    assert csv_rows(out)[-2:] == [(3, "loss", 7.0), (3, "knn_top1", 50.0)]
    with closing(Logger(out, "csv", start_step=3, enabled=False)) as logger:  # another rank: nothing
        logger.log(4, loss=1.0)
    assert csv_rows(out)[-1] == (3, "knn_top1", 50.0)


def test_an_unknown_or_missing_logger_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown logger 'tensorbored'; choose among tensorboard, csv, wandb, mlflow"):
        check(settings(logger="csv,tensorbored"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'fastssl\[wandb\]'") as error:
        Logger(tmp_path, "wandb")
    assert "\n" not in str(error.value)


def test_wandb_offline_run_is_in_the_run_folder_and_resumes_the_same_run(tmp_path, offline):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    with closing(Logger(out, "wandb", config={"epochs": 2, "image_size": None})) as logger:
        logger.log(1, loss=0.5, **{"eval/frozen_aug_top1": 12.5})
        logger.log(2, loss=0.25)
    with closing(Logger(out, "wandb", start_step=1)) as logger:  # wandb takes a step below its last one
        logger.log(2, loss=0.125)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(wandb_id(out) in r.name for r in runs)  # the same id (a suffix within a second)
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wandb_history(out)]
    assert logged == [{"trainer/step": 1, "loss": 0.5, "eval/frozen_aug_top1": 12.5}, {"trainer/step": 2, "loss": 0.25},
                      {"trainer/step": 2, "loss": 0.125}]


def test_mlflow_run_is_in_the_run_folder_and_resumes_the_same_run(tmp_path, offline):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    with closing(Logger(out, "mlflow", config={"view_changes": "x" * 9000, "image_size": None})) as logger:
        logger.log(1, loss=0.5, **{"eval/frozen_aug_top1": 12.5})
    with closing(Logger(out, "mlflow", start_step=1)) as logger:
        logger.log(2, loss=0.25)
    assert mlflow_history(out, "loss") == [(1, 0.5), (2, 0.25)]
    assert mlflow_history(out, "eval/frozen_aug_top1") == [(1, 12.5)]
    run = mlflow.MlflowClient((out / "mlruns").resolve().as_uri()).get_run((out / "mlflow_run_id").read_text())
    assert (run.info.run_name, run.info.status, run.data.params["image_size"]) == ("run", "FINISHED", "None")


def test_a_run_logs_to_csv_wandb_and_mlflow_and_resumes_into_the_same_runs(tmp_path, offline):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    train(settings(**{**TINY, "max_steps": 2}, logger="csv,wandb,mlflow", out=str(out)))  # a checkpoint at step 2
    summary = train(settings(**TINY, logger="csv,wandb,mlflow", out=str(out), resume=True))
    losses = [(s, v) for s, k, v in csv_rows(out) if k == "loss"]
    knn = [(s, v) for s, k, v in csv_rows(out) if k == "knn_top1"]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert [s for s, _ in knn] == [0, 2, 4] and knn[-1][1] == summary["knn_top1"]  # random init, the stop, the end
    assert mlflow_history(out, "loss") == losses and mlflow_history(out, "knn_top1") == knn
    wandb_rows = [(row["trainer/step"], row["loss"]) for row in wandb_history(out) if "loss" in row]
    assert wandb_rows == losses
