"""Fixtures for the runner's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runs import MNIST_RAW, run_cli


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # -n auto: one worker per core this process may use (joblib counts CPU sets and cgroup quotas,
    # as in a container), at most 8: each worker holds its own torch (a few hundred MB), and more
    # would wait on the few long end-to-end tests anyway. PYTEST_XDIST_AUTO_NUM_WORKERS still decides.
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    import joblib

    return min(8, joblib.cpu_count())


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist (pyproject's addopts) runs one worker per core: a worker's torch on every core
    # besides would put several threads on each core, and torch's threads slow down many times when
    # they share a core (resnet18's test: 3.6 s alone, 25 s with two workers of two threads).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def fa_train(tmp_path: Path):
    """Run fa-train from a scratch folder; single runs go to tmp_path/run, sweeps to tmp_path/sweep."""

    def run(*args: str, env: dict[str, str] | None = None):
        return run_cli(
            "fa_cli.train",
            *args,
            f"hydra.run.dir={tmp_path / 'run'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            cwd=tmp_path,
            env=env,
        )

    return run


@pytest.fixture
def mnist_root() -> Path:
    """The folder holding MNIST/raw/, from FA_DATA_DIR; the test is skipped without it."""
    root = os.environ.get("FA_DATA_DIR")
    if not root or not all((Path(root) / "MNIST" / "raw" / name).is_file() for name in MNIST_RAW):
        pytest.skip("real MNIST not found: set FA_DATA_DIR to a folder holding MNIST/raw/")
    return Path(root)
