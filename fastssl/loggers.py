"""Where a run's metrics go: `Logger` writes each `log(step, key=value)` to the backends --logger names
(tensorboard, csv, wandb, mlflow), on the main process only. A resumed run first drops what it logged after its
checkpoint from metrics.csv and TensorBoard; wandb and MLflow keep every point (the steps replayed since the
checkpoint appear twice there)."""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError

KINDS = ("tensorboard", "csv", "wandb", "mlflow")


def parse_kinds(kinds: str | Sequence[str]) -> list[str]:
    """The backends named (comma-separated or a list), each once, in order; a one-line error for an unknown one, or
    for wandb or mlflow not installed (when the settings are checked, before the run loads its data)."""
    names = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip()]
    for name in names:
        if name not in KINDS:
            raise UserError(f"unknown logger {name!r}; choose among {', '.join(KINDS)} (comma-separated)")
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            raise _not_installed(name, "not installed")
    return list(dict.fromkeys(names))


def _not_installed(module: str, why: str) -> UserError:
    return UserError(f"--logger {module} needs the {module} package ({why}); pip install 'fastssl[{module}]'")


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:  # installed but broken
        raise _not_installed(module, str(e)) from None


class CsvSink:
    """OUT/metrics.csv: rows `step,key,value`."""

    def __init__(self, out: Path, start_step: int, purge: bool, config: dict | None):
        self.path = out / "metrics.csv"
        if purge and start_step and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.reader(f) if r[0] == "step" or int(r[0]) <= start_step]
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerows(rows)

    def log(self, step: int, values: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "key", "value"])
            w.writerows([step, k, v] for k, v in values.items())

    def close(self) -> None:
        pass


class TensorBoardSink:
    """OUT/tb/: a scalar per key. purge_step: TensorBoard hides the events from that step on, written before."""

    def __init__(self, out: Path, start_step: int, purge: bool, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter
        # the checkpoint's step was logged before the checkpoint: it stays
        self.writer = SummaryWriter(out / "tb", purge_step=start_step + 1 if purge and start_step else None)

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def wandb_id(out: Path) -> str:
    """The wandb run id of a run folder, from its absolute path: resuming (or evaluating) it continues that run."""
    return "fastssl-" + hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]


class WandbSink:
    """A wandb run named after the run folder, its files in OUT/wandb. WANDB_MODE (offline, disabled),
    WANDB_PROJECT and the login are wandb's own settings, left to it. wandb rejects a step below its last one
    (a resumed run replays steps, an evaluation logs at the last one), so the step is a metric, trainer/step,
    that every other one is plotted against."""

    def __init__(self, out: Path, start_step: int, purge: bool, config: dict | None):
        wandb = _optional("wandb")
        (out / "wandb").mkdir(exist_ok=True)
        try:
            self.run = wandb.init(dir=out, project=os.environ.get("WANDB_PROJECT", "fastssl"),
                                  name=out.resolve().name, id=wandb_id(out), resume="allow", config=config)
        except wandb.errors.Error as e:
            raise UserError(f"wandb cannot start a run ({str(e).splitlines()[0]}); run `wandb login`, or set "
                            f"WANDB_MODE=offline (then `wandb sync` OUT/wandb/offline-run-*)") from None
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")

    def log(self, step: int, values: dict) -> None:
        self.run.log({"trainer/step": step, **{k: float(v) for k, v in values.items()}})

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run in experiment 'fastssl', named after the run folder, in OUT/mlruns unless MLFLOW_TRACKING_URI
    is set; its id in OUT/mlflow_run_id, so that resuming (or evaluating) continues it. A client, not mlflow's
    module-level active run: nothing global changes for other MLflow code in the process."""

    def __init__(self, out: Path, start_step: int, purge: bool, config: dict | None):
        self.mlflow = mlflow = _optional("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A local folder needs MLflow 3's file store, in maintenance mode behind this opt-in: its sqlite store
            # needs the full `mlflow` package (SQLAlchemy, Alembic, pandas, pyarrow, Flask...), where the file store
            # works with the light `mlflow-skinny`. To look at it: MLFLOW_ALLOW_FILE_STORE=true mlflow server
            # --backend-store-uri OUT/mlruns (the full package), or `mlflow migrate-filestore` to sqlite.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(uri)
        id_file = out / "mlflow_run_id"
        self.run_id = self._resumed(id_file.read_text().strip()) if id_file.exists() else None
        if self.run_id is None:
            self.run_id = self._new_run(out.resolve().name, config)
            id_file.write_text(self.run_id)

    def _resumed(self, run_id: str) -> str | None:
        """The run of a saved id, running again; None if this tracking store does not hold it."""
        try:
            self.client.update_run(run_id, status="RUNNING")
        except self.mlflow.exceptions.MlflowException:
            return None
        return run_id

    def _new_run(self, name: str, config: dict | None) -> str:
        experiment = self.client.get_experiment_by_name("fastssl")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("fastssl")
        run = self.client.create_run(experiment_id, run_name=name)
        # MLflow params are strings of limited length (6000 characters in MLflow 3, 500 in older servers)
        params = [self.mlflow.entities.Param(k, str(v)[:500]) for k, v in (config or {}).items()]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def log(self, step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.mlflow.entities.Metric(k, float(v), now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


SINKS = {"csv": CsvSink, "tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


class Logger:
    """Metrics to the backends `kinds` names, on the main process (`enabled`; elsewhere nothing at all). `config`:
    the run's flat settings (wandb's config, MLflow's params). purge: a resumed run (start_step > 0) drops what it
    logged after its checkpoint; False appends (evaluations added to a finished run's folder)."""

    def __init__(self, out: Path, kinds: str | Sequence[str] = "tensorboard,csv", *, enabled: bool = True,
                 start_step: int = 0, config: dict | None = None, purge: bool = True):
        names = parse_kinds(kinds)
        self.sinks = []
        if enabled:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            try:
                for name in names:
                    self.sinks.append(SINKS[name](out, start_step, purge, config))
            except BaseException:  # a backend that cannot start: end those already started (an MLflow run)
                self.close()
                raise

    def log(self, step: int, **values: float) -> None:
        for sink in self.sinks:
            sink.log(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
