"""Plots: `fcb plot` (a run's, or a history file's, metric with its best, tolerance and stop
markers) and the plot of an `fcb replay` sweep. matplotlib is imported only when a plot is
asked for."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._errors import CheckpointCorruptError
from ._common import (
    UsageError,
    _find_manifest,
    _install_hint,
    _missing,
    _monitor_of,
    _not_a_history,
    _read_manifest,
    _recorded_metrics,
    _storage,
)


def _require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            f"plots need matplotlib: {_install_hint('plot')}."
        ) from None
    return plt


def _check_output(path: str, option: str) -> None:
    """A usage error, before any work, unless a plot can be written to `path`."""
    from matplotlib.figure import Figure

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path}: cannot write it, {directory} does not exist.")
    formats = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        raise UsageError(
            f"{option} {path}: {extension or 'no extension'!r} is not an image format "
            f"matplotlib writes; end the name with one of {sorted(formats)}, e.g. .png."
        )


def _save(fig: Any, path: str) -> None:
    try:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot write {path}: {error}") from None


def _plot_replay(result: Any, path: str, source: str) -> None:
    import numpy as np

    plt = _require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis in (left.xaxis, left.yaxis, right.xaxis):  # patience and checks are counts
        axis.set_major_locator(MaxNLocator(integer=True))
    patience = np.asarray([c["patience"] for c in result.configs])
    deltas = sorted({c["min_delta"] for c in result.configs})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(deltas)))
    for delta, color in zip(deltas, colors, strict=True):
        rows = np.asarray([c["min_delta"] == delta for c in result.configs])
        order = np.argsort(patience[rows])
        left.plot(patience[rows][order], result.checks[rows][order], "-", marker=".",
                  color=color, label=f"min_delta = {delta:g}")
    left.axhline(len(result.steps), color="0.5", ls=":", lw=1.2,
                 label="end of the history (not stopped within it)")
    left.set_xlabel("patience (checks without improvement before stopping)")
    left.set_ylabel("checks run (training cost)")
    left.set_title("When each configuration stops")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    scatter = right.scatter(result.checks, result.best_value, c=patience, cmap="viridis", s=18,
                            alpha=0.8)
    fig.colorbar(scatter, ax=right, label="patience")
    front = result.pareto()
    right.plot(result.checks[front], result.best_value[front], "-", color="crimson", lw=1.5,
               label="trade-off front")
    best = int(result.order("best_value")[0])
    right.plot(result.checks[best], result.best_value[best], "*", color="gold", ms=16,
               markeredgecolor="black", label=(
                   f"best: patience={result.configs[best]['patience']}, "
                   f"min_delta={result.configs[best]['min_delta']:g}"))
    right.set_xlabel("checks run (training cost)")
    right.set_ylabel(f"best {result.monitor} kept")
    right.set_title(f"Best {result.monitor} kept vs training cost")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(
        f"EarlyStopping replayed on {os.path.basename(os.path.normpath(source))}: "
        f"{len(result)} configurations x {len(result.steps)} checks"
    )
    _save(fig, path)
    plt.close(fig)


def _plot(args: argparse.Namespace) -> int:
    from .._history import HISTORY_NAME, find_history

    source = args.run_dir
    if not os.path.exists(source):
        raise _missing(source, "a run directory or a history file (.jsonl, .csv)")
    plt = _require_matplotlib()
    _check_output(args.output, "-o")
    if os.path.isdir(source):
        history_path = find_history(source)
        if history_path is None:
            raise UsageError(
                f"{source} has no {HISTORY_NAME}: record one with history=True on the adapter "
                f"(fcb demo does), or pass a history file (.jsonl, Lightning's metrics.csv)."
            )
    else:
        history_path = source
    checks, summary = _read_checks(history_path, args.steps)
    manifest: dict[str, Any] = {}
    if history_path.endswith((".jsonl", ".ndjson")):  # an fcb history: its run's checkpoints
        try:
            directory = _find_manifest(os.path.dirname(os.path.abspath(history_path)))
            manifest = _read_manifest(directory, _storage(directory))
        except (UsageError, CheckpointCorruptError):
            pass  # the curve alone is still worth plotting
    monitored = _monitor_of((manifest.get("callbacks") or {}).get("config"))
    available = _recorded_metrics([c["metrics"] for c in checks])
    metric = args.metric or (monitored[0] if monitored else None)
    if metric is None:
        metric = "val_loss" if "val_loss" in available else available[0]
    if metric not in available:
        raise UsageError(
            f"--metric {metric!r} is not in {history_path}; recorded metrics: {available}."
        )
    mode = monitored[1] if monitored and monitored[0] == metric else "min"
    checks = [c for c in checks if metric in c["metrics"]]
    from ._plot_run import run_figure

    title = f"{metric} per check, {os.path.normpath(source)}"
    fig = run_figure(plt, title, checks, summary, manifest, metric, mode,
                     monitored[0] if monitored else None)
    _save(fig, args.output)
    plt.close(fig)
    print(f"plot: {args.output}")
    return 0


def _read_checks(path: str, steps: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The checks of a history file as history.jsonl records (`step`, `metrics`, ...) in
    step order, and its summary; a CSV's rows of one step are one check."""
    from .._history import read_records, read_rows

    summary: dict[str, Any] = {}
    try:
        if path.endswith((".jsonl", ".ndjson")) and steps is None:
            records = read_records(path)
            checks = [r for r in records if isinstance(r.get("metrics"), dict)]
            for record in records:
                if isinstance(record.get("summary"), dict):
                    summary = record["summary"]
        else:
            checks = _checks_of_rows(path, read_rows(path), steps)
    except ValueError as error:  # not text, or a CSV without a header
        raise UsageError(_not_a_history(path, str(error))) from None
    if not any(_recorded_metrics([c["metrics"]]) for c in checks):
        raise UsageError(_not_a_history(path, "it records no numeric metric"))
    return checks, summary


def _checks_of_rows(
    path: str, rows: list[dict[str, Any]], steps: str | None
) -> list[dict[str, Any]]:
    column = steps or "step"
    if steps is not None and not any(column in row for row in rows):
        raise UsageError(
            f"--steps {steps!r} is not a column of {path}; its columns: "
            f"{list(dict.fromkeys(k for row in rows for k in row))}."
        )
    merged: dict[int, dict[str, float]] = {}
    for index, row in enumerate(rows):
        step = row.get(column, index if steps is None else None)
        if step is None:
            continue
        try:
            number = float(step)
        except (TypeError, ValueError):
            raise UsageError(
                f"{path}: the step column {column!r} holds {step!r}, not a step number."
            ) from None
        metrics = merged.setdefault(int(number), {})
        for key in _recorded_metrics([row], steps):
            metrics[key] = float(row[key])
    return [{"step": step, "metrics": merged[step]} for step in sorted(merged)]
