"""fcb.ray.Stopper: a Ray Tune stopper holding each trial's pure callback state."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import ray.tune

from .._core import Callback
from .._errors import ConfigError, MissingMetricError
from .._grid import Grid
from .._monitored import read_keys
from .._runner import Runner


class _Check:
    """One check of a trial: its step, the state after it, whether it stopped, and the
    state's `state_dict` once asked for (encoded once, for Tune's experiment snapshots)."""

    __slots__ = ("encoded", "snapshot", "step", "stop")

    def __init__(self, step: int, snapshot: Any, stop: bool, encoded: Any = None):
        self.step, self.snapshot, self.stop, self.encoded = step, snapshot, stop, encoded


class Stopper(ray.tune.Stopper):
    """Stop each Tune trial when its fcb callback (or chain) stops.

    Tune calls the stopper in the driver with every result a trial reports. The stopper
    keeps one pure state per trial and runs the callback on the result's metrics (the keys
    the callback reads, e.g. `"val_loss"`) at `step = result[step]` (default Tune's
    `training_iteration`), all trials through one compiled check. A trial stops at the
    first result at which its callback stops; with `stop_all=True` the whole experiment
    ends then.

    The states travel in Tune's experiment snapshots (as `fcb.state_dict`s), so
    `Tuner.restore(...)` continues every trial from the decisions it had reached. A trial
    restored from an earlier checkpoint reports steps it had reported before: its state
    goes back to the one after the last earlier step, so its decisions are those of an
    uninterrupted run.

    Args:
        callback: one fcb callback or chain, e.g. `fcb.EarlyStopping("val_loss", patience=5)`.
        step: the result key holding the step number.
        stop_all: end the experiment as soon as one trial's callback stops.

    >>> stopper = fcb.ray.Stopper(fcb.EarlyStopping("val_loss", patience=1))
    >>> for i, v in enumerate([0.5, 0.4, 0.45], start=1):
    ...     print(stopper("t0", {"training_iteration": i, "val_loss": v}))
    False
    False
    True
    >>> stopper.stop_step("t0"), stopper.stop_all()
    (3, False)
    """

    def __init__(self, callback: Callback, *, step: str = "training_iteration",
                 stop_all: bool = False):
        if not isinstance(callback, Callback) or isinstance(callback, Grid):
            raise ConfigError(
                f"fcb.ray.Stopper: `callback` must be one fcb callback or chain (e.g. "
                f"fcb.EarlyStopping('val_loss', patience=5)), got {type(callback).__name__}."
            )
        self._setup(callback, step, stop_all)

    def _setup(self, callback: Callback, step: str, stop_all: bool) -> None:
        if not isinstance(step, str):
            raise ConfigError(
                f"fcb.ray.Stopper: `step` must name the result key holding the step number "
                f"(default 'training_iteration'), got step = {step!r}."
            )
        self.callback = callback
        self.step_key = step
        self.stop_all_on_first = bool(stop_all)
        self._runner = Runner(callback)
        self._initial = self._runner.snapshot()
        self._trials: dict[str, list[_Check]] = {}
        self._keys: list[str] | None = None

    def _metric_keys(self, result: Mapping[str, Any]) -> list[str]:
        if self._keys is None:
            numeric = [
                str(k) for k, v in result.items()
                if isinstance(v, numbers.Real) and not isinstance(v, bool)
            ]
            try:
                self._keys = read_keys(self.callback, numeric)
            except MissingMetricError as error:
                raise MissingMetricError(
                    f"fcb.ray.Stopper: a trial's result lacks a metric the callback reads; "
                    f"report it with ray.tune.report({{...}}) ({error})"
                ) from None
        return self._keys

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Run the trial's callback on this result; whether the trial must stop."""
        if self.step_key not in result:
            raise MissingMetricError(
                f"fcb.ray.Stopper: the result has no step key {self.step_key!r}; available: "
                f"{sorted(map(str, result))}. Pass step=... naming the key of the step number."
            )
        step = int(result[self.step_key])
        checks = self._trials.setdefault(trial_id, [])
        while checks and checks[-1].step >= step:  # restored from an earlier checkpoint
            checks.pop()
        if checks and checks[-1].stop:
            return True
        metrics = {key: result[key] for key in self._metric_keys(result) if key in result}
        self._runner.restore(checks[-1].snapshot if checks else self._initial)
        actions = self._runner.check(metrics, step=step)
        stop = bool(actions.stop)
        checks.append(_Check(step, self._runner.snapshot(), stop))
        return stop

    def stop_all(self) -> bool:
        """True once a trial has stopped, with `stop_all=True`."""
        return self.stop_all_on_first and any(c and c[-1].stop for c in self._trials.values())

    def stop_step(self, trial_id: str) -> int | None:
        """The step at which the trial's callback stopped (None: it has not)."""
        checks = self._trials.get(trial_id, [])
        return checks[-1].step if checks and checks[-1].stop else None

    def state(self, trial_id: str) -> Any:
        """The trial's callback state after its last check (its initial state before one)."""
        checks = self._trials.get(trial_id, [])
        self._runner.restore(checks[-1].snapshot if checks else self._initial)
        return self._runner.state

    def __getstate__(self) -> dict[str, Any]:
        trials = {}
        for trial_id, checks in self._trials.items():
            for check in checks:
                if check.encoded is None:
                    self._runner.restore(check.snapshot)
                    check.encoded = self._runner.state_dict()
            trials[trial_id] = [(c.step, c.encoded, c.stop) for c in checks]
        return {
            "callback": self.callback,
            "step_key": self.step_key,
            "stop_all": self.stop_all_on_first,
            "trials": trials,
        }

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self._setup(saved["callback"], saved["step_key"], saved["stop_all"])
        for trial_id, checks in saved["trials"].items():
            restored = []
            for step, encoded, stop in checks:
                self._runner.load_state_dict(encoded)
                restored.append(_Check(step, self._runner.snapshot(), stop, encoded))
            self._trials[trial_id] = restored
