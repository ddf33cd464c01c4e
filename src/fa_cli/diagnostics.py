"""Alignment diagnostics during training (``conf/diagnostics/``): how far each layer's update is from
backprop's gradient, and whether ``W`` comes to align with the feedback ``B``.

Every ``diagnostics.every`` training steps, before the step, on the batch about to be trained on:

- ``update_vs_gradient``: per learning layer, the angle between the weight gradient the rule computes
  (its update direction, before the optimizer) and backprop's true gradient. Every rule; bp gives 0.
- ``weight_vs_feedback``: per layer with a weight-shaped ``B`` (fa, usf, brsf, frsf, kp), the angle
  between ``W`` and the ``B`` errors go through now.

Measuring leaves the model, its gradients, buffers and the RNG as they were
(:func:`fa_cli.alignment.metrics.update_gradient_angles`), so a run with diagnostics trains exactly as
one without; with ``every=0`` no hook is installed at all.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fa_cli.alignment import metrics

FIELDS = ["step", "epoch", "layer", "metric", "degrees"]  # alignment.csv's columns
UPDATE_VS_GRADIENT = "update_vs_gradient"
WEIGHT_VS_FEEDBACK = "weight_vs_feedback"
SHORT_NAMES = {UPDATE_VS_GRADIENT: "∠update,grad", WEIGHT_VS_FEEDBACK: "∠W,B"}  # for the epoch line
MAX_LAYERS_SHOWN = 4  # more layers than this: the epoch line gives their mean and range instead


class Diagnostics:
    """The :data:`fa_cli.engine.BatchHook` that measures the angles, and the rows it measured.

    ``step`` in a row counts the optimizer updates done before the measurement (0: the initial
    model), over the whole run.
    """

    def __init__(self, model: nn.Module, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        self.model, self.every = model, every
        self.rows: list[dict[str, Any]] = []

    def __call__(self, epoch: int, step: int, steps: int, inputs: Tensor, targets: Tensor) -> None:
        done = (epoch - 1) * steps + step
        if done % self.every:
            return
        measured = {
            UPDATE_VS_GRADIENT: metrics.update_gradient_angles(self.model, inputs, targets),
            WEIGHT_VS_FEEDBACK: metrics.weight_feedback_angles(self.model),
        }
        for metric, angles in measured.items():
            for layer, degrees in angles.items():
                self.rows.append(
                    {"step": done, "epoch": epoch, "layer": layer, "metric": metric, "degrees": degrees}
                )

    def resume(self, path: Path, last_epoch: int) -> None:
        """Take up the rows of ``alignment.csv`` at ``path`` up to ``last_epoch``, as a run resumed from
        that epoch's checkpoint goes on from there. A missing file (a run that had diagnostics off) adds
        nothing."""
        if not Path(path).is_file():
            return
        with Path(path).open(newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    step, epoch, degrees = int(row["step"]), int(row["epoch"]), float(row["degrees"])
                    if not isinstance(row["layer"], str) or not isinstance(row["metric"], str):
                        raise TypeError
                except (KeyError, TypeError, ValueError):
                    raise ValueError(
                        f"{path} line {line} is not a row of step, epoch, layer, metric, degrees: "
                        "mend or remove the file (a run resumed without it has no earlier angles)"
                    ) from None
                if epoch <= last_epoch:
                    self.rows.append({**row, "step": step, "epoch": epoch, "degrees": degrees})

    def epoch_means(self, epoch: int) -> dict[str, dict[str, float]]:
        """metric -> layer -> mean angle over the epoch's measurements (layers in model order)."""
        collected: dict[str, dict[str, list[float]]] = {}
        for row in self.rows:
            if row["epoch"] == epoch:
                collected.setdefault(row["metric"], {}).setdefault(row["layer"], []).append(row["degrees"])
        return {
            metric: {layer: statistics.fmean(values) for layer, values in layers.items()}
            for metric, layers in collected.items()
        }

    def final(self) -> dict[str, Any] | None:
        """The last measurement: ``{"step": N, metric: {layer: degrees}}``, for results.json; None
        before the first."""
        if not self.rows:
            return None
        last = self.rows[-1]["step"]
        final: dict[str, Any] = {"step": last}
        for row in self.rows:
            if row["step"] == last:
                final.setdefault(row["metric"], {})[row["layer"]] = round(row["degrees"], 4)
        return final

    def epoch_summary(self, epoch: int) -> str:
        """One short phrase for the epoch's log line: each metric's mean angle per layer, input to
        output (or the mean and range over layers in a deep model). Empty when nothing was measured."""
        parts = []
        for metric, layers in self.epoch_means(epoch).items():
            values = list(layers.values())
            if len(values) <= MAX_LAYERS_SHOWN:
                shown = " ".join(f"{v:.1f}°" for v in values)
            else:
                mean, low, high = statistics.fmean(values), min(values), max(values)
                shown = f"{mean:.1f}° ({low:.0f}-{high:.0f}° over {len(values)} layers)"
            parts.append(f"{SHORT_NAMES[metric]} {shown}")
        return "  ".join(parts)
