"""`fcb replay`: every combination of `--patience` and `--min-delta` replayed at once over a
recorded metric history, as a table, the best configuration and the trade-off front."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from ._common import UsageError, _missing, _not_a_history, _recorded_metrics
from ._plot import _check_output, _plot_replay, _require_matplotlib


def _parse_values(option: str, spec: str, *, integer: bool) -> list[Any]:
    """`1:50` (inclusive), `1:50:5`, `0,1e-3,1e-2`, or a mix: `1,2,5:20:5`."""
    values: list[Any] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                bounds = [float(p) for p in part.split(":")]
                if len(bounds) not in (2, 3):
                    raise ValueError
                low, high = bounds[0], bounds[1]
                step = bounds[2] if len(bounds) == 3 else 1.0
                if high < low:
                    raise UsageError(
                        f"{option} {spec!r}: the range {part} runs backwards (a range is "
                        f"low:high, inclusive); write {high:g}:{low:g}."
                    )
                if step <= 0:
                    raise UsageError(
                        f"{option} {spec!r}: the step of the range {part} must be > 0."
                    )
                count = math.floor((high - low) / step + 1e-9) + 1
                values += [low + i * step for i in range(count)]
            else:
                values.append(float(part))
        except ValueError:
            raise UsageError(
                f"{option} {spec!r}: expected numbers and inclusive ranges such as 1:50, "
                f"1:50:5 or 0,1e-3,1e-2."
            ) from None
    if integer:
        if any(v != round(v) for v in values):
            raise UsageError(f"{option} {spec!r}: expected whole numbers.")
        return [round(v) for v in values]
    # ranges accumulate binary rounding (0.1 + 0.2): keep what the user would have typed
    return [float(f"{v:.12g}") for v in values]


def _check_history(path: str, monitor: str, steps: str | None) -> None:
    """A usage error unless `path` is a metric history recording `monitor`."""
    from .._history import read_rows

    try:
        rows = read_rows(path)
    except ValueError as error:  # not text, or a CSV without a header
        raise UsageError(_not_a_history(path, str(error))) from None
    metrics = _recorded_metrics(rows, steps)
    if not metrics:
        raise UsageError(_not_a_history(path, "it records no numeric metric"))
    if monitor not in metrics:
        raise UsageError(
            f"--monitor {monitor!r} is not recorded in {path}; recorded metrics: {metrics}."
        )


def _replay(args: argparse.Namespace) -> int:
    from .._replay import replay

    patience = _parse_values("--patience", args.patience, integer=True)
    min_delta = _parse_values("--min-delta", args.min_delta, integer=False)
    if args.rows < 0:
        raise UsageError(f"--rows must be >= 0 (0 shows every row), got {args.rows}.")
    if args.study is not None:  # HISTORY is an Optuna storage URL
        return _replay_study(args, patience, min_delta)
    if not os.path.exists(args.history):
        raise _missing(args.history, "a CSV or JSONL history, or a run directory")
    if args.plot:
        _require_matplotlib()
        _check_output(args.plot, "--plot")
    _check_history(args.history, args.monitor, args.steps)
    batch = _grid(args, patience, min_delta)
    result = replay(batch, args.history, steps=args.steps)
    print(result.table(max_rows=None if args.rows == 0 else args.rows, sort_by=args.sort))
    best = result.best()
    print()
    print(
        f"best {result.monitor}: {best['best_value']:.6g} at step {best['best_step']} with "
        f"patience={best['patience']}, min_delta={best['min_delta']:g} ({best['checks']} checks)"
    )
    front = result.pareto()
    if len(front) > 1:
        print("trade-offs (fewer checks, or a better value):")
        for index in front:
            row = result.row(int(index))
            print(
                f"  patience={row['patience']:<4} min_delta={row['min_delta']:<8g} "
                f"{row['checks']:>5} checks  best {result.monitor} {row['best_value']:.6g}"
            )
    if args.plot:
        _plot_replay(result, args.plot, args.history)
        print(f"plot: {args.plot}")
    return 0


def _grid(args: argparse.Namespace, patience: list[Any], min_delta: list[Any]) -> Any:
    """Every combination of the EarlyStopping options given on the command line."""
    from .. import _early_stopping
    from .._replay import grid

    return grid(
        _early_stopping.EarlyStopping,
        monitor=args.monitor,
        mode=args.mode,
        patience=patience,
        min_delta=min_delta,
    )


def _replay_study(args: argparse.Namespace, patience: list[Any], min_delta: list[Any]) -> int:
    """`fcb replay STORAGE --study NAME`: the grid over every trial of an Optuna study."""
    from .._replay import replay

    result = replay(_grid(args, patience, min_delta), args.history, study_name=args.study)
    print(result.table(max_rows=None if args.rows == 0 else args.rows))
    keeps_best = [i for i in range(len(result)) if result.lost[i] == 0]
    if keeps_best:
        i = max(keeps_best, key=lambda index: result.saved[index])
        print(
            f"\nmost compute saved without losing the best trial: {result.configs[i]} "
            f"({100 * result.saved[i]:.1f}% of the checks, {result.pruned[i]} trials pruned)"
        )
    return 0
