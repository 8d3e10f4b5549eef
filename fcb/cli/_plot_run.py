"""The figure of `fcb plot`: a run's metric per check, with the best checkpoint, the
tolerance checkpoints and the stop marked, a zoom on the plateau where the decisions happen,
and the learning rate when it changed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ._common import _by_tolerance, _kind

ZOOM_BOUNDS = (0.42, 0.58, 0.58, 0.42)
"""Where the zoom sits in the main axes (x, y, width, height in axes fractions): the top
right, above `CURVE_TOP`."""
CURVE_TOP = 0.54
"""The main axes' y range is set so that every marked value lies below this fraction of its
height: the zoom above it covers neither the curve nor a marker."""
DODGE = 0.12
"""Vertical lines at the same step are spread this many steps apart, so none hides another."""
FIRST_DROP = 15.0
"""Points from a kept check down to its tolerance triangle: clear of the best star there."""
NEXT_DROP = 11.0
"""Points between the triangles of tolerances that keep the same check."""
TOLERANCE_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


class _Line(NamedTuple):
    step: float
    color: str
    style: str
    width: float
    label: str


def _dodged(lines: Sequence[_Line]) -> list[_Line]:
    """Vertical lines with those at the same step spread around it."""
    out = []
    for line in lines:
        same = [other for other in lines if other.step == line.step]
        if len(same) == 1:
            out.append(line)
            continue
        position = same.index(line) - (len(same) - 1) / 2
        out.append(line._replace(step=line.step + DODGE * position))
    return out


def run_figure(
    plt: Any,
    title: str,
    checks: list[dict[str, Any]],
    summary: Mapping[str, Any],
    manifest: Mapping[str, Any],
    metric: str,
    mode: str,
    monitored: str | None,
) -> Any:
    """The figure (the caller saves and closes it). `monitored` is the metric the run's
    checkpoints follow; when another metric is plotted, the checkpoint markers say whose
    best they are."""
    from matplotlib.ticker import MaxNLocator

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
    slots = manifest.get("slots", {}) if monitored in (None, metric) else {}
    foreign = {} if monitored in (None, metric) else manifest.get("slots", {})
    tolerance_slots = _by_tolerance(n for n, slot in slots.items() if _kind(slot) == "tolerance")
    best_steps = sorted({slot["step"] for slot in slots.values() if _kind(slot) == "best"})
    finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if not slots and finite:  # no checkpoint follows this metric: its own best check
        pick = min if mode == "min" else max
        best_steps = [pick(finite, key=lambda sv: sv[1])[0]]
    monitored_best = sorted({s["step"] for s in foreign.values() if _kind(s) == "best"})
    stop = next((r for r in checks if r.get("stop")), None)
    span = (max(v for _, v in finite) - min(v for _, v in finite)) if finite else 1.0

    lines = []
    for i, slot in enumerate(tolerance_slots):
        stopped = summary.get(f"{slot}/stopped_step", -1)
        if isinstance(stopped, (int, float)) and stopped >= 0:
            t = slot.rsplit("=", 1)[1]
            same = stop is not None and int(stopped) == stop["step"]
            lines.append(_Line(int(stopped), TOLERANCE_COLORS[i % len(TOLERANCE_COLORS)], ":",
                               1.4, f"patience {t} stops at {int(stopped)}"
                               + (" (the same check as the real stop)" if same else "")))
    if stop is not None:
        short = "patience ran out" if "patience" in stop["stop"] else stop["stop"]
        lines.append(_Line(stop["step"], "crimson", "--", 1.8,
                           f"stopped at step {stop['step']}: {short}"))
    lines = _dodged(lines)

    def draw(axes: Any, labels: bool) -> None:
        """The curve and every marker; the tolerance triangles hang a fixed number of points
        under their check, so on any scale none covers the star or another triangle."""
        from matplotlib.transforms import offset_copy
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
                      zorder=6, label=label(f"best {metric}: {value:.4g} at step {best_step}"))
        for best_step in monitored_best:
            axes.plot(best_step, value_at.get(best_step, math.nan), "D", color="gold", ms=9,
                      markeredgecolor="black", zorder=6,
                      label=label(f"best {monitored} checkpoint (monitored): step {best_step}"))
        for i, slot in enumerate(tolerance_slots):
            t, color = slot.rsplit("=", 1)[1], TOLERANCE_COLORS[i % len(TOLERANCE_COLORS)]
            kept = slots[slot]["step"]
            value = value_at.get(kept, math.nan)
            # below the curve, pointing up at the kept check: visible even under the best star
            drop = _drop(ranks[slot])
            axes.annotate("", xy=(kept, value), xytext=(0, -drop), textcoords="offset points",
                          arrowprops={"arrowstyle": "-", "color": color, "lw": 1}, zorder=4)
            below = offset_copy(axes.transData, fig=axes.figure, y=-drop, units="points")
            axes.plot(kept, value, "^", color=color, ms=11, markeredgecolor="black", zorder=5,
                      transform=below, scalex=False, scaley=False,
                      label=label(f"patience {t} would keep step {kept}"))
        for line in lines:
            axes.axvline(line.step, color=line.color, ls=line.style, lw=line.width,
                         label=label(line.label))

    kept_steps = [slots[s]["step"] for s in tolerance_slots]
    # the triangles of tolerances keeping the same check hang one under the other
    ranks = {s: kept_steps[:i].count(kept_steps[i]) for i, s in enumerate(tolerance_slots)}
    deepest = max(ranks.values(), default=0)
    draw(ax, labels=True)
    kept_values = [value_at.get(slots[s]["step"], math.nan) for s in tolerance_slots]
    kept_values = [v for v in kept_values if math.isfinite(v)]
    ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    for axes in (ax, lr_ax):
        if axes is not None:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    marked = best_steps + monitored_best + [slots[s]["step"] for s in tolerance_slots]
    zoomed = bool(marked and finite) and _zoom(
        ax, steps, values, min(marked), span, draw, deepest if tolerance_slots else None)
    if kept_values:  # room under the lowest kept check for its triangles
        bottom, top = ax.get_ylim()
        reference = ax.dataLim.y1 if zoomed else top
        fraction = CURVE_TOP if zoomed else 1.0
        low = _room_below(min(kept_values), reference, _drop(deepest),
                          _height_points(ax) * fraction)
        if low < bottom:
            ax.set_ylim(low, low + (reference - low) / fraction if zoomed else top)
    if lr_ax is not None:
        lr_ax.step(steps, lrs, where="post", color="tab:orange", lw=1.6)
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(alpha=0.3)
        lr_ax.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def _drop(index: int) -> float:
    """Points from a kept check down to the `index`-th tolerance triangle's centre."""
    return FIRST_DROP + NEXT_DROP * index


def _height_points(axes: Any) -> float:
    """The axes' height in points (before the final layout, which changes it a little)."""
    height = axes.get_position().height * axes.figure.get_figheight() * 72.0
    return float(height) * 0.85  # the layout's margins, with room to spare


def _room_below(value: float, top: float, drop: float, height: float) -> float:
    """The lowest y limit that leaves `drop` points (and a triangle) under `value` on axes
    `height` points tall whose top is `top`."""
    share = min((drop + 8.0) / max(height, 1.0), 0.6)
    return (value - share * top) / (1.0 - share)


def _zoom(
    ax: Any, steps: list[int], values: list[float], first_marked: int, span: float,
    draw: Any, deepest: int | None,
) -> bool:
    """A zoom on the checks from just before the first marked one, when they are flat on
    the main axes' scale; the main axes make room for it above everything they show.
    Whether it was drawn."""
    from matplotlib.ticker import MaxNLocator

    first = max(first_marked - 3, steps[0])
    window = [v for s, v in zip(steps, values, strict=True) if s >= first and math.isfinite(v)]
    low, high = min(window), max(window)
    if high - low >= 0.3 * span:
        return False
    bottom = ax.get_ylim()[0]  # every curve and marker drawn is within the data limits
    data_low, data_high = min(bottom, ax.dataLim.y0), ax.dataLim.y1
    ax.set_ylim(data_low, data_low + (data_high - data_low) / CURVE_TOP)
    zoom = ax.inset_axes(ZOOM_BOUNDS)
    pad = 0.1 * (high - low + 1e-12)
    draw(zoom, labels=False)
    zoom.set_xlim(first - 0.5, steps[-1] + 0.5)
    bottom = low - pad
    if deepest is not None:  # room for the tolerance triangles
        height = _height_points(ax) * ZOOM_BOUNDS[3]
        bottom = min(bottom, _room_below(low, high + pad, _drop(deepest), height))
    zoom.set_ylim(bottom, high + pad)
    zoom.xaxis.set_major_locator(MaxNLocator(integer=True))
    zoom.grid(alpha=0.3)
    zoom.text(0.02, 0.04, f"steps {first} to {steps[-1]}, zoomed", transform=zoom.transAxes,
              fontsize=8, va="bottom", color="0.3")
    zoom.tick_params(labelsize=8)
    ax.indicate_inset_zoom(zoom, edgecolor="0.4")
    return True
