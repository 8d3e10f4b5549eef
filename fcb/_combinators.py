"""all_of / any_of: stop when every member's stop condition holds, or when any does."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from ._chain import Chain, check_callbacks, check_unique, union
from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike, merge_actions
from ._errors import ConfigError
from ._validate import as_step


class AllOfState(eqx.Module):
    """State of [`fcb.all_of`][].

    Attributes:
        members: the members' states, a tuple in order.
        stopped_step: the check at which every member's stop condition held (-1 while running).
        stop_reason: the first member's [`fcb.StopReason`][] code at that check.
    """

    members: tuple[Any, ...]
    stopped_step: Int[Array, ""]
    stop_reason: Int[Array, ""]

    @property
    def stopped(self) -> Bool[Array, ""]:
        return self.stopped_step >= 0


class AllOf(Callback):
    """Stop when every member's stop condition holds at the same check; built by
    [`fcb.all_of`][]."""

    callbacks: tuple[Callback, ...]

    def __init__(self, *callbacks: Callback):
        labels = [f"callback {i} ({type(c).__name__})" for i, c in enumerate(callbacks)]
        check_callbacks("fcb.all_of", labels, callbacks)
        if len(callbacks) < 2:
            raise ConfigError(
                f"fcb.all_of: give at least two callbacks (every one must hold to stop), got "
                f"{len(callbacks)}. A single callback stops on its own."
            )
        check_unique("fcb.all_of", labels, [c.action_names() for c in callbacks])
        self.callbacks = tuple(callbacks)

    def action_names(self) -> ActionNames:
        return union([c.action_names() for c in self.callbacks])

    def init(self) -> AllOfState:
        members = tuple(c.init() for c in self.callbacks)
        shape = _batch_shape(self)
        return AllOfState(
            members=members,
            stopped_step=jnp.full(shape, NO_STEP, jnp.int32),
            stop_reason=jnp.zeros(shape, jnp.int32),
        )

    def __call__(
        self, state: AllOfState, metrics: Metrics, *, step: StepLike
    ) -> tuple[AllOfState, Actions]:
        step = as_step("fcb.all_of", step)
        results = [c(s, metrics, step=step) for c, s in zip(self.callbacks, state.members)]
        merged = merge_actions(a for _, a in results)
        every = functools.reduce(jnp.logical_and, [a.stop for _, a in results])
        stopping = ~state.stopped & every
        members = []
        for callback, old, (new, _) in zip(self.callbacks, state.members, results, strict=True):
            # A member whose condition held alone is not latched: it keeps checking, so
            # that its condition is asked again at the next check.
            running = jax.tree_util.tree_map(
                lambda held, cleared: jnp.where(every, held, cleared), new, callback.unstopped(new)
            )
            members.append(
                jax.tree_util.tree_map(
                    lambda frozen, moved: jnp.where(state.stopped, frozen, moved), old, running
                )
            )
        new_state = AllOfState(
            members=tuple(members),
            stopped_step=jnp.where(stopping, step, state.stopped_step),
            stop_reason=jnp.where(stopping, merged.stop_reason, state.stop_reason).astype(
                jnp.int32
            ),
        )
        return new_state, dataclasses.replace(
            merged, stop=new_state.stopped, stop_reason=new_state.stop_reason
        )

    def finalize(self, state: AllOfState) -> tuple[AllOfState, Actions]:
        results = [c.finalize(s) for c, s in zip(self.callbacks, state.members, strict=True)]
        merged = merge_actions(a for _, a in results)
        return dataclasses.replace(state, members=tuple(s for s, _ in results)), merged

    def unstopped(self, state: AllOfState) -> AllOfState:
        return dataclasses.replace(
            state,
            members=tuple(c.unstopped(s) for c, s in zip(self.callbacks, state.members)),
            stopped_step=jnp.full_like(state.stopped_step, NO_STEP),
            stop_reason=jnp.zeros_like(state.stop_reason),
        )

    def stop_details(self, state: AllOfState) -> str | None:
        """Every member's reason, at the check where they all held."""
        if np.ndim(state.stopped_step) or int(state.stopped_step) < 0:
            return None
        reasons = []
        for callback, member in zip(self.callbacks, state.members, strict=True):
            details = callback.stop_details(member)
            reasons.append(details if details is not None else type(callback).__name__)
        return (
            f"every condition held at step {int(state.stopped_step)} (fcb.all_of): "
            + "; and ".join(reasons)
        )


def _batch_shape(callback: Callback) -> tuple[int, ...]:
    """The configuration axes a batched member carries (none for a single configuration)."""
    shapes = [
        jnp.shape(s.stopped_step)
        for s in jax.tree_util.tree_leaves(
            tuple(c.init() for c in callback.callbacks),  # type: ignore[attr-defined]
            is_leaf=lambda x: hasattr(x, "stopped_step"),
        )
        if hasattr(s, "stopped_step")
    ]
    return jnp.broadcast_shapes(*shapes) if shapes else ()


def all_of(*callbacks: Callback) -> AllOf:
    """Stop only when every member's stop condition holds at the same check.

    Each member runs as on its own, except that a member whose condition holds while another's
    does not is not latched: it keeps checking, and its condition is asked again at the next
    check (an `EarlyStopping` whose patience ran out keeps counting, and forgets it when its
    metric improves). Once every condition holds at one check, the combination stops and
    freezes; [`fcb.stop_message`][] reports each member's reason. Actions merge as in
    [`fcb.chain`][] (names must be unique; use `fcb.named_chain` inside to prefix them),
    except `stop`, which is the conjunction. Compose it with `chain` and run it under
    `jax.vmap` / [`fcb.grid`][] as any callback.

    >>> both = fcb.all_of(
    ...     fcb.named_chain(loss=fcb.EarlyStopping("val_loss", patience=1)),
    ...     fcb.named_chain(acc=fcb.EarlyStopping("val_acc", mode="max", patience=1)))
    >>> state = both.init()
    >>> history = [(0.5, 0.7), (0.6, 0.8), (0.4, 0.75), (0.45, 0.74)]
    >>> for step, (loss, acc) in enumerate(history):
    ...     state, actions = both(state, {"val_loss": loss, "val_acc": acc}, step=step)
    ...     print(step, bool(actions.stop))
    0 False
    1 False
    2 False
    3 True
    >>> print(fcb.stop_message(both, state, actions))
    every condition held at step 3 (fcb.all_of): val_loss did not improve for 1 check
    (patience=1, min_delta=0); best 0.4 at step 2; and val_acc did not improve for 2 checks
    (patience=1, min_delta=0); best 0.8 at step 1

    (At step 1 the loss had stopped improving but the accuracy had not; at step 2 the
    accuracy had stopped, but the loss improved again.)
    """
    return AllOf(*callbacks)


def any_of(*callbacks: Callback) -> Chain:
    """Stop when any member's stop condition holds: the rule of [`fcb.chain`][], by name.

    The same callback as `fcb.chain(*callbacks)` (the stop reason is the first stopping
    member's); it reads better next to [`fcb.all_of`][]:

    >>> stop = fcb.any_of(fcb.EarlyStopping("val_loss", patience=3), fcb.TerminateOnNaN())
    >>> type(stop).__name__
    'Chain'
    """
    return Chain(*callbacks)
