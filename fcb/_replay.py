"""fcb.grid and fcb.replay: choose early-stopping and checkpoint options after the fact.

`grid` builds one batched callback from every combination of some numeric options; `replay`
runs a callback (single or batched) over a recorded metric history in one compiled loop
over the checks, every configuration at once (`jax.vmap`), as if each configuration had
driven the training run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._core import NO_STEP, Actions, Callback, Metrics, StepLike, StopReason
from ._errors import ConfigError, MetricTypeError, MissingMetricError
from ._monitor import MODES, Mode, improves, worst_value
from ._validate import check_mode, describe_keys

HistoryLike = Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike
"""A recorded history: `{key: 1-D array}`, a list of per-check dicts, or a CSV / JSONL path."""

_AXIS_TYPES = (list, range, np.ndarray, jax.Array)

_STRUCTURAL_OPTION = (
    "fcb.grid: `{name}` changes the structure of {owner} (a static field such as a mode, a "
    "slot name or a table size), so it cannot vary inside one batch: {first!r} and {other!r} "
    "give different structures. Build one grid per value, e.g. "
    "[fcb.grid(..., {name}=v) for v in {values!r}]."
)


# -- the batched callback --------------------------------------------------------------------


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
        return Grid(_batch_of_one(base), configs)
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
        if eqx.is_array(one) else many == one
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


def _batch_of_one(callback: Callback) -> Callback:
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


# -- histories -------------------------------------------------------------------------------


class _KeyRecorder(Mapping[str, Any]):
    """Metrics that record which keys a callback reads (traced once, under `eval_shape`)."""

    def __init__(self, keys: Sequence[str]):
        self._keys = list(keys)
        self.read: dict[str, None] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        self.read[key] = None
        return jnp.zeros((), jnp.float32)

    def __iter__(self) -> Any:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _read_keys(callback: Callback, available: Sequence[str]) -> list[str]:
    """The metric keys `callback` reads at a check, given the keys a history offers.

    A strict callback whose key is not offered raises [`fcb.MissingMetricError`][] here,
    listing the history's keys.
    """
    recorder = _KeyRecorder(available)
    jax.eval_shape(lambda: callback(callback.init(), recorder, step=jnp.int32(0)))
    return list(recorder.read)


def _number(where: str, key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetricTypeError(
            f"fcb.replay: {where}: metric {key!r} must be a number, got {value!r}."
        ) from None
    return number


def _column(key: str, values: Any) -> np.ndarray:
    try:
        column = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MetricTypeError(
            f"fcb.replay: history column {key!r} must hold numbers, got {values!r}."
        ) from None
    if column.ndim != 1:
        raise ConfigError(
            f"fcb.replay: history column {key!r} must be 1-D (one value per check), got shape "
            f"{column.shape}."
        )
    return column


def _step_numbers(steps: Any, columns: Mapping[str, np.ndarray], length: int) -> np.ndarray:
    if steps is None:
        steps = "step" if "step" in columns else np.arange(length)
    source = f"column {steps!r}" if isinstance(steps, str) else "`steps`"
    if isinstance(steps, str):
        if steps not in columns:
            raise MissingMetricError(
                f"fcb.replay: steps = {steps!r} names no history column with a value at every "
                f"check; available keys: {describe_keys(columns)}."
            )
        steps = columns[steps]
    numbers = _column("steps", steps)
    if len(numbers) != length:
        raise ConfigError(
            f"fcb.replay: `steps` must give one step number per check ({length}), got "
            f"{len(numbers)}."
        )
    if not np.all(np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= 0)):
        raise ConfigError(
            f"fcb.replay: the step numbers ({source}) must be whole numbers >= 0, got "
            f"{numbers[:8].tolist()}{'...' if len(numbers) > 8 else ''}."
        )
    if np.any(numbers > np.iinfo(np.int32).max):
        raise ConfigError(f"fcb.replay: the step numbers ({source}) must fit in int32.")
    return numbers.astype(np.int32)


def _history(history: Any, callback: Callback, steps: Any) -> tuple[dict[str, np.ndarray], Any]:
    """The columns `callback` reads, as float32, and the step number of every check."""
    if isinstance(history, (str, os.PathLike)):
        from ._history import read_rows  # file reading stays out of the pure path

        try:
            history = read_rows(history)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"fcb.replay: {error}") from None
    step_key = steps if isinstance(steps, str) else "step"
    if isinstance(history, Mapping):
        keys = [str(k) for k in history]
        read = _read_keys(callback, keys)
        raw = {k: _column(k, history[k]) for k in dict.fromkeys([*read, step_key]) if k in history}
        lengths = {k: len(v) for k, v in raw.items()} or {
            k: len(_column(k, history[k])) for k in keys[:1]
        }
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"fcb.replay: every history column must have one value per check, got lengths "
                f"{lengths}."
            )
        length = next(iter(lengths.values()), 0)
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        rows = list(history)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ConfigError(
                    f"fcb.replay: a history list must hold one dict of metrics per check; item "
                    f"{i} is {type(row).__name__}: {row!r}."
                )
        keys = list(dict.fromkeys(str(k) for row in rows for k in row))
        read = _read_keys(callback, keys)
        # A row is a check when it has every metric the callbacks read (a CSV logger writes
        # training rows with the validation columns empty).
        kept = [row for row in rows if all(row.get(k) is not None for k in read)]
        raw = {
            key: np.asarray([_number(f"check {i}", key, row[key]) for i, row in enumerate(kept)])
            for key in dict.fromkeys([*read, step_key])
            if kept and all(row.get(key) is not None for row in kept)
        }
        length = len(kept)
    else:
        raise ConfigError(
            f"fcb.replay: `history` must be a mapping of 1-D arrays, a list of per-check dicts, "
            f"or a CSV / JSONL path, got {type(history).__name__}."
        )
    if length == 0:
        raise ConfigError(
            f"fcb.replay: the history has no check with every metric the callbacks read "
            f"({', '.join(map(repr, read)) or 'none'})."
        )
    step_numbers = _step_numbers(steps, raw, length)
    return {k: raw[k].astype(np.float32) for k in read}, step_numbers


# -- replay ----------------------------------------------------------------------------------


def _monitored(callback: Any) -> list[tuple[str, Mode]]:
    """The distinct (metric, mode) pairs the monitoring callbacks in `callback` follow."""
    found: dict[tuple[str, Mode], None] = {}

    def visit(node: Any) -> None:
        if isinstance(node, Callback):
            key = getattr(node, "monitor", None) or getattr(node, "metric_key", None)
            mode = getattr(node, "mode", None)
            if isinstance(key, str) and mode in MODES:
                found[(key, mode)] = None
            for field in dataclasses.fields(node):
                visit(getattr(node, field.name))
        elif isinstance(node, (tuple, list)):
            for item in node:
                visit(item)

    visit(callback)
    return list(found)


def _resolve_monitor(
    callback: Callback, available: Sequence[str], monitor: str | None, mode: Mode | None
) -> tuple[str | None, Mode]:
    candidates = [(k, m) for k, m in _monitored(callback) if k in available]
    if mode is not None:
        mode = check_mode("fcb.replay", mode)
    if monitor is not None:
        if monitor not in available:
            raise MissingMetricError(
                f"fcb.replay: monitor = {monitor!r} is not a metric the callbacks read from the "
                f"history; available: {describe_keys(dict.fromkeys(available))}."
            )
        modes = [m for k, m in candidates if k == monitor]
        return monitor, mode or (modes[0] if modes else "min")
    if mode is not None:
        candidates = [(k, m) for k, m in candidates if m == mode]
    keys = list(dict.fromkeys(k for k, _ in candidates))
    if len(keys) > 1 or len(candidates) > len(keys):
        raise ConfigError(
            f"fcb.replay: the callbacks monitor several metrics or modes {candidates}; pass "
            f"monitor=... (and mode=...) to say which one best_step and best_value follow."
        )
    if not candidates:
        return None, "min"
    return candidates[0]


class _Carry(eqx.Module):
    state: Any
    index: Int[Array, ""]  # the check, shared by the batch; the other fields are per config
    stop_index: Int[Array, ""]
    stop_reason: Int[Array, ""]
    best: Float[Array, ""]
    best_step: Int[Array, ""]
    slots: dict[str, Int[Array, ""]]
    slot_values: dict[str, Float[Array, ""]]


def _keep_running(running: Bool[Array, " b"], new: Any, old: Any) -> Any:
    """`new` for the configurations still running, `old` for those that have stopped."""

    def pick(n: Any, o: Any) -> Any:
        return jnp.where(running.reshape(running.shape + (1,) * (jnp.ndim(n) - 1)), n, o)

    return jax.tree_util.tree_map(pick, new, old)


@eqx.filter_jit
def _replay_batch(
    callback: Callback,
    monitor: str | None,
    mode: Mode,
    columns: Mapping[str, Float[ArrayLike, " n"]],
    steps: Int[ArrayLike, " n"],
    size: int,
) -> _Carry:
    """Every configuration, check after check, until it stops or the history ends.

    A `while_loop` rather than a `scan`: a run ends at its stopping check, as training
    would, and the loop ends once every configuration has stopped; a stopped
    configuration's carry stays as it was at its stop. One loop over the checks with a
    scalar check index, the batched callback called at each check (rather than a `vmap` of
    one loop per configuration, which makes the index and every read of the history
    per-configuration gathers).
    """
    # axis_size: a batch of callbacks without array leaves (TerminateOnNaN) has no axis to read
    slot_names = callback.action_names().slots

    def full(value: Any, dtype: Any) -> Array:
        return jnp.full((size,), value, dtype)

    initial = _Carry(
        state=eqx.filter_vmap(lambda c: c.init(), in_axes=(eqx.if_array(0),), axis_size=size)(
            callback
        ),
        index=jnp.asarray(0, jnp.int32),
        stop_index=full(NO_STEP, jnp.int32),
        stop_reason=full(StopReason.NONE, jnp.int32),
        best=full(worst_value(mode), jnp.float32),
        best_step=full(NO_STEP, jnp.int32),
        slots={n: full(NO_STEP, jnp.int32) for n in slot_names},
        slot_values={n: full(jnp.nan, jnp.float32) for n in slot_names},
    )
    length = jnp.shape(steps)[0]

    def running(carry: _Carry) -> Bool[Array, ""]:
        # whether any configuration still runs, as a dot product of 0/1 values (exact: any 1
        # makes it >= 1): XLA:CPU splits a reduction this wide into a tree of three kernels,
        # slower to compile and to run at every check than one dot.
        live = (carry.stop_index < 0).astype(jnp.float32)
        return (carry.index < length) & (jnp.dot(live, live) > 0)

    def check(carry: _Carry) -> _Carry:
        metrics = {key: jnp.asarray(column)[carry.index] for key, column in columns.items()}
        step = jnp.asarray(steps)[carry.index]
        state, actions = eqx.filter_vmap(
            lambda c, s: c(s, metrics, step=step), in_axes=(eqx.if_array(0), 0), axis_size=size
        )(callback, carry.state)
        best, best_step = carry.best, carry.best_step
        if monitor is not None:
            # the best a ModelCheckpoint(monitor, mode) would hold: the shared rule, no margin
            better = improves(metrics[monitor], best, 0.0, mode)
            best = jnp.where(better, metrics[monitor], best)
            best_step = jnp.where(better, step, best_step)
        updated = _keep_running(
            carry.stop_index < 0,
            (
                state,
                jnp.where(actions.stop, carry.index, NO_STEP).astype(jnp.int32),
                actions.stop_reason,
                best,
                best_step,
                actions.slots,
                actions.slot_values,
            ),
            (
                carry.state,
                carry.stop_index,
                carry.stop_reason,
                carry.best,
                carry.best_step,
                carry.slots,
                carry.slot_values,
            ),
        )
        state, stop_index, stop_reason, best, best_step, slots, slot_values = updated
        return _Carry(
            state=state,
            index=carry.index + 1,
            stop_index=stop_index,
            stop_reason=stop_reason,
            best=best,
            best_step=best_step,
            slots=slots,
            slot_values=slot_values,
        )

    return jax.lax.while_loop(running, check, initial)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ReplayResult:
    """What each configuration of a replay did. Columns are NumPy arrays, one row per
    configuration (in the order of `configs`).

    Attributes:
        names: the varied options (none when a single callback was replayed).
        values: per configuration, the values of `names`.
        stop_step: the step of the check that stopped the run (-1: never stopped).
        stop_reason: its [`fcb.StopReason`][] code (0 when never stopped).
        checks: how many checks the run made (up to and including the stopping check).
        best_step: the best check of `monitor` among those checks (-1 when none was finite):
            the step `fcb.ModelCheckpoint(monitor, mode)` holds as its best when the run ends
            (strict improvement, so the earliest of tied values; NaN and ±inf never).
        best_value: its value (NaN when none).
        slots: slot name -> the step each checkpoint slot holds when the run ends (-1: empty).
        slot_values: slot name -> the metric value of that step (NaN: empty).
        monitor: the metric `best_step` follows (None when the callbacks monitor nothing).
        mode: `"min"` or `"max"`.
        steps: the step number of every check of the history.
        state: the callbacks' final state, batched (each configuration frozen at its stop).
    """

    names: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]
    stop_step: np.ndarray
    stop_reason: np.ndarray
    checks: np.ndarray
    best_step: np.ndarray
    best_value: np.ndarray
    slots: dict[str, np.ndarray]
    slot_values: dict[str, np.ndarray]
    monitor: str | None
    mode: Mode
    steps: np.ndarray
    state: Any

    def __len__(self) -> int:
        return len(self.values)

    @functools.cached_property
    def configs(self) -> list[dict[str, Any]]:
        """Per configuration, the varied options and their values (`{}` for a single
        callback)."""
        return [dict(zip(self.names, v, strict=True)) for v in self.values]

    def row(self, index: int) -> dict[str, Any]:
        """Configuration `index` and its results as plain Python values."""
        row: dict[str, Any] = dict(zip(self.names, self.values[index], strict=True))
        row["stop_step"] = int(self.stop_step[index])
        row["stop_reason"] = StopReason(int(self.stop_reason[index])).name.lower()
        row["checks"] = int(self.checks[index])
        row["best_step"] = int(self.best_step[index])
        row["best_value"] = float(self.best_value[index])
        row.update({name: int(s[index]) for name, s in self.slots.items()})
        return row

    def rows(self) -> list[dict[str, Any]]:
        """Every configuration as a dict (for `pandas.DataFrame(result.rows())`)."""
        return [self.row(i) for i in range(len(self))]

    def _quality(self) -> np.ndarray:
        """best_value turned into "smaller is better", NaN last."""
        value = self.best_value.astype(np.float64) * (1.0 if self.mode == "min" else -1.0)
        return np.where(np.isnan(value), np.inf, value)

    def order(self, by: str = "best_value") -> np.ndarray:
        """Row indices sorted by a column: `best_value` (better first, then fewer checks),
        `checks` / `stop_step` (fewer first, then better value), or a varied option."""
        quality, checks = self._quality(), self.checks
        if by == "best_value":
            keys: tuple[Any, ...] = (checks, quality)
        elif by in ("checks", "stop_step"):
            keys = (quality, checks)
        elif by in self.names:
            position = self.names.index(by)
            keys = (np.asarray([v[position] for v in self.values], np.float64),)
        else:
            raise ConfigError(
                f"ReplayResult: cannot sort by {by!r}; use 'best_value', 'checks', 'stop_step' "
                f"or one of the varied options {list(self.names)}."
            )
        return np.lexsort(keys)

    def best(self) -> dict[str, Any]:
        """The row of the configuration that kept the best value; ties: fewest checks."""
        return self.row(int(self.order("best_value")[0]))

    def pareto(self) -> np.ndarray:
        """Indices of the configurations no other beats on both fewer checks and a better
        best value, by increasing checks: the trade-offs worth considering."""
        quality, front, best_so_far = self._quality(), [], np.inf
        for index in self.order("checks"):
            if quality[index] < best_so_far:
                front.append(index)
                best_so_far = quality[index]
        return np.asarray(front, dtype=np.int64)

    def table(self, max_rows: int | None = 20, sort_by: str | None = None) -> str:
        """The results as an aligned text table (`max_rows=None`: every row)."""
        order = np.arange(len(self)) if sort_by is None else self.order(sort_by)
        shown = list(order)
        hidden = 0
        if max_rows is not None and len(shown) > max_rows:
            head = max(1, max_rows - max_rows // 4)
            hidden = len(shown) - max_rows
            shown = [*shown[:head], -1, *shown[len(shown) - (max_rows - head) :]]
        best_header = f"best {self.monitor}" if self.monitor else "best_value"
        headers = ["#", *self.names, "stop_step", "reason", "checks", "best_step", best_header]
        headers += list(self.slots)
        lines = []
        for index in shown:
            if index < 0:
                lines.append([f"... {hidden} more rows"] + [""] * (len(headers) - 1))
                continue
            row = self.row(int(index))
            cells = [str(index)] + [_cell(row[n]) for n in self.names]
            cells += [
                "never" if row["stop_step"] < 0 else str(row["stop_step"]),
                "-" if row["stop_reason"] == "none" else row["stop_reason"],
                str(row["checks"]),
                "-" if row["best_step"] < 0 else str(row["best_step"]),
                "-" if np.isnan(row["best_value"]) else f"{row['best_value']:.6g}",
            ]
            cells += ["-" if row[s] < 0 else str(row[s]) for s in self.slots]
            lines.append(cells)
        widths = [
            max([len(h)] + [len(line[i]) for line in lines if not line[0].startswith("...")])
            for i, h in enumerate(headers)
        ]

        def fmt(cells: list[str]) -> str:
            if cells[0].startswith("..."):
                return cells[0]
            return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        title = (
            f"replay: {len(self)} configuration{'s' if len(self) != 1 else ''} x "
            f"{len(self.steps)} checks"
        )
        if self.monitor:
            title += f"; best = {'lowest' if self.mode == 'min' else 'highest'} {self.monitor}"
        return "\n".join([title, fmt(headers), *(fmt(c) for c in lines)])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"ReplayResult({len(self)} configurations x {len(self.steps)} checks, "
            f"monitor={self.monitor!r}, varied={list(self.names)})"
        )


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def replay(
    callback: Callback,
    history: HistoryLike,
    *,
    monitor: str | None = None,
    mode: Mode | None = None,
    steps: str | Any = None,
) -> ReplayResult:
    """Run a callback, or every configuration of a [`fcb.grid`][], over a recorded history.

    Each configuration sees check `i` of the history as
    `callback(state, {key: history[key][i]}, step=steps[i])`, exactly as in a training loop,
    and its run ends at the first check that asks to stop: later checks change nothing, as
    training would have ended there. All configurations run in one compiled `lax.while_loop`
    over the checks, the callback `jax.vmap`-ed over the configurations at each check: a scan
    that ends once every configuration has stopped.

    `history` is a mapping from metric name to a 1-D array, a list of per-check dicts, or
    the path of a CSV file (header row of names), a JSONL file, or a run directory with a
    `history.jsonl` (see [`fcb.torch.TorchAdapter`][]'s `history=True`). From a list or a
    file, the checks are the rows that have every metric the callbacks read; other rows (a
    CSV logger's training rows with empty validation cells) are skipped. `steps` names the
    column holding the step numbers (default: `"step"` when present, otherwise
    `0, 1, 2, ...`) or gives them as an array.

    `best_step` / `best_value` follow the metric the callbacks monitor (or `monitor=` /
    `mode=` when they monitor several). Nested callbacks of a `BestCheckpoint` evaluate the
    live model, which a replay does not have: they do not run.

    >>> history = {"val_loss": [0.9, 0.7, 0.72, 0.69, 0.71, 0.73, 0.74, 0.6]}
    >>> result = fcb.replay(fcb.grid(fcb.EarlyStopping, monitor="val_loss",
    ...                              patience=[1, 2, 4], min_delta=[0, 0.02]), history)
    >>> result.stop_step.tolist()
    [2, 2, 5, 3, -1, 5]
    >>> print(result.table())
    replay: 6 configurations x 8 checks; best = lowest val_loss
    #  patience  min_delta  stop_step    reason  checks  best_step  best val_loss
    0         1          0          2  patience       3          1           0.7
    1         1       0.02          2  patience       3          1           0.7
    2         2          0          5  patience       6          3          0.69
    3         2       0.02          3  patience       4          3          0.69
    4         4          0      never         -       8          7           0.6
    5         4       0.02          5  patience       6          3          0.69
    >>> result.configs[3]
    {'patience': 2, 'min_delta': 0.02}
    >>> result.pareto().tolist()  # the trade-offs: fewer checks, or a better value
    [0, 3, 4]
    """
    batch = callback if isinstance(callback, Grid) else None
    if batch is None:
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"fcb.replay: `callback` must be an fcb.Callback or an fcb.grid(...), got "
                f"{type(callback).__name__}: {callback!r}."
            )
        batch = Grid(_batch_of_one(callback))
    single = batch[0]
    columns, step_numbers = _history(history, single, steps)
    key, resolved_mode = _resolve_monitor(single, list(columns), monitor, mode)
    final = jax.device_get(
        _replay_batch(
            batch.callback, key, resolved_mode, columns, step_numbers, len(batch)
        )
    )
    stopped = final.stop_index >= 0
    n = len(step_numbers)
    best_value = np.where(final.best_step >= 0, final.best, np.nan).astype(np.float32)
    return ReplayResult(
        names=batch.names,
        values=batch.values,
        stop_step=np.where(stopped, step_numbers[np.maximum(final.stop_index, 0)], NO_STEP),
        stop_reason=np.asarray(final.stop_reason),
        checks=np.where(stopped, final.stop_index + 1, n),
        best_step=np.asarray(final.best_step),
        best_value=best_value,
        slots={k: np.asarray(v) for k, v in final.slots.items()},
        slot_values={k: np.asarray(v) for k, v in final.slot_values.items()},
        monitor=key,
        mode=resolved_mode,
        steps=step_numbers,
        state=final.state,
    )
