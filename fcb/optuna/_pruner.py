"""fcb.optuna.Pruner: an Optuna pruner whose decision is an fcb callback's stop."""

from __future__ import annotations

from typing import Any

import optuna

from .._core import Callback
from .._errors import ConfigError, MissingMetricError
from .._grid import Grid, batch_of_one
from .._monitored import read_keys
from .._replay_study import TRIAL_METRIC, replay_values


class Pruner(optuna.pruners.BasePruner):
    """Prune a trial at the check where an fcb callback (or chain) stops.

    The callback sees each intermediate value a trial reports under the metric name
    `"value"`, at the step it was reported with, in step order. At every
    `trial.should_prune()` the pruner replays the trial's whole
    `trial.intermediate_values` through the callback in one compiled call (histories of
    nearby lengths share one compilation), so it keeps no state of its own: any storage
    (in-memory, SQLite, PostgreSQL), any number of workers and a worker restarted mid-trial
    all give the same decision. The trial is pruned from the check at which the callback
    stops on; NaN and infinities are what the callback makes of them (an
    `fcb.EarlyStopping` with `check_finite=True` stops on them).

    Args:
        callback: one fcb callback or chain reading the metric `"value"`; for example
            `fcb.EarlyStopping("value", patience=5)`.

    >>> import optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> pruner = fcb.optuna.Pruner(fcb.EarlyStopping("value", patience=1))
    >>> study = optuna.create_study(pruner=pruner)
    >>> trial = study.ask()
    >>> decisions = []
    >>> for step, loss in enumerate([0.5, 0.4, 0.45, 0.46]):
    ...     trial.report(loss, step)
    ...     decisions.append(trial.should_prune())
    >>> decisions
    [False, False, True, True]
    >>> pruner.stop_step(study.trials[0])
    2
    """

    def __init__(self, callback: Callback):
        if not isinstance(callback, Callback) or isinstance(callback, Grid):
            raise ConfigError(
                f"fcb.optuna.Pruner: `callback` must be one fcb callback or chain (e.g. "
                f"fcb.EarlyStopping('value', patience=5)), got {type(callback).__name__}; "
                f"to compare several settings, replay the finished study with fcb.replay."
            )
        try:
            read_keys(callback, [TRIAL_METRIC])
        except MissingMetricError as error:
            raise MissingMetricError(
                f"fcb.optuna.Pruner: a trial's intermediate values reach the callback as the "
                f"metric 'value'; build it with monitor='value' ({error})"
            ) from None
        self.callback = callback
        self._batch = Grid(batch_of_one(callback))

    def stop_step(self, trial: optuna.trial.FrozenTrial) -> int | None:
        """The step of the trial's check at which the callback stops (None: it has not)."""
        reported = sorted(trial.intermediate_values.items())
        if not reported:
            return None
        result = replay_values(self._batch, [v for _, v in reported], [s for s, _ in reported])
        step = int(result.stop_step[0])
        return None if step < 0 else step

    def prune(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether the callback has stopped at one of the trial's checks so far."""
        del study
        return self.stop_step(trial) is not None

    def __repr__(self) -> str:
        return f"fcb.optuna.Pruner({self.callback!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pruner, (self.callback,))
