"""TimeLimit: stop when a launch has run for `max_seconds`, with a resumable checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike, StopReason
from ._validate import as_step, check_key, float_param, read_metric

_OWNER = "TimeLimit"

ELAPSED_SECONDS = "elapsed_seconds"
"""The host input of the seconds since the adapter started in this process (this launch)."""


def reached(elapsed: ArrayLike, max_seconds: ArrayLike) -> Any:
    """The time-limit rule, one copy: `elapsed >= max_seconds` for a finite `elapsed` (NumPy
    or JAX arrays alike, so the host's check between checks is the callback's)."""
    xp = jnp if isinstance(elapsed, jnp.ndarray) or isinstance(max_seconds, jnp.ndarray) else np
    elapsed = xp.asarray(elapsed, xp.float32)
    return xp.isfinite(elapsed) & (elapsed >= xp.asarray(max_seconds, xp.float32))


class TimeLimitState(eqx.Module):
    """State of [`fcb.TimeLimit`][].

    Attributes:
        stopped_step: step of the last check that reached the limit (-1 before any).
        stopped_elapsed: the elapsed seconds at that check (NaN before any).
    """

    stopped_step: Int[Array, ""]
    stopped_elapsed: Float[Array, ""]

    @property
    def stopped(self) -> Bool[Array, ""]:
        return self.stopped_step >= 0


class TimeLimit(Callback):
    """Stop when this launch has run for `max_seconds`, and write a resumable checkpoint.

    The adapter feeds the seconds since it started (`on_fit_start`) in this process as the
    host input `key` (default `"elapsed_seconds"`), at every check and, between checks, at
    every `on_train_batch_end`: the first hook that finds `elapsed >= max_seconds` stops with
    [`fcb.StopReason.TIME_LIMIT`][fcb.StopReason] and commits a resumable checkpoint of its
    step. The time is per launch (a job's wall-clock budget: set `max_seconds` to the
    scheduler's limit minus the time a checkpoint takes); a relaunch resumes the run and
    counts from 0 again. The stop is not a finished run: resuming trains on.

    Pure: the time is a metric, so tests and [`fcb.replay`][] feed recorded or fake clocks.

    >>> limit = fcb.TimeLimit(max_seconds=3600)
    >>> state = limit.init()
    >>> for step, elapsed in enumerate([1200.0, 2400.0, 3600.5]):
    ...     state, actions = limit(state, {"elapsed_seconds": elapsed}, step=step)
    >>> bool(actions.stop), fcb.StopReason(int(actions.stop_reason)).name, int(state.stopped_step)
    (True, 'TIME_LIMIT', 2)
    """

    max_seconds: Float[Array, ""]
    key: str = eqx.field(static=True)

    def __init__(self, max_seconds: float, *, key: str = ELAPSED_SECONDS):
        self.max_seconds = float_param(
            _OWNER, "max_seconds", max_seconds, above=0.0,
            hint=" It is the wall-clock budget of one launch, in seconds, e.g. 3.5 * 3600.",
        )
        self.key = check_key(_OWNER, "key", key)

    def action_names(self) -> ActionNames:
        return ActionNames(host_inputs=((self.key, ELAPSED_SECONDS),))

    def deadline_seconds(self) -> float:
        """The limit the adapter applies between checks (a concrete, unbatched config)."""
        return float(self.max_seconds)

    def init(self) -> TimeLimitState:
        shape = jnp.shape(self.max_seconds)
        return TimeLimitState(
            stopped_step=jnp.full(shape, NO_STEP, jnp.int32),
            stopped_elapsed=jnp.full(shape, jnp.nan, jnp.float32),
        )

    def __call__(
        self, state: TimeLimitState, metrics: Metrics, *, step: StepLike
    ) -> tuple[TimeLimitState, Actions]:
        elapsed = read_metric(_OWNER, metrics, self.key, strict=True)
        assert elapsed is not None
        # Not latched: the time is per launch, so a relaunch (elapsed from 0) trains on.
        stopping = reached(elapsed, self.max_seconds)
        new_state = TimeLimitState(
            stopped_step=jnp.where(stopping, as_step(_OWNER, step), state.stopped_step),
            stopped_elapsed=jnp.where(stopping, elapsed, state.stopped_elapsed),
        )
        actions = self.no_actions()
        return new_state, dataclasses.replace(
            actions,
            stop=stopping,
            stop_reason=jnp.where(stopping, StopReason.TIME_LIMIT, StopReason.NONE).astype(
                jnp.int32
            ),
        )

    def stop_details(self, state: TimeLimitState) -> str | None:
        """The stop, naming the elapsed time, the limit and the step."""
        if np.ndim(state.stopped_step) or int(state.stopped_step) < 0:
            return None
        return (
            f"the time limit was reached (TimeLimit): {float(state.stopped_elapsed):.1f} s "
            f"elapsed at step {int(state.stopped_step)} (max_seconds="
            f"{float(self.max_seconds):g}); a resumable checkpoint was written"
        )
