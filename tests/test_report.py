"""Tables in the report's format from results: mean ± std over completed runs, the rest counted."""

from __future__ import annotations

import csv
import json

import pytest

from fa_cli import report
from runs import run_cli, run_code


def result(method, accuracy, loss, seed=0, status="completed", model="ann", dataset="mnist", overrides=()):
    return dict(method=method, model=model, dataset=dataset, seed=seed, status=status,
                test_accuracy=accuracy, test_loss=loss, overrides=list(overrides))  # fmt: skip


RESULTS = [
    result("dfa", 95.0, 0.30, seed=0),
    result("bp", 97.0, 0.10, seed=0),
    result("bp", 98.0, 0.20, seed=1),
    result("dfa", None, None, seed=1, status="diverged"),
    result("fa", 90.0, 0.5, model="cnn"),
    result("kp", None, None, model="cnn", status="failed"),
]


def test_one_table_per_dataset_and_model_rows_in_method_order():
    tables = report.summarize(RESULTS)
    assert list(tables) == [("mnist", "ann"), ("mnist", "cnn")]
    assert [row.method for row in tables[("mnist", "ann")]] == ["bp", "dfa"]
    assert [row.method for row in tables[("mnist", "cnn")]] == ["fa", "kp"]


def test_rows_show_mean_std_and_the_runs_behind_them():
    bp, dfa = report.summarize(RESULTS)[("mnist", "ann")]
    assert bp.cells() == ("BP", "97.50 ± 0.71 %", "0.1500 ± 0.0707", "2")
    # the diverged run is counted, never averaged
    assert dfa.cells() == ("DFA", "95.00 %", "0.3000", "1 of 2 (1 diverged)")
    fa, kp = report.summarize(RESULTS)[("mnist", "cnn")]
    assert kp.cells() == ("KP", "—", "—", "0 of 1 (1 failed)")


def test_markdown_is_the_reports_table():
    text = report.to_markdown(report.summarize(RESULTS))
    assert "## mnist · ann\n\n| Method | Test Accuracy | Loss | Runs |\n|---|---:|---:|---:|\n" in text
    assert "| BP | 97.50 ± 0.71 % | 0.1500 ± 0.0707 | 2 |" in text


def test_csv_has_a_row_per_method_with_numbers(tmp_path):
    report.write_summary(tmp_path, report.summarize(RESULTS))
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["model"], r["method"]) for r in rows] == [
        ("ann", "bp"),
        ("ann", "dfa"),
        ("cnn", "fa"),
        ("cnn", "kp"),
    ]
    assert (rows[0]["test_accuracy_mean"], rows[0]["test_accuracy_std"], rows[0]["runs"]) == (
        "97.5",
        "0.7071",
        "2",
    )
    assert (rows[1]["completed"], rows[1]["statuses"]) == ("1", "completed:1;diverged:1")
    assert (tmp_path / "summary.md").read_text() == report.to_markdown(report.summarize(RESULTS))


def test_collect_finds_results_at_any_depth_and_skips_broken_files(tmp_path, capsys):
    for i, r in enumerate(RESULTS[:3]):
        folder = tmp_path / "sweep" / str(i)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(r))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{ half a fi")
    assert sorted(r["seed"] for r in report.collect([tmp_path])) == [0, 0, 1]
    assert "skipping" in capsys.readouterr().err


def test_runs_with_other_settings_get_their_own_rows():
    grid = [
        result("bp", 97.0, 0.1, seed=seed, overrides=["trainer.epochs=3", f"optim.lr={lr}", f"seed={seed}"])
        for lr in (0.1, 0.01)
        for seed in (0, 1)
    ]
    (table,) = report.summarize(grid).values()
    # never one mean over two learning rates; the override all runs share is no setting
    assert [(row.settings, row.runs) for row in table] == [("optim.lr=0.01", 2), ("optim.lr=0.1", 2)]
    text = report.to_markdown(report.summarize(grid))
    assert "| Method | Settings | Test Accuracy | Loss | Runs |\n|---|---|---:|---:|---:|" in text
    assert "| BP | optim.lr=0.1 | 97.00 ± 0.00 % | 0.1000 ± 0.0000 | 2 |" in text
    rows = report.to_csv_rows(report.summarize(grid))
    assert [row["settings"] for row in rows] == ["optim.lr=0.01", "optim.lr=0.1"]


def test_a_grid_over_methods_and_seeds_has_no_settings_column():
    grid = [  # Hydra's own overrides are no settings either
        result(
            method, 90.0, 0.3, seed=seed, overrides=[f"method={method}", f"seed={seed}", "hydra.verbose=1"]
        )
        for method in ("bp", "fa")
        for seed in (0, 1)
    ]
    (table,) = report.summarize(grid).values()
    assert [(row.method, row.settings, row.runs) for row in table] == [("bp", "", 2), ("fa", "", 2)]
    assert "Settings" not in report.to_markdown(report.summarize(grid))


def test_where_the_data_lives_and_how_many_threads_are_no_settings():
    # The same runs started on two machines with the data in different folders are one row.
    runs = [
        result("fa", 97.0, 0.1, seed=0, overrides=["dataset.root=/data", "trainer.threads=1"]),
        result("fa", 96.0, 0.1, seed=1, overrides=["dataset.root=/tmp/mnist", "trainer.threads=8"]),
    ]
    (table,) = report.summarize(runs).values()
    assert [(row.settings, row.runs) for row in table] == [("", 2)]


BROKEN = {
    "a list": ("[]", "holds a JSON list, not a run's results"),
    "null": ("null", "holds a JSON NoneType, not a run's results"),
    "no accuracy": ('{"status": "completed"}', "a completed run whose test_accuracy is None, not a number"),
    "a word": (
        '{"status": "completed", "test_accuracy": "abc", "test_loss": 0.1}',
        "a completed run whose test_accuracy is 'abc', not a number",
    ),
    "overrides": ('{"status": "failed", "overrides": "lr=1"}', "its overrides are not a list of strings"),
    "robustness": (
        '{"status": "completed", "test_accuracy": 90, "test_loss": 0.3, "robustness": {"results": [1]}}',
        "its robustness is not an attack's name and a list of eps and accuracy numbers",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_results_json_that_holds_no_runs_results_is_skipped_in_one_line(tmp_path, capsys, case):
    text, why = BROKEN[case]
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "results.json").write_text(json.dumps(RESULTS[1]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(text)
    problems: list[str] = []
    assert report.collect([tmp_path], problems) == [RESULTS[1]]
    assert problems == [f"{tmp_path / 'bad' / 'results.json'}: {why}"]
    assert capsys.readouterr().err.splitlines() == [f"fa-report: skipping {problems[0]}"]


def test_fa_report_writes_nothing_from_part_of_the_runs(tmp_path):
    for i, r in enumerate(RESULTS[:3]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    report.write_summary(tmp_path, report.summarize(RESULTS[:3]))
    before = {name: (tmp_path / name).read_bytes() for name in ("summary.md", "summary.csv")}
    damaged = tmp_path / "0" / "results.json"
    damaged.write_text(damaged.read_text()[:40])  # cut short
    for args in (["--write"], ["--plots"]):
        proc = run_cli("fa_cli.report", str(tmp_path), *args, cwd=tmp_path)
        assert proc.returncode == 1
        lines = proc.stderr.splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"fa-report: skipping {damaged}: ")
        assert lines[1].startswith("fa-report: error: 1 file(s) skipped (above); ")
        assert {name: (tmp_path / name).read_bytes() for name in before} == before
        assert not list(tmp_path.glob("*.png"))
    proc = run_cli("fa_cli.report", str(tmp_path), "--format", "markdown", cwd=tmp_path)
    assert proc.returncode == 1 and "| BP |" in proc.stdout  # the rest is printed, and the gap is told


def test_plots_name_a_metrics_file_they_cannot_read(tmp_path):
    from fa_cli.plots import read_run

    (tmp_path / "results.json").write_text(json.dumps(RESULTS[0]))
    header = "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,seconds\n"
    columns = "epoch, train_loss, train_accuracy, val_loss, val_accuracy"
    cases = {
        "loss,accuracy\n0.1,90\n": f"metrics.csv has no {columns} column",
        header + "1,0.5,80,0.6\n": "metrics.csv line 2 is cut short",
        header + "1,0.5,x,0.6,70,0.01,1.0\n": "metrics.csv line 2: train_accuracy is 'x', not a number",
    }
    for text, why in cases.items():
        (tmp_path / "metrics.csv").write_text(text)
        with pytest.raises(ValueError) as error:
            read_run(tmp_path)
        assert str(error.value) == why
    (tmp_path / "metrics.csv").write_text(header + "1,0.5,80,,,0.01,1.0\n")  # no validation split: fine
    assert len(read_run(tmp_path).metrics) == 1


def test_plots_skip_a_run_whose_epochs_have_no_metrics(tmp_path, capsys):
    from fa_cli.plots import collect_runs

    (tmp_path / "results.json").write_text(json.dumps({**RESULTS[0], "epochs_completed": 3}))
    problems: list[str] = []
    assert collect_runs([tmp_path], problems) == []
    assert problems == [f"{tmp_path} in plots: its metrics.csv is missing or empty"]


def test_one_run_in_two_folders_is_counted_once(tmp_path, capsys):
    # A grid relaunched with one more seed: Hydra's job numbers, and so the folders, moved.
    def run(folder, seed, status="completed", finished="2026-01-01T00:00:00+00:00", lr=0.01):
        config = {"method": {"name": "bp"}, "seed": seed, "optim": {"lr": lr}, "dataset": {"root": folder}}
        r = {**result("bp", 90.0 + seed, 0.1, seed=seed, status=status), "config": config}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps({**r, "finished_at": finished}))

    run("0_bp_seed0", 0)
    run("1_bp_seed1", 1, status="interrupted")
    run("1_bp_seed0", 0, finished="2026-02-01T00:00:00+00:00")  # the relaunch's, same config
    run("2_bp_seed1", 1)
    run("3_bp_seed1", 1, lr=0.1)  # another config: its own run
    kept = report.collect([tmp_path])
    assert sorted((r["seed"], r["status"], r["config"]["dataset"]["root"]) for r in kept) == [
        (0, "completed", "1_bp_seed0"),
        (1, "completed", "2_bp_seed1"),
        (1, "completed", "3_bp_seed1"),
    ]
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        f"fa-report: {tmp_path / '0_bp_seed0' / 'results.json'} repeats the run of "
        f"{tmp_path / '1_bp_seed0' / 'results.json'} (same config and seed); counted once",
        f"fa-report: {tmp_path / '1_bp_seed1' / 'results.json'} repeats the run of "
        f"{tmp_path / '2_bp_seed1' / 'results.json'} (same config and seed); counted once",
    ]


def test_fa_report_with_every_file_skipped_says_so(tmp_path):
    (tmp_path / "results.json").write_text("[]")
    proc = run_cli("fa_cli.report", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert (
        proc.stderr.splitlines()[-1]
        == f"fa-report: error: no readable results.json under {tmp_path} (1 skipped, above)"
    )


# fa-report reads JSON and writes text: it needs neither torch nor its seconds of import. Run as
# fa-report runs, on a folder of results, with torch made unimportable.
NO_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from fa_cli.report import main
main(sys.argv[1:])
"""


def test_fa_report_runs_without_importing_torch(tmp_path):
    for i, r in enumerate(RESULTS[:3]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    proc = run_code(NO_TORCH, str(tmp_path), "--format", "markdown", "--write", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| BP | 97.50 ± 0.71 % | 0.1500 ± 0.0707 | 2 |" in proc.stdout
    assert "| BP | 97.50 ± 0.71 % |" in (tmp_path / "summary.md").read_text()
