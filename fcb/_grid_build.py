"""How fcb.grid builds a batch: the columns of the Cartesian product, one call of the
factory with every varied option as an array, and the checks that the batch equals its
configurations built one by one (with the fallbacks when it does not)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._core import Callback
from ._errors import ConfigError

_STRUCTURAL_OPTION = (
    "fcb.grid: `{name}` changes the structure of {owner} (a static field such as a mode, a "
    "slot name or a table size), so it cannot vary inside one batch: {first!r} and {other!r} "
    "give different structures. Build one grid per value, e.g. "
    "[fcb.grid(..., {name}=v) for v in {values!r}]."
)


def _describe(factory: Any) -> str:
    return getattr(factory, "__name__", type(factory).__name__)


def _build(factory: Callable[..., Any], options: Mapping[str, Any], varied: Mapping[str, Any]):
    try:
        built = factory(**options)
    except ConfigError as error:
        raise ConfigError(f"fcb.grid: configuration {dict(varied)}: {error}") from None
    if not isinstance(built, Callback):
        raise ConfigError(
            f"fcb.grid: `{_describe(factory)}` must return an fcb.Callback, got "
            f"{type(built).__name__}."
        )
    return built


def _columns(axes: Mapping[str, tuple[Any, ...]]) -> list[np.ndarray]:
    """Per axis, its value in every configuration of the Cartesian product (the last axis
    varying fastest), built by NumPy: each column holds the axis's values (so it has the
    dtype NumPy gives them), each repeated for the axes after it and tiled for those
    before.

    >>> [c.tolist() for c in _columns({"patience": (1, 2), "min_delta": (0, 0.5, 1)})]
    [[1, 1, 1, 2, 2, 2], [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]]
    """
    sizes = [len(values) for values in axes.values()]
    total, inner, columns = math.prod(sizes), math.prod(sizes), []
    for values, size in zip(axes.values(), sizes, strict=True):
        inner //= size
        column = np.repeat(np.asarray(values), inner)
        columns.append(np.tile(column, total // len(column)))
    return columns


def _stores_options_as_is(factory: Any) -> bool:
    """Whether `factory` is one of fcb's callback classes: they validate each numeric
    option and store it with `jnp.asarray` (int32 / float32) and nothing else, so that an
    integer column given as int32 rather than int64 builds the same leaves (and compiles no
    conversion program)."""
    return isinstance(factory, type) and factory.__module__.startswith("fcb.")


def _as_int32(column: np.ndarray) -> np.ndarray:
    """An integer column as int32 when every value fits (the cast is then exact); any other
    column as it is (a value out of range is reported as given)."""
    info = np.iinfo(np.int32)
    if column.dtype.kind in "iu" and info.min <= column.min() and column.max() <= info.max:
        return column.astype(np.int32)
    return column


def _check_each_value(
    factory: Callable[..., Any],
    fixed: Mapping[str, Any],
    axes: Mapping[str, tuple[Any, ...]],
    base: Callback,
) -> None:
    """Build one configuration per distinct value of each axis: each must be valid and give
    the structure of the first configuration."""
    first = {name: values[0] for name, values in axes.items()}
    for name, values in axes.items():
        for value in dict.fromkeys(values[1:]):
            varied = {**first, name: value}
            other = _build(factory, {**fixed, **varied}, varied)
            if not _same_structure(other, base):
                raise ConfigError(
                    _STRUCTURAL_OPTION.format(
                        name=name,
                        owner=type(base).__name__,
                        first=values[0],
                        other=value,
                        values=list(dict.fromkeys(values)),
                    )
                )


def _build_from_arrays(
    factory: Callable[..., Any],
    fixed: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    base: Callback,
) -> Callback | None:
    """The batch built in one call, each varied option given as the array of its values.

    fcb's callbacks validate and store numeric options elementwise, so every leaf comes back
    either with the configuration axis or as in a single configuration (then broadcast).
    `None` when the factory does not work that way (the caller then builds under vmap); a
    `ConfigError` when some value is invalid (or, for a structural option, not an int).
    """
    size = len(next(iter(arrays.values())))
    try:
        built = factory(**fixed, **arrays)
    except ConfigError:
        raise
    except Exception:
        return None
    if not isinstance(built, Callback) or not _same_structure(built, base):
        return None
    leaves = []
    for one, many in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(built)):
        if not eqx.is_array(one):
            leaves.append(many)
        elif not eqx.is_array(many) or many.dtype != one.dtype:
            return None
        elif many.shape == (size, *one.shape):
            leaves.append(many)
        elif many.shape == one.shape:
            # broadcast by NumPy and put on the device as it is: `jnp.asarray` of a NumPy
            # array compiles a program per shape and dtype
            wide = np.broadcast_to(np.asarray(many), (size, *one.shape))
            leaves.append(jax.device_put(np.ascontiguousarray(wide)))
        else:
            return None
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base), leaves)


def _same_members(batched: Callback, index: int, alone: Callback) -> bool:
    """Configuration `index` of the batch equals `alone`, that configuration built on its
    own."""
    return all(
        np.array_equal(np.asarray(many)[index], np.asarray(one), equal_nan=True)
        if eqx.is_array(one)
        else many == one
        for many, one in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(alone))
    )


def _build_under_vmap(
    factory: Callable[..., Any], fixed: Mapping[str, Any], names: list[str], columns: list[Any]
) -> Any:
    def build_one(*values: Any) -> Callback:
        return factory(**fixed, **dict(zip(names, values, strict=True)))

    try:
        return eqx.filter_vmap(build_one)(*columns)
    except Exception as error:
        raise ConfigError(
            f"fcb.grid: {_describe(factory)} could not be built under jax.vmap with "
            f"{', '.join(names)} varying ({type(error).__name__}: {error}). Varied options must "
            f"be numeric hyperparameters that the callback stores as arrays."
        ) from None


def _same_structure(a: Any, b: Any) -> bool:
    """Same tree structure, static fields included (equinox keeps them in the treedef)."""
    structure: Any = jax.tree_util.tree_structure(a)
    return bool(structure == jax.tree_util.tree_structure(b))


def _check_batch(base: Callback, batched: Any, size: int, names: list[str]) -> None:
    """The batch has the single configuration's structure, with a leading axis on each leaf."""
    ok = _same_structure(batched, base)
    if ok:
        for one, many in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(batched)):
            if eqx.is_array(one):
                ok = ok and np.shape(many) == (size, *np.shape(one)) and many.dtype == one.dtype
    if not ok:
        raise ConfigError(
            f"fcb.grid: building {type(base).__name__} with {', '.join(names)} varying gave a "
            f"different structure than building one configuration; the varied options must be "
            f"numeric hyperparameters stored as arrays."
        )
