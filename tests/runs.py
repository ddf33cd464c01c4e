"""fa-train and fa-report as subprocesses, with tiny settings (imported by the runner's tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Seconds-long runs on generated data. One thread: tiny models gain nothing from two, and two threads
# slow down many times when another process (a second test, a build) is busy on a 2-core machine.
SMOKE = [
    "dataset=synthetic",
    "dataset.train_size=600",
    "dataset.test_size=200",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "trainer.threads=1",
    "diagnostics.plots=false",  # a second of drawing per run; tests/test_plots.py turns it back on
]
MNIST_RAW = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def run_cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    """``python -m <module> args...`` in ``cwd``; returns the CompletedProcess (text, both streams)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_code(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -c <code> args...``, for what needs a fresh interpreter (imports, modules hidden)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def start_cli(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    """``python -m <module> args...`` in ``cwd``, started and not waited for, for a test that interrupts
    it: stdout dropped, stderr kept (text), and SIGINT at its default action in the child."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    # A test runner started in the background (cmd &, nohup) ignores SIGINT, its children inherit
    # that, and Python leaves an inherited ignored SIGINT ignored, so the test's Ctrl-C would be lost.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
