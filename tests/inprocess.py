"""Runs trained in the test process: configs composed with Hydra's compose API, then ``fa_cli.run.train``
(imported by the diagnostics' and attacks' tests; seconds each, on generated data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module

from fa_cli.config import RunConfig, validate
from fa_cli.run import train

TINY = [
    "dataset=synthetic",
    "dataset.train_size=400",
    "dataset.test_size=200",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "trainer.threads=1",
    "diagnostics.plots=false",
]


def compose_run(*overrides: str) -> RunConfig:
    """``conf/train.yaml`` with ``overrides``, composed and validated."""
    with initialize_config_module(config_module="fa_cli.conf", version_base=None):
        return validate(compose(config_name="train", overrides=list(overrides)))


def config(*overrides: str) -> RunConfig:
    return compose_run(*TINY, *overrides)


def run(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """Train ``TINY`` plus ``overrides`` into ``run_dir``; returns results.json's contents."""
    return train(config(*overrides), run_dir, list(overrides))
