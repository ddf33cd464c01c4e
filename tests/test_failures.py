"""Failure handling (issue 6): divergence, interruption and resume, skipping finished runs, bad data
files, bad configs and unsafe checkpoints. Each case checks the exit code (or exception), the message,
and that files written before are intact."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from fa_cli import data, engine
from fa_cli import files as fa_files
from fa_cli import run as runner
from fa_cli.config import ConfigError, FilesDatasetConfig, SGDConfig, SyntheticDatasetConfig, validate
from fa_cli.files import checkpoint_bytes, write_bytes
from fa_cli.folders import FolderTaken
from fa_cli.optim import build_scheduler
from fa_cli.train import _interrupt
from runs import SMOKE, run_cli, start_cli

CPU = torch.device("cpu")


def metrics(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the timings, which no two runs share."""
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def outcome(run_dir: Path) -> tuple:
    """What an interrupted-and-resumed run must share with an uninterrupted one."""
    r = results(run_dir)
    scores = (r["test_accuracy"], r["test_loss"], r["best_val_accuracy"], r["best_epoch"])
    return (r["status"], r["epochs_completed"], *scores, metrics(run_dir))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fa-train: error: "), stderr
    return lines[0].removeprefix("fa-train: error: ")


# --- in-process runs ------------------------------------------------------------------------------

TINY = [
    "dataset=synthetic",
    "dataset.train_size=300",
    "dataset.test_size=100",
    "trainer.epochs=3",
    "trainer.batch_size=32",
    "optim.schedule=step",  # a schedule whose state matters: the lr halves every epoch
    "optim.step_size=1",
    "optim.gamma=0.5",
]


@pytest.fixture
def make():
    """A validated run config from TINY plus overrides, composed as fa-train composes it."""
    with initialize_config_module(config_module="fa_cli.conf", version_base=None):
        yield lambda *overrides: validate(compose(config_name="train", overrides=[*TINY, *overrides]))


@pytest.fixture
def interrupt_at(monkeypatch):
    """Make the next run's progress callback raise KeyboardInterrupt (as Ctrl-C does) at a given step of a
    given epoch: mid-epoch, after the checkpoints of the epochs before it."""

    def arm(epoch: int, step: int) -> None:
        monkeypatch.setattr(engine, "REFRESH_SECONDS", 0.0)  # the callback runs after every step
        update = runner.ProgressBar.update

        def update_or_interrupt(self, at_epoch, at_step, *args):
            if (at_epoch, at_step) == (epoch, step):
                monkeypatch.setattr(runner.ProgressBar, "update", update)  # once
                raise KeyboardInterrupt
            update(self, at_epoch, at_step, *args)

        monkeypatch.setattr(runner.ProgressBar, "update", update_or_interrupt)

    return arm


# The rules with state of their own: kp's trained feedback (and its momentum), dfa's projections made at
# the first forward, brsf's per-batch draws from the global RNG, shallow's frozen layers. (bp, fa, usf
# and frsf hold only fixed buffers, restored as the model is.) Plus the schedule and the batch order.
@pytest.mark.parametrize("method", ["kp", "dfa", "brsf", "shallow"])
def test_a_resumed_run_ends_as_if_never_interrupted(make, interrupt_at, tmp_path, method):
    runner.train(make(f"method={method}"), tmp_path / "whole")
    interrupt_at(epoch=2, step=4)
    with pytest.raises(KeyboardInterrupt):
        runner.train(make(f"method={method}"), tmp_path / "cut")
    cut = results(tmp_path / "cut")
    assert cut["status"] == "interrupted" and cut["epochs_completed"] == 1
    assert len(metrics(tmp_path / "cut")) == 1

    resume = f"trainer.resume={tmp_path / 'cut'}"
    resumed = runner.train(make(f"method={method}", resume), tmp_path / "resumed")
    assert resumed["resumed_from"] == {"checkpoint": str(tmp_path / "cut"), "epoch": 1}
    assert outcome(tmp_path / "resumed") == outcome(tmp_path / "whole")
    assert results(tmp_path / "cut")["status"] == "interrupted", "the interrupted run's folder is kept"


def test_resuming_in_place_keeps_the_earlier_epochs(make, interrupt_at, tmp_path):
    runner.train(make(), tmp_path / "whole")
    interrupt_at(epoch=3, step=2)
    with pytest.raises(KeyboardInterrupt):
        runner.train(make(), tmp_path / "run")
    runner.train(make(f"trainer.resume={tmp_path / 'run' / 'checkpoint.pt'}"), tmp_path / "run")
    assert outcome(tmp_path / "run") == outcome(tmp_path / "whole")


def before_each_checkpoint_write(monkeypatch, action) -> None:
    """Call ``action(path)`` on the run's file thread before each checkpoint.pt is written."""
    write = fa_files.write_bytes

    def write_after_action(path, data):
        if path.name == "checkpoint.pt":
            action(path)
        write(path, data)

    monkeypatch.setattr(fa_files, "write_bytes", write_after_action)


@pytest.mark.parametrize("epochs", [1, 3])
def test_a_run_whose_checkpoint_cannot_be_written_fails_naming_why(make, tmp_path, monkeypatch, epochs):
    # Epoch files are written by a thread while the next epoch trains: a failure stops the run at the
    # next epoch's end, or, after the last epoch, at the end of the run; never silently.
    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    before_each_checkpoint_write(monkeypatch, disk_full)
    cfg = make(f"trainer.epochs={epochs}")
    if epochs > 1:
        with pytest.raises(OSError, match="No space left"):
            runner.train(cfg, tmp_path / "run")
    else:
        runner.train(cfg, tmp_path / "run")
    done = results(tmp_path / "run")
    assert done["status"] == "failed" and "No space left on device" in done["error"]
    assert done["epochs_completed"] == 1, "an epoch after the failed write is not counted"
    assert len(metrics(tmp_path / "run")) == 1, "written before the checkpoint, in the first epoch's batch"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_interrupt_while_the_last_files_are_written_still_records_the_run(make, tmp_path, monkeypatch):
    # Ctrl-C while finish waits for a slow checkpoint write (as a second Ctrl-C, after the first stopped
    # the run, would): results.json must still say how the run ended, and the interrupt stop the caller.
    def slow_then_interrupted(path):
        time.sleep(0.5)  # the main thread meanwhile tests the model and waits in finish
        os.kill(os.getpid(), signal.SIGINT)

    before_each_checkpoint_write(monkeypatch, slow_then_interrupted)
    previous = signal.signal(signal.SIGINT, _interrupt)  # as fa-train's main installs for SIGTERM
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.train(make("trainer.epochs=1"), tmp_path / "run")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert results(tmp_path / "run")["status"] in ("completed", "interrupted")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert (tmp_path / "run" / "curves.png").is_file(), "the figures are drawn after results.json still"


def test_resume_refuses_another_config_naming_the_differences(make, tmp_path):
    runner.train(make("trainer.epochs=1"), tmp_path / "first", overrides=["trainer.epochs=1"])
    before = snapshot(tmp_path / "first")
    with pytest.raises(ConfigError) as error:
        runner.train(make("optim.lr=0.5", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "first")
    message = str(error.value)
    assert message.startswith(f"trainer.resume: {tmp_path / 'first' / 'checkpoint.pt'} was trained with")
    assert "optim.lr: 0.01 -> 0.5" in message and "trainer.epochs: 1 -> 3" in message
    hint = f"resume it with its own overrides: fa-train trainer.epochs=1 trainer.resume={tmp_path / 'first'}"
    assert message.endswith(hint) and "\n" not in message
    assert snapshot(tmp_path / "first") == before


def test_a_random_shift_as_wide_as_the_images_is_refused(make, tmp_path):
    with pytest.raises(ConfigError, match=r"^dataset.random_shift: 28 pixels would .*: at most 27$"):
        runner.train(make("dataset.random_shift=28"), tmp_path / "run")


def test_resume_from_a_folder_without_checkpoint_says_so(make, tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.resume: /dev/null: not a file$"):
        runner.train(make("trainer.resume=/dev/null"), tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^trainer.resume: .*empty: no checkpoint.pt in that folder"):
        runner.train(make(f"trainer.resume={tmp_path / 'empty'}"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^trainer.resume: .*nowhere: no such file"):
        runner.train(make(f"trainer.resume={tmp_path / 'nowhere'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "nothing written for a run that never started"


def test_resuming_reads_the_earlier_angles_or_names_the_line_it_cannot(make, tmp_path):
    first = make("trainer.epochs=1", "diagnostics.every=3")
    done = runner.train(first, tmp_path / "first")
    assert done["alignment"] is not None
    # Nothing left to train: the results keep the last measured angles.
    again = runner.train(
        make("trainer.epochs=1", "diagnostics.every=3", f"trainer.resume={tmp_path / 'first'}"),
        tmp_path / "again",
    )
    assert again["alignment"] == done["alignment"]
    angles = tmp_path / "first" / "alignment.csv"
    angles.write_text(angles.read_text() + "garbage,,,\n")
    lines = len(angles.read_text().splitlines())
    with pytest.raises(ConfigError) as error:
        runner.train(
            make("trainer.epochs=1", "diagnostics.every=3", f"trainer.resume={tmp_path / 'first'}"),
            tmp_path / "run",
        )
    assert str(error.value).startswith(f"trainer.resume: {angles} line {lines} is not a row of step, epoch, ")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.batch_size=1", "trainer.batch_size: 1 cannot train resnet18: BatchNorm needs 2 examples"),
        ("dataset.subset=2", "dataset: 1 training example cannot train resnet18: BatchNorm needs 2"),
    ],
)
def test_batchnorm_with_one_example_a_batch_is_a_config_error(make, tmp_path, override, message):
    cfg = make("model=torchvision", "model.name=resnet18", "trainer.epochs=1", override)
    with pytest.raises(ConfigError) as error:
        runner.train(cfg, tmp_path / "run")
    assert str(error.value).startswith(message)


def test_a_truncated_checkpoint_is_refused(make, tmp_path):
    runner.train(make("trainer.epochs=1"), tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"^trainer.resume: .* is not a readable checkpoint \(truncated"):
        runner.train(make("trainer.epochs=1", f"trainer.resume={checkpoint}"), tmp_path / "run")


@pytest.mark.parametrize("skip_completed", [False, True])
def test_a_folder_holding_another_configs_run_is_never_written_into(make, tmp_path, skip_completed):
    runner.train(make("trainer.epochs=1"), tmp_path / "run")
    before = snapshot(tmp_path / "run")
    taken = rf"^{tmp_path / 'run'}: holds a run of another config \(trainer.epochs: 1 -> 2\); not writing"
    with pytest.raises(FolderTaken, match=taken):
        runner.train(make("trainer.epochs=2", f"trainer.skip_completed={skip_completed}"), tmp_path / "run")
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("damage", ["removed", "cut short"])
def test_without_readable_results_the_checkpoint_tells_whose_run_a_folder_holds(make, tmp_path, damage):
    runner.train(make("trainer.epochs=1"), tmp_path / "run")
    found = tmp_path / "run" / "results.json"
    if damage == "removed":
        found.unlink()
    else:
        found.write_text(found.read_text()[:50])
    before = snapshot(tmp_path / "run")
    with pytest.raises(FolderTaken, match=r"holds a run of another config \(trainer.epochs: 1 -> 2\)"):
        runner.train(make("trainer.epochs=2"), tmp_path / "run")
    assert snapshot(tmp_path / "run") == before
    # The same config with skip_completed: an interrupted run, resumed from its checkpoint.
    resumed = runner.train(make("trainer.epochs=1", "trainer.skip_completed=true"), tmp_path / "run")
    assert resumed["status"] == "completed" and resumed["resumed_from"]["epoch"] == 1
    (tmp_path / "run" / "results.json").unlink()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04 and then nothing")
    with pytest.raises(FolderTaken, match=r"holds a checkpoint.pt that cannot be read \("):
        runner.train(make("trainer.epochs=1"), tmp_path / "run")


def test_a_run_into_another_configs_folder_is_refused_before_hydra_writes_there(fa_train, tmp_path):
    assert fa_train(*SMOKE, "trainer.epochs=1").returncode == 0
    before = snapshot(tmp_path / "run")  # .hydra/ and train.log included
    proc = fa_train(*SMOKE, "trainer.epochs=1", "method=fa")
    assert proc.returncode == 2
    message = one_error_line(proc.stderr)
    assert message.startswith(f"{tmp_path / 'run'}: holds a run of another config (method.name: bp -> fa")
    assert snapshot(tmp_path / "run") == before
    # The same config again is a rerun, as before: it may write there.
    assert fa_train(*SMOKE, "trainer.epochs=1").returncode == 0


def test_a_grid_into_another_grids_folder_is_refused_before_any_job_writes(fa_train, tmp_path):
    grid = ["-m", *SMOKE, "trainer.epochs=1", "method=bp,fa"]
    assert fa_train(*grid).returncode == 0
    before = snapshot(tmp_path / "sweep")  # multirun.yaml, each job's .hydra/, summary.md included
    proc = fa_train(*grid, "optim.lr=0.05")
    assert proc.returncode == 2
    message = one_error_line(proc.stderr)
    job = tmp_path / "sweep" / "0_synthetic_ann_bp_seed0"
    assert message.startswith(f"{job}: holds a run of another config (optim.lr: 0.01 -> 0.05)")
    assert "(job dataset=synthetic " in message and message.endswith(" method=bp optim.lr=0.05)")
    assert snapshot(tmp_path / "sweep") == before


@pytest.mark.parametrize("name", ["metrics.csv", "results.json", "train.log"])
def test_resume_from_a_file_that_is_no_checkpoint_says_so(make, tmp_path, name):
    runner.train(make("trainer.epochs=1"), tmp_path / "first")
    (tmp_path / "first" / "train.log").write_text("[INFO] epoch 1/1\n")
    named = tmp_path / "first" / name
    with pytest.raises(ConfigError) as error:
        runner.train(make("trainer.epochs=1", f"trainer.resume={named}"), tmp_path / "run")
    why = "torch.save writes a zip archive; this file is not one"
    assert str(error.value) == f"trainer.resume: {named} is not a checkpoint ({why})"


def test_skip_completed_names_itself_when_the_checkpoint_it_chose_is_unreadable(make, tmp_path):
    runner.train(make("trainer.epochs=1"), tmp_path / "run")
    stopped = {**results(tmp_path / "run"), "status": "interrupted"}  # as a killed job leaves it
    (tmp_path / "run" / "results.json").write_text(json.dumps(stopped))
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ConfigError) as error:
        runner.train(make("trainer.epochs=1", "trainer.skip_completed=true"), tmp_path / "run")
    assert str(error.value).startswith(
        f"trainer.skip_completed: the unfinished run's checkpoint cannot be resumed: {checkpoint} is not a "
        "readable checkpoint"
    )


def test_skip_completed_reruns_a_run_that_failed_before_it_started(make, tmp_path):
    # What fa-train records for a job that failed on its config: no config, no result to keep.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"status": "failed", "error": "model: ..."}')
    rerun = runner.train(make("trainer.epochs=1", "trainer.skip_completed=true"), tmp_path / "run")
    assert rerun["status"] == "completed" and "resumed_from" not in rerun


# --- divergence -----------------------------------------------------------------------------------


def test_max_loss_stops_a_finite_blow_up(tmp_path):
    # lr=3 with momentum: the loss climbs to 1e27 over three epochs before it overflows; the bound
    # stops it in the first.
    synthetic = SyntheticDatasetConfig(name="synthetic", train_size=600, test_size=200, noise=4.0)
    splits = data.load(synthetic, CPU, seed=0)

    def fit(max_loss: float | None) -> list[engine.EpochRecord]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9)
        scheduler = build_scheduler(SGDConfig(lr=3.0, momentum=0.9), optimizer, 3)
        generator = torch.Generator().manual_seed(0)
        return list(
            engine.fit(
                model, optimizer, scheduler, splits, epochs=3, batch_size=32, eval_batch_size=1000,
                generator=generator, max_loss=max_loss,
            )
        )  # fmt: skip

    assert [r.train_loss > 1e6 for r in fit(None)] == [True, True, True]  # finite, and no use
    with pytest.raises(engine.Diverged) as error:
        fit(100.0)
    assert error.value.epoch == 1 and error.value.step > 1 and 100 < error.value.loss < 1e6
    expected = f"training loss {error.value.loss:.4g} exceeds max_loss=100 at epoch 1, step"
    assert str(error.value).startswith(expected)


def test_max_loss_makes_a_run_diverged(fa_train, tmp_path):
    # The first batches' loss is about ln(10) = 2.3, above this bound.
    proc = fa_train(*SMOKE, "trainer.max_loss=1.5")
    assert proc.returncode == 3, proc.stderr
    r = results(tmp_path / "run")
    assert r["status"] == "diverged" and r["test_accuracy"] is None and r["epochs_completed"] == 0
    assert r["diverged_at"]["epoch"] == 1 and r["diverged_at"]["step"] >= 1 and r["diverged_at"]["loss"] > 1.5
    assert "exceeds max_loss=1.5" in proc.stdout + proc.stderr
    assert metrics(tmp_path / "run") == [], "metrics.csv is there, with its header"


@pytest.mark.parametrize(("val_fraction", "split"), [(0.1, "validation"), (0.0, "test")])
def test_a_loss_that_overflows_outside_training_makes_a_run_diverged(make, tmp_path, val_fraction, split):
    # lr=1e8: every training batch's loss stays finite (up to about 1e28), but the weights then make
    # the logits overflow, so the validation (or, without one, the test) loss is NaN.
    overrides = ["model=mlp", "model.widths=[32]", "trainer.batch_size=128", "trainer.epochs=1"]
    cfg = make(*overrides, "optim.lr=1e8", f"dataset.val_fraction={val_fraction}")
    r = runner.train(cfg, tmp_path / "run")
    assert r["status"] == "diverged" and r["test_loss"] is None and r["test_accuracy"] is None
    assert r["diverged_at"] == {"epoch": 1, "step": None, "loss": "nan", "split": split}
    text = (tmp_path / "run" / "results.json").read_text()
    json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} is not standard JSON"))


def test_results_json_writes_numbers_that_are_not_finite_as_words(tmp_path):
    from fa_cli.files import write_json

    nan, inf = float("nan"), float("inf")
    write_json(tmp_path / "r.json", {"a": nan, "b": [1.5, -inf], "c": {"d": inf}})
    expected = {"a": "nan", "b": [1.5, "-inf"], "c": {"d": "inf"}}
    assert json.loads((tmp_path / "r.json").read_text()) == expected


def test_a_diverged_job_is_shown_in_the_sweep_summary_not_averaged(fa_train, tmp_path):
    proc = fa_train("-m", *SMOKE, "trainer.epochs=1", "optim.lr=0.01,1e12")
    assert proc.returncode == 1
    assert "1 of 2 runs did not complete (1 diverged)" in proc.stderr
    sweep = tmp_path / "sweep"
    statuses = sorted(results(p.parent)["status"] for p in sweep.glob("*/results.json"))
    assert statuses == ["completed", "diverged"]
    summary = (sweep / "summary.md").read_text()
    huge = "optim.lr=1000000000000.0"  # as Hydra writes a grid's value
    assert f"| BP | {huge} | — | — | 0 of 1 (1 diverged) |" in summary
    rows = {r["settings"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows[huge]["completed"] == "0" and rows[huge]["test_accuracy_mean"] == ""
    assert rows[huge]["statuses"] == "diverged:1"
    assert float(rows["optim.lr=0.01"]["test_accuracy_mean"]) > 0 and "nan" not in summary.lower()


# --- interruption: real signals -------------------------------------------------------------------

# Long enough (12 epochs of a tenth of a second or more each) that a signal sent within milliseconds of
# the first checkpoint lands well before the end, even on a busy machine.
EPOCHS = 12
LONG = [*SMOKE, "dataset.train_size=1000", f"trainer.epochs={EPOCHS}", "method=brsf", "optim.schedule=cosine"]


def interrupt_when(proc: subprocess.Popen, checkpoint: Path, signum: int = signal.SIGINT) -> str:
    """Send ``signum`` to ``proc`` as soon as ``checkpoint`` exists (an epoch has ended); its stderr."""
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return stderr


def test_ctrl_c_then_resume_gives_the_uninterrupted_runs_metrics(tmp_path):
    whole, cut, resumed = tmp_path / "whole", tmp_path / "cut", tmp_path / "resumed"
    proc = start_cli("fa_cli.train", *LONG, f"hydra.run.dir={cut}", cwd=tmp_path)
    stderr = interrupt_when(proc, cut / "checkpoint.pt")
    assert proc.returncode == 130 and stderr.strip().endswith("fa-train: interrupted"), stderr
    interrupted = results(cut)
    assert interrupted["status"] == "interrupted" and 1 <= interrupted["epochs_completed"] < EPOCHS
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == interrupted["epochs_completed"]

    again = run_cli("fa_cli.train", *LONG, f"trainer.resume={cut}", f"hydra.run.dir={resumed}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert results(resumed)["resumed_from"]["epoch"] == interrupted["epochs_completed"]
    assert run_cli("fa_cli.train", *LONG, f"hydra.run.dir={whole}", cwd=tmp_path).returncode == 0
    assert outcome(resumed) == outcome(whole)
    assert outcome(whole)[0:2] == ("completed", EPOCHS)


def test_a_relaunched_grid_keeps_finished_runs_and_resumes_the_interrupted_one(tmp_path):
    sweep = tmp_path / "sweep"
    job_dir = [sweep / f"{job}_synthetic_ann_bp_seed0" for job in range(3)]
    grid = ["-m", *LONG, "method=bp", "optim.lr=1e12,0.01,0.02", f"hydra.sweep.dir={sweep}"]
    proc = start_cli("fa_cli.train", *grid, cwd=tmp_path)
    stderr = interrupt_when(proc, job_dir[2] / "checkpoint.pt")  # in the third job: one diverged, one done
    assert proc.returncode == 130, stderr
    assert [results(folder)["status"] for folder in job_dir] == ["diverged", "completed", "interrupted"]
    epochs_before = results(job_dir[2])["epochs_completed"]
    # The runs' own files (Hydra rewrites .hydra/ and appends to train.log for every job it launches).
    kept = ("results.json", "metrics.csv", "checkpoint.pt")

    def own_files(job: int) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in job_dir[job].iterdir() if p.name in kept}

    finished = {job: own_files(job) for job in (0, 1)}
    assert len(finished[0]) == 2 and len(finished[1]) == 3  # the diverged run never ended an epoch

    again = run_cli("fa_cli.train", *grid, "trainer.skip_completed=true", cwd=tmp_path)
    assert again.returncode == 1, again.stderr  # the diverged run still did not complete
    assert "1 of 3 runs did not complete (1 diverged)" in again.stderr
    for job, files in finished.items():
        assert own_files(job) == files, "a finished run is kept byte for byte"
    third = results(job_dir[2])
    assert third["status"] == "completed" and third["epochs_completed"] == EPOCHS
    assert third["resumed_from"]["epoch"] == epochs_before
    assert len(metrics(job_dir[2])) == EPOCHS
    summary = (sweep / "summary.md").read_text()
    assert "| BP | optim.lr=0.02 | " in summary and "skip_completed" not in summary


# --- unsafe checkpoints ---------------------------------------------------------------------------


class RunsCode:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_pickled_objects_is_refused_never_run(fa_train, tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    write_bytes(checkpoint, checkpoint_bytes({"epoch": 1, "model": RunsCode(marker)}))
    before = checkpoint.read_bytes()
    proc = fa_train(*SMOKE, f"trainer.resume={checkpoint}")
    assert proc.returncode == 2
    message = one_error_line(proc.stderr)
    assert message.startswith(f"trainer.resume: {checkpoint} carries pickled Python objects (getattr)")
    assert "refused" in message and "weights_only=True" in message
    assert not marker.exists(), "the pickled call never ran"
    assert checkpoint.read_bytes() == before


# --- bad data files -------------------------------------------------------------------------------


def idx(count: int, *item_shape: int, fill: int = 0) -> bytes:
    """An idx file of unsigned bytes: magic 0x0000080N, the dimensions, then the values."""
    dims = (count, *item_shape)
    values = bytes([fill]) * (count * int(torch.tensor(item_shape).prod()) if item_shape else count)
    return struct.pack(f">4B{len(dims)}I", 0, 0, 8, len(dims), *dims) + values


def fake_mnist(root: Path) -> Path:
    """A well-formed MNIST of 20 training and 10 test digits in ``root``/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 20), ("t10k", 10)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx(count, 28, 28, fill=7))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(count, fill=3))
    return raw


def test_a_well_formed_fake_mnist_loads(tmp_path):
    fake_mnist(tmp_path)
    d = data.load(FilesDatasetConfig(name="mnist", root=str(tmp_path), val_fraction=0.1), CPU, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (18, 2, 10)


BAD_FILES = {
    "truncated": (
        lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(idx(20, 28, 28)[:5000]),
        "train-images-idx3-ubyte is truncated: its header announces 20 items (15696 bytes), the file has "
        "5000 bytes",
    ),
    "count mismatch": (
        lambda raw: (raw / "t10k-labels-idx1-ubyte").write_bytes(idx(9, fill=3)),
        "t10k-images-idx3-ubyte holds 10 images but {raw}/t10k-labels-idx1-ubyte holds 9 labels",
    ),
    "corrupt": (
        lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(b"<html>Not Found</html>"),
        "train-labels-idx1-ubyte is not an idx file of 1-d unsigned bytes (it starts with 3c68746d)",
    ),
    "empty": (
        lambda raw: (raw / "t10k-images-idx3-ubyte").write_bytes(b""),
        "t10k-images-idx3-ubyte is not an idx file of 3-d unsigned bytes (it starts with nothing",
    ),
    "gzipped": (
        lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08\x00rest"),
        "train-images-idx3-ubyte is gzip-compressed: gunzip it",
    ),
    "label range": (
        lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(idx(20, fill=12)),
        "train-labels-idx1-ubyte holds label 12; labels must be 0 to 9",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_files_are_named(tmp_path, case):
    spoil, message = BAD_FILES[case]
    raw = fake_mnist(tmp_path)
    spoil(raw)
    with pytest.raises(data.DataError) as error:
        data.load(FilesDatasetConfig(name="mnist", root=str(tmp_path)), CPU, seed=0)
    assert str(raw) in str(error.value) and message.format(raw=raw) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["truncated", "count mismatch", "corrupt"])
def test_fa_train_stops_on_bad_data_in_one_line_leaving_the_files(fa_train, tmp_path, case):
    spoil, message = BAD_FILES[case]
    raw = fake_mnist(tmp_path / "data")
    spoil(raw)
    before = snapshot(raw)
    proc = fa_train("dataset=mnist", f"dataset.root={tmp_path / 'data'}", "trainer.epochs=1")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith(str(raw)) and message.format(raw=raw) in line
    assert snapshot(raw) == before, "the data files are neither replaced nor removed"
    r = results(tmp_path / "run")
    assert r["status"] == "failed" and r["error"] == line


def test_a_missing_file_offline_is_named(tmp_path, monkeypatch):
    raw = fake_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setattr(data, "_online", lambda url, timeout=3.0: False)
    missing = r"t10k-labels-idx1-ubyte not found in .*MNIST/raw and no network"
    with pytest.raises(data.DataError, match=missing):
        data.load(FilesDatasetConfig(name="mnist", root=str(tmp_path)), CPU, seed=0)
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]


# --- bad configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        # (test_cli covers optim.lr, trainer.batch_size, method= and an unknown torchvision name.)
        (["trainer.epochs=0"], "trainer.epochs: must be > 0, got 0"),
        (["trainer.max_loss=0"], "trainer.max_loss: must be > 0, got 0.0"),
        (["dataset=mnst"], "dataset=mnst: no such option (did you mean mnist?); choose one of: cifar10, "),
        (["model=mpl"], "model=mpl: no such option (did you mean mlp?); choose one of: ann, cnn, lenet, "),
        (
            ["-m", "seed=0,1", "trainer.resume=outputs/x"],
            "trainer.resume: continues one run, not a grid: relaunch the grid with hydra.sweep.dir=",
        ),
        # The runner gives dfa the dataset's class count and checks, before any data loads, that the
        # model returns one (batch, classes) tensor: googlenet returns a tuple while it trains.
        (
            ["model=torchvision", "model.name=googlenet", "method=dfa"],
            "model: googlenet must return (batch, 10) logits, returned GoogLeNetOutputs",
        ),
    ],
)
def test_bad_configs_stop_before_data_loads_leaving_earlier_files(fa_train, tmp_path, args, message):
    # An earlier run's files in the run folder, which a config error must not touch.
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "results.json").write_text('{"status": "completed", "test_accuracy": 97.5}\n')
    (earlier / "metrics.csv").write_text("epoch,train_loss\n1,0.3\n")
    before = snapshot(earlier)
    # (torchvision warns on stderr that googlenet's default initialisation will change: not the error.)
    quiet = {"PYTHONWARNINGS": "ignore::FutureWarning"}
    proc = fa_train(*args, "dataset.root=/nonexistent", env=quiet)  # reading data would fail otherwise
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith(message)
    after = snapshot(earlier)
    assert {k: after[k] for k in before} == before
    assert not list(tmp_path.glob("sweep/*/results.json")), "no job of a bad grid starts"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_fails_a_grid_before_its_first_job(fa_train, tmp_path):
    proc = fa_train("-m", *SMOKE, "seed=0,1", "trainer.device=cuda")
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith("trainer.device: cuda but CUDA is not available")
    assert not list(tmp_path.glob("sweep/*/results.json"))


def test_resuming_in_place_from_data_that_fails_keeps_the_finished_runs_files(fa_train, tmp_path):
    # dataset.root may change between a run and its resumption (it names where the data is, not what
    # it is), so this is the same config: the run starts, and its data fails to load.
    fake_mnist(tmp_path / "data")
    mnist = ["dataset=mnist", "trainer.epochs=1", "trainer.threads=1", "diagnostics.plots=false"]
    assert fa_train(*mnist, f"dataset.root={tmp_path / 'data'}").returncode == 0
    before = snapshot(tmp_path / "run")
    resume = [f"trainer.resume={tmp_path / 'run'}", f"dataset.root={tmp_path / 'elsewhere'}"]
    proc = fa_train(*mnist, *resume)
    assert proc.returncode == 2
    assert "not found in" in one_error_line(proc.stderr)
    own = ("results.json", "metrics.csv", "checkpoint.pt")
    assert {k: v for k, v in snapshot(tmp_path / "run").items() if k in own} == {
        k: v for k, v in before.items() if k in own
    }
    assert results(tmp_path / "run")["status"] == "completed"


@pytest.mark.parametrize("grid", [False, True])
def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, grid):
    (tmp_path / "afile").write_text("not a folder")
    key = "hydra.sweep.dir" if grid else "hydra.run.dir"
    args = ["-m", "method=bp,fa"] if grid else []
    proc = run_cli("fa_cli.train", *args, *SMOKE, f"{key}={tmp_path / 'afile'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == f"{key}: {tmp_path / 'afile'} is a file, not a folder"
    assert (tmp_path / "afile").read_text() == "not a folder"
    below = tmp_path / "afile" / "run"
    proc = run_cli("fa_cli.train", *args, *SMOKE, f"{key}={below}", cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith(f"{key}: cannot make the folder {below}")


def test_a_grid_whose_jobs_fail_before_they_start_exits_1_though_the_folders_keep_results(fa_train, tmp_path):
    # Each job's folder keeps its earlier results.json when the job fails on its data, so the exit
    # code must come from this launch's jobs, not from the folders.
    fake_mnist(tmp_path / "data")
    grid = ["-m", "dataset=mnist", "trainer.epochs=1", "trainer.threads=1", "diagnostics.plots=false"]
    grid.append("seed=0,1")
    assert fa_train(*grid, f"dataset.root={tmp_path / 'data'}").returncode == 0
    proc = fa_train(*grid, f"dataset.root={tmp_path / 'elsewhere'}")
    assert proc.returncode == 1
    assert "fa-train: 2 of the 2 jobs launched did not complete (2 failed)" in proc.stderr
    assert {results(p.parent)["status"] for p in (tmp_path / "sweep").glob("*/results.json")} == {"completed"}


def test_a_grid_does_not_rewrite_its_summary_from_part_of_the_runs(fa_train, tmp_path):
    grid = ["-m", *SMOKE, "trainer.epochs=1", "method=bp,fa"]
    assert fa_train(*grid).returncode == 0
    sweep = tmp_path / "sweep"
    kept = {p.name: p.read_bytes() for p in sweep.iterdir() if p.is_file() and p.name != "multirun.yaml"}
    damaged = sweep / "1_synthetic_ann_fa_seed0" / "results.json"
    damaged.write_text(damaged.read_text()[:30])
    proc = fa_train(*grid[:-1], "method=bp", "trainer.skip_completed=true")  # fa's job is not relaunched
    assert proc.returncode == 1
    assert f"fa-report: skipping {damaged}: " in proc.stderr
    assert "1 file(s) skipped (above); " in proc.stderr and "summary and figures not rewritten" in proc.stderr
    assert {name: (sweep / name).read_bytes() for name in kept} == kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dataset=null"], "ValueError: Config group override must be a string or a list. Got NoneType"),
        (
            ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0", "method=bp,fa"],
            "hydra.launcher.n_jobs: must not be 0: a number of jobs, or -1 for one per core",
        ),
    ],
)
def test_what_hydra_or_its_launcher_would_refuse_with_a_traceback_is_one_line(
    fa_train, tmp_path, args, message
):
    proc = fa_train(*args, *SMOKE)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == message
    assert not (tmp_path / "sweep").exists()
