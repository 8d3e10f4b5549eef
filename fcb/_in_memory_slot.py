"""fcb.InMemorySlot: the weights a checkpoint slot names, kept inside a compiled training loop.

A loop compiled whole (`lax.scan`, `lax.while_loop`) cannot write files at a check, but it can
keep, next to the parameters, a copy of the parameters a slot holds (the best model's, for
one). Kept leaf by leaf, that copy adds a select and a carried buffer per parameter array at
every iteration; kept as one vector per dtype, it adds one of each, and it is copied only at
the checks where the slot takes the current step.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ._core import NO_STEP, Actions, StepLike
from ._errors import CheckpointError, ConfigError
from ._packed import _Layout, _layout_of, pack_as, unpack_from

_OWNER = "fcb.InMemorySlot"


class InMemorySlot(eqx.Module):
    """A copy of a pytree (the parameters, usually) taken whenever the checkpoint slot
    `slot` takes the current step: the weights of the run's best step, say, kept in the carry
    of a compiled loop instead of in a file.

    Build it with the pytree it will copy (its structure, dtypes and shapes; it holds no step
    yet), then at every check pass the chain's actions, the pytree the check's metrics were
    measured on, and the check's step to `update`. When the actions name the current step for
    `slot`, the copy takes that pytree; while they name the step it already holds, it keeps
    it. `step` says which step the copy holds: `-1` when none, which is also the case once
    the slot names a step this copy was not given (a slot emptied, or filled from elsewhere,
    so the copy never holds other weights than the slot names). `value()` gives the pytree.

    A pytree itself: it crosses `jit`, `lax.scan` and `vmap` (under `vmap` over
    configurations each keeps its own copy). The copy is one vector per dtype, taken under a
    `lax.cond`, so it costs one buffer of the loop's carry per dtype, not one per array (row
    B2b of `benchmarks/RESULTS.md`).

    >>> callbacks = fcb.packed(fcb.ModelCheckpoint("loss", save_top_k=1))
    >>> params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    >>> def step(carry, loss_and_step):
    ...     params, state, best = carry
    ...     loss, i = loss_and_step
    ...     state, actions = callbacks(state, {"loss": loss}, step=i)
    ...     best = best.update(actions, params, step=i)  # the weights that gave `loss`
    ...     params = jax.tree_util.tree_map(lambda p: p + 1.0, params)  # a training step
    ...     return (params, state, best), None
    >>> carry = (params, callbacks.init(), fcb.InMemorySlot("best_model", params))
    >>> losses = jnp.asarray([0.9, 0.7, 0.8, 0.75])
    >>> (_, _, best), _ = jax.lax.scan(step, carry, (losses, jnp.arange(4)))
    >>> int(best.step), best.value()["w"].tolist()
    (1, [1.0, 1.0, 1.0])
    """

    slot: str = eqx.field(static=True)
    vectors: tuple[Array, ...]
    """The pytree held, one vector per dtype (zeros while `step` is -1)."""
    step: Int[Array, ""]
    """The step whose pytree is held; -1: none."""
    layout: _Layout = eqx.field(static=True, repr=False)

    def __init__(self, slot: str, like: Any):
        if not isinstance(slot, str) or not slot:
            raise ConfigError(
                f"{_OWNER}: `slot` must be the name of a checkpoint slot (a str such as "
                f"'best_model'), got {slot!r}."
            )
        leaves = jax.tree_util.tree_leaves(like)
        for leaf in leaves:
            if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
                raise ConfigError(
                    f"{_OWNER}({slot!r}): `like` must be a pytree of arrays (the parameters "
                    f"to copy, or jax.ShapeDtypeStruct), got a leaf {type(leaf).__name__}: "
                    f"{leaf!r}. Convert it with jnp.asarray."
                )
        if not leaves:
            raise ConfigError(
                f"{_OWNER}({slot!r}): `like` has no arrays to copy, got {like!r}; pass the "
                f"parameters (a pytree of arrays)."
            )
        self.slot = slot
        self.layout = _layout_of(like)
        sizes = [0] * len(self.layout.dtypes)
        for vector, offset, size, _ in self.layout.leaves:
            sizes[vector] = max(sizes[vector], offset + size)
        self.vectors = tuple(
            jnp.zeros((n,), dtype) for n, dtype in zip(sizes, self.layout.dtypes, strict=True)
        )
        self.step = jnp.asarray(NO_STEP, jnp.int32)

    def update(self, actions: Actions, tree: Any, *, step: StepLike) -> InMemorySlot:
        """The copy after the check of `step`, whose `actions` say which step `slot` holds:
        `tree` when that is `step`, the pytree held when that is the step held, else none."""
        if not isinstance(actions, Actions):
            raise ConfigError(
                f"{_OWNER}({self.slot!r}).update: `actions` must be the fcb.Actions of the "
                f"check, got {type(actions).__name__}."
            )
        if self.slot not in actions.slots:
            raise ConfigError(
                f"{_OWNER}({self.slot!r}).update: the chain has no checkpoint slot "
                f"{self.slot!r}; its slots: {sorted(actions.slots)}. Name one of them (a "
                f"ModelCheckpoint's 'best_model' or 'last', a BestCheckpoint's slots)."
            )
        wanted = actions.slots[self.slot]
        step = jnp.asarray(step, jnp.int32)
        take = (wanted == step) & (step >= 0)
        def copied() -> tuple[Any, ...]:  # packed only where it is taken
            return pack_as(
                self.layout, tree, "the pytree given", "the pytree it was built with", _OWNER
            )

        vectors = jax.lax.cond(take, copied, lambda: self.vectors)
        held = jnp.where(take, step, jnp.where(wanted == self.step, self.step, NO_STEP))
        return eqx.tree_at(lambda s: (s.vectors, s.step), self, (vectors, held))

    def value(self) -> Any:
        """The pytree held (of the structure, dtypes and shapes it was built with).

        Outside a trace, a copy that holds no step raises `fcb.CheckpointError` (inside
        one, check `step >= 0`: the pytree is then zeros)."""
        if not isinstance(self.step, jax.core.Tracer):
            empty = np.asarray(self.step) < 0
            if np.any(empty):
                which = "" if empty.ndim == 0 else f" (configurations {np.flatnonzero(empty)})"
                raise CheckpointError(
                    f"{_OWNER}({self.slot!r}) holds no step{which}: the slot never took a "
                    f"step given to update(), or it now names a step this copy was not "
                    f"given. Check `.step >= 0` before reading the copy."
                )
        return unpack_from(self.layout, self.vectors)
