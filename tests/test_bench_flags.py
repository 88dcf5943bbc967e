"""``fastopt bench`` on a busy machine: rows whose rounds disagree are flagged in the table, the plot and the JSON,
and a run without torch rows has no speed-up column. Results are built from chosen round times, not measured."""
import json

import pytest

from fastopt import benchmark, cli

STABLE = [1.00e-3, 1.10e-3, 1.45e-3]  # slowest / fastest 1.45: a quiet machine's spread
BUSY = [1.00e-3, 1.05e-3, 46e-3]  # one round lost its core for a time slice


def result_of(rows):
    machine = dict(platform="test", processor="test", cpus=2, python="3", numpy="2", numba="0", torch="2",
                   load_average=0.0)
    return {"machine": machine, "settings": dict(threads=2, repeats=3, sample_seconds=0.01, dtype="float32",
                                                 quick=True), "rows": rows}


def test_the_threshold_is_slowest_over_fastest():
    assert not benchmark.rounds_disagree([1.0, 1.5])
    assert benchmark.rounds_disagree([1.0, 1.51]) and benchmark.rounds_disagree([1.51, 1.2, 1.0])


def test_rows_with_disagreeing_rounds_are_flagged_in_table_json_and_plot(tmp_path, monkeypatch, capsys):
    rows = benchmark.group_rows("RMSprop", 1 << 20, 2, {"ceiling": BUSY, "fastopt": STABLE, "torch": STABLE})
    assert {row["backend"]: row["rounds_disagree"] for row in rows} == {"ceiling": True, "fastopt": False,
                                                                         "torch": False}
    monkeypatch.setattr(benchmark, "run", lambda **_: result_of(rows))
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "--json", str(json_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("  optimizer"):].splitlines()
    assert [line[:2] for line in table[2:5]] == ["! ", "  ", "  "]
    assert table[5] == benchmark.ROUNDS_DISAGREE_NOTE
    assert table[5] == "! rounds disagree by more than 1.5x: the machine was busy; rerun"
    assert "fastopt speed-up" in table[0]
    assert [row["rounds_disagree"] for row in json.loads(json_path.read_text())["rows"]] == [True, False, False]
    pytest.importorskip("test_plotting").assert_png(png_path)


def test_stable_rows_carry_no_flag_or_footnote():
    rows = benchmark.group_rows("Adam", 1 << 20, 2, {"ceiling": STABLE, "fastopt": STABLE, "torch-fused": STABLE})
    assert not any(row["rounds_disagree"] for row in rows)
    table = benchmark.format_table(result_of(rows))
    assert "!" not in table and "rounds disagree" not in table


def test_no_speedup_column_without_torch_rows():
    rows = benchmark.group_rows("SGD", 1 << 16, 1, {"ceiling": STABLE, "fastopt": BUSY})
    header, rule, *lines = benchmark.format_table(result_of(rows)).splitlines()
    assert header.rstrip().endswith("of ceiling") and "speed-up" not in header
    assert len(rule) == len(header) and all(len(line) == len(header) for line in lines[:2])


def test_no_torch_run_prints_no_speedup_column(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--sizes", "64K", "--optimizers", "SGD", "--no-torch", "--repeats", "2",
                     "--threads", "1", "--no-progress", "--json", str(tmp_path / "b.json"),
                     "--plot", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    assert "speed-up" not in out and "of ceiling" in out and "torch not used" in out
    assert {row["backend"] for row in json.loads((tmp_path / "b.json").read_text())["rows"]} == {"ceiling", "fastopt"}
