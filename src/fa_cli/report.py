"""Result tables from run folders: rich, Markdown and CSV. One code path serves ``fa-report`` and the
callback that writes ``summary.md`` and ``summary.csv`` when a sweep ends.

    fa-report outputs/multirun/2025-01-01/12-00-00          # print the tables
    fa-report outputs/ --format markdown                      # every run under outputs/, as Markdown
    fa-report outputs/multirun/2025-01-01/12-00-00 --write    # (re)write summary.md and summary.csv there

One table per (dataset, model), one row per method in the report's format (Method | Test Accuracy |
Loss), mean ± sample std over the completed runs, and how many runs are behind each row. Runs that
did not complete (diverged, failed, interrupted, still running) are counted, never averaged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from fa_cli.alignment import METHODS
from fa_cli.config import LAUNCH_ONLY, SAME_RUN_ANYWAY, flatten
from fa_cli.files import csv_text, write_csv, write_text

IDENTITY = ("method", "model", "dataset", "seed")  # what names a run; every other override is a setting
LABELS = {"bp": "BP", "fa": "FA", "dfa": "DFA", "usf": "uSF", "brsf": "brSF", "frsf": "frSF", "kp": "KP"}
HEADER = ("Method", "Test Accuracy", "Loss", "Runs")  # the report's columns, and how many runs
CSV_FIELDS = [
    "dataset",
    "model",
    "method",
    "settings",
    "runs",
    "completed",
    "test_accuracy_mean",
    "test_accuracy_std",
    "test_loss_mean",
    "test_loss_std",
    "statuses",
]


@dataclass
class Row:
    """The runs of one method on one (dataset, model) with the same settings, seeds apart."""

    method: str
    settings: str = ""  # the overrides that set these runs apart from the table's other rows
    statuses: Counter[str] = field(default_factory=Counter)
    accuracies: list[float] = field(default_factory=list)  # of completed runs, percent
    losses: list[float] = field(default_factory=list)
    # eval.attack runs: attack -> epsilon -> test accuracies under that attack, percent
    robustness: dict[str, dict[float, list[float]]] = field(default_factory=dict)

    @property
    def runs(self) -> int:
        return sum(self.statuses.values())

    def cells(self, settings: bool = False) -> tuple[str, ...]:
        """The row as the report prints it; ``settings`` adds the settings column after the method."""
        label = LABELS.get(self.method, self.method.capitalize())
        numbers = (_mean_std(self.accuracies, 2, " %"), _mean_std(self.losses, 4), self._runs_cell())
        return (label, self.settings, *numbers) if settings else (label, *numbers)

    def _runs_cell(self) -> str:
        completed = self.statuses["completed"]
        if completed == self.runs:
            return str(completed)
        others = {status: n for status, n in self.statuses.items() if status != "completed"}
        return f"{completed} of {self.runs} ({_counts(others)})"


Tables = dict[tuple[str, str], list[Row]]
RobustnessTable = tuple[str, tuple[str, ...], list[tuple[str, ...]]]  # title, header, rows of cells


def collect(paths: Iterable[Path], problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Every ``results.json`` under ``paths`` (folders of runs or sweeps, or single files), in path order.
    A file that cannot be read, or does not hold a run's results, is skipped with a one-line warning
    (appended to ``problems`` too): a report should not die of one broken run."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.glob("**/results.json"))
        for file in files:
            try:
                found.append((file, read_results(file)))
            except (OSError, ValueError) as e:
                skipped(f"{file}: {e}", problems)
    return [found[i][1] for i in once_each([file for file, _ in found], [results for _, results in found])]


def once_each(files: list[Path], results: list[dict[str, Any]], note: bool = True) -> list[int]:
    """The indices, in order, of ``results`` (read from ``files``) less repeats of one run: the same
    config and seed in two folders (a grid relaunched with more values, whose job numbers, and so
    folder names, moved; a run resumed into a new folder). Averaging both would count one run twice;
    the completed one that finished last is kept, and with ``note`` the repeat is told on stderr."""
    keys = [_same_run(r) for r in results]
    best: dict[str, int] = {}  # a run's key -> the index kept for it
    for index, key in enumerate(keys):
        if key is None:
            continue
        if key not in best:
            best[key] = index
            continue
        best[key], drop = sorted((best[key], index), key=lambda i: _rank(results[i]), reverse=True)
        if note:
            print(
                f"fa-report: {files[drop]} repeats the run of {files[best[key]]} (same config and seed); "
                "counted once",
                file=sys.stderr,
            )
    return [index for index, key in enumerate(keys) if key is None or best[key] == index]


def _same_run(results: dict[str, Any]) -> str | None:
    """What makes two results.json the same run: the config but for where and how it was launched."""
    config = results.get("config")
    if not isinstance(config, dict):
        return None  # failed before it started: no run to repeat
    flat = {k: v for k, v in flatten(config).items() if k not in SAME_RUN_ANYWAY}
    return json.dumps(flat, sort_keys=True, default=str)


def _rank(results: dict[str, Any]) -> tuple[bool, str]:
    return results.get("status") == "completed", str(results.get("finished_at") or "")


def skipped(why: str, problems: list[str] | None) -> None:
    print(f"fa-report: skipping {why}", file=sys.stderr)
    if problems is not None:
        problems.append(why)


def read_results(file: Path) -> dict[str, Any]:
    """A run's ``results.json``, checked to hold what the tables read; ValueError says what it lacks."""
    results = json.loads(file.read_text())
    if not isinstance(results, dict):
        raise ValueError(f"holds a JSON {type(results).__name__}, not a run's results")
    overrides = results.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError("its overrides are not a list of strings")
    if results.get("status") == "completed":
        for key in ("test_accuracy", "test_loss"):
            if not _is_number(results.get(key)):
                raise ValueError(f"a completed run whose {key} is {results.get(key)!r}, not a number")
        robustness = results.get("robustness")
        if robustness and not (
            isinstance(robustness, dict)
            and isinstance(robustness.get("attack"), str)
            and isinstance(robustness.get("results"), list)
            and all(
                isinstance(point, dict) and _is_number(point.get("eps")) and _is_number(point.get("accuracy"))
                for point in robustness["results"]
            )
        ):
            raise ValueError("its robustness is not an attack's name and a list of eps and accuracy numbers")
    return results


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summarize(results: Iterable[dict[str, Any]]) -> Tables:
    """Group runs into tables by (dataset, model), and into rows by method (in ``METHODS`` order) and
    settings: runs of a grid over ``optim.lr=0.1,0.01`` make two rows, never one mean."""
    by_table: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by_table.setdefault((str(r.get("dataset")), str(r.get("model"))), []).append(r)

    tables: Tables = {}
    for key, runs in sorted(by_table.items()):
        common = set.intersection(*(set(_settings(r)) for r in runs))  # shown by no row
        rows: dict[tuple[str, str], Row] = {}
        for r in runs:
            method = str(r.get("method"))
            settings = " ".join(o for o in _settings(r) if o not in common)
            row = rows.setdefault((method, settings), Row(method, settings))
            status = r.get("status") or "unknown"
            row.statuses[status] += 1
            if status == "completed":
                row.accuracies.append(float(r["test_accuracy"]))
                row.losses.append(float(r["test_loss"]))
                if r.get("robustness"):
                    by_eps = row.robustness.setdefault(r["robustness"]["attack"], {})
                    for point in r["robustness"]["results"]:
                        by_eps.setdefault(float(point["eps"]), []).append(float(point["accuracy"]))
        tables[key] = sorted(rows.values(), key=_order)
    return tables


def _settings(result: dict[str, Any]) -> list[str]:
    """A run's command-line overrides, less those that name it (method, model, dataset, seed), Hydra's
    own and the trackers' (``logger``, which watch a run without changing it): what sets it apart from
    its siblings in a grid."""
    settings = []
    for override in result.get("overrides") or []:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in IDENTITY and key not in LAUNCH_ONLY and not key.startswith(("hydra", "logger")):
            settings.append(override)
    return sorted(settings)


def _order(row: Row) -> tuple[int, str, str]:
    return (METHODS.index(row.method) if row.method in METHODS else len(METHODS), row.method, row.settings)


def to_markdown(tables: Tables) -> str:
    lines = ["# Results", ""]
    for (dataset, model), rows in tables.items():
        settings = _has_settings(rows)
        header = _header(settings)
        alignment = ["---"] * (len(header) - 3) + ["---:"] * 3
        lines += [f"## {dataset} · {model}", "", _md_row(header), _md_row(alignment).replace(" ", "")]
        lines += [_md_row(row.cells(settings)) for row in rows]
        lines.append("")
        for title, header, cells in _robustness_tables(rows, f"{dataset} · {model}"):
            alignment = ["---"] * (1 + settings) + ["---:"] * (len(header) - 1 - settings)
            lines += [f"### {title}", "", _md_row(header), _md_row(alignment).replace(" ", "")]
            lines += [_md_row(row) for row in cells] + [""]
    return "\n".join(lines)


def _robustness_tables(rows: list[Row], title: str) -> list[RobustnessTable]:
    """Per attack among ``rows``: (title, header, cells): test accuracy (mean ± std over seeds) at
    each epsilon, a row per method."""
    settings = _has_settings(rows)
    tables = []
    for attack in sorted({attack for row in rows for attack in row.robustness}):
        eps = sorted({e for row in rows for e in row.robustness.get(attack, {})})
        header = (HEADER[0], *(["Settings"] if settings else []), *(f"ε = {e:g}" for e in eps))
        cells = []
        for row in rows:
            if attack in row.robustness:
                by_eps = row.robustness[attack]
                label = row.cells(settings)[: 1 + settings]
                cells.append((*label, *(_mean_std(by_eps.get(e, []), 2, " %") for e in eps)))
        tables.append((f"{title}: test accuracy under {attack.upper()} attack", header, cells))
    return tables


def to_csv_rows(tables: Tables) -> list[dict[str, Any]]:
    return [
        {
            "dataset": dataset,
            "model": model,
            "method": row.method,
            "settings": row.settings,
            "runs": row.runs,
            "completed": row.statuses["completed"],
            "test_accuracy_mean": _mean(row.accuracies, 4),
            "test_accuracy_std": _std(row.accuracies, 4),
            "test_loss_mean": _mean(row.losses, 6),
            "test_loss_std": _std(row.losses, 6),
            "statuses": ";".join(f"{status}:{n}" for status, n in sorted(row.statuses.items())),
        }
        for (dataset, model), rows in tables.items()
        for row in rows
    ]


def to_rich(tables: Tables) -> list[Table]:
    out = []
    for (dataset, model), rows in tables.items():
        settings = _has_settings(rows)
        table = Table(title=f"{dataset} · {model}")
        header = _header(settings)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < len(header) - 3 else "right")
        for row in rows:
            table.add_row(*row.cells(settings))
        out.append(table)
        for title, header, cells in _robustness_tables(rows, f"{dataset} · {model}"):
            table = Table(title=title)
            for i, name in enumerate(header):
                table.add_column(name, justify="left" if i <= settings else "right")
            for row_cells in cells:
                table.add_row(*row_cells)
            out.append(table)
    return out


def write_plots(folder: Path, paths: Iterable[Path], problems: list[str] | None = None) -> list[Path]:
    """The sweep figures (:func:`fa_cli.plots.plot_sweep`) of the runs under ``paths``, in ``folder``;
    returns the files written. With ``problems``, a run that cannot be read is added to it and no
    figure is drawn: figures of part of the runs would replace complete ones."""
    from fa_cli import plots  # here: plots imports this module

    known = len(problems) if problems is not None else 0
    runs = plots.collect_runs(paths, problems)
    if problems is not None and len(problems) > known:
        return []
    return plots.plot_sweep(Path(folder), runs)


def write_summary(folder: Path, tables: Tables) -> None:
    """``summary.md`` and ``summary.csv`` in ``folder``."""
    write_text(Path(folder) / "summary.md", to_markdown(tables))
    write_csv(Path(folder) / "summary.csv", to_csv_rows(tables), CSV_FIELDS)


class SweepSummary(Callback):
    """When a multirun ends: summary.md and summary.csv in the sweep folder, the tables on the console,
    and exit code 1 if any run did not complete (after its siblings all ran)."""

    def __init__(self) -> None:
        self.launched: list[str] = []  # the status of each job of this launch, as this process saw it

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # Jobs that a launcher runs in this process (the default one): a job that failed before it
        # started keeps its folder's earlier results.json, so the folders alone would not show it.
        value = job_return.return_value if job_return.status == JobStatus.COMPLETED else "failed"
        self.launched.append(value if isinstance(value, str) else "failed")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        problems: list[str] = []
        results = collect([sweep_dir], problems)
        failed_now = Counter(status for status in self.launched if status != "completed")
        if failed_now:
            count = f"{sum(failed_now.values())} of the {len(self.launched)} jobs launched"
            print(f"fa-train: {count} did not complete ({_counts(failed_now)})", file=sys.stderr)
        if problems:  # tables of part of the runs would replace complete ones (as fa-report --write)
            print(
                f"fa-train: {len(problems)} file(s) skipped (above); {sweep_dir}'s summary and figures not "
                "rewritten: fix or remove them, then fa-report --write --plots",
                file=sys.stderr,
            )
            raise SystemExit(1)
        tables = summarize(results)
        write_summary(sweep_dir, tables)
        console = Console()
        for table in to_rich(tables):
            console.print(table)
        console.print(f"summary: {sweep_dir / 'summary.md'}, {sweep_dir / 'summary.csv'}")
        try:
            figures = write_plots(sweep_dir, [sweep_dir])
            console.print(f"plots: {', '.join(f.name for f in figures) or 'no data to plot'}")
        except Exception as e:  # the tables are written; a figure that fails must not hide them
            print(f"fa-train: plots not written: {type(e).__name__}: {e}", file=sys.stderr)
        incomplete = Counter(r.get("status") for r in results if r.get("status") != "completed")
        if incomplete:
            count = f"{sum(incomplete.values())} of {len(results)} runs"
            print(f"fa-train: {count} did not complete ({_counts(incomplete)})", file=sys.stderr)
        if incomplete or failed_now:
            raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fa-report", description="Result tables from fa-train run folders.")
    add = parser.add_argument
    add("paths", nargs="+", type=Path, help="run or sweep folders (searched for results.json)")
    add("--format", choices=("rich", "markdown", "csv"), default="rich", help="what to print")
    add("--write", action="store_true", help="write summary.md and summary.csv in the first PATH")
    add("--plots", action="store_true", help="write the sweep's PNG figures in the first PATH")
    args = parser.parse_args(argv)

    missing = [p for p in args.paths if not p.exists()]
    if missing:
        _error(f"no such file or folder: {', '.join(map(str, missing))}")
    problems: list[str] = []
    tables = summarize(collect(args.paths, problems))
    if not tables:
        where = ", ".join(map(str, args.paths))
        if problems:
            _error(f"no readable results.json under {where} ({len(problems)} skipped, above)", code=1)
        _error(f"no results.json under {where}")
    if args.format == "markdown":
        print(to_markdown(tables), end="")
    elif args.format == "csv":
        print(csv_text(to_csv_rows(tables), CSV_FIELDS), end="")
    else:
        console = Console()
        for table in to_rich(tables):
            console.print(table)
    folder = args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent
    if (args.write or args.plots) and problems:
        # Files written from part of the runs would replace complete ones: fix or remove the files first.
        _error(f"{len(problems)} file(s) skipped (above); nothing written in {folder}", code=1)
    if args.write:
        write_summary(folder, tables)
        print(f"wrote {folder / 'summary.md'} and {folder / 'summary.csv'}", file=sys.stderr)
    if args.plots:
        try:
            figures = write_plots(folder, args.paths, problems)
        except Exception as e:
            _error(f"plots not written: {type(e).__name__}: {e}", code=1)
        if problems:
            _error(f"{len(problems)} file(s) skipped (above); no plots written in {folder}", code=1)
        for figure in figures:
            print(f"wrote {figure}", file=sys.stderr)
    if problems:
        sys.exit(1)  # the tables above leave those runs out


def _error(message: str, code: int = 2) -> NoReturn:
    print(f"fa-report: error: {message}", file=sys.stderr)
    sys.exit(code)


def _mean_std(values: list[float], digits: int, unit: str = "") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}{unit}"


def _header(settings: bool) -> tuple[str, ...]:
    return (HEADER[0], "Settings", *HEADER[1:]) if settings else HEADER


def _has_settings(rows: list[Row]) -> bool:
    return any(row.settings for row in rows)


def _mean(values: list[float], digits: int) -> float | None:
    return round(statistics.mean(values), digits) if values else None


def _std(values: list[float], digits: int) -> float | None:
    return round(statistics.stdev(values), digits) if len(values) > 1 else None


def _counts(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
