"""Plots: `fcb plot` (a run's monitored metric with its best, tolerance and stop markers) and
the plot of an `fcb replay` sweep. matplotlib is imported only when a plot is asked for."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

from .._errors import CheckpointCorruptError
from .._history import HISTORY_NAME, find_history, read_records
from ._common import (
    UsageError,
    _by_tolerance,
    _find_manifest,
    _kind,
    _monitor_of,
    _read_manifest,
    _storage,
)


def _require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "plots need matplotlib: pip install -c constraints.txt 'fcb[plot]'."
        ) from None
    return plt


def _save(fig: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"cannot write {path}: {directory} does not exist.")
    try:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot write {path}: {error}") from None


def _plot_replay(result: Any, path: str, source: str) -> None:
    import numpy as np

    plt = _require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    patience = np.asarray([c["patience"] for c in result.configs])
    deltas = sorted({c["min_delta"] for c in result.configs})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(deltas)))
    for delta, color in zip(deltas, colors, strict=True):
        rows = np.asarray([c["min_delta"] == delta for c in result.configs])
        order = np.argsort(patience[rows])
        left.plot(patience[rows][order], result.checks[rows][order], "-", marker=".",
                  color=color, label=f"min_delta = {delta:g}")
    left.axhline(len(result.steps), color="0.5", ls=":", lw=1.2,
                 label="end of the history (never stopped)")
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
    if not os.path.isdir(args.run_dir):
        raise UsageError(f"{args.run_dir} is not a directory; pass a run directory.")
    history_path = find_history(args.run_dir)
    if history_path is None:
        raise UsageError(
            f"{args.run_dir} has no {HISTORY_NAME}: record one with "
            f"history=True on the adapter (fcb demo does)."
        )
    try:
        records = read_records(history_path)
    except ValueError as error:
        raise UsageError(str(error)) from None
    checks = [r for r in records if isinstance(r.get("metrics"), dict)]
    if not checks:
        raise UsageError(f"{history_path} records no check yet.")
    summary: dict[str, Any] = {}
    for record in records:
        if isinstance(record.get("summary"), dict):
            summary = record["summary"]
    manifest: dict[str, Any] = {}
    try:
        directory = _find_manifest(args.run_dir)
        manifest = _read_manifest(directory, _storage(directory))
    except (UsageError, CheckpointCorruptError):
        pass  # the curve alone is still worth plotting
    monitored = _monitor_of((manifest.get("callbacks") or {}).get("config"))
    available = list(dict.fromkeys(k for r in checks for k in r["metrics"]))
    metric = args.metric or (monitored[0] if monitored else None)
    if metric is None:
        metric = "val_loss" if "val_loss" in available else available[0]
    if metric not in available:
        raise UsageError(
            f"--metric {metric!r} is not in {history_path}; recorded metrics: {available}."
        )
    mode = monitored[1] if monitored and monitored[0] == metric else "min"
    plt = _require_matplotlib()
    _plot_run(plt, args.output, args.run_dir, checks, summary, manifest, metric, mode)
    print(f"plot: {args.output}")
    return 0


def _plot_run(
    plt: Any,
    path: str,
    run_dir: str,
    checks: list[dict[str, Any]],
    summary: Mapping[str, Any],
    manifest: Mapping[str, Any],
    metric: str,
    mode: str,
) -> None:
    steps = [r["step"] for r in checks]
    values = [float(r["metrics"].get(metric, math.nan)) for r in checks]
    value_at = dict(zip(steps, values, strict=True))
    lrs = [r["lr"][0] if r.get("lr") else math.nan for r in checks]
    has_lr = len({lr for lr in lrs if math.isfinite(lr)}) > 1
    if has_lr:
        fig, (ax, lr_ax) = plt.subplots(
            2, 1, figsize=(12, 6.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
        fig, ax = plt.subplots(figsize=(12, 5))
        lr_ax = None
    others = [k for k in checks[0]["metrics"] if k != metric and "loss" in k and "loss" in metric]
    slots = manifest.get("slots", {})
    tolerance_slots = _by_tolerance(n for n, slot in slots.items() if _kind(slot) == "tolerance")
    best_steps = sorted({slot["step"] for slot in slots.values() if _kind(slot) == "best"})
    stop = next((r for r in checks if r.get("stop")), None)
    finite = [v for v in values if math.isfinite(v)]
    span = (max(finite) - min(finite)) if finite else 1.0
    colors = ["tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]

    def draw(axes: Any, offset: float, labels: bool) -> None:
        """The curve and every marker; `offset` lifts the tolerance markers off the curve."""
        def label(text: str) -> str | None:
            return text if labels else None

        axes.plot(steps, values, "-", color="tab:blue", lw=1.8, marker=".", ms=5,
                  label=label(metric))
        for key in others:
            axes.plot(steps, [r["metrics"].get(key, math.nan) for r in checks], "--",
                      color="0.6", lw=1, label=label(key))
        for best_step in best_steps:
            value = value_at.get(best_step, math.nan)
            axes.plot(best_step, value, "*", color="gold", ms=20, markeredgecolor="black",
                      zorder=6, label=label(f"best: {value:.4g} at step {best_step}"))
        for i, slot in enumerate(tolerance_slots):
            t, color = slot.rsplit("=", 1)[1], colors[i % len(colors)]
            kept = slots[slot]["step"]
            value = value_at.get(kept, math.nan)
            stopped = summary.get(f"{slot}/stopped_step", -1)
            text = f"patience {t} would keep step {kept}"
            if isinstance(stopped, (int, float)) and stopped >= 0:
                text += f" (stops at {int(stopped)}, dotted)"
                axes.axvline(stopped, color=color, ls=":", lw=1.4)
            # below the curve, pointing up at the kept check: visible even under the best star
            below = value - offset * (i + 1)
            axes.plot([kept, kept], [below, value], "-", color=color, lw=1, zorder=4)
            axes.plot(kept, below, "^", color=color, ms=11, markeredgecolor="black", zorder=5,
                      label=label(text))
        if stop is not None:
            short = "patience ran out" if "patience" in stop["stop"] else stop["stop"]
            axes.axvline(stop["step"], color="crimson", ls="--", lw=1.8,
                         label=label(f"stopped at step {stop['step']}: {short}"))

    draw(ax, 0.04 * span, labels=True)
    ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    title = f"{metric} per check, {os.path.normpath(run_dir)}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    marked = best_steps + [slots[s]["step"] for s in tolerance_slots]
    if marked and finite:
        # the decisions happen on the plateau, which the first checks' scale flattens: zoom in
        first = max(min(marked) - 3, steps[0])
        window = [v for s, v in zip(steps, values, strict=True) if s >= first and math.isfinite(v)]
        low, high = min(window), max(window)
        if high - low < 0.3 * span:
            # flush with the top right corner, so no line of the main axes shows beside it
            zoom = ax.inset_axes((0.42, 0.38, 0.58, 0.62))
            pad = 0.1 * (high - low + 1e-12)
            draw(zoom, 0.12 * (high - low + 1e-12), labels=False)
            offset_room = 0.12 * (high - low + 1e-12) * (len(tolerance_slots) + 1)
            zoom.set_xlim(first - 0.5, steps[-1] + 0.5)
            zoom.set_ylim(low - offset_room, high + pad)
            zoom.grid(alpha=0.3)
            zoom.text(0.02, 0.04, f"steps {first} to {steps[-1]}, zoomed", transform=zoom.transAxes,
                      fontsize=8, va="bottom", color="0.3")
            zoom.tick_params(labelsize=8)
            ax.indicate_inset_zoom(zoom, edgecolor="0.4")
    if lr_ax is not None:
        lr_ax.step(steps, lrs, where="post", color="tab:orange", lw=1.6)
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(alpha=0.3)
        lr_ax.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
