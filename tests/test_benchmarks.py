"""Smoke tests: every benchmark runs at tiny sizes and reports its rows (no timing checks)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"fcb_benchmarks_{name}", f"{BENCHMARKS}/{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load("run")  # it puts benchmarks/ on sys.path, where the benchmarks import each other
common = sys.modules["_common"]


@pytest.mark.parametrize("bench", run.BENCHMARKS, ids=[b.id for b in run.BENCHMARKS])
def test_each_benchmark_runs_quick(bench):
    if not os.path.exists(os.path.join(BENCHMARKS, bench.module + ".py")):
        pytest.skip(f"benchmarks/{bench.module}.py is not there yet")
    rows, _ = run.run_benchmark(bench, quick=True, isolate=False)
    assert rows, bench.module
    for row in rows:
        assert row.id.startswith(bench.id)
        assert not row.what.endswith("failed"), row
        assert row.fcb and row.peer, row
    table = common.format_table(rows)
    assert table.count("\n") == len(rows) + 1


def test_results_are_written_between_the_markers_and_the_rest_is_kept(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nintro\n\n{run.START}\nold\n{run.END}\n\n## Fixes\nkept\n")
    monkeypatch.setattr(run, "RESULTS", str(results))
    row = common.Row("B9", "what", "1.0 us", "2.0 us", 0.5, "<= 1.0x", True)
    run.write_results(run.results_block([row], {"x": "raw output"}, "python run.py", 60.0))
    text = results.read_text()
    assert "old" not in text and "intro" in text and "## Fixes\nkept" in text
    assert "| B9 | what | 1.0 us | 2.0 us | 0.500x | <= 1.0x | yes |" in text
    assert "python run.py" in text and "raw output" in text


def test_rows_are_read_from_a_script_table_and_from_the_replay_report():
    table = "| B7 | orbax save | 10.0 ms | 9.8 ms | 1.020x | <= 1.05x | yes |\n"
    rows = run.rows_from_output(run.Benchmark("B7", "orbax_save"), table)
    assert [(r.id, r.ratio, r.met) for r in rows] == [("B7", 1.02, True)]
    report = (
        "fcb.replay cold (build+compile+run)      1.234\n"
        "fcb.replay warm (compiled)               0.062\n"
        "Lightning EarlyStopping loop            812.0\n"
        "flax EarlyStopping loop                  51.00\n"
        "speed-up vs Lightning: 1,234x cold, 5,678x warm (target >= 1000x)\n"
        "speed-up vs flax:      41x cold, 190x warm (target >= 30x)\n"
    )
    rows = run.rows_from_output(run.Benchmark("B3", "replay"), report)
    assert [(r.id, r.ratio, r.met) for r in rows] == [
        ("B3", 5678.0, True),
        ("B3c", 1234.0, True),
        ("B3f", 190.0, True),
        ("B3fc", 41.0, True),
    ]


def test_the_diagnostic_of_b8_runs_quick(capsys):
    parts = _load("b8_parts")
    assert parts.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for case in ("the slot plan (_write)", "interrupts", "a jitted call of the same shape"):
        assert case in out, out
