"""Grids on Hydra's launchers: joblib jobs share the cores without oversubscribing them, the shipped
Slurm preset composes, and a grid run through submitit still ends with its summary tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import HydraException

from fa_cli.config import ConfigError
from fa_cli.launcher import JOBLIB, concurrent_jobs, job_threads, threads_per_job
from runs import SMOKE

SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
# Threads left to each job's launcher
UNTHREADED = [arg for arg in SMOKE if not arg.startswith("trainer.threads=")] + ["trainer.epochs=1"]


@pytest.mark.parametrize(
    "n_jobs,cores,threads",
    [(4, 16, 4), (3, 16, 5), (-1, 16, 1), (-2, 16, 1), (-9, 16, 2), (1, 16, 16), (32, 16, 1), (2, 2, 1)],
)
def test_joblib_jobs_times_threads_never_exceed_the_cores(n_jobs: int, cores: int, threads: int) -> None:
    launcher = {"_target_": JOBLIB, "n_jobs": n_jobs}
    assert threads_per_job(launcher, cores) == threads
    jobs = concurrent_jobs(n_jobs, cores)
    # one thread each is the least: more jobs than cores is hydra.launcher.n_jobs's doing (and warned of)
    assert jobs * threads <= cores or threads == 1


def test_joblib_n_jobs_0_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hydra.launcher.n_jobs"):
        threads_per_job({"_target_": JOBLIB, "n_jobs": 0}, 8)


def test_submitit_jobs_take_the_cpus_slurm_grants_and_other_launchers_torchs_default() -> None:
    assert threads_per_job({"_target_": SLURM, "cpus_per_task": 8}) == 8
    assert threads_per_job({"_target_": LOCAL, "cpus_per_task": None}) is None
    assert threads_per_job({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}) is None


def test_threads_asked_for_are_kept_with_a_warning_when_they_oversubscribe(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert job_threads(64, {"_target_": JOBLIB, "n_jobs": 2}) == 64
    assert "slow each other down" in caplog.text
    assert job_threads(3, {"_target_": SLURM, "cpus_per_task": 8}) == 3


def _hydra(*overrides: str):
    with initialize_config_module(config_module="fa_cli.conf", version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra


def test_the_slurm_preset_sets_gpus_memory_time_and_takes_overrides() -> None:
    launcher = _hydra("hydra/launcher=slurm").launcher
    assert launcher._target_ == SLURM
    assert launcher.partition is None  # the cluster's default
    assert (launcher.gpus_per_node, launcher.mem_gb, launcher.timeout_min) == (1, 32, 240)
    assert threads_per_job(launcher) == launcher.cpus_per_task == 8
    hydra = _hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30")
    assert (hydra.launcher.partition, hydra.launcher.timeout_min) == ("gpu", 30)
    with pytest.raises(HydraException, match="partiton"):
        _hydra("hydra/launcher=slurm", "hydra.launcher.partiton=gpu")


def _results(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]


def test_a_joblib_grid_runs_jobs_side_by_side_with_their_share_of_the_cores(fa_train, tmp_path: Path) -> None:
    from joblib import cpu_count

    # joblib divides the cores among its workers only where the environment sets no thread counts: with
    # these set, as on many clusters, two jobs would each start one thread per core but for fa-train's own
    cores = str(cpu_count())
    proc = fa_train(
        "-m", *UNTHREADED, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=bp,fa",
        env={"OMP_NUM_THREADS": cores, "MKL_NUM_THREADS": cores},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path / "sweep")
    assert sorted(r["method"] for r in results) == ["bp", "fa"]
    assert {r["status"] for r in results} == {"completed"}
    assert {r["threads"] for r in results} == {max(1, cpu_count() // 2)}
    assert "| BP |" in (tmp_path / "sweep" / "summary.md").read_text()


def test_a_submitit_grid_ends_with_the_summary(fa_train, tmp_path: Path) -> None:
    proc = fa_train(
        "-m", *UNTHREADED, "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5", "method=bp,dfa",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    results = _results(sweep)
    assert sorted(r["method"] for r in results) == ["bp", "dfa"]
    assert {(r["status"], r["threads"]) for r in results} == {("completed", 1)}
    assert (sweep / ".submitit").is_dir()  # the jobs ran through submitit, each in its own process
    summary = (sweep / "summary.md").read_text()
    assert "| BP |" in summary and "| DFA |" in summary
