"""The logger group: TensorBoard and MLflow see the same numbers as metrics.csv and results.json, a
missing package is a one-line error before anything trains, and a failing tracker never stops a run."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

from fa_cli import report
from fa_cli.config import (
    ConfigError,
    LoggerConfig,
    MLflowLoggerConfig,
    logger_settings,
    validate,
)
from fa_cli.engine import EpochRecord
from fa_cli.logger import DEFAULT_EXPERIMENT, PACKAGES, RunInfo, Trackers, Tracking, experiment_name
from fa_cli.run import train
from runs import SMOKE

TAGS = {  # metrics.csv's columns and their TensorBoard tags, as the README lists them
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "lr": "lr",
    "seconds": "epoch_seconds",
}
FINAL = ("test_accuracy", "test_loss", "best_val_accuracy", "best_epoch", "epochs_completed", "wall_seconds")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """results.json's config as MLflow params: dotted keys, strings as they are, the rest as JSON."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


# --- the config group ------------------------------------------------------------------------------


@pytest.fixture
def hydra_conf():
    with initialize_config_module(config_module="fa_cli.conf", version_base=None):
        yield


def settings(*overrides: str) -> LoggerConfig:
    cfg = compose(config_name="train", overrides=list(overrides))
    validate(cfg)
    return logger_settings(cfg)


def test_csv_is_the_default_and_several_loggers_compose_as_a_list(hydra_conf):
    assert settings() == settings("logger=csv") == settings("logger=[]")
    assert settings().tensorboard is None and settings().mlflow is None
    both = settings("logger=[csv,tensorboard,mlflow]")
    assert both.csv is not None and both.tensorboard is not None
    assert both.mlflow == MLflowLoggerConfig(tracking_uri="sqlite:///outputs/mlflow.db", experiment=None)
    named = settings(
        "logger=mlflow", "logger.mlflow.experiment=lenet", "logger.mlflow.tracking_uri=http://h:5000"
    )
    assert named.csv is None and named.mlflow == MLflowLoggerConfig("http://h:5000", "lenet")


def test_tracking_uri_defaults_to_the_environment(hydra_conf, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert settings("logger=mlflow").mlflow.tracking_uri == "http://tracking:5000"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["logger=mlflow", "logger.mlflow.tracking_uri= "], "logger.mlflow.tracking_uri"),
        (["logger=mlflow", "logger.mlflow.experiment=''"], "logger.mlflow.experiment"),
        (["logger=[csv,tensorboard]", "+logger.wandb.project=x"], "logger.wandb"),
    ],
)
def test_bad_logger_settings_name_their_key(hydra_conf, overrides, key):
    with pytest.raises(ConfigError) as error:
        settings(*overrides)
    assert error.value.key == key


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_package_is_a_config_error_naming_the_extra(hydra_conf, monkeypatch, name):
    monkeypatch.setitem(sys.modules, PACKAGES[name][0], None)  # None in sys.modules: not importable
    with pytest.raises(ConfigError) as error:
        settings(f"logger=[csv,{name}]")
    message = str(error.value)
    assert error.value.key == "logger" and f"pip install 'fa-cli[{name}]'" in message and "\n" not in message


def test_a_preset_names_the_experiment_and_the_config_text_is_resolved(hydra_conf, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = ["experiment=smoke", "logger=mlflow"]
    cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    hydra_cfg = cfg.hydra
    with open_dict(cfg):  # the job's config, as @hydra.main passes it
        del cfg["hydra"]
    tracking = Tracking.of(cfg, hydra_cfg)
    assert tracking.experiment == "smoke" and tracking.settings.mlflow is not None
    assert "tracking_uri: sqlite:///outputs/mlflow.db" in tracking.config_text  # ${oc.env:...} resolved


def test_experiment_names_come_from_the_setting_the_preset_or_the_sweep():
    assert experiment_name("mine", "smoke", "outputs/multirun/x") == "mine"
    assert experiment_name(None, "smoke", "outputs/multirun/x") == "smoke"
    assert experiment_name(None, None, "outputs/multirun/x") == "outputs/multirun/x"
    assert experiment_name(None, None, None) == DEFAULT_EXPERIMENT


def test_runs_that_differ_only_in_their_trackers_share_a_summary_row():
    watched = ["logger=[csv,mlflow]", "logger.mlflow.experiment=x"]
    runs = [
        {"method": "bp", "model": "ann", "dataset": "mnist", "seed": seed, "status": "completed",
         "test_accuracy": 97.0, "test_loss": 0.1, "overrides": overrides}
        for seed, overrides in ((0, watched), (1, []))
    ]  # fmt: skip
    (table,) = report.summarize(runs).values()
    assert [(row.settings, row.runs) for row in table] == [("", 2)]


# --- trackers, in-process --------------------------------------------------------------------------


class Failing:
    """A tracker whose server went away after it started."""

    def log_epoch(self, record):
        raise ConnectionError("tracking server unreachable")


class Recording:
    def __init__(self):
        self.epochs = []

    def log_epoch(self, record):
        self.epochs.append(record.epoch)


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning(caplog):
    recording = Recording()
    trackers = Trackers({"mlflow": Failing(), "other": recording})
    record = EpochRecord(1, 1.0, 50.0, 1.0, 50.0, 0.1, 1.0)
    with caplog.at_level(logging.WARNING):
        trackers.log_epoch(record)
        trackers.log_epoch(record)
    assert list(trackers.trackers) == ["other"] and recording.epochs == [1, 1]
    warnings = [r.getMessage() for r in caplog.records if "logger stopped" in r.getMessage()]
    assert len(warnings) == 1 and "mlflow" in warnings[0] and "unreachable" in warnings[0]


def test_a_tracking_store_that_cannot_start_is_a_config_error(tmp_path):
    run = RunInfo(tmp_path, "fa-train", "seed: 0\n", {"seed": 0})
    with pytest.raises(ConfigError) as error:
        Trackers.start(LoggerConfig(mlflow=MLflowLoggerConfig("nosuchscheme://x")), run)
    assert error.value.key == "logger.mlflow" and "\n" not in str(error.value)


# --- runs -----------------------------------------------------------------------------------------


def test_tensorboard_scalars_read_back_equal_metrics_csv(hydra_conf, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # in this process (fa-train's own wiring is the MLflow sweep's test below): seconds, not a startup
    overrides = [*SMOKE, "method=fa", "logger=[csv,tensorboard]", "diagnostics.every=10"]
    cfg = compose(config_name="train", overrides=overrides)
    tracking = Tracking(logger_settings(cfg), config_text=OmegaConf.to_yaml(cfg, resolve=True))
    run_dir = tmp_path / "run"
    assert train(validate(cfg), run_dir, overrides, tracking=tracking)["status"] == "completed"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()

    rows = read_csv(run_dir / "metrics.csv")
    assert len(rows) == 2
    for column, tag in TAGS.items():
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        # TensorBoard keeps scalars as float32: the CSV's value, rounded to float32, exactly
        assert points == [(int(r["epoch"]), np.float32(float(r[column]))) for r in rows], tag

    angles = read_csv(run_dir / "alignment.csv")
    assert angles, "diagnostics.every=10 measured something"
    for row in angles:
        tag = f"alignment/{row['metric']}/{row['layer']}"
        assert np.float32(float(row["degrees"])) in [
            e.value for e in events.Scalars(tag) if e.step == int(row["step"])
        ], tag
    assert sum(len(events.Scalars(t)) for t in events.Tags()["scalars"] if t.startswith("alignment/")) == len(
        angles
    )

    results = json.loads((run_dir / "results.json").read_text())
    assert events.Scalars("test/accuracy")[0].value == np.float32(results["test_accuracy"])
    assert events.Scalars("test/accuracy")[0].step == results["best_epoch"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: fa" in config_text and "train_size: 600" in config_text  # resolved, this run's
    assert results["trackers"]["tensorboard"]["log_dir"] == str(run_dir)


@pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # MLflow's store on SQLAlchemy 2.1
def test_a_sweep_logged_to_sqlite_reads_back_through_the_mlflow_client(fa_train, tmp_path):
    from mlflow.tracking import MlflowClient

    database = tmp_path / "tracking" / "mlflow.db"
    proc = fa_train(
        "-m",
        *SMOKE,
        "method=bp,dfa",
        "logger=[csv,mlflow]",
        f"logger.mlflow.tracking_uri=sqlite:///{database}",
        env={"MLFLOW_DISABLE_TELEMETRY": "true"},  # MLflow's own usage reports: no network in tests
    )
    assert proc.returncode == 0, proc.stderr
    sweep_dir = tmp_path / "sweep"
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiment = client.get_experiment_by_name(str(sweep_dir))  # named from the sweep folder
    assert experiment is not None
    assert experiment.artifact_location == (database.parent / "mlartifacts").as_uri()
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}

    result_files = sorted(sweep_dir.glob("*/results.json"))
    assert len(result_files) == 2
    for path in result_files:
        results = json.loads(path.read_text())
        run = runs.pop(path.parent.name)  # one MLflow run per fa-train run, named like its folder
        assert run.info.run_id == results["trackers"]["mlflow"]["run_id"]
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
        assert run.data.params == flatten(results["config"])
        assert run.data.params["method.name"] == results["method"]
        for key in FINAL:
            assert run.data.metrics[key] == pytest.approx(results[key], abs=0), key

        rows = read_csv(path.parent / "metrics.csv")
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        expected = [(int(r["epoch"]), float(r["val_accuracy"])) for r in rows]
        assert [(m.step, m.value) for m in history] == expected

        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"results.json", "metrics.csv", "config.yaml"} <= artifacts
        stored = Path(client.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "dl")))
        assert json.loads(stored.read_text()) == results

    # what is left is the sweep's summary run, holding the tables that summary.md holds
    (summary,) = runs.values()
    assert summary.info.run_name == f"summary of {sweep_dir}"
    stored = Path(client.download_artifacts(summary.info.run_id, "summary.md", str(tmp_path / "dl")))
    assert stored.read_text() == (sweep_dir / "summary.md").read_text()


def test_a_missing_extra_stops_fa_train_with_one_line_before_training(tmp_path):
    # fa-train as installed, in a Python where mlflow cannot be imported
    hide_mlflow = "import sys; sys.modules['mlflow'] = None; from fa_cli.train import main; main()"
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", hide_mlflow, *SMOKE, "logger=[csv,mlflow]", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'fa-cli[mlflow]'" in lines[0], proc.stderr
    assert not (run_dir / "metrics.csv").exists() and not (tmp_path / "outputs").exists()  # nothing trained


START_TOGETHER = """
import sys, time
from pathlib import Path

import mlflow  # imported first, so that the processes open the new store at the same moment

from fa_cli.config import LoggerConfig, MLflowLoggerConfig
from fa_cli.logger import RunInfo, Trackers

go, run_dir, seed, uri = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
run_dir.mkdir()
while not go.exists():
    time.sleep(0.01)
run = RunInfo(run_dir, "parallel", "seed: 0\\n", {"seed": seed})
trackers = Trackers.start(LoggerConfig(mlflow=MLflowLoggerConfig(uri)), run)
trackers.finish({"status": "completed", "test_accuracy": 50.0 + seed})
"""


def test_parallel_jobs_can_share_a_new_sqlite_store(tmp_path):
    # the jobs of a parallel grid (hydra/launcher=joblib) all open outputs/mlflow.db when it is new
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", START_TOGETHER, str(go), str(tmp_path / f"run{seed}"), str(seed), uri],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(3)
    ]
    while not all((tmp_path / f"run{seed}").exists() for seed in range(3)):
        assert all(job.poll() is None for job in jobs), [job.communicate()[1] for job in jobs]
        time.sleep(0.05)
    go.touch()
    errors = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], errors

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(r.data.metrics["test_accuracy"] for r in runs) == [50.0, 51.0, 52.0]
    assert all(r.info.status == "FINISHED" for r in runs)
