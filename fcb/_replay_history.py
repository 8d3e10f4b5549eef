"""Recorded histories for fcb.replay: a mapping, rows or a file, as columns and step numbers;
or an Optuna study, as one history per trial.

A history is loaded for the metric keys the replayed callbacks read (asked of them by
`metric_keys`), so a check is a row that has all of them; the step numbers come from a
column or are given. A study's trials are read through Optuna (imported only then).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import ConfigError, MetricTypeError, MissingMetricError
from ._monitor import Mode
from ._validate import describe_keys

HistoryLike = Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike
"""A recorded history: `{key: 1-D array}`, a list of per-check dicts, or a CSV / JSONL path."""


def _number(where: str, key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetricTypeError(
            f"fcb.replay: {where}: metric {key!r} must be a number, got {value!r}."
        ) from None
    return number


def _column(key: str, values: Any) -> np.ndarray:
    try:
        column = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MetricTypeError(
            f"fcb.replay: history column {key!r} must hold numbers, got {values!r}."
        ) from None
    if column.ndim != 1:
        raise ConfigError(
            f"fcb.replay: history column {key!r} must be 1-D (one value per check), got shape "
            f"{column.shape}."
        )
    return column


def _step_numbers(steps: Any, columns: Mapping[str, np.ndarray], length: int) -> np.ndarray:
    if steps is None:
        steps = "step" if "step" in columns else np.arange(length)
    source = f"column {steps!r}" if isinstance(steps, str) else "`steps`"
    if isinstance(steps, str):
        if steps not in columns:
            raise MissingMetricError(
                f"fcb.replay: steps = {steps!r} names no history column with a value at every "
                f"check; available keys: {describe_keys(columns)}."
            )
        steps = columns[steps]
    numbers = _column("steps", steps)
    if len(numbers) != length:
        raise ConfigError(
            f"fcb.replay: `steps` must give one step number per check ({length}), got "
            f"{len(numbers)}."
        )
    if not np.all(np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= 0)):
        raise ConfigError(
            f"fcb.replay: the step numbers ({source}) must be whole numbers >= 0, got "
            f"{numbers[:8].tolist()}{'...' if len(numbers) > 8 else ''}."
        )
    if np.any(numbers > np.iinfo(np.int32).max):
        raise ConfigError(f"fcb.replay: the step numbers ({source}) must fit in int32.")
    return numbers.astype(np.int32)


def load_history(
    history: Any, metric_keys: Callable[[Sequence[str]], list[str]], steps: Any
) -> tuple[dict[str, np.ndarray], Any]:
    """The columns the callbacks read, as float32, and the step number of every check.

    `metric_keys(available)` says which of the history's keys the callbacks read (for
    example [`fcb.Grid.metric_keys`][]).

    >>> from fcb._replay_history import load_history
    >>> columns, steps = load_history(
    ...     [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.4, "val_loss": 0.7}],
    ...     lambda keys: ["val_loss"], None)
    >>> columns["val_loss"].tolist(), steps.tolist()
    ([0.699999988079071], [20])
    """
    if isinstance(history, (str, os.PathLike)):
        from ._history import read_rows  # file reading stays out of the pure path

        try:
            history = read_rows(history)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"fcb.replay: {error}") from None
    step_key = steps if isinstance(steps, str) else "step"
    if isinstance(history, Mapping):
        keys = [str(k) for k in history]
        read = metric_keys(keys)
        raw = {k: _column(k, history[k]) for k in dict.fromkeys([*read, step_key]) if k in history}
        lengths = {k: len(v) for k, v in raw.items()} or {
            k: len(_column(k, history[k])) for k in keys[:1]
        }
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"fcb.replay: every history column must have one value per check, got lengths "
                f"{lengths}."
            )
        length = next(iter(lengths.values()), 0)
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        rows = list(history)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ConfigError(
                    f"fcb.replay: a history list must hold one dict of metrics per check; item "
                    f"{i} is {type(row).__name__}: {row!r}."
                )
        keys = list(dict.fromkeys(str(k) for row in rows for k in row))
        read = metric_keys(keys)
        # A row is a check when it has every metric the callbacks read (a CSV logger writes
        # training rows with the validation columns empty).
        kept = [row for row in rows if all(row.get(k) is not None for k in read)]
        raw = {
            key: np.asarray([_number(f"check {i}", key, row[key]) for i, row in enumerate(kept)])
            for key in dict.fromkeys([*read, step_key])
            if kept and all(row.get(key) is not None for row in kept)
        }
        length = len(kept)
    else:
        raise ConfigError(
            f"fcb.replay: `history` must be a mapping of 1-D arrays, a list of per-check dicts, "
            f"or a CSV / JSONL path, got {type(history).__name__}."
        )
    if length == 0:
        raise ConfigError(
            f"fcb.replay: the history has no check with every metric the callbacks read "
            f"({', '.join(map(repr, read)) or 'none'})."
        )
    step_numbers = _step_numbers(steps, raw, length)
    return {k: raw[k].astype(np.float32) for k in read}, step_numbers


@dataclasses.dataclass(frozen=True)
class StudyTrial:
    """One finished trial of a study: its intermediate values by step, and its objective
    value (its last intermediate value when it has none, e.g. a pruned trial)."""

    number: int
    steps: np.ndarray
    values: np.ndarray
    value: float


def is_study(history: Any) -> bool:
    """Whether `history` is an Optuna study (a `optuna.study.Study`, told apart without
    importing Optuna)."""
    return type(history).__module__.startswith("optuna.") and hasattr(history, "get_trials")


def load_study(history: Any, study_name: str | None) -> tuple[list[StudyTrial], Mode]:
    """The finished trials (complete or pruned) with at least one intermediate value, in
    trial order, and whether the study minimizes (`"min"`) or maximizes (`"max"`).

    `history` is an Optuna study, or a storage URL (`sqlite:///study.db`,
    `postgresql://...`) holding the study `study_name`.
    """
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "fcb.replay: replaying an Optuna study needs Optuna: pip install 'fcb[optuna]'."
        ) from None
    if study_name is not None:
        if not isinstance(history, str):
            raise ConfigError(
                f"fcb.replay: with study_name = {study_name!r}, `history` must be the study's "
                f"storage URL (e.g. 'sqlite:///study.db'), got {type(history).__name__}."
            )
        names = optuna.get_all_study_names(storage=history)
        if study_name not in names:
            raise ConfigError(
                f"fcb.replay: the storage {history!r} has no study named {study_name!r}; its "
                f"studies: {', '.join(map(repr, names)) or 'none'}."
            )
        history = optuna.load_study(study_name=study_name, storage=history)
    if len(history.directions) != 1:
        raise ConfigError(
            f"fcb.replay: study {history.study_name!r} has {len(history.directions)} "
            f"objectives; a pruner follows one (intermediate values are single numbers)."
        )
    minimize = history.direction == optuna.study.StudyDirection.MINIMIZE
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = []
    for trial in history.get_trials(deepcopy=False, states=finished):
        reported = sorted(trial.intermediate_values.items())
        if not reported:
            continue
        values = np.asarray([v for _, v in reported], np.float64)
        value = float(values[-1]) if trial.value is None else float(trial.value)
        trials.append(
            StudyTrial(trial.number, np.asarray([s for s, _ in reported], np.int64), values, value)
        )
    return trials, "min" if minimize else "max"
