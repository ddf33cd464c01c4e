"""Tables in the report's format from results: mean ± std over completed runs, the rest counted."""

from __future__ import annotations

import csv
import json

from fa_cli import report


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
