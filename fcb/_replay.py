"""fcb.replay: choose early-stopping and checkpoint options after the fact.

`replay` runs a callback (single or an [`fcb.grid`][]) over a recorded metric history in one
compiled loop over the checks, every configuration at once (`jax.vmap`), as if each
configuration had driven the training run. The grid is built in `_grid`, the history loaded
in `_replay_history`, the results tabled in `_replay_result`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._core import NO_STEP, Callback, StopReason
from ._errors import ConfigError, MissingMetricError
from ._grid import Grid, batch_of_one, grid as grid  # re-exported: fcb.cli imports it here
from ._monitor import Mode, improves, worst_value
from ._program_cache import cached_call
from ._replay_history import HistoryLike, is_study, load_history
from ._replay_result import ReplayResult
from ._replay_study import StudyReplay, replay_study
from ._validate import check_mode, describe_keys

if TYPE_CHECKING:
    import optuna


def _resolve_monitor(
    batch: Grid, available: Sequence[str], monitor: str | None, mode: Mode | None
) -> tuple[str | None, Mode]:
    """The metric `best_step` follows, and its mode: the one the callbacks monitor among the
    `available` keys, or the one `monitor=` / `mode=` name."""
    candidates = [(k, m) for k, m in batch.monitored() if k in available]
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


def _replay_batch_loop(
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


_replay_batch = eqx.filter_jit(_replay_batch_loop)


def _run_batch(
    callback: Callback,
    monitor: str | None,
    mode: Mode,
    columns: Mapping[str, Any],
    steps: np.ndarray,
    size: int,
) -> _Carry:
    """`_replay_batch`, its executable loaded from disk when an earlier process compiled the
    same program (`fcb._program_cache`: only for callbacks made of fcb's own classes)."""
    dynamic, static = eqx.partition(callback, eqx.is_array)

    def _replay_batch_cached(dynamic: Any, columns: Any, steps: Any) -> _Carry:
        return _replay_batch_loop(eqx.combine(dynamic, static), monitor, mode, columns, steps, size)

    return cached_call(
        "fcb.replay",
        _replay_batch_cached,
        (dynamic, dict(columns), steps),
        static,
        {"monitor": monitor, "mode": mode, "size": size},
        lambda: _replay_batch(callback, monitor, mode, columns, steps, size),
    )


DEFAULT_CHUNK_SIZE = 8_192
"""Configurations `fcb.replay` runs at once; a larger grid runs in chunks of equal size."""


def _chunk_bounds(size: int, chunk_size: int) -> tuple[int, list[tuple[int, int]]]:
    """The configurations of each chunk (`start`, `stop`), and the chunk size they are padded
    to: as equal as possible, so that every chunk runs the same compiled program."""
    count = -(-size // chunk_size)
    per = -(-size // count)
    return per, [(start, min(start + per, size)) for start in range(0, size, per)]


def _replay_chunks(
    callback: Callback,
    monitor: str | None,
    mode: Mode,
    columns: Mapping[str, Any],
    steps: np.ndarray,
    size: int,
    chunk_size: int,
) -> _Carry:
    """`_replay_batch` over at most `chunk_size` configurations at a time, the results joined
    on the host: memory is bounded by a chunk (and the history), time grows linearly with the
    configurations. Each configuration runs alone (`vmap`): chunking changes no result."""
    if size <= chunk_size:
        return jax.device_get(_run_batch(callback, monitor, mode, columns, steps, size))
    per, bounds = _chunk_bounds(size, chunk_size)
    host = jax.device_get(callback)  # slicing NumPy leaves compiles no side program

    def chunk(start: int, stop: int) -> Any:
        def take(leaf: Any) -> Any:
            if not eqx.is_array(leaf):
                return leaf
            part = leaf[start:stop]
            # the last chunk is padded with copies of its last configuration, then trimmed
            return np.concatenate([part, np.repeat(part[-1:], per - len(part), axis=0)])

        return jax.tree_util.tree_map(take, host)

    finals = [
        jax.device_get(_run_batch(chunk(a, b), monitor, mode, columns, steps, per))
        for a, b in bounds
    ]
    return jax.tree_util.tree_map(
        lambda *parts: np.concatenate(parts)[:size] if np.ndim(parts[0]) else max(parts), *finals
    )


@overload
def replay(
    callback: Callback, history: HistoryLike, *, monitor: str | None = None,
    mode: Mode | None = None, steps: str | Any = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
    study_name: None = None,
) -> ReplayResult: ...


@overload
def replay(
    callback: Callback, history: str, *, monitor: str | None = None,
    mode: Mode | None = None, steps: str | Any = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
    study_name: str,
) -> StudyReplay: ...


@overload
def replay(
    callback: Callback, history: optuna.study.Study, *, monitor: str | None = None,
    mode: Mode | None = None, steps: str | Any = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
    study_name: None = None,
) -> StudyReplay: ...


def replay(
    callback: Callback,
    history: Any,
    *,
    monitor: str | None = None,
    mode: Mode | None = None,
    steps: str | Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    study_name: str | None = None,
) -> ReplayResult | StudyReplay:
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

    `history` can also be a finished Optuna study (an `optuna.study.Study`, or its storage
    URL such as `"sqlite:///study.db"` with `study_name=`): every finished trial with
    intermediate values is a history, seen under the metric name `"value"` at the trial's
    steps, and the result is an [`fcb.optuna.StudyReplay`][]: per configuration, the trials
    it prunes, the checks it saves and the best objective value it loses.

    `best_step` / `best_value` follow the metric the callbacks monitor (or `monitor=` /
    `mode=` when they monitor several). A grid larger than `chunk_size` configurations
    runs in chunks of at most that many, one after the other, with the same results: memory
    stays bounded by a chunk and the time grows linearly with the configurations. Nested
    callbacks of a `BestCheckpoint` evaluate the
    live model, which a replay does not have: they do not run.

    >>> history = {"val_loss": [0.9, 0.7, 0.72, 0.69, 0.71, 0.73, 0.74, 0.6]}
    >>> result = fcb.replay(fcb.grid(fcb.EarlyStopping, monitor="val_loss",
    ...                              patience=[1, 2, 4], min_delta=[0, 0.02]), history)
    >>> result.stop_step.tolist()
    [2, 2, 5, 3, -1, 5]
    >>> print(result.table())
    replay: 6 configurations x 8 checks; best = lowest val_loss
    #  patience  min_delta  stop_step         reason  checks  best_step  best val_loss
    0         1          0          2       patience       3          1            0.7
    1         1       0.02          2       patience       3          1            0.7
    2         2          0          5       patience       6          3           0.69
    3         2       0.02          3       patience       4          3           0.69
    4         4          0        > 7  history ended       8          7            0.6
    5         4       0.02          5       patience       6          3           0.69
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
        batch = Grid(batch_of_one(callback))
    if study_name is not None or is_study(history):
        return replay_study(batch, history, study_name, steps=steps, monitor=monitor)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or (
        chunk_size < 1
    ):
        raise ConfigError(
            f"fcb.replay: chunk_size = {chunk_size!r} must be a whole number of configurations "
            f">= 1 (default {DEFAULT_CHUNK_SIZE})."
        )
    columns, step_numbers = load_history(history, batch.metric_keys, steps)
    key, resolved_mode = _resolve_monitor(batch, list(columns), monitor, mode)
    final = _replay_chunks(
        batch.callback, key, resolved_mode, columns, step_numbers, len(batch), int(chunk_size)
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
