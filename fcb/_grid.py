"""fcb.grid: a batch of configurations of one callback, built from option values.

`grid` builds one batched callback from every combination of some numeric options; the
`Grid` it returns runs every configuration at once (`jax.vmap`), in a training loop or over
a recorded history with [`fcb.replay`][].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _monitored
from ._core import Actions, Callback, Metrics, StepLike
from ._errors import ConfigError
from ._monitor import Mode

_AXIS_TYPES = (list, range, np.ndarray, jax.Array)

_STRUCTURAL_OPTION = (
    "fcb.grid: `{name}` changes the structure of {owner} (a static field such as a mode, a "
    "slot name or a table size), so it cannot vary inside one batch: {first!r} and {other!r} "
    "give different structures. Build one grid per value, e.g. "
    "[fcb.grid(..., {name}=v) for v in {values!r}]."
)


class Grid(Callback):
    """A batch of configurations of one callback, built by [`fcb.grid`][].

    Every array leaf of `callback` carries a leading configuration axis. A `Grid` is itself
    a callback: `init`, `__call__` and `finalize` run every configuration at once under
    `jax.vmap` (metrics are shared; state and actions gain the leading axis), so it also works
    inside a compiled training loop. [`fcb.replay`][] runs it over a recorded history.

    Attributes:
        callback: the batched callback.
        names: the options that vary, in the order they were given.
        values: per configuration, the values of `names`.

    >>> g = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2])
    >>> len(g), g.configs
    (2, [{'patience': 1}, {'patience': 2}])
    >>> state = g.init()
    >>> for step, loss in enumerate([0.5, 0.6, 0.7]):
    ...     state, actions = g(state, {"val_loss": loss}, step=step)
    >>> actions.stop.tolist(), int(g[1].patience)
    ([True, True], 2)
    """

    callback: Callback
    names: tuple[str, ...] = eqx.field(static=True)
    values: tuple[tuple[Any, ...], ...] = eqx.field(static=True)

    def __init__(
        self, callback: Callback, configs: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"fcb.Grid: `callback` must be an fcb.Callback whose array leaves carry a leading "
                f"configuration axis, got {type(callback).__name__}: {callback!r}."
            )
        sizes = {
            int(np.shape(leaf)[0]) if np.ndim(leaf) else None
            for leaf in jax.tree_util.tree_leaves(callback)
            if eqx.is_array(leaf)
        }
        if None in sizes or len(sizes) > 1:
            raise ConfigError(
                f"fcb.Grid: every array leaf of the batched {type(callback).__name__} must have "
                f"the same leading (configuration) axis; got leading sizes "
                f"{sorted(str(s) for s in sizes)}. Build batches with fcb.grid."
            )
        configs = [dict(c) for c in configs] if configs is not None else None
        leading = sizes.pop() if sizes else None
        size = leading if leading is not None else (len(configs) if configs else 1)
        if configs is None:
            configs = [{} for _ in range(size)]
        if len(configs) != size:
            raise ConfigError(
                f"fcb.Grid: {len(configs)} configs were given for a batch of {size} "
                f"configurations; give one config per configuration."
            )
        names = tuple(configs[0]) if configs else ()
        for config in configs:
            if tuple(config) != names:
                raise ConfigError(
                    f"fcb.Grid: every config must name the same options in the same order; "
                    f"got {list(config)} after {list(names)}."
                )
        self.callback = callback
        self.names = names
        self.values = tuple(tuple(c[n] for n in names) for c in configs)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def configs(self) -> list[dict[str, Any]]:
        """Per configuration, the varied options and their values."""
        return [dict(zip(self.names, v, strict=True)) for v in self.values]

    def __getitem__(self, index: int) -> Callback:
        """Configuration `index` as an ordinary (unbatched) callback."""
        size = len(self)
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"fcb.Grid: index with an int, got {index!r}.")
        if not -size <= index < size:
            raise IndexError(f"fcb.Grid: index {index} is out of range for {size} configurations.")
        return jax.tree_util.tree_map(lambda leaf: _row(leaf, index), self.callback)

    def action_names(self) -> Any:
        return self.callback.action_names()

    def init(self) -> Any:
        return eqx.filter_vmap(lambda c: c.init(), axis_size=len(self))(self.callback)

    def __call__(self, state: Any, metrics: Metrics, *, step: StepLike) -> tuple[Any, Actions]:
        return eqx.filter_vmap(lambda c, s: c(s, metrics, step=step))(self.callback, state)

    def finalize(self, state: Any) -> tuple[Any, Actions]:
        return eqx.filter_vmap(lambda c, s: c.finalize(s))(self.callback, state)

    def evaluated(
        self, state: Any, request: str, results: Metrics, *, step: StepLike
    ) -> tuple[Any, Actions]:
        return eqx.filter_vmap(lambda c, s: c.evaluated(s, request, results, step=step))(
            self.callback, state
        )

    def metric_keys(self, available: Sequence[str]) -> list[str]:
        """The metric keys the configurations read at a check, given the keys on offer.

        The configurations share one structure, so the first answers for all. A strict
        callback whose key is not in `available` raises [`fcb.MissingMetricError`][],
        listing them.

        >>> fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2]).metric_keys(
        ...     ["loss", "val_loss"])
        ['val_loss']
        """
        return _monitored.read_keys(self[0], available)

    def monitored(self) -> list[tuple[str, Mode]]:
        """The distinct (metric, mode) pairs the monitoring callbacks of the batch follow.

        >>> fcb.grid(fcb.BestCheckpoint, metric_key="val_acc", mode="max",
        ...          min_delta=[0, 0.01]).monitored()
        [('val_acc', 'max')]
        """
        return _monitored.monitored(self.callback)


def _row(leaf: Any, index: int) -> Any:
    """Row `index` of a batched leaf. A concrete array is indexed on the host: indexing a
    `jax.Array` compiles a slicing program per shape and dtype (tens of ms each, paid again
    by every new batch size); `device_put` compiles nothing."""
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        return jax.device_put(np.asarray(leaf)[index])
    return leaf[index] if eqx.is_array(leaf) else leaf


def _is_axis(value: Any) -> bool:
    return isinstance(value, _AXIS_TYPES) and not (
        isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
    )


def _axis_values(name: str, value: Any) -> tuple[Any, ...]:
    """The values of one grid axis as Python numbers, checked numeric and non-empty."""
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) != 1:
        raise ConfigError(
            f"fcb.grid: the values of `{name}` must be 1-D, got an array of shape "
            f"{tuple(np.shape(value))}."
        )
    values = tuple(value.tolist() if isinstance(value, (np.ndarray, jax.Array)) else value)
    if not values:
        raise ConfigError(f"fcb.grid: `{name}` has no values; give at least one, e.g. [3].")
    for v in values:
        numeric = isinstance(v, (int, float, np.integer, np.floating))
        if isinstance(v, (bool, np.bool_)) or not numeric:
            raise ConfigError(
                f"fcb.grid: only numeric options can vary inside one batch (they are array "
                f"leaves), got {name} = {list(values)!r} with {v!r}. Pass a single value for "
                f"`{name}` (a tuple counts as one value), or build one grid per value."
            )
    return tuple(v.item() if isinstance(v, np.generic) else v for v in values)


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


def grid(factory: Callable[..., Callback], /, **options: Any) -> Grid:
    """Every combination of some numeric options of a callback, as one batched callback.

    `factory` is a callback class (or any function returning a callback). A keyword whose
    value is a list, a `range` or a 1-D array is an axis of the grid; any other value (a
    string, a number, a tuple...) is passed to every configuration as is. Configurations are
    the Cartesian product of the axes, the last axis varying fastest.

    The batch is built in one call, each varied option given as the array of its values, so
    a grid of 10,000 configurations costs about as much as one; the callback validates every
    value, and an invalid one raises its [`fcb.ConfigError`][] naming the configuration.
    (A factory that cannot take arrays is built under `jax.vmap` instead.) Only
    options stored as array leaves can vary (`patience`, `min_delta`, thresholds, `every_n`,
    `factor`...): an option that changes the callback's structure (`mode`, `save_top_k`,
    `tolerances`...) raises an error naming it.

    >>> g = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=range(1, 4),
    ...              min_delta=[0, 1e-3])
    >>> len(g), g.configs[1]
    (6, {'patience': 1, 'min_delta': 0.001})
    >>> g.callback.patience.tolist()
    [1, 1, 2, 2, 3, 3]

    A function lets several callbacks of a chain vary together:

    >>> g = fcb.grid(lambda patience, factor: fcb.chain(
    ...     fcb.EarlyStopping("val_loss", patience=patience),
    ...     fcb.ReduceLROnPlateau("val_loss", factor=factor, patience=1)),
    ...     patience=[5, 10], factor=[0.1, 0.5])
    >>> len(g)
    4
    """
    if not callable(factory):
        raise ConfigError(
            f"fcb.grid: the first argument must be a callback class or a function returning a "
            f"callback, got {factory!r}."
        )
    axes = {name: _axis_values(name, v) for name, v in options.items() if _is_axis(v)}
    fixed = {name: v for name, v in options.items() if name not in axes}
    first = {name: values[0] for name, values in axes.items()}
    base = _build(factory, {**fixed, **first}, first)
    combos = list(itertools.product(*axes.values()))
    configs = [dict(zip(axes, combo, strict=True)) for combo in combos]
    if not axes:
        return Grid(batch_of_one(base), configs)
    columns = [np.asarray([combo[i] for combo in combos]) for i in range(len(axes))]
    try:
        batched = _build_from_arrays(factory, fixed, dict(zip(axes, columns, strict=True)), base)
    except ConfigError:
        # some value is invalid: find it, and name the configuration that holds it
        _check_each_value(factory, fixed, axes, base)
        for config in configs:
            _build(factory, {**fixed, **config}, config)
        batched = None
    if batched is None or not _same_members(batched, len(combos) - 1, factory, fixed, configs):
        _check_each_value(factory, fixed, axes, base)
        batched = _build_under_vmap(factory, fixed, list(axes), columns)
    _check_batch(base, batched, len(combos), list(axes))
    return Grid(batched, configs)


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
            # NumPy broadcasts without compiling a program per leaf shape
            leaves.append(jnp.asarray(np.broadcast_to(np.asarray(many), (size, *one.shape))))
        else:
            return None
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base), leaves)


def _same_members(
    batched: Callback,
    index: int,
    factory: Callable[..., Any],
    fixed: Mapping[str, Any],
    configs: Sequence[Mapping[str, Any]],
) -> bool:
    """Configuration `index` of the batch equals that configuration built on its own."""
    alone = _build(factory, {**fixed, **configs[index]}, configs[index])
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


def batch_of_one(callback: Callback) -> Callback:
    """`callback` as a batch of one configuration: a leading axis of size 1 on each leaf."""
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(leaf)[None] if eqx.is_array(leaf) else leaf, callback
    )


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
