"""fcb.ReplayResult: what each configuration of a replay did, as a table of NumPy columns."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from ._core import StopReason
from ._errors import ConfigError
from ._monitor import Mode


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ReplayResult:
    """What each configuration of a replay did. Columns are NumPy arrays, one row per
    configuration (in the order of `configs`).

    Attributes:
        names: the varied options (none when a single callback was replayed).
        values: per configuration, the values of `names`.
        stop_step: the step of the check that stopped the run (-1: never stopped).
        stop_reason: its [`fcb.StopReason`][] code (0 when never stopped).
        checks: how many checks the run made (up to and including the stopping check).
        best_step: the best check of `monitor` among those checks (-1 when none was finite):
            the step `fcb.ModelCheckpoint(monitor, mode)` holds as its best when the run ends
            (strict improvement, so the earliest of tied values; NaN and ±inf never).
        best_value: its value (NaN when none).
        slots: slot name -> the step each checkpoint slot holds when the run ends (-1: empty).
        slot_values: slot name -> the metric value of that step (NaN: empty).
        monitor: the metric `best_step` follows (None when the callbacks monitor nothing).
        mode: `"min"` or `"max"`.
        steps: the step number of every check of the history.
        state: the callbacks' final state, batched (each configuration frozen at its stop).
    """

    names: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]
    stop_step: np.ndarray
    stop_reason: np.ndarray
    checks: np.ndarray
    best_step: np.ndarray
    best_value: np.ndarray
    slots: dict[str, np.ndarray]
    slot_values: dict[str, np.ndarray]
    monitor: str | None
    mode: Mode
    steps: np.ndarray
    state: Any

    def __len__(self) -> int:
        return len(self.values)

    @functools.cached_property
    def configs(self) -> list[dict[str, Any]]:
        """Per configuration, the varied options and their values (`{}` for a single
        callback)."""
        return [dict(zip(self.names, v, strict=True)) for v in self.values]

    def row(self, index: int) -> dict[str, Any]:
        """Configuration `index` and its results as plain Python values."""
        row: dict[str, Any] = dict(zip(self.names, self.values[index], strict=True))
        row["stop_step"] = int(self.stop_step[index])
        row["stop_reason"] = StopReason(int(self.stop_reason[index])).name.lower()
        row["checks"] = int(self.checks[index])
        row["best_step"] = int(self.best_step[index])
        row["best_value"] = float(self.best_value[index])
        row.update({name: int(s[index]) for name, s in self.slots.items()})
        return row

    def rows(self) -> list[dict[str, Any]]:
        """Every configuration as a dict (for `pandas.DataFrame(result.rows())`)."""
        return [self.row(i) for i in range(len(self))]

    def _quality(self) -> np.ndarray:
        """best_value turned into "smaller is better", NaN last."""
        value = self.best_value.astype(np.float64) * (1.0 if self.mode == "min" else -1.0)
        return np.where(np.isnan(value), np.inf, value)

    def order(self, by: str = "best_value") -> np.ndarray:
        """Row indices sorted by a column: `best_value` (better first, then fewer checks),
        `checks` / `stop_step` (fewer first, then better value), or a varied option."""
        quality, checks = self._quality(), self.checks
        if by == "best_value":
            keys: tuple[Any, ...] = (checks, quality)
        elif by in ("checks", "stop_step"):
            keys = (quality, checks)
        elif by in self.names:
            position = self.names.index(by)
            keys = (np.asarray([v[position] for v in self.values], np.float64),)
        else:
            raise ConfigError(
                f"ReplayResult: cannot sort by {by!r}; use 'best_value', 'checks', 'stop_step' "
                f"or one of the varied options {list(self.names)}."
            )
        return np.lexsort(keys)

    def best(self) -> dict[str, Any]:
        """The row of the configuration that kept the best value; ties: fewest checks."""
        return self.row(int(self.order("best_value")[0]))

    def pareto(self) -> np.ndarray:
        """Row indices (into `configs`, `rows()` and every column) of the configurations no
        other beats on both fewer checks and a better best value, by increasing checks: the
        trade-offs worth considering. `result.configs[i]` is the setting of index `i`:

        >>> result = fcb.replay(
        ...     fcb.grid(fcb.EarlyStopping, monitor="loss", patience=[1, 2, 3]),
        ...     {"loss": [0.5, 0.4, 0.45, 0.41, 0.3]})
        >>> front = result.pareto()
        >>> front.tolist(), [result.configs[i] for i in front]
        ([0, 2], [{'patience': 1}, {'patience': 3}])
        """
        quality, front, best_so_far = self._quality(), [], np.inf
        for index in self.order("checks"):
            if quality[index] < best_so_far:
                front.append(index)
                best_so_far = quality[index]
        return np.asarray(front, dtype=np.int64)

    def table(self, max_rows: int | None = 20, sort_by: str | None = None) -> str:
        """The results as an aligned text table (`max_rows=None`: every row). A
        configuration that did not stop within the history shows its stop step as `> S`
        (after the last recorded step `S`, if ever) and its reason as `history ended`."""
        order = np.arange(len(self)) if sort_by is None else self.order(sort_by)
        shown = list(order)
        hidden = 0
        if max_rows is not None and len(shown) > max_rows:
            head = max(1, max_rows - max_rows // 4)
            hidden = len(shown) - max_rows
            shown = [*shown[:head], -1, *shown[len(shown) - (max_rows - head) :]]
        best_header = f"best {self.monitor}" if self.monitor else "best_value"
        headers = ["#", *self.names, "stop_step", "reason", "checks", "best_step", best_header]
        headers += list(self.slots)
        lines = []
        for index in shown:
            if index < 0:
                lines.append([f"... {hidden} more rows"] + [""] * (len(headers) - 1))
                continue
            row = self.row(int(index))
            cells = [str(index)] + [_cell(row[n]) for n in self.names]
            # not stopped: the history ended first (it may stop later), not "never stops"
            cells += [
                f"> {int(self.steps[-1])}" if row["stop_step"] < 0 else str(row["stop_step"]),
                "history ended" if row["stop_reason"] == "none" else row["stop_reason"],
                str(row["checks"]),
                "-" if row["best_step"] < 0 else str(row["best_step"]),
                "-" if np.isnan(row["best_value"]) else f"{row['best_value']:.6g}",
            ]
            cells += ["-" if row[s] < 0 else str(row[s]) for s in self.slots]
            lines.append(cells)
        widths = [
            max([len(h)] + [len(line[i]) for line in lines if not line[0].startswith("...")])
            for i, h in enumerate(headers)
        ]

        def fmt(cells: list[str]) -> str:
            if cells[0].startswith("..."):
                return cells[0]
            return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        title = (
            f"replay: {len(self)} configuration{'s' if len(self) != 1 else ''} x "
            f"{len(self.steps)} checks"
        )
        if self.monitor:
            title += f"; best = {'lowest' if self.mode == 'min' else 'highest'} {self.monitor}"
        return "\n".join([title, fmt(headers), *(fmt(c) for c in lines)])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"ReplayResult({len(self)} configurations x {len(self.steps)} checks, "
            f"monitor={self.monitor!r}, varied={list(self.names)})"
        )


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
