"""EarlyStopping: stop when a monitored metric stops improving."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import _monitor
from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike, StopReason
from ._monitor import Mode
from ._validate import (
    as_step,
    check_flag,
    check_key,
    check_mode,
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
    """

    best: Float[Array, ""]
    best_step: Int[Array, ""]
    wait_count: Int[Array, ""]
    stopped_step: Int[Array, ""]
    stop_reason: Int[Array, ""]

    @property
    def stopped(self) -> Bool[Array, ""]:
        return self.stopped_step >= 0


class EarlyStopping(Callback):
    """Stop training when a monitored metric has stopped improving.

    Each call is one check. Conventions (Lightning's, made explicit):

    - Improvement is strict: `current < best - min_delta` in `"min"` mode,
      `current > best + min_delta` in `"max"` mode. An improving check resets `wait_count`
      to 0 and records the value and step as the best; any other check adds 1.
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
    - Checks at steps before `start_from_step` are ignored entirely (a warm-up).
    - Once stopped, the state is frozen and every later call repeats the stop.
    - A missing metric raises [`fcb.MissingMetricError`][] listing the available keys when
      `strict=True`; with `strict=False` the check changes nothing and fires the
      `early_stopping/metric_missing` event.

    Numeric options (`patience`, `min_delta`, the thresholds, `baseline`, `start_from_step`)
    are array leaves: build the callback from arrays of them and `jax.vmap` over it to run many
    configurations at once.

    >>> es = fcb.EarlyStopping(monitor="val_loss", patience=2)
    >>> state = es.init()
    >>> for step, loss in enumerate([0.5, 0.4, 0.45, 0.41]):
    ...     state, actions = es(state, {"val_loss": loss}, step=step)
    >>> bool(actions.stop), int(state.best_step), actions.stop_message()
    (True, 1, 'the monitored metric did not improve for `patience` consecutive checks')
    """

    identity_fields = ("monitor", "mode")

    monitor: str = eqx.field(static=True)
    mode: Mode = eqx.field(static=True)
    check_finite: bool = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    patience: Int[Array, "*batch"]
    min_delta: Float[Array, "*batch"]
    stopping_threshold: Float[Array, "*batch"]
    divergence_threshold: Float[Array, "*batch"]
    baseline: Float[Array, "*batch"]
    start_from_step: Int[Array, "*batch"]

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
    ):
        owner = "EarlyStopping"
        self.monitor = check_key(owner, "monitor", monitor)
        self.mode = check_mode(owner, mode)
        self.check_finite = check_flag(owner, "check_finite", check_finite)
        self.strict = check_flag(owner, "strict", strict)
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

    def action_names(self) -> ActionNames:
        return ActionNames(events=("early_stopping/improved", "early_stopping/metric_missing"))

    def init(self) -> EarlyStoppingState:
        return EarlyStoppingState(
            best=jnp.asarray(self.baseline, jnp.float32),
            best_step=jnp.full(jnp.shape(self.baseline), NO_STEP, jnp.int32),
            wait_count=jnp.zeros(jnp.shape(self.baseline), jnp.int32),
            stopped_step=jnp.full(jnp.shape(self.baseline), NO_STEP, jnp.int32),
            stop_reason=jnp.full(jnp.shape(self.baseline), int(StopReason.NONE), jnp.int32),
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
            new_state, fired = self.update(state, value, as_step("EarlyStopping", step))
            event = "early_stopping/improved"
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
        improved = active & _monitor.improves(value, state.best, self.min_delta, self.mode)
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
        )
        return new_state, improved
