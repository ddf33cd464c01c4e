"""diagnostics.every=N: alignment angles per layer in alignment.csv, results.json and the epoch line;
measuring never changes training, and with diagnostics off nothing is measured at all."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from fa_cli.config import ConfigError
from fa_cli.diagnostics import FIELDS
from inprocess import config, run


def read_alignment(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "alignment.csv").open() as f:
        return list(csv.DictReader(f))


def angles(rows: list[dict[str, str]], metric: str, layer: str | None = None) -> list[tuple[int, float]]:
    return [
        (int(r["step"]), float(r["degrees"]))
        for r in rows
        if r["metric"] == metric and (layer is None or r["layer"] == layer)
    ]


def training_outcome(run_dir: Path) -> tuple[list[dict[str, str]], dict[str, torch.Tensor]]:
    with (run_dir / "metrics.csv").open() as f:
        metrics = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return metrics, torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("method", ["fa", "dfa", "brsf", "kp"])
def test_measuring_every_step_trains_exactly_as_diagnostics_off(tmp_path, method):
    # brsf draws random magnitudes each step, kp trains B with W's gradient, dfa captures the output error:
    # the diagnostics' extra passes must leave all of them as they were.
    off = run(tmp_path / "off", f"method={method}")
    on = run(tmp_path / "on", f"method={method}", "diagnostics.every=1")
    assert off["alignment"] is None and not (tmp_path / "off" / "alignment.csv").exists()
    assert on["alignment"] is not None
    assert (on["test_loss"], on["test_accuracy"]) == (off["test_loss"], off["test_accuracy"])
    metrics_off, model_off = training_outcome(tmp_path / "off")
    metrics_on, model_on = training_outcome(tmp_path / "on")
    assert metrics_on == metrics_off
    assert model_on.keys() == model_off.keys()
    assert all(torch.equal(model_on[k], model_off[k]) for k in model_off)


def test_bp_updates_are_the_gradient(tmp_path):
    results = run(tmp_path, "method=bp", "diagnostics.every=4")
    rows = read_alignment(tmp_path)
    assert list(rows[0]) == FIELDS
    measured = angles(rows, "update_vs_gradient")
    assert measured and all(degrees < 1e-3 for _, degrees in measured)
    assert not angles(rows, "weight_vs_feedback")  # bp has no B
    steps = sorted({step for step, _ in measured})
    assert steps[0] == 0 and all(b - a == 4 for a, b in zip(steps, steps[1:], strict=False))
    assert results["alignment"]["step"] == steps[-1]


def test_a_wide_layer_starts_at_90_degrees_from_its_random_feedback(tmp_path):
    run(tmp_path, "method=fa", "model=mlp", "model.widths=[512]", "diagnostics.every=100", "trainer.epochs=1")
    rows = read_alignment(tmp_path)
    first_layer = rows[0]["layer"]
    (step, degrees), *_ = angles(rows, "weight_vs_feedback", first_layer)
    assert step == 0 and 87 < degrees < 93  # 784 x 512 independent draws: about 90 +- 0.1 degrees


def test_kolen_pollack_brings_w_and_b_together(tmp_path):
    results = run(
        tmp_path, "method=kp", "diagnostics.every=10", "trainer.epochs=4", "optim.weight_decay=0.01"
    )
    rows = read_alignment(tmp_path)
    for layer in results["alignment"]["weight_vs_feedback"]:
        curve = angles(rows, "weight_vs_feedback", layer)
        assert curve[0][1] > 80  # random at the start
        assert curve[-1][1] < curve[0][1] - 10, curve
        degrees = [d for _, d in curve]
        assert all(b <= a + 1 for a, b in zip(degrees, degrees[1:], strict=False))  # falling throughout


def test_the_epoch_line_summarises_the_angles(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fa_cli.run"):
        results = run(tmp_path, "method=fa", "diagnostics.every=5")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and all("∠update,grad" in line and "∠W,B" in line for line in lines)
    final = results["alignment"]
    assert set(final) == {"step", "update_vs_gradient", "weight_vs_feedback"}
    assert len(final["update_vs_gradient"]) == 2  # the report's ANN: two layers learn
    assert all(0 <= d <= 180 for d in final["weight_vs_feedback"].values())


def test_a_negative_interval_names_its_key():
    with pytest.raises(ConfigError, match=r"^diagnostics\.every: must be >= 0"):
        config("diagnostics.every=-1")
