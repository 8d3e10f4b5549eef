"""Smoothed monitors: an exponential moving average or a window mean of a raw metric.

A monitoring callback built with `alpha=` or `window=` compares the smoothed value instead of
the raw one. The smoothing state lives in the callback's state (so it is in
[`fcb.state_dict`][] and resumes exactly); `alpha` is an array leaf ([`fcb.grid`][] sweeps it),
`window` a static size (one grid per value).

Conventions:

- Exponential moving average: the first finite value starts the average, then
  `smoothed = alpha * value + (1 - alpha) * smoothed` (Keras' and pandas' `adjust=False`
  convention; `alpha=1` is no smoothing).
- Window mean: the mean of the last `window` finite values (of the values so far before
  `window` of them have been seen).
- A non-finite raw value (NaN, ±inf) is never averaged in: that check sees the raw value, so
  the NaN policy of the callback still applies, and the average carries on from the finite
  values.
- Precision: the average is kept in float32. Compiled code (`jax.jit`, `lax.scan`, the
  adapters' checks) may fuse its multiply-add into one operation, so with an `alpha` that is
  not a short binary fraction (0.5, 0.25, 0.125...) a compiled average can differ from an
  eager one in its last bit. Compiled runs agree with each other, and resume exactly.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._errors import ConfigError
from ._validate import concrete, float_param


class SmoothingState(eqx.Module):
    """The running average of a smoothed monitor.

    Attributes:
        average: the exponential moving average (NaN before the first finite value; unused
            by a window mean).
        recent: the last `window` finite values, a ring buffer (empty for an average).
        count: finite values seen so far.
    """

    average: Float[Array, ""]
    recent: Float[Array, " window"]
    count: Int[Array, ""]


def check_smoothing(owner: str, alpha: Any, window: Any) -> tuple[Array | None, int]:
    """The validated smoothing options: `alpha` as a float32 leaf (None: no average) and
    `window` as a static int (0: no window). At most one of them may be given."""
    if alpha is not None and window is not None:
        raise ConfigError(
            f"{owner}: pass at most one of `alpha` (exponential moving average) and `window` "
            f"(window mean), got alpha = {alpha!r} and window = {window!r}."
        )
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(
                f"{owner}: `window` must be an integer >= 1 (the number of recent values "
                f"averaged), got window = {window!r}. It sets the size of the state, so it "
                f"cannot be an array: build one callback (or one fcb.grid) per window."
            )
        return None, int(window)
    if alpha is None:
        return None, 0
    hint = " alpha is the weight of the newest value: 1 is no smoothing, 0.1 a long average."
    leaf = float_param(owner, "alpha", alpha, above=0.0, hint=hint)
    array = concrete(alpha)
    if array is not None and np.any(np.asarray(array, np.float64) > 1.0):
        raise ConfigError(
            f"{owner}: `alpha` must be a number in (0, 1], got alpha = {alpha!r}.{hint}"
        )
    return leaf, 0


def smoothing_init(alpha: Array | None, window: int) -> SmoothingState | None:
    """The state of a smoothed monitor before any check (None when not smoothed)."""
    if alpha is None and window == 0:
        return None
    shape = () if alpha is None else jnp.shape(alpha)
    return SmoothingState(
        average=jnp.full(shape, jnp.nan, jnp.float32),
        recent=jnp.zeros((*shape, window), jnp.float32),
        count=jnp.zeros(shape, jnp.int32),
    )


def smooth(
    alpha: Array | None, window: int, state: SmoothingState | None, value: Float[Array, ""]
) -> tuple[SmoothingState | None, Float[Array, ""]]:
    """One raw `value` in; the new state and the value the monitor compares out."""
    if state is None:
        return None, value
    finite = jnp.isfinite(value)
    count = state.count + finite.astype(jnp.int32)
    if alpha is not None:
        average = jnp.where(state.count == 0, value, alpha * value + (1 - alpha) * state.average)
        average = jnp.where(finite, average, state.average)
        new_state = SmoothingState(average=average, recent=state.recent, count=count)
        return new_state, jnp.where(finite, average, value)
    slot = state.count % window
    recent = jnp.where(finite & (jnp.arange(window) == slot), value, state.recent).astype(
        jnp.float32
    )
    seen = jnp.minimum(count, window)
    held = jnp.arange(window) < seen
    mean = jnp.sum(jnp.where(held, recent, 0.0)) / jnp.maximum(seen, 1).astype(jnp.float32)
    new_state = SmoothingState(average=state.average, recent=recent, count=count)
    return new_state, jnp.where(finite, mean, value).astype(jnp.float32)


def where_tree(condition: Any, new: Any, old: Any) -> Any:
    """`new` where `condition`, else `old`, leaf by leaf; None (no smoothing state) stays None."""
    if new is None or old is None:
        return new
    return jax.tree_util.tree_map(lambda n, o: jnp.where(condition, n, o), new, old)
