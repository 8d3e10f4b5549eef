"""Shared pieces of the benchmarks: timing, result rows, machine description, command line.

Every benchmark module exposes `run(quick: bool = False) -> list[Row]` and a `main()` that
prints its rows; `benchmarks/run.py` collects the rows of all of them into one table.
Timings are medians over repeats after a warm-up; fcb and its peer are timed alternately in
the same process, so both see the same machine load, and the ratio is the median of the
per-repeat ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass
class Row:
    """One line of the results table.

    `ratio` is fcb / peer (the target says which way is better); `met` says whether the target
    holds (None when the row has no target).
    """

    id: str
    what: str
    fcb: str
    peer: str
    ratio: float | None
    target: str
    met: bool | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def interleaved(
    subjects: dict[str, Callable[[], float]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call each subject (which returns the seconds it measured) in turn, `repeats` times.

    Alternating the subjects inside each repeat keeps slow drifts of the machine (other
    processes, thermal state) from favouring one of them.
    """
    for _ in range(warmup):
        for fn in subjects.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(repeats):
        for name, fn in subjects.items():
            gc.collect()
            times[name].append(fn())
    return times


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def spread(values: Sequence[float]) -> str:
    """The middle half of the per-repeat ratios, to show how much the machine moved them."""
    if len(values) < 4:
        return f"ratios {min(values):.2f}-{max(values):.2f}"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"middle half of the ratios {q1:.2f}-{q3:.2f}"


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """CPU, cores, Python and library versions, for the results file."""
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for name in ("torch", "jax", "pytorch_lightning", "orbax.checkpoint", "flax", "fcb"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            info[name] = "not installed"
    return info


def format_ratio(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    if ratio >= 0.01:
        return f"{ratio:.3f}x"
    return f"{ratio:.2g}x"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| id | what | fcb | peer | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "" if row.ratio is None else format_ratio(row.ratio)
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        what = row.what + (f" ({row.note})" if row.note else "")
        lines.append(
            f"| {row.id} | {what} | {row.fcb} | {row.peer} | {ratio} | {row.target} | {met} |"
        )
    return "\n".join(lines)


def cli(run: Callable[..., list[Row]], doc: str | None, argv: Sequence[str] | None = None) -> int:
    """Parse `--quick`, run the benchmark, print its rows."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    print(format_table(rows))
    sys.stdout.flush()
    return 0
