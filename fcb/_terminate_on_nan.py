"""TerminateOnNaN: stop as soon as a watched value is NaN or infinite."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike, StopReason
from ._errors import ConfigError
from ._validate import as_step, check_flag, check_key, check_metrics_mapping, read_metric

_OWNER = "TerminateOnNaN"


def _check_keys(keys: Any) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = (keys,)
    if not isinstance(keys, Sequence) or not keys:
        raise ConfigError(
            f"{_OWNER}: `keys` must be a non-empty sequence of metric names, got keys = "
            f"{keys!r}. Pass e.g. keys=('loss',) or keys=('loss', 'grad_norm')."
        )
    for key in keys:
        check_key(_OWNER, "keys", key)
    duplicates = sorted({k for k in keys if list(keys).count(k) > 1})
    if duplicates:
        raise ConfigError(
            f"{_OWNER}: `keys` must not repeat a name, got keys = {tuple(keys)!r} "
            f"(repeated: {', '.join(map(repr, duplicates))})."
        )
    return tuple(keys)


class TerminateOnNaNState(eqx.Module):
    """State of [`fcb.TerminateOnNaN`][].

    Attributes:
        stopped_step: step of the check that found a non-finite value (-1 while running).
        non_finite_key: index in `keys` of the first watched key that was not finite at that
            check (-1 while running).
    """

    stopped_step: Int[Array, ""]
    non_finite_key: Int[Array, ""]

    @property
    def stopped(self) -> Bool[Array, ""]:
        return self.stopped_step >= 0


class TerminateOnNaN(Callback):
    """Stop training as soon as a watched value is NaN, +inf or -inf.

    Each call is one check of every key in `keys` (default `("loss",)`). When any of them is
    not finite, the actions stop training with [`fcb.StopReason.TERMINATE_ON_NAN`][fcb.StopReason]
    and the state records the step and the first offending key (by position in `keys`).
    Once stopped, the state is frozen and every later call repeats the stop, whatever the values.

    A missing key raises [`fcb.MissingMetricError`][] listing the available keys when
    `strict=True` (default); with `strict=False` the missing key is ignored at that check, the
    present keys are still checked, and the `terminate_on_nan/metric_missing` event fires.

    As in Keras' `TerminateOnNaN`, infinities count as well as NaN. The callback has no numeric
    options; inside a vmapped sweep (for example chained with a stack of
    [`fcb.EarlyStopping`][]) its state is broadcast along the configuration axis.

    >>> guard = fcb.TerminateOnNaN(keys=("loss", "grad_norm"))
    >>> state = guard.init()
    >>> for step, (loss, grad_norm) in enumerate([(0.9, 1.0), (0.8, float("inf")), (0.7, 1.0)]):
    ...     state, actions = guard(state, {"loss": loss, "grad_norm": grad_norm}, step=step)
    >>> bool(actions.stop), int(state.stopped_step), guard.keys[int(state.non_finite_key)]
    (True, 1, 'grad_norm')
    >>> fcb.stop_message(guard, state, actions)
    'grad_norm is NaN or infinite (TerminateOnNaN) at step 1; watched keys: loss, grad_norm'
    """

    keys: tuple[str, ...] = eqx.field(static=True)
    strict: bool = eqx.field(static=True)

    def __init__(self, keys: Any = ("loss",), *, strict: bool = True):
        self.keys = _check_keys(keys)
        self.strict = check_flag(_OWNER, "strict", strict)

    def action_names(self) -> ActionNames:
        return ActionNames(events=("terminate_on_nan/metric_missing",))

    def init(self) -> TerminateOnNaNState:
        return TerminateOnNaNState(
            stopped_step=jnp.asarray(NO_STEP, jnp.int32),
            non_finite_key=jnp.asarray(NO_STEP, jnp.int32),
        )

    def __call__(
        self, state: TerminateOnNaNState, metrics: Metrics, *, step: StepLike
    ) -> tuple[TerminateOnNaNState, Actions]:
        check_metrics_mapping(_OWNER, metrics)
        # Read every key first, so that a strict error names the first missing key before
        # anything is computed.
        values = [read_metric(_OWNER, metrics, key, strict=self.strict) for key in self.keys]
        present = [(i, v) for i, v in enumerate(values) if v is not None]
        missing = len(present) < len(self.keys)
        if present:
            indices = jnp.asarray([i for i, _ in present], jnp.int32)
            non_finite = ~jnp.isfinite(jnp.stack([v for _, v in present]))
            found = jnp.any(non_finite)
            first = indices[jnp.argmax(non_finite)]
        else:
            found, first = jnp.asarray(False), jnp.asarray(NO_STEP, jnp.int32)
        stopping = ~state.stopped & found
        new_state = TerminateOnNaNState(
            stopped_step=jnp.where(stopping, as_step(_OWNER, step), state.stopped_step),
            non_finite_key=jnp.where(stopping, first, state.non_finite_key),
        )
        actions = self.no_actions()
        return new_state, dataclasses.replace(
            actions,
            stop=new_state.stopped,
            stop_reason=jnp.where(
                new_state.stopped, StopReason.TERMINATE_ON_NAN, StopReason.NONE
            ).astype(jnp.int32),
            events={**actions.events, "terminate_on_nan/metric_missing": jnp.asarray(missing)},
        )

    def unstopped(self, state: TerminateOnNaNState) -> TerminateOnNaNState:
        return TerminateOnNaNState(
            stopped_step=jnp.full_like(state.stopped_step, NO_STEP),
            non_finite_key=jnp.full_like(state.non_finite_key, NO_STEP),
        )

    def stop_details(self, state: TerminateOnNaNState) -> str | None:
        """The stop, naming the offending key, the step and the watched keys."""
        if np.ndim(state.stopped_step) or int(state.stopped_step) < 0:
            return None
        key = self.keys[int(state.non_finite_key)]
        return (
            f"{key} is NaN or infinite (TerminateOnNaN) at step {int(state.stopped_step)}; "
            f"watched keys: {', '.join(self.keys)}"
        )
