"""Run every benchmark, print one table, and (with --write) record it in RESULTS.md.

    python benchmarks/run.py               # all benchmarks, full sizes (several minutes)
    python benchmarks/run.py --quick       # tiny sizes: checks that each one runs
    python benchmarks/run.py --only B1,B4  # some of them
    python benchmarks/run.py --write       # also update benchmarks/RESULTS.md

Each benchmark runs in its own Python process (no compiled functions, threads or memory
carried from one to the next; `--in-process` runs them in this one). A benchmark module either
defines `run(quick: bool) -> list[Row]` (rows as `_common.Row` or dicts with its fields) or
is run as a script; its Markdown table rows (`| B7 | ...`) are then read from its output, and
the whole output is kept in the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import Row, format_table, machine  # noqa: E402 (after the path)

RESULTS = os.path.join(HERE, "RESULTS.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclasses.dataclass
class Benchmark:
    id: str
    module: str
    script_args: tuple[list[str], list[str]] = ([], [])
    """Arguments when run as a script without `run()`: (full, quick)."""


BENCHMARKS = [
    Benchmark("B1", "b1_host_cost"),
    Benchmark("B2", "b2_scan"),
    Benchmark(
        "B3",
        "replay",
        ([], ["--configs", "100", "--steps", "100", "--sample", "5", "--cold-repeats", "1"]),
    ),
    Benchmark("B4", "b4_atomic_write"),
    Benchmark("B5", "b5_bytes_written"),
    Benchmark("B6", "b6_background"),
    Benchmark(
        "B7",
        "orbax_save",
        ([], ["--saves", "2", "--epochs", "20", "--width", "32", "--repeats", "1"]),
    ),
    Benchmark("B8", "b8_growth"),
    Benchmark("B9", "b9_replay_scale"),
    Benchmark("B10", "b10_compile_cache"),
    Benchmark("B11", "batch_hook"),
    Benchmark("B12", "b12_sharded_save", ([], ["--saves", "2", "--width", "256"])),
    Benchmark("B13", "b13_import"),
]


def as_row(row: Any) -> Row:
    return row if isinstance(row, Row) else Row(**row)


def has_run_function(path: str) -> bool:
    with open(path) as f:
        return re.search(r"^def run\(", f.read(), re.MULTILINE) is not None


def run_benchmark(bench: Benchmark, quick: bool, isolate: bool) -> tuple[list[Row], str]:
    """Rows of one benchmark, and the raw output of scripts without `run()`."""
    path = os.path.join(HERE, bench.module + ".py")
    if not os.path.exists(path):
        return [Row(bench.id, f"{bench.module}.py is missing", "", "", None, "", None)], ""
    if has_run_function(path):
        if not isolate:
            module = importlib.import_module(bench.module)
            return [as_row(r) for r in module.run(quick=quick)], ""
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            code = (
                f"import json, sys; sys.path.insert(0, {HERE!r}); import {bench.module} as m; "
                f"rows = m.run(quick={quick}); "
                f"json.dump([r if isinstance(r, dict) else r.as_dict() for r in rows], "
                f"open({out.name!r}, 'w'))"
            )
            subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)
            return [as_row(r) for r in json.load(out)], ""
    args = bench.script_args[1] if quick else bench.script_args[0]
    result = subprocess.run(
        [sys.executable, path, *args], capture_output=True, text=True, cwd=HERE, check=False
    )
    output = result.stdout + (f"\n(stderr)\n{result.stderr}" if result.returncode else "")
    if result.returncode:
        return [Row(bench.id, f"{bench.module}.py failed", "", "", None, "", False)], output
    return rows_from_output(bench, output), output


def rows_from_output(bench: Benchmark, output: str) -> list[Row]:
    """Table rows a script printed (`| B7 | what | fcb | peer | ratio | target | met |`), or
    the figures of the replay and orbax reports."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(bench.id) and len(cells) >= 7:
            ratio = re.match(r"([\d.,]+)x", cells[4])
            rows.append(
                Row(
                    cells[0],
                    cells[1],
                    cells[2],
                    cells[3],
                    float(ratio.group(1).replace(",", "")) if ratio else None,
                    cells[5],
                    {"yes": True, "no": False, "**no**": False}.get(cells[6]),
                )
            )
    if rows:
        return rows
    parse = {"replay": _replay_rows, "orbax_save": _orbax_rows}.get(bench.module)
    rows = parse(bench.id, output) if parse else []
    return rows or [Row(bench.id, f"{bench.module}.py: see its output", "", "", None, "", None)]


def _replay_rows(id: str, output: str) -> list[Row]:
    """Rows from fcb.replay's report (`benchmarks/replay.py`): its speed-ups, compiled
    (warm: the replay run again) and cold (grid built, replay compiled and run once)."""
    rows = []
    timings = {
        kind: re.search(rf"fcb\.replay {kind} \S+\s+([\d.]+)", output) for kind in ("cold", "warm")
    }
    for peer, target in (("Lightning", 1000.0), ("flax", 30.0)):
        found = re.search(
            rf"speed-up vs {peer}:\s+([\d,.]+)x cold, ([\d,.]+)x warm", output, re.IGNORECASE
        )
        seconds = re.search(rf"{peer} EarlyStopping loop\s+([\d.]+)", output)
        if not found:
            continue
        for kind, value in (("warm", found.group(2)), ("cold", found.group(1))):
            speedup = float(value.replace(",", ""))
            fcb_time = timings[kind]
            rows.append(
                Row(
                    id + ("" if peer == "Lightning" else "f") + ("" if kind == "warm" else "c"),
                    f"fcb.replay of 10,000 EarlyStopping configurations against a {peer} "
                    f"EarlyStopping loop (extrapolated from a sample); speed-up, "
                    + ("compiled" if kind == "warm" else "compile included"),
                    f"{fcb_time.group(1)} s" if fcb_time else "",
                    f"{seconds.group(1)} s" if seconds else "",
                    speedup,
                    f">= {target:,.0f}x faster",
                    speedup >= target,
                )
            )
    return rows


def _orbax_rows(id: str, output: str) -> list[Row]:
    """Rows from fcb.orbax's report (`benchmarks/orbax_save.py`): save times per mode."""
    rows = []
    size = re.search(r"saves of one pytree \(([\d.]+ MiB)\)", output)
    for line in output.splitlines():
        found = re.match(r"(async|sync)\s+([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+)", line.strip())
        if found:
            mode, ours, direct, ratio = found.groups()
            rows.append(
                Row(
                    id if mode == "async" else id + "s",
                    f"fcb.orbax save of an equinox MLP + Adam state"
                    f"{f' ({size.group(1)})' if size else ''}, {mode}, waited for, against "
                    "direct CheckpointManager.save",
                    f"{ours} ms",
                    f"{direct} ms",
                    float(ratio),
                    "<= 1.05x",
                    float(ratio) <= 1.05,
                )
            )
    loop = re.search(r"ratio \(median\) ([\d.]+); callbacks cost ([\d.]+) us per check", output)
    if loop:
        rows.append(
            Row(
                id + "c",
                "fcb.orbax report: four callbacks in a compiled loop against the same loop "
                "without them",
                f"{loop.group(2)} us per check",
                "the loop alone",
                float(loop.group(1)),
                "",
                None,
            )
        )
    return rows


def results_block(rows: list[Row], outputs: dict[str, str], command: str, seconds: float) -> str:
    info = machine()
    lines = [
        START,
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} with `{command}` "
        f"({seconds / 60:.1f} min).",
        "",
        "Machine: "
        + f"{info['cpu']}, {info['cores']} cores, {info['os']}; Python {info['python']}, "
        + ", ".join(
            f"{name} {info[name]}"
            for name in ("torch", "jax", "pytorch_lightning", "orbax.checkpoint", "flax")
        )
        + ".",
        "",
        "Ratios are fcb / peer (for B4r: fcb bandwidth / raw bandwidth; for B3: the speed-up).",
        "",
        format_table(rows),
    ]
    for name, output in outputs.items():
        if output.strip():
            lines += ["", f"Output of `benchmarks/{name}.py`:", "", "```", output.rstrip(), "```"]
    lines.append(END)
    return "\n".join(lines)


def write_results(block: str) -> None:
    text = "# Benchmark results\n"
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            text = f.read()
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    with open(RESULTS, "w") as f:
        f.write(before + block + after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that each runs")
    parser.add_argument("--only", default="", help="comma-separated ids, e.g. B1,B4")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--in-process", action="store_true", help="no process per benchmark")
    args = parser.parse_args(argv)
    wanted = {i.strip().upper() for i in args.only.split(",") if i.strip()}
    start = time.perf_counter()
    rows: list[Row] = []
    outputs: dict[str, str] = {}
    for bench in BENCHMARKS:
        if wanted and bench.id not in wanted:
            continue
        print(f"running {bench.id} ({bench.module}.py)...", file=sys.stderr, flush=True)
        bench_rows, output = run_benchmark(bench, args.quick, isolate=not args.in_process)
        rows += bench_rows
        outputs[bench.module] = output
    print(format_table(rows))
    if args.write:
        command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
        write_results(results_block(rows, outputs, command, time.perf_counter() - start))
        print(f"\nwritten to {os.path.relpath(RESULTS)}", file=sys.stderr)
    for row in rows:
        if row.what.endswith("is missing"):
            print(f"warning: {row.id} not run: {row.what}", file=sys.stderr)
    return 1 if any(row.what.endswith("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
