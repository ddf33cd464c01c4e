"""PNG figures: per run from fa-train, per sweep from the end-of-grid summary and fa-report --plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from fa_cli.alignment import METHODS
from fa_cli.plots import METHOD_COLORS, plot_sweep
from runs import SMOKE, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_FIGURES = {
    "synthetic_ann_test_accuracy.png",
    "synthetic_ann_val_accuracy.png",
    "synthetic_ann_alignment.png",
    "synthetic_ann_robustness_fgsm.png",
}


def assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE), path
    height, width, _ = matplotlib.image.imread(path).shape  # decodes the whole image
    assert height > 200 and width > 300, (path, height, width)


def test_runs_and_sweeps_get_their_figures(fa_train, tmp_path):
    diagnostics = ["diagnostics.plots=true", "diagnostics.every=5", "eval.attack=fgsm", "eval.eps=[0,0.1]"]
    proc = fa_train("-m", *SMOKE, "method=bp,kp", *diagnostics)
    assert proc.returncode == 0, proc.stderr
    sweep = tmp_path / "sweep"
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(runs) == 2
    for run in runs:
        assert_png(run / "curves.png")
        assert_png(run / "alignment.png")
    assert {p.name for p in sweep.glob("*.png")} == SWEEP_FIGURES
    for name in SWEEP_FIGURES:
        assert_png(sweep / name)
    assert "test accuracy under FGSM attack" in (sweep / "summary.md").read_text()

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("*.png"))
    redrawn = run_cli("fa_cli.report", str(copy), "--plots", cwd=tmp_path)
    assert redrawn.returncode == 0, redrawn.stderr
    assert {p.name for p in copy.glob("*.png")} == SWEEP_FIGURES


def test_a_run_without_diagnostics_gets_curves_only(fa_train, tmp_path):
    proc = fa_train(*SMOKE, "trainer.epochs=1", "diagnostics.plots=true")
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "run" / "curves.png")
    assert not (tmp_path / "run" / "alignment.png").exists()
    shutil.rmtree(tmp_path / "run")
    assert fa_train(*SMOKE, "trainer.epochs=1").returncode == 0
    assert not (tmp_path / "run" / "curves.png").exists()  # diagnostics.plots=false draws nothing


def test_every_method_has_its_own_colour():
    assert set(METHODS) <= set(METHOD_COLORS)
    assert len({METHOD_COLORS[m] for m in METHODS}) == len(METHODS)


def test_runs_that_did_not_finish_draw_what_there_is(tmp_path):
    from fa_cli.plots import collect_runs

    folder = tmp_path / "0"
    folder.mkdir()
    results = {"method": "fa", "model": "ann", "dataset": "mnist", "seed": 0, "status": "failed"}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "metrics.csv").write_text("epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,seconds\n")
    assert plot_sweep(tmp_path, collect_runs([tmp_path])) == []  # nothing to draw is no error


@pytest.mark.parametrize("args", [["--plots"], ["--plots", "--write"]])
def test_fa_report_plots_needs_runs(tmp_path, args):
    proc = run_cli("fa_cli.report", str(tmp_path), *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"fa-report: error: no results.json under {tmp_path}"]
