"""Trackers (``conf/logger/``): TensorBoard event files and MLflow runs, views of the same records that
the run's own files hold. ``metrics.csv`` and ``results.json`` stay the record (``fa-report`` and
resuming read them); a tracker is fed the same numbers, epoch by epoch, as they are written.

    fa-train logger=[csv,tensorboard]          # events in each run folder: tensorboard --logdir outputs/
    fa-train -m logger=[csv,mlflow] seed=0,1,2 # one MLflow run per job, in outputs/mlflow.db

A tracker's package is imported only when it starts: ``fa-train`` without trackers never imports
TensorBoard or MLflow, and a missing package is found by :func:`missing_package` while the config is
validated, before any job trains. A tracker that fails in the middle of a run (a tracking server that
went away) is reported once and dropped: the run and its files go on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fa_cli.config import ConfigError, LoggerConfig, MLflowLoggerConfig, describe, flatten, logger_settings

try:
    import fcntl
except ImportError:  # Windows: no lock; start a new store with one run before a parallel grid
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # engine imports torch, which validating a config does not need
    from fa_cli.engine import EpochRecord

log = logging.getLogger(__name__)

#: The modules each tracker imports, by the extra that installs them.
PACKAGES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
#: Columns of metrics.csv -> TensorBoard tags: a loss chart and an accuracy chart, train and val in each.
TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "lr": "lr",
    "seconds": "epoch_seconds",
}
#: results.json's numbers that MLflow gets as the run's final metrics.
FINAL_METRICS = (
    "test_accuracy", "test_loss", "best_val_accuracy", "best_epoch", "epochs_completed", "wall_seconds"
)  # fmt: skip
#: The run's files that MLflow keeps as artifacts, when they exist; plots are added by suffix. (The
#: resolved config goes as config.yaml; a sweep's summary.md goes to a run of its own.)
ARTIFACTS = ("results.json", "metrics.csv", "alignment.csv", "train.log")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
MLFLOW_STATUS = {"completed": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "interrupted": "KILLED"}
DEFAULT_EXPERIMENT = "fa-train"


def missing_package(name: str, settings: Any = None) -> str | None:
    """The first module that tracker ``name`` needs and this Python cannot import, or None. MLflow's
    SQLite store needs sqlalchemy and alembic; a tracking server does not."""
    packages = PACKAGES[name]
    if isinstance(settings, MLflowLoggerConfig) and not settings.tracking_uri.startswith("sqlite:"):
        packages = ("mlflow",)
    return next((p for p in packages if importlib.util.find_spec(p) is None), None)


def experiment_name(configured: str | None, preset: str | None, sweep_dir: str | None) -> str:
    """MLflow's experiment for a run: as configured, else the preset's name (``experiment=smoke``),
    else the sweep folder, so that a grid's runs sit together, else ``fa-train``."""
    return configured or preset or sweep_dir or DEFAULT_EXPERIMENT


@dataclass
class Tracking:
    """Which trackers a run starts, and what they show of it besides its records."""

    settings: LoggerConfig
    experiment: str = DEFAULT_EXPERIMENT  # MLflow's experiment
    config_text: str = ""  # the resolved config as YAML

    @classmethod
    def of(cls, cfg: DictConfig, hydra_cfg: DictConfig) -> Tracking:
        """The tracking of a composed config, named from Hydra's choices and sweep folder."""
        settings = logger_settings(cfg)
        sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
        configured = settings.mlflow.experiment if settings.mlflow is not None else None
        preset = hydra_cfg.runtime.choices.get("experiment")
        name = experiment_name(configured, preset, sweep_dir)
        return cls(settings, name, OmegaConf.to_yaml(cfg, resolve=True))

    def start(self, run_dir: Path, params: dict[str, Any], tags: dict[str, str]) -> Trackers:
        run = RunInfo(run_dir, self.experiment, self.config_text, params, tags)
        return Trackers.start(self.settings, run)


@dataclass
class RunInfo:
    """What the trackers show of a run besides its records."""

    run_dir: Path
    experiment: str  # MLflow's experiment
    config_text: str  # the resolved config as YAML
    params: dict[str, Any]  # the resolved config as a tree: results.json's "config"
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run folder's name (``<time>_<dataset>_<model>_<method>_seed<seed>``): how trackers list it."""
        return self.run_dir.name


class Tracker(Protocol):
    def replay(self, history: list[EpochRecord], alignment: list[Mapping[str, Any]]) -> None: ...

    def log_epoch(self, record: EpochRecord) -> None: ...

    def log_alignment(self, rows: Iterable[Mapping[str, Any]]) -> None: ...

    def finish(self, results: Mapping[str, Any]) -> None: ...


class Trackers:
    """The trackers a run has on, called together. :meth:`start` raises :class:`ConfigError` when one
    cannot start (a bad tracking URI): before training, as a config error. Later failures are logged
    once and that tracker is dropped."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.trackers = trackers

    @classmethod
    def start(cls, settings: LoggerConfig, run: RunInfo) -> Trackers:
        trackers: dict[str, Tracker] = {}
        kinds = {"tensorboard": TensorBoard, "mlflow": MLflow}
        for name, kind in kinds.items():
            tracker_settings = getattr(settings, name)
            if tracker_settings is None:
                continue
            try:
                trackers[name] = kind(tracker_settings, run)
            except Exception as error:
                Trackers(trackers).finish({"status": "failed"})  # close those already started
                raise ConfigError(f"logger.{name}", f"could not start: {describe(error)}") from error
        return cls(trackers)

    def info(self) -> dict[str, Any]:
        """Where each tracker put the run, for results.json."""
        return {name: t.info() for name, t in self.trackers.items() if hasattr(t, "info")}

    def log_epoch(self, record: EpochRecord) -> None:
        self._each("log_epoch", record)

    def log_alignment(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Alignment angles, rows of ``step, epoch, layer, metric, degrees`` (alignment.csv's): each
        measurement at its optimizer step."""
        rows = list(rows)
        if rows:
            self._each("log_alignment", rows)

    def replay(self, history: Iterable[EpochRecord], alignment: Iterable[Mapping[str, Any]]) -> None:
        """A resumed run's earlier epochs and angles, for the trackers that do not hold them yet."""
        self._each("replay", list(history), list(alignment))

    def finish(self, results: Mapping[str, Any]) -> None:
        """The run's end: final metrics, artifacts, status; then the trackers close."""
        self._each("finish", results)
        self.trackers = {}

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:
                log.warning(f"{name} logger stopped, the run goes on: {describe(error)}")
                del self.trackers[name]


class TensorBoard:
    """Event files written into the run folder itself, so that ``tensorboard --logdir`` on a sweep
    lists one run per job, named by its folder. Per-epoch scalars are at step = epoch; alignment
    angles at step = optimizer steps done."""

    def __init__(self, settings: Any, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A run resumed in its own folder: the first attempt's event files hold every epoch up to the
        # checkpoint. (An epoch reaches TensorBoard as its checkpoint is being written, on a thread; a
        # run killed with SIGKILL in the few ms between can show that epoch twice once resumed here.)
        self.continues = any(run.run_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(run.run_dir))
        self.writer.add_text("config", _as_code(run.config_text))
        self.writer.flush()

    def info(self) -> dict[str, Any]:
        return {"log_dir": self.writer.get_logdir()}

    def replay(self, history: list[EpochRecord], alignment: list[Mapping[str, Any]]) -> None:
        if not self.continues:  # resumed into a new folder: the curves start from epoch 1 here too
            for record in history:
                self.log_epoch(record)
            self.log_alignment(alignment)

    def log_epoch(self, record: EpochRecord) -> None:
        for column, tag in TENSORBOARD_TAGS.items():
            value = getattr(record, column)
            if value is not None:  # val_* without a validation split
                self.writer.add_scalar(tag, value, record.epoch)
        self.writer.flush()  # each epoch on disk as it ends: a killed run keeps its curves

    def log_alignment(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.writer.add_scalar(f"alignment/{row['metric']}/{row['layer']}", row["degrees"], row["step"])
        self.writer.flush()

    def finish(self, results: Mapping[str, Any]) -> None:
        step = results.get("best_epoch") or results.get("epochs_completed") or 0  # the tested epoch
        for key in ("test_accuracy", "test_loss"):
            if results.get(key) is not None:
                self.writer.add_scalar(key.replace("_", "/", 1), results[key], step)
        self.writer.add_text("status", str(results.get("status")), step)
        self.writer.close()


class MLflow:
    """One MLflow run: the flattened config as params, metrics.csv's columns per epoch (step = epoch),
    results.json's numbers as final metrics, and the run's files as artifacts. With a ``sqlite:``
    tracking URI the store is that file (made absolute, its folder created) and new experiments keep
    their artifacts in ``mlartifacts/`` beside it; a server decides both itself."""

    def __init__(self, settings: MLflowLoggerConfig, run: RunInfo) -> None:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        self.tracking_uri, artifact_location = _store(settings.tracking_uri)
        with _store_lock(self.tracking_uri):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)  # creates a new store's tables
            self.experiment_id = _experiment_id(self.client, run.experiment, artifact_location)
        self.experiment = run.experiment
        self.run_dir = run.run_dir
        tags = {"run_dir": str(run.run_dir), **run.tags}
        self.run_id = self.client.create_run(self.experiment_id, run_name=run.name, tags=tags).info.run_id
        self._log(params=flatten_params(run.params))
        self.client.log_text(self.run_id, run.config_text, "config.yaml")

    def info(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "run_id": self.run_id}

    def replay(self, history: list[EpochRecord], alignment: list[Mapping[str, Any]]) -> None:
        """A resumed run is a new MLflow run: it gets the earlier epochs, so that it has them all."""
        for record in history:
            self.log_epoch(record)
        if alignment:
            self.log_alignment(alignment)

    def log_epoch(self, record: EpochRecord) -> None:
        values = {k: v for k, v in asdict(record).items() if k != "epoch" and v is not None}
        self._log(metrics=values, step=record.epoch)

    def log_alignment(self, rows: Iterable[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = _milliseconds()
        metrics = [
            Metric(f"alignment/{r['metric']}/{r['layer']}", float(r["degrees"]), now, int(r["step"]))
            for r in rows
        ]
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def finish(self, results: Mapping[str, Any]) -> None:
        final = {k: results[k] for k in FINAL_METRICS if isinstance(results.get(k), int | float)}
        self._log(metrics=final, step=results.get("epochs_completed") or 0)
        self.client.set_tag(self.run_id, "status", str(results.get("status")))
        for path in run_artifacts(self.run_dir):
            self.client.log_artifact(self.run_id, str(path))
        status = MLFLOW_STATUS.get(str(results.get("status")), "FAILED")
        self.client.set_terminated(self.run_id, status)

    def _log(
        self,
        params: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
    ) -> None:
        from mlflow.entities import Metric, Param

        now = _milliseconds()
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        for start in range(0, len(param_list), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=param_list[start : start + 100])
        if metrics:
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)


def flatten_params(tree: Mapping[str, Any]) -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``: MLflow's params, one per config leaf.
    Values other than strings are written as JSON (``true``, ``null``, ``[50]``), as results.json has
    them."""
    return {key: v if isinstance(v, str) else json.dumps(v) for key, v in flatten(tree).items()}


def run_artifacts(run_dir: Path) -> list[Path]:
    """The files of a run folder that MLflow keeps: results, metrics, angles, log and plots."""
    named = [run_dir / name for name in ARTIFACTS]
    plots = sorted(p for p in run_dir.iterdir() if p.suffix in PLOT_SUFFIXES)
    return [p for p in named + plots if p.is_file()]


class MLflowSweepSummary(Callback):
    """When a sweep ends, its summary tables (the same Markdown and CSV that ``summary.md`` and
    ``summary.csv`` hold) as the artifacts of one more MLflow run, ``summary of <sweep folder>``, in
    each experiment the sweep's runs went to. Computed from the runs' results.json, so it does not
    depend on the order in which Hydra calls the end-of-sweep callbacks."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fa_cli import report

        sweep_dir = Path(config.hydra.sweep.dir)
        results = report.collect([sweep_dir])
        stores = {
            (r["trackers"]["mlflow"]["tracking_uri"], r["trackers"]["mlflow"]["experiment"])
            for r in results
            if isinstance(r.get("trackers"), dict) and "mlflow" in r["trackers"]
        }
        if not stores:
            return
        tables = report.summarize(results)
        markdown = report.to_markdown(tables)
        table_csv = report.csv_text(report.to_csv_rows(tables), report.CSV_FIELDS)
        for tracking_uri, experiment in sorted(stores):
            try:
                _log_summary(tracking_uri, experiment, sweep_dir, markdown, table_csv)
            except Exception as error:
                log.warning(f"mlflow: could not log the sweep's summary: {describe(error)}")


def _log_summary(tracking_uri: str, experiment: str, sweep_dir: Path, markdown: str, table_csv: str) -> None:
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    with _store_lock(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = _experiment_id(client, experiment, None)
    tags = {"sweep_dir": str(sweep_dir), "kind": "sweep summary"}
    run_id = client.create_run(experiment_id, run_name=f"summary of {sweep_dir}", tags=tags).info.run_id
    client.log_text(run_id, markdown, "summary.md")
    client.log_text(run_id, table_csv, "summary.csv")
    client.set_terminated(run_id, "FINISHED")


def _store(tracking_uri: str) -> tuple[str, str | None]:
    """The tracking URI with a relative SQLite path made absolute (its folder created), and where new
    experiments keep their artifacts: ``mlartifacts/`` beside a SQLite file, else the store's choice."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return tracking_uri, None
    database = Path(tracking_uri[len(prefix) :]).absolute()  # sqlite:////abs/path keeps its root
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"{prefix}{database}", (database.parent / "mlartifacts").as_uri()


@contextlib.contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """For a SQLite store: one process at a time opens it (``<file>.lock`` beside it). MLflow creates
    a new store's tables by running its migrations, and two processes that do so at once (the jobs of
    a parallel grid) break the file; once it exists, SQLite serialises the writes itself."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or fcntl is None:
        yield
        return
    with open(f"{tracking_uri[len(prefix) :]}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it when it does not exist. Parallel jobs of a sweep may race to
    create it: the loser finds the winner's."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _quiet_mlflow() -> None:
    """MLflow and alembic log every schema migration of a new SQLite store (dozens of lines) at INFO."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _as_code(text: str) -> str:
    """TensorBoard renders text as Markdown: an indented code block keeps the YAML's indentation."""
    return "\n".join("    " + line for line in text.splitlines())


def _milliseconds() -> int:
    return int(time.time() * 1000)
