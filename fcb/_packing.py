"""Packed pytrees: every leaf of a state (or actions) pytree in one flat int32 buffer."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Leaves are stored in one int32 buffer. Each dtype has an exact route there and back:
# 32-bit types are bit-cast, narrower ones widened (float16 / bfloat16 through float32).
_AS_INT32 = {np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.uint8, np.uint16)}
_BITCAST = {np.dtype(np.float32), np.dtype(np.uint32)}
_AS_FLOAT32 = {np.dtype(jnp.float16), np.dtype(jnp.bfloat16)}
_FLOAT32 = np.dtype(np.float32)
_INT32 = np.dtype(np.int32)
_BOOL = np.dtype(np.bool_)
_INT_VIEW, _FLOAT_VIEW, _BOOL_VIEW, _UINT_VIEW = range(4)


class _Leaf(NamedTuple):
    offset: int
    size: int
    shape: tuple[int, ...]
    dtype: np.dtype


class Packing:
    """Where each leaf of a pytree of arrays lives in one flat int32 buffer.

    Crossing `jit` costs a few microseconds per array, in and out, and the host reads each
    array with a separate transfer; a chain's state and actions have dozens of scalar leaves.
    Packed, one event moves two small buffers each way, and the host reads its actions with
    one transfer. Hashable (by structure and leaves), so it can be a static argument of `jit`.
    """

    __slots__ = (
        "_hash", "_host_plan", "_scalar_plan", "_views", "leaves", "nested", "size", "treedef"
    )

    def __init__(self, treedef: Any, leaves: tuple[_Leaf, ...]):
        self.treedef, self.leaves = treedef, leaves
        self.size = sum(leaf.size for leaf in leaves)
        self._hash = hash((treedef, leaves))
        # How the host reads each leaf: from which view of the buffer, where, and whether it
        # must be narrowed; scalars are read as 0-d views (`view[offset, ...]`), the fastest.
        plan = []
        for leaf in leaves:
            if leaf.dtype == _BOOL:
                view, convert = _BOOL_VIEW, None
            elif leaf.dtype in _AS_INT32:
                view, convert = _INT_VIEW, None if leaf.dtype == _INT32 else leaf.dtype
            elif leaf.dtype in _AS_FLOAT32:
                view, convert = _FLOAT_VIEW, leaf.dtype
            else:
                view, convert = (_FLOAT_VIEW if leaf.dtype == _FLOAT32 else _UINT_VIEW), None
            plan.append((view, leaf.offset, leaf.offset + leaf.size, leaf.shape or None, convert))
        self._host_plan = tuple(plan)
        self._views = frozenset(view for view, *_ in plan)
        # All scalars, none narrowed (an Actions pytree): each leaf is one index of a view.
        self._scalar_plan = (
            tuple((view, (start, ...)) for view, start, _, _, _ in plan)
            if all(shape is None and convert is None for _, _, _, shape, convert in plan)
            else None
        )
        self.nested = any(len(leaf.shape) > 1 for leaf in leaves)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return other is self or (
            isinstance(other, Packing)
            and self._hash == other._hash
            and self.treedef == other.treedef
            and self.leaves == other.leaves
        )

    @classmethod
    def of(cls, tree: Any, *, allow_weak: bool = False) -> Packing | None:
        """The packing of `tree` (arrays, tracers or shape structs), or None when a leaf
        cannot be stored exactly (64-bit and complex types, Python scalars, weak types)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        specs = []
        offset = 0
        for leaf in leaves:
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not hasattr(leaf, "shape"):
                return None
            dtype = np.dtype(dtype)
            if dtype not in _AS_INT32 and dtype not in _BITCAST and dtype not in _AS_FLOAT32:
                return None
            weak = getattr(leaf, "weak_type", None)
            if weak is None:
                weak = getattr(getattr(leaf, "aval", None), "weak_type", False)
            if weak and not allow_weak:  # unpacking would make it strongly typed
                return None
            shape = tuple(int(d) for d in leaf.shape)
            size = int(np.prod(shape, dtype=np.int64))
            specs.append(_Leaf(offset, size, shape, dtype))
            offset += size
        return cls(treedef, tuple(specs))

    def pack(self, tree: Any) -> jax.Array:
        """Traceable: the leaves of `tree` in one int32 vector."""
        parts = [jnp.zeros((0,), jnp.int32)]
        for spec, leaf in zip(self.leaves, jax.tree_util.tree_leaves(tree), strict=True):
            flat = jnp.ravel(jnp.asarray(leaf))
            if spec.dtype in _AS_FLOAT32:
                flat = flat.astype(jnp.float32)
            if spec.dtype in _AS_INT32:
                flat = flat.astype(jnp.int32)
            else:
                flat = jax.lax.bitcast_convert_type(flat, jnp.int32)
            parts.append(flat)
        return jnp.concatenate(parts)

    def unpack(self, buffer: jax.Array) -> Any:
        """Traceable: the pytree stored in `buffer` (JAX arrays)."""
        leaves = []
        for spec in self.leaves:
            part = buffer[spec.offset : spec.offset + spec.size]
            if spec.dtype in _AS_INT32:
                value = part != 0 if spec.dtype == _BOOL else part.astype(spec.dtype)
            elif spec.dtype in _AS_FLOAT32:
                value = jax.lax.bitcast_convert_type(part, jnp.float32).astype(spec.dtype)
            else:
                value = jax.lax.bitcast_convert_type(part, spec.dtype)
            leaves.append(value.reshape(spec.shape))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def host_leaves(self, buffer: np.ndarray, *, read_only: bool = False) -> list[np.ndarray]:
        """The leaves stored in a host copy of the buffer, as NumPy arrays (views; all
        read-only with `read_only`, for a read-only `buffer`)."""
        views: list[Any] = [buffer, None, None, None]
        if _FLOAT_VIEW in self._views:
            views[_FLOAT_VIEW] = buffer.view(np.float32)
        if _BOOL_VIEW in self._views:
            views[_BOOL_VIEW] = buffer != 0
            if read_only:
                views[_BOOL_VIEW].flags.writeable = False
        if _UINT_VIEW in self._views:
            views[_UINT_VIEW] = buffer.view(np.uint32)
        if self._scalar_plan is not None:
            return [views[view][index] for view, index in self._scalar_plan]
        leaves = []
        for view, start, end, shape, convert in self._host_plan:
            value = views[view][start, ...] if shape is None else views[view][start:end]
            if shape is not None:
                value = value.reshape(shape)
            if convert is not None:
                value = value.astype(convert)
                if read_only:
                    value.flags.writeable = False
            leaves.append(value)
        return leaves

    def host_values(self, buffer: np.ndarray) -> list[Any]:
        """The leaves stored in a host copy of the buffer as Python values: what
        `leaf.tolist()` gives for each of `host_leaves`, with one `tolist` per view (a
        narrow type is stored widened exactly, so its values are those of the wide view)."""
        views: list[Any] = [None] * 4
        if self.nested:  # nested lists: NumPy builds them
            return [leaf.tolist() for leaf in self.host_leaves(buffer)]
        views[_INT_VIEW] = buffer.tolist()
        if _FLOAT_VIEW in self._views:
            views[_FLOAT_VIEW] = buffer.view(np.float32).tolist()
        if _BOOL_VIEW in self._views:
            views[_BOOL_VIEW] = (buffer != 0).tolist()
        if _UINT_VIEW in self._views:
            views[_UINT_VIEW] = buffer.view(np.uint32).tolist()
        return [
            views[view][start] if shape is None else views[view][start:end]
            for view, start, end, shape, _ in self._host_plan
        ]

    def unpack_host(self, buffer: np.ndarray, *, read_only: bool = False) -> Any:
        return jax.tree_util.tree_unflatten(
            self.treedef, self.host_leaves(buffer, read_only=read_only)
        )


pack = jax.jit(lambda packing, tree: packing.pack(tree), static_argnums=0)
"""`packing.pack(tree)`, compiled once per packing."""
unpack = jax.jit(lambda packing, buffer: packing.unpack(buffer), static_argnums=0)
"""`packing.unpack(buffer)`, compiled once per packing."""
