"""The one improvement rule shared by every monitoring callback.

Conventions (Lightning's, made explicit):

- Improvement is strict. In `"min"` mode `current` improves on `best` when
  `current < best - min_delta`; in `"max"` mode when `current > best + min_delta`. With
  `threshold_mode="rel"` the margin is relative instead: `current < best * (1 - threshold)`
  (min) or `current > best * (1 + threshold)` (max), as in `torch.optim.lr_scheduler`.
- A non-finite value (NaN, +inf, -inf) is its own outcome, `Outcome.NON_FINITE`: it is never an
  improvement and never becomes the best. Callbacks decide what it means (stop, or count it as
  a non-improving check).
- Thresholds compare strictly and explicitly exclude NaN: `reached(current, threshold)` is
  `current < threshold` in min mode, `current > threshold` in max mode, False for NaN.
"""

from __future__ import annotations

import enum
from typing import Literal, TypeAlias

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

Mode: TypeAlias = Literal["min", "max"]
ThresholdMode: TypeAlias = Literal["abs", "rel"]

MODES = ("min", "max")
THRESHOLD_MODES = ("abs", "rel")


class Outcome(enum.IntEnum):
    """The result of comparing one check's value with the best so far."""

    IMPROVED = 0
    NOT_IMPROVED = 1
    NON_FINITE = 2


def worst_value(mode: Mode) -> float:
    """The value every finite value improves on: +inf in min mode, -inf in max mode."""
    return float("inf") if mode == "min" else float("-inf")


def is_better(current: ArrayLike, reference: ArrayLike, mode: Mode) -> Bool[Array, "..."]:
    """`current` strictly better than `reference` (False when either is NaN)."""
    current, reference = jnp.asarray(current), jnp.asarray(reference)
    return current < reference if mode == "min" else current > reference


def reached(current: ArrayLike, threshold: ArrayLike, mode: Mode) -> Bool[Array, "..."]:
    """`current` is strictly past `threshold` in the good direction (NaN: False)."""
    return is_better(current, threshold, mode)


def exceeded(current: ArrayLike, threshold: ArrayLike, mode: Mode) -> Bool[Array, "..."]:
    """`current` is strictly past `threshold` in the bad direction (NaN: False)."""
    return is_better(threshold, current, mode)


def improvement_bound(
    best: ArrayLike,
    min_delta: ArrayLike,
    mode: Mode,
    threshold_mode: ThresholdMode = "abs",
) -> Float[Array, "..."]:
    """The value a check must strictly beat to count as an improvement on `best`.

    >>> float(fcb.monitor.improvement_bound(-2.0, 0.25, "min", "rel"))
    -2.5
    >>> float(fcb.monitor.improvement_bound(2.0, 0.25, "min", "rel"))
    1.5
    """
    best, min_delta = jnp.asarray(best), jnp.asarray(min_delta)
    if threshold_mode == "rel":
        # best * (1 -/+ min_delta), the sign of the factor chosen by the sign of best: the
        # same float operations as torch's rule where that rule is right (best >= 0, min).
        widen, narrow = 1 + min_delta, 1 - min_delta
        positive = best >= 0
        if mode == "min":
            bound = best * jnp.where(positive, narrow, widen)
        else:
            bound = best * jnp.where(positive, widen, narrow)
        return jnp.where(jnp.isfinite(best), bound, best)
    return best - min_delta if mode == "min" else best + min_delta


def improves(
    current: ArrayLike,
    best: ArrayLike,
    min_delta: ArrayLike,
    mode: Mode,
    threshold_mode: ThresholdMode = "abs",
) -> Bool[Array, "..."]:
    """Whether `current` is a strict improvement on `best`. Non-finite values never improve."""
    current = jnp.asarray(current)
    bound = improvement_bound(best, min_delta, mode, threshold_mode)
    return jnp.isfinite(current) & is_better(current, bound, mode)


def outcome(
    current: ArrayLike,
    best: ArrayLike,
    min_delta: ArrayLike,
    mode: Mode,
    threshold_mode: ThresholdMode = "abs",
) -> Int[Array, "..."]:
    """The [`Outcome`][fcb.Outcome] code (int32) of one check."""
    current = jnp.asarray(current)
    return jnp.where(
        ~jnp.isfinite(current),
        jnp.int32(Outcome.NON_FINITE),
        jnp.where(
            improves(current, best, min_delta, mode, threshold_mode),
            jnp.int32(Outcome.IMPROVED),
            jnp.int32(Outcome.NOT_IMPROVED),
        ),
    ).astype(jnp.int32)
