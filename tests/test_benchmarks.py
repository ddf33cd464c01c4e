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

    draw = feedback.redraw_feedback
    out = tmp_path / "speed.md"
    methods = ["bp", "fa", "dfa", "usf", "brsf", "kp"]
    speed.main(
        ["--quick", "--markdown", "--sections", "steps", "settle", "limits", "parts", "--models", "ann"]
        + ["--methods", *methods, "--output", str(out)]
    )
    text = out.read_text()
    assert feedback.redraw_feedback is draw  # the profiler's label is taken off again
    steps = text[text.index("ann (") : text.index("mlp: ms per step by its place")]
    settle = text[text.index("mlp: ms per step by its place") : text.index("Where a step")]
    limits = text[text.index("Where a step") : text.index("What the rounds")]
    for method in methods:
        assert f"| {method} |" in steps and f"| {method} |" in settle and f"| {method} |" in limits
    assert "| method | step 1 | step 2 | step 3 | first / last |" in settle
    brsf = next(line for line in limits.splitlines() if line.startswith("| brsf |"))
    random_numbers = float(brsf.split("|")[6])  # the "random numbers (brsf)" column
    assert random_numbers > 0  # brsf's draws are found and labelled
    assert "| fa, B in W's memory |" in limits  # fa's cost split: its Functions, and a second matrix
    assert "two halves on two threads" in text and "fused" in text
    assert "in order (the floor)" in text and "random order (as in training)" in text


def test_overhead_puts_each_sampled_stack_in_its_part_of_the_epoch(speed):
    # py-spy's raw format: one line per stack, outermost frame first, "function (file:line)".
    def stack(*frames: str) -> list[tuple[str, str]]:
        return [speed.frame_parts(frame) for frame in frames]

    root = ("<module> (fa_cli/train.py:600)", "main (fa_cli/train.py:500)", "Run.fit (fa_cli/run.py:300)")
    fit = (*root, "fit (/x/src/fa_cli/engine.py:109)", "train_epoch (/x/src/fa_cli/engine.py:150)")
    stacks = {
        "math": stack(*fit, "Module._wrapped_call_impl (/v/torch/nn/modules/module.py:1773)"),
        "optimizer": stack(*fit, "SGD.step (/v/torch/optim/sgd.py:80)"),
        "gather": stack(*fit, "gathered (/x/src/fa_cli/engine.py:255)"),
        "loop": stack(*fit),
        "bar": stack(*fit, "ProgressBar.update (fa_cli/logger.py:90)"),
        "files": stack(*root, "Run.end_epoch (fa_cli/run.py:320)", "write_csv (fa_cli/files.py:40)"),
        "once": stack(*root, "load (fa_cli/data.py:100)"),
    }
    loop = speed.epoch_loop(list(stacks.values()))
    assert loop == speed.frame_parts(root[-1])
    parts = {name: speed.epoch_part(parts, loop) for name, parts in stacks.items()}
    assert parts == {
        "math": "math",
        "optimizer": "math",
        "gather": "batch gather (engine.gathered)",
        "loop": "batches, metrics, epoch loop (engine)",
        "bar": "progress bar",
        "files": "metrics.csv, checkpoint, log (run.py)",
        "once": None,
    }


def test_results_doc_gives_one_grid_command_per_recipe():
    # Runs of several sweeps (one recipe per rule) are not one grid: the union of their overrides would
    # claim runs nobody made (fa at dfa's learning rate).
    spec = importlib.util.spec_from_file_location("results_doc", SPEED.with_name("results_doc.py"))
    results_doc = importlib.util.module_from_spec(spec)
    sys.modules["results_doc"] = results_doc  # its dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(results_doc)
    finally:
        sys.modules.pop("results_doc", None)

    def run(method: str, seed: int, *settings: str) -> dict:
        return {"overrides": ["experiment=report_cnn_adamw", f"method={method}", f"seed={seed}", *settings]}

    runs = [run("fa", s, "trainer.epochs=20") for s in (0, 1)]
    runs += [run("dfa", s, "optim.lr=0.003", "trainer.epochs=20", "hydra.job.chdir=false") for s in (0, 1)]
    runs += [run("bp", 0, "trainer.epochs=20")]
    assert results_doc.commands(runs) == [
        "`fa-train -m experiment=report_cnn_adamw method=bp,fa seed=0,1 trainer.epochs=20`",
        "`fa-train -m experiment=report_cnn_adamw method=dfa seed=0,1 optim.lr=0.003 trainer.epochs=20`",
    ]


def test_interleaved_runs_before_untimed_right_before_each_timing(speed, monkeypatch):
    calls = []
    now = [0.0]

    def work(name, seconds):
        def run():
            calls.append(name)
            now[0] += seconds

        return run

    monkeypatch.setattr(speed, "clock", lambda: now[0])
    runs = {"a": work("a", 1.0), "b": work("b", 2.0)}
    before = {"a": work("settle a", 100.0), "b": work("settle b", 100.0)}
    samples = speed.interleaved(runs, 3, speed.torch.device("cpu"), before=before)
    assert samples == {"a": [1.0] * 3, "b": [2.0] * 3}  # the settling steps are not timed
    assert len(calls) == 12
    for settle, run in zip(calls[::2], calls[1::2], strict=True):
        assert settle == f"settle {run}"


def test_interleaved_never_times_a_run_right_after_itself(speed, monkeypatch):
    # Section settle times a network's first steps after another network's: with a plain shuffle per
    # round, the run that ends one round would start the next about once in as many rounds as runs.
    calls = []
    monkeypatch.setattr(speed, "clock", lambda: 0.0)
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    for seed in range(5):
        calls.clear()
        speed.interleaved(runs, 60, speed.torch.device("cpu"), seed=seed)
        assert len(calls) == 180
        assert all(previous != name for previous, name in zip(calls, calls[1:], strict=False))
        rounds = [calls[i : i + 3] for i in range(0, 180, 3)]
        assert all(sorted(order) == ["a", "b", "c"] for order in rounds)
        assert len({tuple(order) for order in rounds}) > 1  # still shuffled


# Random123's kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output (4 words).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((2**32 - 1,) * 4, (2**32 - 1,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KNOWN_ANSWERS)
def test_the_philox_that_parts_times_gives_random123s_known_answers(speed, counter, key, expected):
    # benchmarks/philox.py is brsf's generator before AES: the parts pair must time the real one.
    assert [int(word) for word in speed.philox().philox4x32(*counter, *key)] == list(expected)
