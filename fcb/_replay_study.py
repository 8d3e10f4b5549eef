"""Replays over many histories of one metric: every trial of a finished Optuna study, and
the trial a pruner is asked about.

A trial's history is its intermediate values, seen by the callbacks under the metric name
`"value"` at the trial's own step numbers. Trials have different lengths; each history is
padded with NaN to a power-of-two capacity so that histories of nearby lengths share one
compiled replay, and whatever a configuration does on the padding is dropped: a stop there
is no stop (the trial ended first), and NaN never becomes a best value, so the best of the
real checks is untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._core import NO_STEP, StopReason
from ._errors import ConfigError
from ._grid import Grid
from ._monitor import Mode
from ._replay_history import load_study
from ._replay_result import ReplayResult

TRIAL_METRIC = "value"
"""The metric name a trial's intermediate values have for the callbacks."""


def capacity(length: int) -> int:
    """The padded length of a history of `length` checks: a power of two, at least 16."""
    return max(16, 1 << max(0, length - 1).bit_length())


def replay_values(batch: Grid, values: Sequence[float], steps: Sequence[int]) -> ReplayResult:
    """Every configuration of `batch` over one trial's `values` at `steps`, as if the trial
    had ended at its last check. Slots and final states are not kept (they would include
    the padding), so the result holds stops and bests only.

    >>> from fcb._grid import Grid, batch_of_one
    >>> result = replay_values(Grid(batch_of_one(fcb.EarlyStopping("value", patience=1))),
    ...                        [0.5, 0.6, 0.7], [0, 1, 2])
    >>> result.stop_step.tolist(), result.checks.tolist()
    ([1], [2])
    """
    from ._replay import replay  # _replay imports this module

    length = len(values)
    size = capacity(length)
    padded = np.full(size, np.nan, np.float64)
    padded[:length] = np.asarray(values, np.float64)
    last = int(steps[-1]) if length else -1
    step_numbers = np.concatenate(
        [np.asarray(steps, np.int64), last + 1 + np.arange(size - length)]
    )
    result = replay(batch, {TRIAL_METRIC: padded}, steps=step_numbers)
    stopped = (result.stop_step >= 0) & (result.checks <= length)
    return dataclasses.replace(
        result,
        stop_step=np.where(stopped, result.stop_step, NO_STEP),
        stop_reason=np.where(stopped, result.stop_reason, StopReason.NONE),
        checks=np.where(stopped, result.checks, length),
        slots={},
        slot_values={},
        steps=step_numbers[:length].astype(np.int32),
        state=None,
    )


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class StudyReplay:
    """What each configuration would have done over every trial of a study.

    Per-trial columns are `[configuration, trial]` arrays; a configuration "prunes" a
    trial when it stops before the trial's last check.

    Attributes:
        names: the varied options (none when a single callback was replayed).
        values: per configuration, the values of `names`.
        trials: the trial numbers, in the order of the columns.
        lengths: per trial, its number of intermediate values.
        trial_values: per trial, its objective value (the last intermediate value of a
            trial that has none, such as a trial the study's own pruner pruned).
        stop_step, stop_reason, checks, best_step, best_value: per configuration and
            trial, as in [`fcb.ReplayResult`][].
        mode: `"min"` or `"max"`: which trial values are better.
    """

    names: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]
    trials: np.ndarray
    lengths: np.ndarray
    trial_values: np.ndarray
    stop_step: np.ndarray
    stop_reason: np.ndarray
    checks: np.ndarray
    best_step: np.ndarray
    best_value: np.ndarray
    mode: Mode

    def __len__(self) -> int:
        return len(self.values)

    @functools.cached_property
    def configs(self) -> list[dict[str, Any]]:
        """Per configuration, the varied options and their values."""
        return [dict(zip(self.names, v, strict=True)) for v in self.values]

    @property
    def pruned(self) -> np.ndarray:
        """Per configuration, how many trials it prunes."""
        return (self.stop_step >= 0).sum(axis=1)

    @property
    def saved(self) -> np.ndarray:
        """Per configuration, the fraction of the study's checks it would not have run."""
        return 1.0 - self.checks.sum(axis=1) / max(1, int(self.lengths.sum()))

    def _best_of(self, keep: np.ndarray) -> np.ndarray:
        sign = 1.0 if self.mode == "min" else -1.0
        quality = np.where(keep & np.isfinite(self.trial_values), sign * self.trial_values, np.inf)
        best = quality.min(axis=-1)
        return np.where(np.isfinite(best), sign * best, np.nan)

    @property
    def best_kept(self) -> np.ndarray:
        """Per configuration, the best objective value among the trials it lets finish
        (NaN when it prunes them all)."""
        return self._best_of(self.stop_step < 0)

    @property
    def lost(self) -> np.ndarray:
        """Per configuration, how much worse `best_kept` is than the study's best value
        (0 when it keeps the best trial; NaN when it prunes every trial)."""
        overall = self._best_of(np.ones(self.trial_values.shape, bool))
        return np.abs(self.best_kept - overall)

    def row(self, index: int) -> dict[str, Any]:
        """Configuration `index` and its study-wide figures as plain Python values."""
        row: dict[str, Any] = dict(zip(self.names, self.values[index], strict=True))
        row["pruned"] = int(self.pruned[index])
        row["checks"] = int(self.checks[index].sum())
        row["saved"] = float(self.saved[index])
        row["best_kept"] = float(self.best_kept[index])
        row["lost"] = float(self.lost[index])
        return row

    def table(self, max_rows: int | None = 20) -> str:
        """Compute saved against best value lost, one row per configuration."""
        headers = ["#", *self.names, "pruned", "checks", "saved", "best kept", "lost"]
        lines = []
        for index in range(len(self) if max_rows is None else min(len(self), max_rows)):
            row = self.row(index)
            lines.append([
                str(index),
                *(f"{row[n]:g}" if isinstance(row[n], float) else str(row[n]) for n in self.names),
                f"{row['pruned']}/{len(self.trials)}",
                str(row["checks"]),
                f"{100 * row['saved']:.1f}%",
                "-" if np.isnan(row["best_kept"]) else f"{row['best_kept']:.6g}",
                "-" if np.isnan(row["lost"]) else f"{row['lost']:.6g}",
            ])
        widths = [max([len(h)] + [len(c[i]) for c in lines]) for i, h in enumerate(headers)]
        title = (
            f"replay of a study: {len(self)} configuration{'s' if len(self) != 1 else ''} x "
            f"{len(self.trials)} trials ({int(self.lengths.sum())} checks); "
            f"best = {'lowest' if self.mode == 'min' else 'highest'} value"
        )
        shown = [
            "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
            for cells in [headers, *lines]
        ]
        if len(lines) < len(self):
            shown.append(f"... {len(self) - len(lines)} more rows")
        return "\n".join([title, *shown])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"StudyReplay({len(self)} configurations x {len(self.trials)} trials)"


def replay_trials(batch: Grid, trials: Sequence[Any], direction: Mode) -> StudyReplay:
    """Every configuration of `batch` over every trial (`history.StudyTrial`s)."""
    if not trials:
        raise ConfigError(
            "fcb.replay: the study has no finished trial with an intermediate value; report "
            "values with trial.report(value, step) to replay a pruner over them."
        )
    monitored = [m for k, m in batch.monitored() if k == TRIAL_METRIC]
    if monitored and monitored[0] != direction:
        raise ConfigError(
            f"fcb.replay: the callbacks monitor 'value' in mode {monitored[0]!r}, but the study "
            f"{'minimizes' if direction == 'min' else 'maximizes'} it; build them with "
            f"mode={direction!r}."
        )
    results = [replay_values(batch, trial.values, trial.steps) for trial in trials]

    def column(name: str) -> np.ndarray:
        return np.stack([getattr(r, name) for r in results], axis=1)

    return StudyReplay(
        names=batch.names,
        values=batch.values,
        trials=np.asarray([t.number for t in trials], np.int64),
        lengths=np.asarray([len(t.values) for t in trials], np.int64),
        trial_values=np.asarray([t.value for t in trials], np.float64),
        stop_step=column("stop_step"),
        stop_reason=column("stop_reason"),
        checks=column("checks"),
        best_step=column("best_step"),
        best_value=column("best_value"),
        mode=direction,
    )


def replay_study(
    batch: Grid, history: Any, study_name: str | None, *, steps: Any, monitor: str | None
) -> StudyReplay:
    """`fcb.replay` of a study: `history` is an Optuna study, or its storage URL holding
    `study_name`."""
    if steps is not None or monitor not in (None, TRIAL_METRIC):
        raise ConfigError(
            f"fcb.replay: a study's histories are its trials' intermediate values, under the "
            f"metric 'value' at the trials' own steps; drop steps = {steps!r} and "
            f"monitor = {monitor!r}."
        )
    trials, direction = load_study(history, study_name)
    return replay_trials(batch, trials, direction)
