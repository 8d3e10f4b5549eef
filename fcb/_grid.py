"""fcb.grid: a batch of configurations of one callback, built from option values.

`grid` builds one batched callback from every combination of some numeric options; the
`Grid` it returns runs every configuration at once (`jax.vmap`), in a training loop or over
a recorded history with [`fcb.replay`][].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _monitored
from ._core import Actions, Callback, Metrics, StepLike
from ._errors import ConfigError
from ._grid_build import (
    _as_int32,
    _build,
    _build_from_arrays,
    _build_under_vmap,
    _check_batch,
    _check_each_value,
    _columns,
    _same_members,
    _stores_options_as_is,
)
from ._monitor import Mode

_AXIS_TYPES = (list, range, np.ndarray, jax.Array)

class _Values(tuple):
    """Per configuration, the values of the varied options: a tuple of tuples that pytrees
    see as one leaf. Equinox walks the pytree of every static field when a module is built
    (for 10,000 configurations of two options, 20,000 leaves: tens of milliseconds); as a
    tuple it compares, hashes, prints and encodes (`state_dict`) as one."""

    __slots__ = ()


class _Table(NamedTuple):
    """The varied options and the values of each configuration, as `grid` passes them to
    `Grid` (consistent by construction: no dict per configuration)."""

    names: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]


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
        self, callback: Callback, configs: Sequence[Mapping[str, Any]] | _Table | None = None
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
        leading = sizes.pop() if sizes else None
        if isinstance(configs, _Table):  # from fcb.grid: consistent by construction
            names, values = configs.names, configs.values
            size = leading if leading is not None else len(values)
        else:
            configs = [dict(c) for c in configs] if configs is not None else None
            size = leading if leading is not None else (len(configs) if configs else 1)
            if configs is None:
                configs = [{} for _ in range(size)]
            names = tuple(configs[0]) if configs else ()
            for config in configs:
                if tuple(config) != names:
                    raise ConfigError(
                        f"fcb.Grid: every config must name the same options in the same "
                        f"order; got {list(config)} after {list(names)}."
                    )
            values = tuple(tuple(c[n] for n in names) for c in configs)
        if len(values) != size:
            raise ConfigError(
                f"fcb.Grid: {len(values)} configs were given for a batch of {size} "
                f"configurations; give one config per configuration."
            )
        self.callback = callback
        self.names = names
        self.values = _Values(values)

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
    # the configurations as tuples of values (the last axis fastest), no dict for each
    table = _Table(tuple(axes), tuple(itertools.product(*axes.values())))
    if not axes:
        return Grid(batch_of_one(base), table)
    columns = _columns(axes)
    arrays = [_as_int32(c) for c in columns] if _stores_options_as_is(factory) else columns
    try:
        batched = _build_from_arrays(factory, fixed, dict(zip(axes, arrays, strict=True)), base)
    except ConfigError:
        # some value is invalid: find it, and name the configuration that holds it
        _check_each_value(factory, fixed, axes, base)
        for combo in table.values:
            config = dict(zip(table.names, combo, strict=True))
            _build(factory, {**fixed, **config}, config)
        batched = None
    size = len(table.values)
    # the first, middle and last configurations built alone must equal theirs in the batch: a
    # factory that is not elementwise in its options (one that reduces an array option) is
    # then built under vmap instead of giving every configuration the same wrong value
    checked = sorted({0, size // 2, size - 1})

    def alone(index: int) -> Callback:  # the first is `base`, built above
        if index == 0:
            return base
        config = dict(zip(table.names, table.values[index], strict=True))
        return _build(factory, {**fixed, **config}, config)

    if batched is None or not all(_same_members(batched, i, alone(i)) for i in checked):
        _check_each_value(factory, fixed, axes, base)
        batched = _build_under_vmap(factory, fixed, list(axes), columns)
    _check_batch(base, batched, size, list(axes))
    return Grid(batched, table)


def batch_of_one(callback: Callback) -> Callback:
    """`callback` as a batch of one configuration: a leading axis of size 1 on each leaf."""
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(leaf)[None] if eqx.is_array(leaf) else leaf, callback
    )
