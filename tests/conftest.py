"""Fixtures for the runner's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runs import MNIST_RAW, run_cli


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
