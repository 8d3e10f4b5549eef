"""EarlyStopping: stop when a monitored metric stops improving."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from . import _monitor
from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike, StopReason
from ._monitor import Mode, ThresholdMode
from ._smoothing import SmoothingState, check_smoothing, smooth, smoothing_init, where_tree
from ._validate import (
    as_step,
    check_flag,
    check_key,
    check_mode,
    check_threshold_mode,
    float_param,
    int_param,
    optional_float_param,
    read_metric,
)


class EarlyStoppingState(eqx.Module):
    """State of [`fcb.EarlyStopping`][].

    Attributes:
        best: best value so far (the baseline, or the worst value, before any improvement).
        best_step: step of `best` (-1 before any improvement).
        wait_count: consecutive non-improving checks since the last improvement.
        stopped_step: step at which the callback asked to stop (-1 while running).
        stop_reason: a [`fcb.StopReason`][] code (NONE while running).
        smoothing: the running average of a smoothed monitor (`alpha=` or `window=`; None
            otherwise).
    """

    best: Float[Array, ""]
    best_step: Int[Array, ""]
    wait_count: Int[Array, ""]
    stopped_step: Int[Array, ""]
    stop_reason: Int[Array, ""]
    smoothing: SmoothingState | None = None

    @property
    def stopped(self) -> Bool[Array, ""]:
        return self.stopped_step >= 0


class EarlyStopping(Callback):
    """Stop training when a monitored metric has stopped improving.

    Each call is one check. Conventions (Lightning's, made explicit):

    - Improvement is strict: `current < best - min_delta` in `"min"` mode,
      `current > best + min_delta` in `"max"` mode. With `threshold_mode="rel"`, `min_delta`
      is a fraction of `|best|`: `current < best - min_delta * |best|` (min) /
      `current > best + min_delta * |best|` (max), right for negative and zero-crossing
      metrics too (see [`fcb.monitor.improvement_bound`][]). An improving check resets
      `wait_count` to 0 and records the value and step as the best; any other check adds 1.
    - Stop when `wait_count` reaches `patience` (so `patience=0` stops at the first
      non-improving check, `patience=3` after three non-improving checks in a row).
    - NaN and ±inf are their own outcome: with `check_finite=True` (default) they stop training
      with `StopReason.NON_FINITE`; with `check_finite=False` they are a non-improving check.
      They never become the best.
    - Stop reasons are checked in this order: non-finite, `stopping_threshold` (value strictly
      better than it), `divergence_threshold` (value strictly worse than it), patience. A check
      that improves updates the best even when it also stops on a threshold.
    - `baseline` is the initial best: a value must beat it (by more than `min_delta`) to count
      as an improvement, so training stops after `patience` checks that do not.
    - Checks at steps before `start_from_step` are ignored entirely (a warm-up); a smoothed
      monitor still averages their values in.
    - Smoothing (`alpha=` for an exponential moving average, `window=` for a window mean, see
      [Smoothed monitors](../callbacks/early_stopping.md#smoothed-monitors)): every rule above
      applies to the smoothed value, so the callback decides exactly as an unsmoothed one run
      over the smoothed series. The smoothed value is logged as `early_stopping/smoothed`.
    - Once stopped, the state is frozen and every later call repeats the stop.
    - A missing metric raises [`fcb.MissingMetricError`][] listing the available keys when
      `strict=True`; with `strict=False` the check changes nothing and fires the
      `early_stopping/metric_missing` event.

    Numeric options (`patience`, `min_delta`, the thresholds, `baseline`, `start_from_step`,
    `alpha`) are array leaves: build the callback from arrays of them and `jax.vmap` over it
    to run many configurations at once.

    >>> es = fcb.EarlyStopping(monitor="val_loss", patience=2)
    >>> state = es.init()
    >>> for step, loss in enumerate([0.5, 0.4, 0.45, 0.41]):
    ...     state, actions = es(state, {"val_loss": loss}, step=step)
    >>> bool(actions.stop), int(state.best_step), actions.stop_message()
    (True, 1, 'the monitored metric did not improve for patience consecutive checks')
    >>> fcb.stop_message(es, state, actions)
    'val_loss did not improve for 2 checks (patience=2, min_delta=0); best 0.4 at step 1'

    A noisy metric, smoothed by an exponential moving average before it is compared:

    >>> es = fcb.EarlyStopping("val_loss", patience=1, alpha=0.5)
    >>> state = es.init()
    >>> for step, loss in enumerate([1.0, 0.6, 0.9]):
    ...     state, actions = es(state, {"val_loss": loss}, step=step)
    ...     print(step, round(float(actions.log["early_stopping/smoothed"]), 4), bool(actions.stop))
    0 1.0 False
    1 0.8 False
    2 0.85 True
    >>> print(fcb.stop_message(es, state, actions))
    val_loss (moving average, alpha=0.5) did not improve for 1 check (patience=1,
    min_delta=0); best 0.8 at step 1
    """

    identity_fields = ("monitor", "mode")

    monitor: str = eqx.field(static=True)
    mode: Mode = eqx.field(static=True)
    check_finite: bool = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    threshold_mode: ThresholdMode = eqx.field(static=True)
    window: int = eqx.field(static=True)
    patience: Int[Array, "*batch"]
    min_delta: Float[Array, "*batch"]
    stopping_threshold: Float[Array, "*batch"]
    divergence_threshold: Float[Array, "*batch"]
    baseline: Float[Array, "*batch"]
    start_from_step: Int[Array, "*batch"]
    alpha: Float[Array, "*batch"] | None

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Mode = "min",
        patience: Any = 3,
        min_delta: Any = 0.0,
        *,
        check_finite: bool = True,
        stopping_threshold: Any = None,
        divergence_threshold: Any = None,
        baseline: Any = None,
        start_from_step: Any = 0,
        strict: bool = True,
        threshold_mode: ThresholdMode = "abs",
        alpha: Any = None,
        window: int | None = None,
    ):
        owner = "EarlyStopping"
        self.monitor = check_key(owner, "monitor", monitor)
        self.mode = check_mode(owner, mode)
        self.check_finite = check_flag(owner, "check_finite", check_finite)
        self.strict = check_flag(owner, "strict", strict)
        self.threshold_mode = check_threshold_mode(owner, threshold_mode)
        self.alpha, self.window = check_smoothing(owner, alpha, window)
        self.patience = int_param(owner, "patience", patience, minimum=0)
        self.min_delta = float_param(
            owner,
            "min_delta",
            min_delta,
            minimum=0.0,
            hint=" The sign is set by `mode`; pass the absolute margin.",
        )
        best_possible = -_monitor.worst_value(self.mode)
        self.stopping_threshold = optional_float_param(
            owner, "stopping_threshold", stopping_threshold, disabled=best_possible
        )
        self.divergence_threshold = optional_float_param(
            owner, "divergence_threshold", divergence_threshold, disabled=-best_possible
        )
        self.baseline = optional_float_param(owner, "baseline", baseline, disabled=-best_possible)
        self.start_from_step = int_param(owner, "start_from_step", start_from_step, minimum=0)

    @property
    def smoothed(self) -> bool:
        """Whether the monitor compares a smoothed value (`alpha=` or `window=`)."""
        return self.alpha is not None or self.window > 0

    def action_names(self) -> ActionNames:
        return ActionNames(
            log=("early_stopping/smoothed",) if self.smoothed else (),
            events=("early_stopping/improved", "early_stopping/metric_missing"),
        )

    def init(self) -> EarlyStoppingState:
        return EarlyStoppingState(
            best=jnp.asarray(self.baseline, jnp.float32),
            best_step=jnp.full(jnp.shape(self.baseline), NO_STEP, jnp.int32),
            wait_count=jnp.zeros(jnp.shape(self.baseline), jnp.int32),
            stopped_step=jnp.full(jnp.shape(self.baseline), NO_STEP, jnp.int32),
            stop_reason=jnp.full(jnp.shape(self.baseline), int(StopReason.NONE), jnp.int32),
            smoothing=smoothing_init(self.alpha, self.window),
        )

    def __call__(
        self, state: EarlyStoppingState, metrics: Metrics, *, step: StepLike
    ) -> tuple[EarlyStoppingState, Actions]:
        actions = self.no_actions()
        value = read_metric("EarlyStopping", metrics, self.monitor, strict=self.strict)
        if value is None:
            new_state, event = state, "early_stopping/metric_missing"
            fired = jnp.asarray(True)
        else:
            smoothing, value = smooth(self.alpha, self.window, state.smoothing, value)
            new_state, fired = self.update(state, value, as_step("EarlyStopping", step))
            new_state = dataclasses.replace(
                new_state, smoothing=where_tree(state.stopped, state.smoothing, smoothing)
            )
            event = "early_stopping/improved"
            if self.smoothed:
                actions = dataclasses.replace(actions, log={"early_stopping/smoothed": value})
        return new_state, dataclasses.replace(
            actions,
            stop=new_state.stopped,
            stop_reason=new_state.stop_reason,
            events={**actions.events, event: fired},
        )

    def update(
        self, state: EarlyStoppingState, value: Float[Array, ""], step: Int[Array, ""]
    ) -> tuple[EarlyStoppingState, Bool[Array, ""]]:
        """The transition on a float32 `value` at `step`; returns the state and `improved`."""
        active = ~state.stopped & (step >= self.start_from_step)
        improved = active & _monitor.improves(
            value, state.best, self.min_delta, self.mode, self.threshold_mode
        )
        wait_count = jnp.where(improved, 0, state.wait_count + 1)
        # The first condition that holds gives the reason. Nested `where`s rather than
        # `jnp.select`, which stacks the conditions and takes an argmax: a reduction kernel
        # of its own that XLA:CPU compiles slowly (the costliest kernel of an fcb.replay).
        reason = jnp.asarray(StopReason.NONE, jnp.int32)
        for condition, code in reversed(
            [
                (jnp.asarray(self.check_finite) & ~jnp.isfinite(value), StopReason.NON_FINITE),
                (
                    _monitor.reached(value, self.stopping_threshold, self.mode),
                    StopReason.STOPPING_THRESHOLD,
                ),
                (
                    _monitor.exceeded(value, self.divergence_threshold, self.mode),
                    StopReason.DIVERGENCE_THRESHOLD,
                ),
                (~improved & (wait_count >= self.patience), StopReason.PATIENCE),
            ]
        ):
            reason = jnp.where(condition, jnp.int32(code), reason)
        stopping = active & (reason != StopReason.NONE)
        new_state = EarlyStoppingState(
            best=jnp.where(improved, value, state.best),
            best_step=jnp.where(improved, step, state.best_step),
            wait_count=jnp.where(active, wait_count, state.wait_count),
            stopped_step=jnp.where(stopping, step, state.stopped_step),
            stop_reason=jnp.where(stopping, reason, state.stop_reason),
            smoothing=state.smoothing,
        )
        return new_state, improved

    def unstopped(self, state: EarlyStoppingState) -> EarlyStoppingState:
        return dataclasses.replace(
            state,
            stopped_step=jnp.full_like(state.stopped_step, NO_STEP),
            stop_reason=jnp.full_like(state.stop_reason, int(StopReason.NONE)),
        )

    def stop_details(self, state: EarlyStoppingState) -> str | None:
        """The stop, with the metric, the setting and the values, e.g. `val_loss did not
        improve for 10 checks (patience=10, min_delta=0.001); best 0.4461 at step 31`."""
        if np.ndim(state.stopped_step) or int(state.stopped_step) < 0:
            return None
        return describe_stop(self, state)


def number(x: Any) -> str:
    """A config or metric value as a stop message shows it (float32 precision)."""
    value = float(np.asarray(x))
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def monitored_name(callback: Any) -> str:
    """The monitored metric, with its smoothing: `val_loss (moving average, alpha=0.1)`."""
    key = getattr(callback, "monitor", None) or callback.metric_key
    if getattr(callback, "alpha", None) is not None:
        return f"{key} (moving average, alpha={number(callback.alpha)})"
    if getattr(callback, "window", 0):
        return f"{key} (mean of the last {callback.window} values)"
    return key


def describe_stop(es: EarlyStopping, state: EarlyStoppingState) -> str:
    """The detailed stop message of a stopped, concrete, unbatched EarlyStopping state."""
    name, step, reason = monitored_name(es), int(state.stopped_step), int(state.stop_reason)
    delta = f"min_delta={number(es.min_delta)}"
    if es.threshold_mode == "rel":
        delta += " relative to |best|"
    if int(state.best_step) >= 0:
        best = f"best {number(state.best)} at step {int(state.best_step)}"
    elif np.isfinite(float(state.best)):
        best = f"no check beat the baseline {number(state.best)}"
    else:
        best = "no finite value yet"
    if reason == StopReason.PATIENCE:
        count = int(state.wait_count)
        return (
            f"{name} did not improve for {count} check{'' if count == 1 else 's'} "
            f"(patience={int(es.patience)}, {delta}); {best}"
        )
    if reason == StopReason.STOPPING_THRESHOLD:
        what = f"reached stopping_threshold={number(es.stopping_threshold)}"
    elif reason == StopReason.DIVERGENCE_THRESHOLD:
        what = f"crossed divergence_threshold={number(es.divergence_threshold)}"
    else:
        what = "is NaN or infinite (check_finite=True)"
    return f"{name} {what} at step {step}; {best}"
