"""One run on two processes (gloo, CPU) ends with the weights a single process gets on the same global
batches: the DDP path of fa_cli.distributed, for rules whose feedback is fixed (fa), projected from the
output (dfa) and trained (kp)."""

from __future__ import annotations

import csv
import gc
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module

from fa_cli.config import validate
from fa_cli.distributed import SINGLE, World, leave, process_group
from runs import run_cli

METHODS = ("bp", "fa", "dfa", "kp")
# 181 training examples (21 held out): five batches of 32, then one of 21 that splits 11 / 10 over the
# ranks, so that the weighting of uneven shards is tested too. Two hidden layers: dfa is not fa.
RUN = [
    "dataset=synthetic",
    "dataset.train_size=202",
    "dataset.test_size=100",
    "model=mlp",
    "model.widths=[32,16]",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "trainer.device=cpu",
    "trainer.threads=1",
    "trainer.eval_batch_size=64",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_on_ranks(rank: int, size: int, port: int, folder: Path) -> None:
    """A rank: every method under DDP, as torchrun would start it; then rank 0 trains each method again
    as a single process, the reference."""
    from fa_cli.run import Run, train  # in the child: the spawn start method imports afresh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    with initialize_config_module(config_module="fa_cli.conf", version_base=None):
        configs = {m: validate(compose("train", overrides=[*RUN, f"method={m}"])) for m in METHODS}
    # Without automatic collection, what a run leaves in reference cycles stays until a run frees it:
    # each run under a process group must free what the runs before it left, before its collectives.
    gc.disable()
    with process_group() as world:
        assert world == World(rank=rank, size=size, local_rank=rank, active=True)
        for method, cfg in configs.items():
            train(cfg, folder / f"{method}_rank{rank}")
            earlier = [
                o.run_dir.name
                for o in gc.get_objects()
                if isinstance(o, Run) and o.run_dir.name != f"{method}_rank{rank}"
            ]
            assert not earlier, f"after {method}, earlier runs still alive: {earlier}"
    gc.enable()
    if rank == 0:
        assert World.current() == SINGLE
        for method, cfg in configs.items():
            train(cfg, folder / f"{method}_single")
    leave(0)  # as fa-train's ranks end: no interpreter shutdown beside gloo's threads


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    for method in METHODS:
        for name in ("rank0", "rank1", "single"):
            (folder / f"{method}_{name}").mkdir()
    mp.start_processes(_train_on_ranks, args=(2, _free_port(), folder), nprocs=2, start_method="spawn")
    return folder


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


# One test for every method, not one per method: the ranks train them all in one fixture, which two
# test workers would each train again.
def test_two_processes_end_with_the_weights_of_one(ddp_runs: Path) -> None:
    for method in METHODS:
        _check_ddp_run(ddp_runs, method)


def _check_ddp_run(ddp_runs: Path, method: str) -> None:
    ddp, single = ddp_runs / f"{method}_rank0", ddp_runs / f"{method}_single"
    ddp_weights, single_weights = _final(ddp), _final(single)
    assert ddp_weights.keys() == single_weights.keys(), method
    # the feedback buffers too: fixed ones stay equal, and kp's B (under SGD its offset from W and the
    # scale of it) follows W's averaged update
    feedback = ("feedback_offset", "offset_scale") if method == "kp" else ("feedback",)
    assert any(key.endswith(feedback) for key in ddp_weights) == (method != "bp"), method
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-4, atol=1e-5, msg=f"{method}: {key}")
    # the epoch's numbers are summed over both ranks, so they are those of the whole split
    for a, b in zip(_metrics(ddp), _metrics(single), strict=True):
        for field in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert float(a[field]) == pytest.approx(float(b[field]), rel=1e-4, abs=1e-5), (method, field)
    ddp_results, single_results = (json.loads((d / "results.json").read_text()) for d in (ddp, single))
    assert (ddp_results["processes"], single_results["processes"]) == (2, 1), method
    assert ddp_results["status"] == "completed", method
    assert ddp_results["test_accuracy"] == pytest.approx(single_results["test_accuracy"], abs=1e-9)
    assert ddp_results["test_loss"] == pytest.approx(single_results["test_loss"], rel=1e-4)
    assert not any((ddp_runs / f"{method}_rank1").iterdir()), f"{method}: only rank 0 writes"


def test_a_batch_splits_into_contiguous_shards_that_cover_it() -> None:
    index = torch.arange(21)
    shards = [World(rank=r, size=2, active=True).shard(index) for r in range(2)]
    assert [len(s) for s in shards] == [11, 10]
    assert torch.equal(torch.cat(shards), index)
    spans = [World(rank=r, size=3, active=True).span(10) for r in range(3)]
    assert spans == [(0, 3), (3, 6), (6, 10)]
    assert SINGLE.shard(index) is index and SINGLE.span(10) == (0, 10)


def test_torchrun_trains_one_run_that_rank_0_alone_writes(tmp_path: Path) -> None:
    """The command the README gives, end to end: two processes, one run folder, nothing else written
    (the other rank's Hydra files go to a temporary folder that is removed)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_dir = tmp_path / "run"
    proc = run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fa_cli.train",
        *RUN,
        "method=dfa",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"TMPDIR": str(scratch)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["status"], results["processes"], results["method"]) == ("completed", 2, "dfa")
    assert {p.name for p in run_dir.iterdir()} >= {".hydra", "results.json", "metrics.csv", "checkpoint.pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]  # no outputs/ of another rank
    assert not [p for p in scratch.iterdir() if p.name.startswith("fa-train-rank")]


def test_torchrun_refuses_a_grid(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from fa_cli.train import main

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in {**env, "HYDRA_FULL_ERROR": "0"}.items():
        monkeypatch.setenv(name, value)  # restored after the test, as main() sets HYDRA_FULL_ERROR
    monkeypatch.setattr(sys, "argv", ["fa-train", "-m", *RUN, "method=bp,fa"])
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit:
            main()
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "fa-train: error: torchrun trains one run on several processes: drop -m (for a grid, use "
        "hydra/launcher=joblib or slurm, or one torchrun per run)"
    ]


def test_a_rank_that_fails_prints_its_traceback_and_leaves_with_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Not only fa-train's own exits: a run that fails with an exception skips the interpreter's shutdown
    # too, where gloo's threads can abort the process, after printing what Python would have printed.
    from fa_cli import distributed, train

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored after the test, as main() sets it

    def fail(full_error: bool) -> None:
        raise RuntimeError("a collective timed out")

    left: list[int | str | None] = []

    def leave(code: int | str | None) -> None:
        left.append(code)
        raise SystemExit(code)  # os._exit would end the test run

    monkeypatch.setattr(train, "_command", fail)
    monkeypatch.setattr(distributed, "leave", leave)
    monkeypatch.setattr(sys, "argv", ["fa-train", *RUN])
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit:
            train.main()
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert (exit.value.code, left) == (1, [1])
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.rstrip().endswith("RuntimeError: a collective timed out")


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("fa-train: stopped", 1)])
def test_a_rank_leaves_with_sys_exits_status_and_nothing_unflushed(tmp_path: Path, code, status) -> None:
    # A torchrun rank ends with os._exit (no interpreter shutdown): what it printed must still come
    # out, and its status must be the one sys.exit(code) gives.
    script = f"from fa_cli.distributed import leave; print('printed', end=''); leave({code!r})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "printed"  # only a flush gets it out before os._exit
    assert (code in proc.stderr) if isinstance(code, str) else proc.stderr == ""
