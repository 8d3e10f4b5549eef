"""Smoothed monitors: EarlyStopping on an exponential moving average or a window mean."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb.testing import (
    assert_jit_equivalent,
    assert_resume_equivalent,
    assert_vmap_equivalent,
    run,
)

KEY = "val_loss"
NAN, INF = float("nan"), float("inf")


def _ema(values, alpha):
    """Plain NumPy float32: the first finite value starts the average; non-finite values pass
    through and are not averaged in."""
    alpha = np.float32(alpha)
    out, average = [], None
    for v in np.asarray(values, np.float32):
        if not np.isfinite(v):
            out.append(v)
            continue
        average = v if average is None else alpha * v + (np.float32(1) - alpha) * average
        out.append(np.float32(average))
    return np.asarray(out, np.float32)


def _window_mean(values, window):
    out, recent = [], []
    for v in np.asarray(values, np.float32):
        if not np.isfinite(v):
            out.append(v)
            continue
        recent = [*recent, float(v)][-window:]
        out.append(np.float32(sum(recent) / len(recent)))
    return np.asarray(out, np.float32)


_CHECK = jax.jit(lambda cb, state, metrics, step: cb(state, metrics, step=step))


def _decisions(callback, values):
    """(stop, improved, wait_count, best) per check, through one shared compiled check."""
    state, out = callback.init(), []
    for i, v in enumerate(values):
        state, actions = _CHECK(callback, state, {KEY: jnp.float32(v)}, jnp.int32(i))
        out.append(
            (
                bool(actions.stop),
                bool(actions.events["early_stopping/improved"]),
                int(state.wait_count),
                float(state.best),
                int(state.stop_reason),
            )
        )
    return out


# dyadic values and alphas keep the float32 average exact in both computations
_VALUE = st.one_of(st.integers(-64, 64).map(lambda k: k / 8), st.sampled_from([NAN, INF]))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(_VALUE, min_size=1, max_size=16),
    st.sampled_from([1.0, 0.5, 0.25, 0.75, 0.125]),
    st.integers(0, 3),
    st.sampled_from(["min", "max"]),
    st.booleans(),
)
def test_ema_early_stopping_equals_early_stopping_on_the_averaged_series(
    values, alpha, patience, mode, check_finite
):
    options = dict(mode=mode, patience=patience, check_finite=check_finite)
    smoothed = fcb.EarlyStopping(KEY, alpha=alpha, **options)
    plain = fcb.EarlyStopping(KEY, **options)
    assert _decisions(smoothed, values) == _decisions(plain, _ema(values, alpha))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(_VALUE, min_size=1, max_size=16),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 3),
)
def test_window_mean_early_stopping_equals_early_stopping_on_the_averaged_series(
    values, window, patience
):
    smoothed = fcb.EarlyStopping(KEY, window=window, patience=patience)
    plain = fcb.EarlyStopping(KEY, patience=patience)
    assert _decisions(smoothed, values) == _decisions(plain, _window_mean(values, window))


def test_smoothed_value_is_logged_and_the_average_is_in_the_state():
    es = fcb.EarlyStopping(KEY, alpha=0.5, patience=10, check_finite=False)
    state, actions = run(es, {KEY: np.asarray([1.0, 0.0, NAN, 1.0])})
    assert np.asarray(actions.log["early_stopping/smoothed"]).tolist()[:2] == [1.0, 0.5]
    assert np.isnan(np.asarray(actions.log["early_stopping/smoothed"])[2])  # raw NaN
    assert float(state.smoothing.average) == 0.75 and int(state.smoothing.count) == 3


# Binary fractions, so that the average is exact in float32 whether or not the compiled code
# fuses its multiply-add (see the one-ulp test below).
HISTORY = {KEY: np.asarray([0.5, 0.75, 0.375, 0.625, NAN, 0.6875, 0.5, 0.4375, 0.75, 0.8125])}


@pytest.mark.parametrize("options", [dict(alpha=0.25), dict(window=3)], ids=["ema", "window"])
def test_jit_scan_resume_and_state_dict(options):
    es = fcb.EarlyStopping(KEY, patience=2, check_finite=False, **options)
    assert_jit_equivalent(es, HISTORY)  # also checks the jitted check traced once
    assert_resume_equivalent(es, HISTORY)  # through JSON at every split


def test_grid_sweeps_alpha_and_each_member_equals_its_configuration():
    grid = fcb.grid(fcb.EarlyStopping, monitor=KEY, patience=[1, 3], alpha=[0.25, 0.5, 1.0])
    assert grid.callback.alpha.shape == (6,)
    singles = [fcb.EarlyStopping(KEY, **c) for c in grid.configs]
    assert_vmap_equivalent(grid.callback, singles, {KEY: np.nan_to_num(HISTORY[KEY], nan=0.9)})


def test_replay_sweeps_alpha():
    grid = fcb.grid(fcb.EarlyStopping, monitor=KEY, patience=1, alpha=[0.1, 1.0])
    result = fcb.replay(grid, {KEY: np.asarray([1.0, 0.9, 0.95, 0.8, 0.85, 0.9])})
    stops = [int(s) for s in np.asarray(result.stop_step)]
    alone = [
        int(run(grid[i], {KEY: np.asarray([1.0, 0.9, 0.95, 0.8, 0.85, 0.9])})[0].stopped_step)
        for i in range(2)
    ]
    assert stops == alone and stops[0] != stops[1]


def test_an_inexact_alpha_differs_by_at_most_one_ulp_between_eager_and_compiled_checks():
    """XLA contracts the average's multiply-add into one fused operation in compiled code
    (documented): with an alpha that is not a short binary fraction the compiled average can
    differ from the eager one in its last bit, never more."""
    values = np.random.default_rng(0).random(50).astype(np.float32)
    es = fcb.EarlyStopping(KEY, alpha=0.3, patience=1000)
    eager = np.asarray(run(es, {KEY: values})[1].log["early_stopping/smoothed"])
    compiled = np.asarray(run(es, {KEY: values}, jit=True)[1].log["early_stopping/smoothed"])
    assert np.all(np.abs(eager - compiled) <= np.spacing(np.maximum(eager, compiled)))


def test_window_is_static_so_a_grid_over_it_names_the_option():
    with pytest.raises(fcb.ConfigError, match=r"`window` changes the structure of EarlyStopping"):
        fcb.grid(fcb.EarlyStopping, monitor=KEY, window=[2, 3])


def test_unsmoothed_state_dicts_are_unchanged():
    """An EarlyStopping without smoothing saves the leaves it always did."""
    es = fcb.EarlyStopping(KEY)
    leaves = fcb.state_dict(es.init(), es)["state"]["leaves"]
    assert sorted(leaves) == [".best", ".best_step", ".stop_reason", ".stopped_step", ".wait_count"]


def test_no_retrace_over_a_long_run():
    es = fcb.EarlyStopping(KEY, window=4, patience=100)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def check(state, value, step):
        return es(state, {KEY: value}, step=step)

    state = es.init()
    for i in range(20):
        state, _ = check(state, jnp.float32(i % 3), jnp.int32(i))
    assert int(state.smoothing.count) == 20


def _slots_and_events(callback, series):
    _, actions = run(callback, {KEY: np.asarray(series, np.float32)}, jit=True)
    return (
        {k: np.asarray(v).tolist() for k, v in actions.slots.items()},
        {k: np.asarray(v).tolist() for k, v in actions.events.items()},
        np.asarray(actions.lr_scale).tolist(),
    )


SMOOTHED_CALLBACKS = {
    "model_checkpoint": lambda **o: fcb.ModelCheckpoint(KEY, save_top_k=2, **o),
    "best_checkpoint": lambda **o: fcb.BestCheckpoint(KEY, tolerances=(1, 3), **o),
    "reduce_lr_on_plateau": lambda **o: fcb.ReduceLROnPlateau(KEY, patience=1, **o),
}
SERIES = [0.5, 0.75, 0.375, 0.625, 0.6875, 0.5, 0.4375, 0.75, 0.8125, 0.25]


@pytest.mark.parametrize("make", SMOOTHED_CALLBACKS.values(), ids=SMOOTHED_CALLBACKS.keys())
@pytest.mark.parametrize("options", [dict(alpha=0.5), dict(window=3)], ids=["ema", "window"])
def test_smoothed_checkpoints_and_plateau_decide_as_on_the_averaged_series(make, options):
    averaged = _ema(SERIES, options["alpha"]) if "alpha" in options else _window_mean(SERIES, 3)
    assert _slots_and_events(make(**options), SERIES) == _slots_and_events(make(), averaged)
    assert_jit_equivalent(make(**options), {KEY: np.asarray(SERIES)})
    assert_resume_equivalent(make(**options), {KEY: np.asarray(SERIES)}, splits=[5])


def test_checkpoint_slots_record_the_smoothed_and_the_raw_value():
    ckpt = fcb.ModelCheckpoint(KEY, save_top_k=2, window=2)
    _, actions = run(ckpt, {KEY: np.asarray(SERIES)})
    best = int(actions.slots["best_model"][-1])
    assert float(actions.slot_values["best_model"][-1]) == _window_mean(SERIES, 2)[best]
    assert float(actions.log["best_model/raw_value"][-1]) == np.float32(SERIES[best])
    cb = fcb.BestCheckpoint(KEY, alpha=0.5)
    state, actions = run(cb, {KEY: np.asarray(SERIES)})
    assert float(actions.log["best.val_loss/raw_value"][-1]) == np.float32(
        SERIES[int(state.best_step)]
    )
