"""PNG figures of runs and sweeps, drawn from the files runs write (``results.json``, ``metrics.csv``,
``alignment.csv``), so ``fa-train`` and ``fa-report --plots`` draw the same figures from the same data.

Per run (in the run folder): ``curves.png`` (training and validation loss and accuracy per epoch) and,
with diagnostics on, ``alignment.png`` (angles per layer over training).

Per sweep (in the sweep folder), for each (dataset, model): ``<dataset>_<model>_test_accuracy.png``
(mean ± std over seeds, every seed a dot), ``..._val_accuracy.png`` (validation curves of all
methods overlaid), ``..._alignment.png`` (all methods' angle curves side by side, a panel per metric
and layer) and ``..._robustness_<attack>.png`` (accuracy against epsilon).

Each method has one colour in every figure (:data:`METHOD_COLORS`). Figures are drawn on matplotlib's
Agg canvas without pyplot: no display, no global state.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fa_cli.alignment import METHODS
from fa_cli.files import write_bytes
from fa_cli.report import IDENTITY, LABELS, once_each, read_results, skipped

# tab10, in METHODS order: bp blue, fa orange, dfa green, usf red, brsf purple, frsf brown, kp pink, ...
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
METHOD_COLORS = dict(zip(METHODS, _TAB10, strict=True))
OTHER_COLOR = "#17becf"
METRIC_TITLES = {
    "update_vs_gradient": "angle between update and true gradient",
    "weight_vs_feedback": "angle between W and feedback B",
}
MAX_LAYER_PANELS = 6  # a deeper model's alignment is drawn as the mean over its layers
LINESTYLES = ["-", "--", ":", "-."]  # the settings of one method's series, when a sweep varies any


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, OTHER_COLOR)


def method_label(method: str) -> str:
    return LABELS.get(method, method.capitalize())


@dataclass
class RunFiles:
    """One run's files, as read back from its folder."""

    folder: Path
    results: dict[str, Any]
    metrics: list[dict[str, str]] = field(default_factory=list)
    alignment: list[dict[str, str]] = field(default_factory=list)


def read_run(folder: Path) -> RunFiles:
    """``results.json`` and, when there, ``metrics.csv`` and ``alignment.csv`` of the run in ``folder``;
    ValueError names a file that lacks what the figures read."""
    folder = Path(folder)
    metrics = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    return RunFiles(
        folder,
        read_results(folder / "results.json"),
        _read_csv(folder / "metrics.csv", metrics),
        _read_csv(folder / "alignment.csv", ("step", "degrees"), ("layer", "metric")),
    )


def collect_runs(paths: Iterable[Path], problems: list[str] | None = None) -> list[RunFiles]:
    """Every run under ``paths`` (folders of runs or sweeps); unreadable runs are skipped with a one-line
    warning (appended to ``problems`` too)."""
    runs = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.glob("**/results.json"))
        for file in files:
            try:
                run = read_run(file.parent)
                if run.results.get("epochs_completed") and not run.metrics:  # epochs trained, none to draw
                    raise ValueError("its metrics.csv is missing or empty")
                runs.append((file, run))
            except (OSError, ValueError) as e:
                skipped(f"{file.parent} in plots: {e}", problems)
    files, results = [file for file, _ in runs], [run.results for _, run in runs]
    return [runs[i][1] for i in once_each(files, results, note=False)]  # the tables' collect notes repeats


def _read_csv(path: Path, numbers: Sequence[str], names: Sequence[str] = ()) -> list[dict[str, str]]:
    """The rows of a run's CSV, each with a number or nothing (an epoch without validation) in every one
    of ``numbers``, and ``names`` present; none when the file is not there."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (*numbers, *names) if c not in header]
        if missing:
            raise ValueError(f"{path.name} has no {', '.join(missing)} column")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        if any(row.get(c) is None for c in header):  # fewer fields than the header: a cut line
            raise ValueError(f"{path.name} line {line} is cut short")
        for c in numbers:
            try:
                _number(row[c])
            except ValueError:
                raise ValueError(f"{path.name} line {line}: {c} is {row[c]!r}, not a number") from None
    return rows


def _number(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


# --- per run --------------------------------------------------------------------------------------


def plot_run(folder: Path) -> list[Path]:
    """``curves.png`` and (with alignment data) ``alignment.png`` in the run ``folder``; returns the
    files written. A run with no finished epoch gets none."""
    run = read_run(folder)
    method = str(run.results.get("method"))
    r = run.results
    title = f"{method_label(method)} · {r.get('model')} · {r.get('dataset')} · seed {r.get('seed')}"
    written = []
    if run.metrics:
        written.append(_save(_curves_figure(run.metrics, method, title), run.folder / "curves.png"))
    if run.alignment:
        figure = _run_alignment_figure(run.alignment, method, title)
        written.append(_save(figure, run.folder / "alignment.png"))
    return written


def _curves_figure(metrics: list[dict[str, str]], method: str, title: str) -> Any:
    figure, (loss_axes, accuracy_axes) = _figure(1, 2, width=11, height=4)
    epochs = [int(row["epoch"]) for row in metrics]
    color = method_color(method)
    for axes, key, unit in ((loss_axes, "loss", "cross-entropy"), (accuracy_axes, "accuracy", "%")):
        for split, style in (("train", "--"), ("val", "-")):
            values = [_number(row.get(f"{split}_{key}")) for row in metrics]
            if all(v is None for v in values):
                continue
            label = "training" if split == "train" else "validation"
            axes.plot(epochs, values, style, color=color, marker="o", markersize=3, label=label)
        axes.set(title=key, xlabel="epoch", ylabel=f"{key} ({unit})")
        _whole_epochs(axes)
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    return figure


def _run_alignment_figure(rows: list[dict[str, str]], method: str, title: str) -> Any:
    by_metric: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        points = by_metric.setdefault(row["metric"], {}).setdefault(row["layer"], [])
        points.append((int(row["step"]), float(row["degrees"])))
    figure, axes_row = _figure(1, len(by_metric), width=5.5 * len(by_metric), height=4)
    for axes, (metric, layers) in zip(axes_row, by_metric.items(), strict=True):
        for i, (layer, points) in enumerate(layers.items()):
            # one hue per method; layers darken from input to output
            shade = _shade(method_color(method), i, len(layers))
            steps, degrees = zip(*points, strict=True)
            axes.plot(steps, degrees, color=shade, label=f"layer {layer}")
        _angle_axes(axes, METRIC_TITLES.get(metric, metric))
        axes.legend(fontsize="small")
    figure.suptitle(f"{title}: alignment")
    return figure


# --- per sweep ------------------------------------------------------------------------------------


def plot_sweep(folder: Path, runs: list[RunFiles]) -> list[Path]:
    """For each (dataset, model) among ``runs``: test accuracy, validation curves, alignment curves
    and robustness figures in ``folder`` (those the runs have data for). Returns the files written."""
    groups: dict[tuple[str, str], list[RunFiles]] = {}
    for run in runs:
        groups.setdefault((str(run.results.get("dataset")), str(run.results.get("model"))), []).append(run)
    written = []
    for (dataset, model), members in sorted(groups.items()):
        series = _series(members)
        prefix, title = f"{dataset}_{model}", f"{dataset} · {model}"
        figures = {
            "test_accuracy": _test_accuracy_figure(series, title),
            "val_accuracy": _val_accuracy_figure(series, title),
            "alignment": _sweep_alignment_figure(series, title),
        }
        attacks = sorted({r.results["robustness"]["attack"] for r in members if r.results.get("robustness")})
        for attack in attacks:
            figures[f"robustness_{attack}"] = _robustness_figure(series, title, attack)
        for name, figure in figures.items():
            if figure is not None:
                written.append(_save(figure, Path(folder) / f"{prefix}_{name}.png"))
    return written


@dataclass
class Series:
    """The runs of one method (and settings) in a (dataset, model) group: one colour, one line."""

    method: str
    settings: str
    style: str
    runs: list[RunFiles]

    @property
    def label(self) -> str:
        return f"{method_label(self.method)} {self.settings}".strip()

    @property
    def color(self) -> str:
        return method_color(self.method)

    @property
    def completed(self) -> list[RunFiles]:
        return [r for r in self.runs if r.results.get("status") == "completed"]


def _series(runs: list[RunFiles]) -> list[Series]:
    """Runs grouped by method and by the overrides that set them apart (seeds aside), in METHODS order."""

    def settings(run: RunFiles) -> set[str]:
        overrides = run.results.get("overrides") or []
        return {o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in (*IDENTITY, "seed")
                and not o.startswith("hydra")}  # fmt: skip

    common = set.intersection(*(settings(r) for r in runs))
    grouped: dict[tuple[str, str], list[RunFiles]] = {}
    for run in runs:
        key = (str(run.results.get("method")), " ".join(sorted(settings(run) - common)))
        grouped.setdefault(key, []).append(run)
    order = sorted(grouped, key=lambda k: (METHODS.index(k[0]) if k[0] in METHODS else len(METHODS), k))
    styles: dict[str, int] = {}
    out = []
    for method, setting in order:
        index = styles[method] = styles.get(method, -1) + 1
        out.append(Series(method, setting, LINESTYLES[index % len(LINESTYLES)], grouped[(method, setting)]))
    return out


def _test_accuracy_figure(series: list[Series], title: str) -> Any:
    shown = [s for s in series if s.completed]
    if not shown:
        return None
    figure, (axes,) = _figure(1, 1, width=max(5, 1.1 * len(shown) + 2), height=4.5)
    for x, s in enumerate(shown):
        accuracies = [float(r.results["test_accuracy"]) for r in s.completed]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0
        axes.errorbar(x, statistics.fmean(accuracies), yerr=spread, fmt="o", color=s.color, capsize=6,
                      markersize=8, label=f"{s.label} (n={len(accuracies)})")  # fmt: skip
        axes.scatter([x] * len(accuracies), accuracies, color=s.color, alpha=0.4, s=12)
    axes.set_xticks(range(len(shown)), [s.label for s in shown], rotation=30 if len(shown) > 6 else 0)
    axes.set(title=f"{title}: test accuracy (mean ± std over seeds)", ylabel="test accuracy (%)")
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return figure


def _val_accuracy_figure(series: list[Series], title: str) -> Any:
    figure, (axes,) = _figure(1, 1, width=7, height=4.5)
    drawn = False
    for s in series:
        curves = [{int(m["epoch"]): _number(m["val_accuracy"]) for m in r.metrics} for r in s.runs]
        epochs = sorted({e for c in curves for e, v in c.items() if v is not None})
        if not epochs:
            continue
        values = [[c[e] for c in curves if c.get(e) is not None] for e in epochs]
        mean = [statistics.fmean(v) for v in values]
        label = f"{s.label} (n={len(s.runs)})"
        axes.plot(epochs, mean, s.style, color=s.color, marker="o", markersize=3, label=label)
        if max(map(len, values)) > 1:
            spread = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
            low = [m - d for m, d in zip(mean, spread, strict=True)]
            high = [m + d for m, d in zip(mean, spread, strict=True)]
            axes.fill_between(epochs, low, high, color=s.color, alpha=0.15)
        drawn = True
    if not drawn:
        return None
    axes.set(title=f"{title}: validation accuracy (mean ± std over seeds)", xlabel="epoch",
             ylabel="validation accuracy (%)")  # fmt: skip
    _whole_epochs(axes)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def _sweep_alignment_figure(series: list[Series], title: str) -> Any:
    # metric -> layer -> series label -> step -> angles over seeds
    table: dict[str, dict[str, dict[int, dict[int, list[float]]]]] = {}
    layers: dict[str, None] = {}  # in first-seen order: input to output
    for index, s in enumerate(series):
        for run in s.runs:
            for row in run.alignment:
                layers.setdefault(row["layer"], None)
                steps = table.setdefault(row["metric"], {}).setdefault(row["layer"], {}).setdefault(index, {})
                steps.setdefault(int(row["step"]), []).append(float(row["degrees"]))
    if not table:
        return None
    columns = list(layers) if len(layers) <= MAX_LAYER_PANELS else [f"mean over {len(layers)} layers"]
    if len(layers) > MAX_LAYER_PANELS:  # pool every layer's angles into one panel per metric
        for metric, by_layer in table.items():
            pooled: dict[int, dict[int, list[float]]] = {}
            for by_series in by_layer.values():
                for index, steps in by_series.items():
                    for step, values in steps.items():
                        pooled.setdefault(index, {}).setdefault(step, []).extend(values)
            table[metric] = {columns[0]: pooled}
    metrics = [m for m in METRIC_TITLES if m in table] + [m for m in table if m not in METRIC_TITLES]
    width, height = 4 * len(columns) + 1.5, 3.4 * len(metrics)
    figure, grid = _figure(len(metrics), len(columns), width=width, height=height)
    for r, metric in enumerate(metrics):
        for c, layer in enumerate(columns):
            axes = grid[r * len(columns) + c]
            for index, steps in sorted(table[metric].get(layer, {}).items()):
                s = series[index]
                xs = sorted(steps)
                axes.plot(xs, [statistics.fmean(steps[x]) for x in xs], s.style, color=s.color, label=s.label)
            name = layer if layer.startswith("mean") else f"layer {layer}"
            _angle_axes(axes, f"{name}\n{METRIC_TITLES.get(metric, metric)}", small=True)
            if not table[metric].get(layer):
                axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    handles = {s.label: s for s in series}
    from matplotlib.lines import Line2D  # here: matplotlib loads only when a figure is drawn

    figure.legend([Line2D([], [], color=s.color, linestyle=s.style) for s in handles.values()], list(handles),
                  loc="outside right upper", fontsize="small")  # fmt: skip
    figure.suptitle(f"{title}: alignment during training (mean over seeds)")
    return figure


def _robustness_figure(series: list[Series], title: str, attack: str) -> Any:
    figure, (axes,) = _figure(1, 1, width=7, height=4.5)
    for s in series:
        robustness = [r.results.get("robustness") or {} for r in s.completed]
        curves = [curve for curve in robustness if curve.get("attack") == attack]
        by_eps: dict[float, list[float]] = {}
        for curve in curves:
            for point in curve["results"]:
                by_eps.setdefault(float(point["eps"]), []).append(float(point["accuracy"]))
        if not by_eps:
            continue
        eps = sorted(by_eps)
        mean = [statistics.fmean(by_eps[e]) for e in eps]
        spread = [statistics.stdev(by_eps[e]) if len(by_eps[e]) > 1 else 0 for e in eps]
        axes.errorbar(eps, mean, yerr=spread, fmt="o" + s.style, color=s.color, capsize=3, markersize=4,
                      label=f"{s.label} (n={len(curves)})")  # fmt: skip
    axes.set(
        title=f"{title}: test accuracy under {attack.upper()} (true input gradient)",
        xlabel="ε (L∞, pixel units: images in [0, 1])",
        ylabel="test accuracy (%)",
        ylim=(0, 100),
    )
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure


# --- drawing --------------------------------------------------------------------------------------


def _figure(rows: int, columns: int, *, width: float, height: float) -> tuple[Any, list[Any]]:
    """A pyplot-free Agg figure and its axes, as a flat list."""
    from matplotlib.figure import Figure  # here: importing matplotlib costs a run that draws nothing

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, list(axes.flat)


def _angle_axes(axes: Any, title: str, small: bool = False) -> None:
    axes.axhline(90, color="grey", linestyle=":", linewidth=1)  # what unrelated directions give
    axes.set_title(title, fontsize="medium" if small else "large")
    axes.set(xlabel="training step", ylabel="angle (degrees)")
    low, high = axes.get_ylim()
    axes.set_ylim(0, max(100, high))
    axes.grid(alpha=0.3)


def _whole_epochs(axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _shade(color: str, index: int, count: int) -> tuple[float, float, float]:
    """``color`` mixed with white for early layers and with black for late ones."""
    from matplotlib.colors import to_rgb

    rgb = to_rgb(color)
    t = 0.0 if count == 1 else index / (count - 1) - 0.5  # -0.5 (first layer) .. 0.5 (last)
    target = 1.0 if t < 0 else 0.0
    mix = abs(t) * 0.9
    return tuple(c + (target - c) * mix for c in rgb)  # type: ignore[return-value]


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes(path, buffer.getvalue())
    return path
