"""fa-train and fa-report end to end, as a user runs them: subprocesses, files on disk, exit codes."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fa_cli.alignment import METHODS
from fa_cli.run import cpu_model
from runs import SMOKE, run_cli, run_code, start_cli

RESULT_FIELDS = {
    "method", "model", "dataset", "seed", "status", "test_accuracy", "test_loss", "best_val_accuracy",
    "epochs_completed", "wall_seconds",
}  # fmt: skip
METRIC_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_run_writes_config_metrics_checkpoint_and_results(tmp_path):
    # the console script itself, as installed by pip
    fa_train = Path(sys.executable).parent / "fa-train"
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(fa_train), *SMOKE, "method=kp", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout  # the closing table

    assert (run_dir / ".hydra" / "config.yaml").is_file() and (
        run_dir / ".hydra" / "overrides.yaml"
    ).is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results.keys() >= RESULT_FIELDS
    assert (results["method"], results["model"], results["dataset"], results["seed"]) == (
        "kp",
        "ann",
        "synthetic",
        0,
    )
    assert results["status"] == "completed" and results["epochs_completed"] == 2
    assert (
        20 < results["test_accuracy"] <= 100
        and math.isfinite(results["test_loss"])
        and results["test_loss"] > 0
    )
    assert 0 <= results["best_val_accuracy"] <= 100 and results["wall_seconds"] > 0
    if not torch.cuda.is_available():  # what the wall time was measured on
        assert results["device"] == f"cpu ({cpu_model()})"
    assert (
        results["train_examples"] == 540 and results["val_examples"] == 60 and results["test_examples"] == 200
    )

    rows = read_metrics(run_dir)
    assert list(rows[0]) == METRIC_FIELDS and [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["val_accuracy"]) <= 100 and float(r["seconds"]) > 0 for r in rows)

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["best_epoch"] == results["best_epoch"]
    assert {"model", "optimizer", "scheduler", "best_model", "rng"} <= checkpoint.keys()
    # kp under SGD keeps B as W plus a scale times B_0 - W_0 (fa_cli.alignment.train_feedback)
    assert any(key.endswith("feedback_offset") for key in checkpoint["model"]), "the rule's feedback is saved"
    assert any(key.endswith("offset_scale") for key in checkpoint["model"])
    assert len(checkpoint["optimizer"]["param_groups"]) == 2, (
        "with kp's feedback as the optimizer's second group"
    )
    assert not list(run_dir.glob(".*.tmp")), "no temporary files left behind"


def test_the_cpu_is_named_by_its_model(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert cpu_model(tmp_path / "none") in (platform.processor(), platform.machine())  # not Linux


def test_the_same_seed_gives_the_same_run(fa_train, tmp_path):
    def metrics(seed: int) -> tuple[list, float]:
        shutil.rmtree(tmp_path / "run", ignore_errors=True)  # a folder holding another seed's run is kept
        proc = fa_train(*SMOKE, "method=fa", f"seed={seed}")
        assert proc.returncode == 0, proc.stderr
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / "run")]
        return rows, json.loads((tmp_path / "run" / "results.json").read_text())["test_loss"]

    first, again, other = metrics(1), metrics(1), metrics(2)
    assert first == again
    assert first != other


def test_a_sweep_over_every_method_writes_the_summary_and_fa_report_rebuilds_it(fa_train, tmp_path):
    proc = fa_train("-m", *SMOKE, "trainer.epochs=1", f"method={','.join(METHODS)}", "seed=0,1")
    assert proc.returncode == 0, proc.stderr
    sweep = tmp_path / "sweep"
    assert len(list(sweep.glob("*/results.json"))) == 2 * len(METHODS)

    summary = (sweep / "summary.md").read_text()
    assert "## synthetic · ann" in summary and "| Method | Test Accuracy | Loss | Runs |" in summary
    for label in ("BP", "FA", "DFA", "uSF", "brSF", "frSF", "KP", "Shallow"):
        assert f"| {label} | " in summary
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["method"] for r in rows] == list(METHODS)
    assert all(
        r["runs"] == "2" and r["completed"] == "2" and float(r["test_accuracy_std"]) >= 0 for r in rows
    )

    printed = run_cli("fa_cli.report", str(sweep), "--format", "markdown", cwd=tmp_path)
    assert printed.returncode == 0 and printed.stdout == summary
    table = run_cli("fa_cli.report", str(sweep), cwd=tmp_path)
    assert table.returncode == 0 and "synthetic · ann" in table.stdout and "Shallow" in table.stdout

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("summary.*"))
    assert run_cli("fa_cli.report", str(copy), "--write", cwd=tmp_path).returncode == 0
    assert (copy / "summary.md").read_text() == summary
    assert (copy / "summary.csv").read_text() == (sweep / "summary.csv").read_text()


def test_a_failing_job_does_not_lose_the_others(fa_train, tmp_path):
    # synthetic has 600 training examples: the second job's subset cannot be taken, at data-loading time
    proc = fa_train("-m", *SMOKE, "trainer.epochs=1", "dataset.subset=100,5000")
    assert proc.returncode == 1
    assert "1 of 2 runs did not complete (1 failed)" in proc.stderr
    results = {
        r["status"]: r
        for r in map(json.loads, map(Path.read_text, (tmp_path / "sweep").glob("*/results.json")))
    }
    assert results.keys() == {"completed", "failed"}
    assert "dataset.subset=5000" in results["failed"]["error"]
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| BP | dataset.subset=100 | " in summary and "| 1 |" in summary
    assert "| BP | dataset.subset=5000 | — | — | 0 of 1 (1 failed) |" in summary


def test_a_diverging_run_stops_and_says_so(fa_train, tmp_path):
    proc = fa_train(*SMOKE, "trainer.epochs=3", "optim.lr=1e12")
    assert proc.returncode == 3, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "diverged" and results["test_accuracy"] is None
    assert results["diverged_at"]["epoch"] >= 1 and results["diverged_at"]["step"] >= 1
    assert (
        len(read_metrics(tmp_path / "run"))
        == results["epochs_completed"]
        == results["diverged_at"]["epoch"] - 1
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_records_it_and_keeps_its_files(tmp_path, signum):
    run_dir = tmp_path / "run"
    args = [*SMOKE, "trainer.epochs=100000", f"hydra.run.dir={run_dir}"]
    proc = start_cli("fa_cli.train", *args, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().endswith("fa-train: interrupted")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["epochs_completed"] >= 1
    assert len(read_metrics(run_dir)) == results["epochs_completed"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] >= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["method=dfx"],
            "method=dfx: no such option (did you mean dfa?); choose one of: bp, brsf, dfa, fa, frsf",
        ),
        (["trainer.epoch=3"], "trainer.epoch: unknown key (did you mean trainer.epochs?)"),
        (
            ["trainer.epochs=abc"],
            "trainer.epochs: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        (["optim.lr=-0.1"], "optim.lr: must be > 0, got -0.1"),
        (["trainer.batch_size=0"], "trainer.batch_size: must be > 0, got 0"),
        (["model=torchvision", "model.name=resnet1"], "model.name: unknown torchvision classifier 'resnet1'"),
        (
            ["-m", "method=bp,fa", "optim.lr=0.1,0"],
            "optim.lr: must be > 0, got 0.0 (job method=bp optim.lr=0 ",
        ),
    ],
)
def test_bad_configs_fail_in_one_line_naming_the_key(fa_train, tmp_path, args, message):
    start = time.monotonic()
    proc = fa_train(*args, "dataset=mnist", "dataset.root=/nonexistent")  # no data is ever read
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"fa-train: error: {message}"), proc.stderr
    assert time.monotonic() - start < 60
    assert not list(tmp_path.glob("sweep/*/metrics.csv")), "no job of a bad sweep starts"


# fa-train refuses what cannot run before torch loads (seconds): run as fa-train runs, with torch made
# unimportable, each refusal must be the one line it is with torch, not an ImportError.
NO_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from fa_cli.train import main
main()
"""


@pytest.mark.parametrize(
    "args,message",
    [
        (["method=dfx"], "method=dfx: no such option (did you mean dfa?)"),
        (["optim.lr=-0.1"], "optim.lr: must be > 0, got -0.1"),
        (["model.activation=relu2"], "model.activation: unknown value 'relu2' (did you mean relu?)"),
        (["model.init=glorot"], "model.init: unknown value 'glorot'; choose one of: default"),
        (["-m", "method=bp,fa", "optim.lr=0.1,0"], "optim.lr: must be > 0, got 0.0 (job method=bp"),
        (["trainer.epochs=1"], "{taken}: holds a run of another config ("),
        (["trainer.resume=nowhere/run"], "trainer.resume: nowhere/run: no such file"),
        (["trainer.resume=."], "trainer.resume: .: no checkpoint.pt in that folder"),
    ],
)
def test_bad_configs_and_taken_folders_are_refused_without_importing_torch(tmp_path, args, message):
    taken = tmp_path / "taken"  # another config's run: the run folder of the case that names it
    taken.mkdir()
    (taken / "results.json").write_text(json.dumps({"status": "completed", "config": {"seed": 5}}))
    run_dir = taken if "{taken}" in message else tmp_path / "run"
    folders = [f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_code(NO_TORCH, *args, *folders, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fa-train: error: {message.format(taken=taken)}"), lines
    assert json.loads((taken / "results.json").read_text())["config"] == {"seed": 5}, "left as it was"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_config_error(fa_train):
    proc = fa_train(*SMOKE, "trainer.device=cuda")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fa-train: error: trainer.device: cuda but CUDA is not available")


def test_full_tracebacks_on_request(fa_train):
    proc = fa_train(*SMOKE, "optim.lr=0", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "optim.lr: must be > 0" in proc.stderr


def test_hydra_flags_work_as_usual(tmp_path):
    proc = run_cli("fa_cli.train", "method=kp", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0 and "name: kp" in proc.stdout
    assert run_cli("fa_cli.train", "--help", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "outputs").exists(), "printing the config runs nothing"


def test_a_plain_install_runs_from_any_folder(tmp_path):
    # pip install . (not editable) into a folder of its own, then run from elsewhere: the configs must ship
    # (from a copy of the checkout: setuptools builds in the source tree)
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".*", "build", "outputs", "data", "*.egg-info", "__pycache__")
    shutil.copytree(Path(__file__).resolve().parents[1], source, ignore=skip)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target"]
    install = subprocess.run([*pip, str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    # The installed fa_cli comes first on the path (torch and the rest come from this environment), and
    # the run starts in a folder that has no conf/ of its own.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    which = subprocess.run(
        [sys.executable, "-c", "import fa_cli.conf; print(fa_cli.conf.__file__)"],
        cwd=elsewhere,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert which.stdout.startswith(str(site)), "the installed copy is the one that runs"
    proc = run_cli("fa_cli.train", *SMOKE, f"hydra.run.dir={elsewhere / 'run'}", cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((elsewhere / "run" / "results.json").read_text())["status"] == "completed"


def test_real_mnist_trains(fa_train, tmp_path, mnist_root):
    mnist = ["dataset=mnist", "dataset.subset=3000", "trainer.epochs=1", "trainer.batch_size=32"]
    proc = fa_train(*mnist, env={"FA_DATA_DIR": str(mnist_root)})
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train_examples"] == 2700 and results["test_examples"] == 10000
    assert results["test_accuracy"] > 80  # one epoch of the report's ANN on 2,700 digits
