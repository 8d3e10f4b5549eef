"""Relative min_delta (threshold_mode="rel") for EarlyStopping and BestCheckpoint: a fraction
of |best|, right for negative and zero-crossing metrics; the rule of ReduceLROnPlateau."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb.testing import assert_jit_equivalent, assert_resume_equivalent, assert_vmap_equivalent, run

KEY = "val_loss"


def _reference_early_stopping(values, patience, min_delta, mode):
    """Plain Python (float64 on float32 inputs, exact for the drawn values): the step at which
    EarlyStopping(threshold_mode="rel") stops, its best and best step."""
    best, best_step, wait = float("inf") if mode == "min" else float("-inf"), -1, 0
    for step, v in enumerate(values):
        if np.isfinite(best):
            margin = min_delta * abs(best)
            improved = v < best - margin if mode == "min" else v > best + margin
        else:
            improved = v < best if mode == "min" else v > best
        if improved:
            best, best_step, wait = v, step, 0
        else:
            wait += 1
        if not improved and wait >= patience:
            return step, best, best_step
    return -1, best, best_step


_CHECK = jax.jit(lambda cb, state, metrics, step: cb(state, metrics, step=step))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-64, 64).map(lambda k: k / 8), min_size=1, max_size=20),
    st.integers(0, 4),
    st.sampled_from([0.0, 0.125, 0.25, 0.5]),
    st.sampled_from(["min", "max"]),
)
def test_early_stopping_relative_rule_matches_a_reference_with_negative_metrics(
    values, patience, min_delta, mode
):
    es = fcb.EarlyStopping(
        KEY, mode=mode, patience=patience, min_delta=min_delta, threshold_mode="rel"
    )
    state = es.init()
    for step, v in enumerate(values):
        state, _ = _CHECK(es, state, {KEY: jnp.float32(v)}, jnp.int32(step))
    stopped, best, best_step = _reference_early_stopping(values, patience, min_delta, mode)
    assert int(state.stopped_step) == stopped
    assert int(state.best_step) == best_step
    if best_step >= 0:
        assert float(state.best) == best


def test_a_negative_best_needs_a_better_value_not_a_worse_one():
    # torch's rule would count -7.5 (worse than -8) as an improvement: -8 * (1 - 0.25) = -6
    es = fcb.EarlyStopping(KEY, patience=1, min_delta=0.25, threshold_mode="rel")
    state, actions = run(es, {KEY: np.array([-8.0, -7.5])})
    assert bool(actions.stop[-1]) and int(state.best_step) == 0
    state, actions = run(es, {KEY: np.array([-8.0, -10.5])})
    assert not bool(actions.stop[-1]) and int(state.best_step) == 1


def test_zero_crossing_metric():
    es = fcb.EarlyStopping(KEY, mode="max", patience=1, min_delta=0.5, threshold_mode="rel")
    # -1 -> best; -0.4 beats -1 + 0.5 = -0.5; 0 beats -0.4 + 0.2 = -0.2; 0.001 beats 0 + 0
    state, actions = run(es, {KEY: np.array([-1.0, -0.4, 0.0, 0.001])})
    assert not bool(actions.stop[-1]) and int(state.best_step) == 3


def test_best_checkpoint_shares_the_rule():
    history = {KEY: np.array([-8.0, -7.5, -9.0, -10.5, -10.0])}
    cb = fcb.BestCheckpoint(KEY, tolerances=(1,), min_delta=0.25, threshold_mode="rel")
    state, actions = run(cb, history)
    assert int(state.best_step) == 3  # -9 is not 25% better than -8; -10.5 is
    assert int(actions.slots["best.val_loss.tolerance=1"][-1]) == 0  # stopped at step 1


HISTORY = {KEY: np.array([-1.0, -1.25, -1.2, -1.5, 0.5, -2.0, -2.1, -2.05, -2.5])}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_jit_scan_resume_and_vmap(mode):
    es = fcb.EarlyStopping(KEY, mode=mode, patience=2, min_delta=0.1, threshold_mode="rel")
    assert_jit_equivalent(es, HISTORY)
    assert_resume_equivalent(es, HISTORY, splits=[4])
    grid = fcb.grid(
        fcb.EarlyStopping, monitor=KEY, mode=mode, threshold_mode="rel", min_delta=[0.0, 0.1, 0.5]
    )
    singles = [fcb.EarlyStopping(KEY, mode=mode, threshold_mode="rel", **c) for c in grid.configs]
    assert_vmap_equivalent(grid.callback, singles, HISTORY)
