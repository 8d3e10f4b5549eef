"""fcb.packed: a callback whose state is a few vectors (one per dtype, of at most 8 leaves
each), for compiled training loops.

A chain's state is a dozen scalars (best values, steps, wait counts, flags). Carried through
a `lax.scan` or `lax.while_loop` as they are, each is a buffer of the loop's carry, which
XLA:CPU updates and copies one by one at every iteration: a fixed cost per scalar. Packed,
the state is one vector per dtype, so the carry holds a few buffers instead.

A vector holds at most `MAX_LEAVES_PER_VECTOR` leaves: XLA:CPU fuses a concatenate of at
most 8 operands with the computations of its operands into one kernel, and runs a larger
one as a kernel of its own after one kernel per operand (row B2 of `benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._core import ActionNames, Actions, Callback, Metrics, StepLike
from ._errors import ConfigError


class _Layout(NamedTuple):
    """Where each leaf of the wrapped callback's state lives: `leaves[i]` is (vector, offset,
    size, shape) of leaf `i`; vector `j` holds leaves of dtype `dtypes[j]` (a dtype may
    have several vectors)."""

    treedef: Any
    dtypes: tuple[np.dtype, ...]
    leaves: tuple[tuple[int, int, int, tuple[int, ...]], ...]


MAX_LEAVES_PER_VECTOR = 8
"""The most leaves `fcb.packed` puts in one vector: XLA:CPU's limit for fusing a
concatenate (`kMaxConcatenateArguments` in its instruction fusion)."""


def _layout_of(state: Any, max_leaves: int | None = None) -> _Layout:
    """One vector per dtype, in the order the dtypes first appear; with `max_leaves`, a
    dtype's leaves past every `max_leaves` start another vector of that dtype."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    dtypes: list[np.dtype] = []
    sizes: list[int] = []
    counts: list[int] = []
    open_vector: dict[np.dtype, int] = {}  # the vector a dtype's next leaf goes to
    specs = []
    for leaf in leaves:
        dtype, shape = np.dtype(leaf.dtype), tuple(int(d) for d in leaf.shape)
        vector = open_vector.get(dtype)
        if vector is None or (max_leaves is not None and counts[vector] >= max_leaves):
            vector = open_vector[dtype] = len(dtypes)
            dtypes.append(dtype)
            sizes.append(0)
            counts.append(0)
        size = math.prod(shape)
        specs.append((vector, sizes[vector], size, shape))
        sizes[vector] += size
        counts[vector] += 1
    return _Layout(treedef, tuple(dtypes), tuple(specs))


def pack_as(layout: _Layout, tree: Any, what: str, made: str, owner: str) -> tuple[Any, ...]:
    """Traceable: `tree` (of `layout`'s structure, dtypes and shapes) as one vector per
    dtype; a `ConfigError` of `owner` naming `what` differs from the pytree `made` it."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef != layout.treedef:
        raise ConfigError(
            f"{owner}: {what} has structure {treedef}, {made} had {layout.treedef}; a "
            f"packed pytree keeps the structure of {made}."
        )
    parts: list[list[Any]] = [[] for _ in layout.dtypes]
    for (vector, _, _, shape), leaf in zip(layout.leaves, leaves, strict=True):
        dtype = layout.dtypes[vector]
        if np.dtype(leaf.dtype) != dtype or tuple(np.shape(leaf)) != shape:
            raise ConfigError(
                f"{owner}: a leaf of {what} is {np.dtype(leaf.dtype)}{list(np.shape(leaf))}, "
                f"{made} made it {dtype}{list(shape)}; a packed pytree keeps the dtypes and "
                f"shapes of {made}."
            )
        parts[vector].append(jnp.ravel(leaf))
    return tuple(jnp.concatenate(part) for part in parts)


def unpack_from(layout: _Layout, vectors: tuple[Any, ...]) -> Any:
    """The pytree held in the vectors of `layout` (JAX or NumPy arrays; vectors batched by
    `vmap` give leaves with the same leading axes)."""
    leaves = [
        vectors[vector][..., offset : offset + size].reshape(
            (*np.shape(vectors[vector])[:-1], *shape)
        )
        for vector, offset, size, shape in layout.leaves
    ]
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)


class Packed(Callback):
    """`callback` with its state stored as one vector per dtype (of at most 8 leaves
    each): the same checks, actions and values, for the carry of a compiled training loop.

    Build it with [`fcb.packed`][]. `init`, `__call__`, `finalize` and `evaluated` take and
    return the packed state (a tuple of 1-D arrays); `unpack(state)` gives the wrapped
    callback's own state (to read it, or for [`fcb.state_dict`][] with the wrapped
    callback), and `pack(state)` packs one.
    """

    callback: Callback
    layout: _Layout = eqx.field(static=True, repr=False, metadata={"derived": True})

    def __init__(self, callback: Callback):
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"fcb.packed: `callback` must be an fcb.Callback, got "
                f"{type(callback).__name__}: {callback!r}."
            )
        self.callback = callback
        self.layout = _layout_of(jax.eval_shape(callback.init), MAX_LEAVES_PER_VECTOR)

    def pack(self, state: Any) -> tuple[jax.Array, ...]:
        """The wrapped callback's `state` as packed vectors (one per dtype, of at most 8
        leaves each)."""
        name = type(self.callback).__name__
        return pack_as(self.layout, state, f"the state of {name}", "init()", "fcb.packed")

    def unpack(self, state: tuple[Any, ...]) -> Any:
        """The wrapped callback's state held in the packed `state` (JAX or NumPy arrays)."""
        return unpack_from(self.layout, state)

    def init(self) -> tuple[jax.Array, ...]:
        return self.pack(self.callback.init())

    def __call__(
        self, state: tuple[Any, ...], metrics: Metrics, *, step: StepLike
    ) -> tuple[tuple[jax.Array, ...], Actions]:
        inner, actions = self.callback(self.unpack(state), metrics, step=step)
        return self.pack(inner), actions

    def finalize(self, state: tuple[Any, ...]) -> tuple[tuple[jax.Array, ...], Actions]:
        inner, actions = self.callback.finalize(self.unpack(state))
        return self.pack(inner), actions

    def evaluated(
        self, state: tuple[Any, ...], request: str, results: Metrics, *, step: StepLike
    ) -> tuple[tuple[jax.Array, ...], Actions]:
        inner, actions = self.callback.evaluated(self.unpack(state), request, results, step=step)
        return self.pack(inner), actions

    def action_names(self) -> ActionNames:
        return self.callback.action_names()

    def stop_details(self, state: tuple[Any, ...]) -> str | None:
        return self.callback.stop_details(self.unpack(state))

    def unstopped(self, state: tuple[Any, ...]) -> tuple[jax.Array, ...]:
        return self.pack(self.callback.unstopped(self.unpack(state)))


def packed(callback: Callback) -> Packed:
    """`callback` (a chain, usually) with its state packed into one vector per dtype (of
    at most 8 leaves each), for the carry of a compiled training loop (`lax.scan`,
    `lax.while_loop`).

    The checks, actions and values are the wrapped callback's, bit for bit; only the state's
    layout changes. In a loop that checks at every step this removes most of the callbacks'
    cost on XLA:CPU (rows B2 and B2u of `benchmarks/RESULTS.md`: 1.01x against 1.07x the
    loop without callbacks). Outside compiled loops there is nothing to gain: the adapters
    pack the state themselves.

    >>> chain = fcb.chain(fcb.EarlyStopping("loss", patience=2),
    ...                   fcb.ReduceLROnPlateau("loss", patience=1))
    >>> callbacks = fcb.packed(chain)
    >>> tuple(v.dtype.name for v in callbacks.init())
    ('float32', 'int32')
    >>> def step(state, loss_and_step):
    ...     loss, i = loss_and_step
    ...     state, actions = callbacks(state, {"loss": loss}, step=i)
    ...     return state, actions.stop
    >>> losses = jnp.asarray([0.9, 0.7, 0.8, 0.75, 0.72])
    >>> state, stops = jax.lax.scan(step, callbacks.init(), (losses, jnp.arange(5)))
    >>> stops.tolist()
    [False, False, False, True, True]
    >>> early_stopping_state = callbacks.unpack(state)[0]
    >>> int(early_stopping_state.best_step)
    1
    """
    return Packed(callback)
