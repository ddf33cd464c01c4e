"""benchmarks/speed.py is a script, not a test, but it calls into the library (and patches it to
label brsf's draws): a quick run of its CPU sections keeps it working as the library moves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture
def speed():
    spec = importlib.util.spec_from_file_location("speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed"] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)
    sys.modules.pop("speed", None)


def test_speed_quick_cpu_sections_report_every_rule(speed, tmp_path):
    from fa_cli.alignment import feedback

    draw = feedback.drawn_magnitudes
    out = tmp_path / "speed.md"
    methods = ["bp", "fa", "dfa", "usf", "brsf", "kp"]
    speed.main(
        ["--quick", "--markdown", "--sections", "steps", "limits", "parts", "--models", "ann"]
        + ["--methods", *methods, "--output", str(out)]
    )
    text = out.read_text()
    assert feedback.drawn_magnitudes is draw  # the profiler's label is taken off again
    steps = text[text.index("ann (") : text.index("Where a step")]
    limits = text[text.index("Where a step") : text.index("What the second")]
    for method in methods:
        assert f"| {method} |" in steps and f"| {method} |" in limits
    brsf = next(line for line in limits.splitlines() if line.startswith("| brsf |"))
    random_numbers = float(brsf.split("|")[6])  # the "random numbers (brsf)" column
    assert random_numbers > 0  # brsf's draws are found and labelled
    assert "two halves on two threads" in text and "fused" in text
