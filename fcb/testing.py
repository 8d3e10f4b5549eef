"""Assertions for users (and fcb's own tests): jit/scan/vmap parity and exact resume.

A *history* is a mapping from metric name to a 1-D array; check `i` sees
`{key: history[key][i]}` at `step=i`.

>>> es = fcb.EarlyStopping("val_loss", patience=2)
>>> history = {"val_loss": np.array([0.5, 0.4, 0.45, 0.41, 0.3])}
>>> fcb.testing.assert_jit_equivalent(es, history)
>>> fcb.testing.assert_resume_equivalent(es, history)
>>> fcb.testing.assert_changed_resume_equivalent(
...     es, fcb.EarlyStopping("val_loss", patience=4), history)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ._core import Actions, Callback
from ._resume_change import resume_with_changes
from ._state_dict import load_state_dict, state_dict

History = Mapping[str, Any]


def history_length(history: History) -> int:
    lengths = {len(np.asarray(v)) for v in history.values()}
    if len(lengths) != 1:
        raise ValueError(f"every history column must have the same length, got {sorted(lengths)}")
    return lengths.pop()


def _metrics_at(history: History, i: int) -> dict[str, Any]:
    return {k: jnp.asarray(np.asarray(v)[i], jnp.float32) for k, v in history.items()}


def _stack(actions: list[Actions]) -> Actions:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *actions)


def run(
    callback: Callback,
    history: History,
    *,
    state: Any = None,
    start: int = 0,
    stop: int | None = None,
    jit: bool = False,
) -> tuple[Any, Actions]:
    """Run checks `start..stop` of `history` one Python call at a time.

    Returns the final state and the actions stacked along a leading step axis.
    With `jit=True` every check goes through one jitted function, which must not retrace.
    """
    n = history_length(history) if stop is None else stop
    state = callback.init() if state is None else state

    traces = 0

    def check(state: Any, metrics: Any, step: Any) -> tuple[Any, Actions]:
        nonlocal traces
        traces += 1  # runs once per trace under jit, once per call otherwise
        return callback(state, metrics, step=step)

    step_fn = jax.jit(check) if jit else check
    actions = []
    for i in range(start, n):
        state, a = step_fn(state, _metrics_at(history, i), jnp.asarray(i, jnp.int32))
        actions.append(a)
    if jit and traces > 1:
        raise AssertionError(
            f"the jitted check of {type(callback).__name__} was traced {traces} times over "
            f"{n - start} checks; the state or actions change dtype, shape or weak type between "
            f"steps (build state leaves with explicit dtypes)."
        )
    if not actions:
        raise ValueError(f"no checks to run between start={start} and stop={n}")
    return state, _stack(actions)


def run_scan(callback: Callback, history: History, *, state: Any = None) -> tuple[Any, Actions]:
    """Run every check of `history` inside one jitted `jax.lax.scan`."""
    n = history_length(history)
    columns = {k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in history.items()}

    def body(state: Any, xs: Any) -> tuple[Any, Actions]:
        metrics, step = xs
        return callback(state, metrics, step=step)

    initial = callback.init() if state is None else state
    steps = jnp.arange(n, dtype=jnp.int32)
    return jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(initial, (columns, steps))


def assert_jit_equivalent(callback: Callback, history: History) -> None:
    """Eager calls, jitted calls (no retracing) and one `lax.scan` give identical results."""
    eager = run(callback, history)
    chex.assert_trees_all_equal(eager, run(callback, history, jit=True))
    chex.assert_trees_all_equal(eager, run_scan(callback, history))


def assert_resume_equivalent(callback: Callback, history: History, splits: Any = None) -> None:
    """Interrupt after each split, save through JSON, resume: identical actions and state.

    `splits` defaults to every position `1..len(history)-1`.
    """
    n = history_length(history)
    full_state, full_actions = run(callback, history)
    for k in range(1, n) if splits is None else splits:
        state, first = run(callback, history, stop=k)
        saved = json.loads(json.dumps(state_dict(state, callback)))
        resumed = load_state_dict(callback, saved)
        chex.assert_trees_all_equal(resumed, state)
        final, rest = run(callback, history, state=resumed, start=k)
        chex.assert_trees_all_equal(final, full_state)
        joined = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), first, rest)
        chex.assert_trees_all_equal(joined, full_actions)


def assert_vmap_equivalent(stacked: Callback, callbacks: list[Callback], history: History) -> None:
    """A stacked callback under `jax.vmap` equals running each configuration on its own."""
    n = history_length(history)
    states = jax.vmap(lambda c: c.init())(stacked)
    check = jax.jit(jax.vmap(lambda c, s, m, i: c(s, m, step=i), in_axes=(0, 0, None, None)))
    batched = []
    for i in range(n):
        states, a = check(stacked, states, _metrics_at(history, i), jnp.asarray(i, jnp.int32))
        batched.append(a)
    batched_actions = _stack(batched)
    for index, single in enumerate(callbacks):
        state, actions = run(single, history)
        pick = lambda x, index=index: x[index]  # noqa: E731
        chex.assert_trees_all_equal(jax.tree_util.tree_map(pick, states), state)
        chex.assert_trees_all_equal(
            jax.tree_util.tree_map(lambda x, index=index: x[:, index], batched_actions), actions
        )


def assert_changed_resume_equivalent(
    before: Callback, after: Callback, history: History, splits: Any = None
) -> None:
    """Run `before` up to each split, resume as `after` (changed numeric settings) through
    [`fcb.resume_with_changes`][] over the recorded checks, and continue: the state and the
    actions from the split on equal those of `after` run from the start.

    `splits` defaults to every position `1..len(history)-1`. Raises when a resume was not
    rebuilt (the report says why).
    """
    n = history_length(history)
    full_state, full_actions = run(after, history)
    for k in range(1, n) if splits is None else splits:
        state, _ = run(before, history, stop=k)
        saved = json.loads(json.dumps(state_dict(state, before)))
        records = [
            {"step": i, "metrics": {key: float(np.asarray(v)[i]) for key, v in history.items()}}
            for i in range(k)
        ]
        resumed, report = resume_with_changes(after, saved, records)
        if report.lines and not report.rebuilt:
            raise AssertionError(f"resuming at check {k} was not rebuilt: {report}")
        final, rest = run(after, history, state=resumed, start=k)
        chex.assert_trees_all_equal(final, full_state)
        tail = jax.tree_util.tree_map(lambda a, k=k: a[k:], full_actions)
        chex.assert_trees_all_equal(rest, tail)
