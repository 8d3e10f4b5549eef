"""EarlyStopping: every documented convention, parity with a reference model, jit/scan/vmap."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fcb
import fcb.testing
from fcb import StopReason

NAN = math.nan
INF = math.inf
KEY = "val_loss"


def _eager_check(callback, state, metrics, step):
    return callback(state, metrics, step=step)


# One jitted check for every test: the callback is an argument, so only its static structure
# (mode, check_finite, strict, ...) and the metrics' structure cause a new trace.
_JIT_CHECK = jax.jit(_eager_check)


@pytest.fixture(params=["eager", "jit"])
def check(request):
    return _eager_check if request.param == "eager" else _JIT_CHECK


def _run(check, es, values, steps=None):
    """Feed `values` one check at a time; return the (state, actions) after every check."""
    steps = range(len(values)) if steps is None else steps
    state = es.init()
    trace = []
    for step, value in zip(steps, values, strict=True):
        metrics = {} if value is None else {KEY: value}
        state, actions = check(es, state, metrics, step)
        trace.append((state, actions))
    return trace


def _summary(state, actions):
    return {
        "stop": bool(actions.stop),
        "reason": StopReason(int(actions.stop_reason)),
        "best": float(state.best),
        "best_step": int(state.best_step),
        "wait": int(state.wait_count),
        "stopped_step": int(state.stopped_step),
    }


def _first_stop(trace):
    """(step index, reason) of the first check whose actions stop, or None."""
    for i, (_, actions) in enumerate(trace):
        if bool(actions.stop):
            return i, StopReason(int(actions.stop_reason))
    return None


# --- initial state ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "best"), [("min", INF), ("max", -INF)])
def test_initial_state(mode, best):
    state = fcb.EarlyStopping(KEY, mode=mode).init()
    assert isinstance(state, fcb.EarlyStoppingState)
    assert float(state.best) == best
    assert int(state.best_step) == fcb.NO_STEP
    assert int(state.wait_count) == 0
    assert int(state.stopped_step) == fcb.NO_STEP
    assert int(state.stop_reason) == StopReason.NONE
    assert not bool(state.stopped)
    assert (state.best.dtype, state.best_step.dtype, state.wait_count.dtype) == (
        jnp.float32, jnp.int32, jnp.int32)


# --- patience ---------------------------------------------------------------------------------


def test_patience_three_stops_after_three_non_improving_checks_in_a_row(check):
    es = fcb.EarlyStopping(KEY, patience=3)
    trace = _run(check, es, [1.0, 1.0, 1.5, 1.0, 2.0])
    summaries = [_summary(*t) for t in trace]
    assert [s["wait"] for s in summaries] == [0, 1, 2, 3, 3]
    assert [s["stop"] for s in summaries] == [False, False, False, True, True]
    assert summaries[3]["reason"] == StopReason.PATIENCE
    assert summaries[3]["stopped_step"] == 3
    assert (summaries[3]["best"], summaries[3]["best_step"]) == (1.0, 0)


def test_an_improvement_resets_the_wait_count(check):
    es = fcb.EarlyStopping(KEY, patience=3)
    values = [1.0, 2.0, 2.0, 0.5, 2.0, 2.0, 2.0]
    trace = _run(check, es, values)
    assert [int(s.wait_count) for s, _ in trace] == [0, 1, 2, 0, 1, 2, 3]
    assert _first_stop(trace) == (6, StopReason.PATIENCE)
    assert [bool(a.events["early_stopping/improved"]) for _, a in trace] == [
        True, False, False, True, False, False, False]
    assert (float(trace[-1][0].best), int(trace[-1][0].best_step)) == (0.5, 3)


def test_patience_zero_stops_at_the_first_non_improving_check(check):
    # The baseline makes the very first check non-improving.
    es = fcb.EarlyStopping(KEY, patience=0, baseline=1.0)
    trace = _run(check, es, [2.0])
    assert _first_stop(trace) == (0, StopReason.PATIENCE)


def test_patience_zero_does_not_stop_on_an_improving_check(check):
    es = fcb.EarlyStopping(KEY, patience=0)
    trace = _run(check, es, [1.0, 0.5, 0.75])
    assert _first_stop(trace) == (2, StopReason.PATIENCE)


def test_ties_are_not_improvements(check):
    es = fcb.EarlyStopping(KEY, patience=1)
    trace = _run(check, es, [1.0, 1.0])
    assert _first_stop(trace) == (1, StopReason.PATIENCE)
    assert int(trace[-1][0].best_step) == 0
    assert not bool(trace[-1][1].events["early_stopping/improved"])


def test_min_delta_is_a_strict_margin(check):
    es = fcb.EarlyStopping(KEY, patience=2, min_delta=0.25)
    # 0.75 is exactly best - min_delta: not an improvement; 0.5 beats 1.0 - 0.25.
    trace = _run(check, es, [1.0, 0.75, 0.5, 0.375])
    summaries = [_summary(*t) for t in trace]
    assert [(s["best"], s["best_step"], s["wait"]) for s in summaries] == [
        (1.0, 0, 0), (1.0, 0, 1), (0.5, 2, 0), (0.5, 2, 1)]
    assert not any(s["stop"] for s in summaries)


# --- non-finite values ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_stops_with_check_finite(check, mode, bad):
    es = fcb.EarlyStopping(KEY, mode=mode, patience=5)
    trace = _run(check, es, [1.0, bad])
    assert _first_stop(trace) == (1, StopReason.NON_FINITE)
    state, actions = trace[-1]
    assert (float(state.best), int(state.best_step)) == (1.0, 0)
    assert int(state.stopped_step) == 1
    assert not bool(actions.events["early_stopping/improved"])
    assert "NaN or infinite" in actions.stop_message()


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_is_a_non_improving_check_without_check_finite(check, mode, bad):
    es = fcb.EarlyStopping(KEY, mode=mode, patience=2, check_finite=False)
    trace = _run(check, es, [1.0, bad, bad])
    summaries = [_summary(*t) for t in trace]
    assert [s["wait"] for s in summaries] == [0, 1, 2]
    assert [(s["best"], s["best_step"]) for s in summaries] == [(1.0, 0)] * 3
    assert _first_stop(trace) == (2, StopReason.PATIENCE)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_first_check_never_becomes_the_best(check, bad):
    es = fcb.EarlyStopping(KEY, patience=3, check_finite=False)
    state, actions = _run(check, es, [bad])[-1]
    assert (float(state.best), int(state.best_step), int(state.wait_count)) == (INF, -1, 1)
    assert not bool(actions.stop)


# --- thresholds and the order of reasons ------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "values", "threshold"),
    [("min", [1.0, 0.5, 0.25], 0.5), ("max", [1.0, 2.0, 2.5], 2.0)],
)
def test_stopping_threshold_is_strict_and_the_best_is_updated(check, mode, values, threshold):
    es = fcb.EarlyStopping(KEY, mode=mode, patience=10, stopping_threshold=threshold)
    trace = _run(check, es, values)
    assert _first_stop(trace) == (2, StopReason.STOPPING_THRESHOLD)
    state, actions = trace[-1]
    # the stopping check improved: it is the best, even though it also stopped
    assert (float(state.best), int(state.best_step)) == (values[2], 2)
    assert bool(actions.events["early_stopping/improved"])


@pytest.mark.parametrize(
    ("mode", "values", "threshold"),
    [("min", [1.0, 2.0, 2.5], 2.0), ("max", [1.0, 0.5, 0.25], 0.5),
     ("min", [-3.0, -2.0, -1.5], -2.0)],
)
def test_divergence_threshold_is_strict(check, mode, values, threshold):
    es = fcb.EarlyStopping(KEY, mode=mode, patience=10, divergence_threshold=threshold)
    trace = _run(check, es, values)
    assert _first_stop(trace) == (2, StopReason.DIVERGENCE_THRESHOLD)
    assert (float(trace[-1][0].best), int(trace[-1][0].best_step)) == (values[0], 0)


def test_divergence_on_the_first_check_still_records_the_improvement(check):
    es = fcb.EarlyStopping(KEY, divergence_threshold=2.0)
    state, actions = _run(check, es, [3.0])[-1]
    assert int(actions.stop_reason) == StopReason.DIVERGENCE_THRESHOLD
    assert (float(state.best), int(state.best_step)) == (3.0, 0)


@pytest.mark.parametrize(
    ("kwargs", "values", "reason"),
    [
        # non-finite before a threshold the value is past
        (dict(stopping_threshold=0.5), [-INF], StopReason.NON_FINITE),
        (dict(divergence_threshold=2.0), [INF], StopReason.NON_FINITE),
        # non-finite before patience
        (dict(patience=1), [1.0, NAN], StopReason.NON_FINITE),
        # stopping before divergence (a config where a value is past both)
        (dict(stopping_threshold=3.0, divergence_threshold=1.0), [2.0],
         StopReason.STOPPING_THRESHOLD),
        # stopping before patience: 0.5 does not beat the baseline, but is past the threshold
        (dict(patience=1, baseline=0.25, stopping_threshold=1.0), [0.5],
         StopReason.STOPPING_THRESHOLD),
        # divergence before patience
        (dict(patience=1, divergence_threshold=0.5), [0.25, 1.0], StopReason.DIVERGENCE_THRESHOLD),
        # without check_finite, -inf / +inf are values past the thresholds (as in Lightning)
        (dict(check_finite=False, stopping_threshold=0.5), [1.0, -INF],
         StopReason.STOPPING_THRESHOLD),
        (dict(check_finite=False, divergence_threshold=2.0, patience=1), [1.0, INF],
         StopReason.DIVERGENCE_THRESHOLD),
        # ... and NaN is past no threshold
        (dict(check_finite=False, stopping_threshold=0.5, divergence_threshold=2.0, patience=1),
         [1.0, NAN], StopReason.PATIENCE),
    ],
)
def test_reason_order(check, kwargs, values, reason):
    es = fcb.EarlyStopping(KEY, **kwargs)
    trace = _run(check, es, values)
    assert _first_stop(trace) == (len(values) - 1, reason)
    assert int(trace[-1][0].stop_reason) == reason


# --- baseline, start_from_step, frozen state --------------------------------------------------


def test_baseline_is_the_initial_best(check):
    es = fcb.EarlyStopping(KEY, patience=2, baseline=0.5)
    assert float(es.init().best) == 0.5
    trace = _run(check, es, [0.75, 0.5])  # worse, then a tie with the baseline
    assert _first_stop(trace) == (1, StopReason.PATIENCE)
    assert (float(trace[-1][0].best), int(trace[-1][0].best_step)) == (0.5, -1)


def test_baseline_must_be_beaten_by_more_than_min_delta(check):
    es = fcb.EarlyStopping(KEY, patience=5, baseline=0.5, min_delta=0.25)
    trace = _run(check, es, [0.25, 0.125])
    assert [(float(s.best), int(s.best_step)) for s, _ in trace] == [(0.5, -1), (0.125, 1)]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_checks_before_start_from_step_are_ignored_entirely(check, mode):
    es = fcb.EarlyStopping(KEY, mode=mode, patience=1, start_from_step=3,
                           stopping_threshold=0.0 if mode == "min" else 10.0)
    # a NaN, a value past the stopping threshold and a very good value, all during warm-up
    values = [NAN, -5.0 if mode == "min" else 20.0, 1.0, 2.0, 2.0]
    trace = _run(check, es, values, steps=[0, 1, 2, 3, 4])
    initial = es.init()
    for state, actions in trace[:3]:
        chex.assert_trees_all_equal(state, initial)
        assert not bool(actions.stop)
        assert not bool(actions.events["early_stopping/improved"])
    assert int(trace[3][0].best_step) == 3
    assert _first_stop(trace) == (4, StopReason.PATIENCE)


def test_start_from_step_compares_with_the_step_not_the_call_count(check):
    es = fcb.EarlyStopping(KEY, patience=1, start_from_step=10)
    trace = _run(check, es, [1.0, 2.0], steps=[10, 20])
    assert [int(s.best_step) for s, _ in trace] == [10, 10]
    assert _first_stop(trace) == (1, StopReason.PATIENCE)
    assert int(trace[-1][0].stopped_step) == 20


def test_state_is_frozen_after_a_stop(check):
    es = fcb.EarlyStopping(KEY, patience=1, check_finite=True)
    trace = _run(check, es, [1.0, NAN, 0.25, INF, 0.125, 3.0])
    stopped_state, stopped_actions = trace[1]
    assert int(stopped_actions.stop_reason) == StopReason.NON_FINITE
    for state, actions in trace[2:]:
        chex.assert_trees_all_equal(state, stopped_state)
        assert bool(actions.stop)
        assert int(actions.stop_reason) == StopReason.NON_FINITE
        assert not bool(actions.events["early_stopping/improved"])


# --- max mode, negative metrics ---------------------------------------------------------------


def test_max_mode(check):
    es = fcb.EarlyStopping(KEY, mode="max", patience=2, min_delta=0.5)
    trace = _run(check, es, [1.0, 1.5, 2.0, 2.25, 2.5])
    assert [(float(s.best), int(s.best_step), int(s.wait_count)) for s, _ in trace] == [
        (1.0, 0, 0), (1.0, 0, 1), (2.0, 2, 0), (2.0, 2, 1), (2.0, 2, 2)]
    assert _first_stop(trace) == (4, StopReason.PATIENCE)


@pytest.mark.parametrize(
    ("mode", "values", "bests"),
    [
        ("min", [-1.0, -2.0, -1.5, -2.5], [(-1.0, 0), (-2.0, 1), (-2.0, 1), (-2.5, 3)]),
        ("max", [-3.0, -2.0, -2.5, -0.5], [(-3.0, 0), (-2.0, 1), (-2.0, 1), (-0.5, 3)]),
    ],
)
def test_negative_metrics(check, mode, values, bests):
    es = fcb.EarlyStopping(KEY, mode=mode, patience=2, min_delta=0.25)
    trace = _run(check, es, values)
    assert [(float(s.best), int(s.best_step)) for s, _ in trace] == bests
    assert [int(s.wait_count) for s, _ in trace] == [0, 0, 1, 0]


# --- missing metrics, metric types ------------------------------------------------------------


def test_missing_metric_with_strict_false_changes_nothing(check):
    es = fcb.EarlyStopping(KEY, patience=1, strict=False)
    trace = _run(check, es, [1.0, None, None, 1.5, None])
    states = [s for s, _ in trace]
    chex.assert_trees_all_equal(states[1], states[0])
    chex.assert_trees_all_equal(states[2], states[0])
    missing = [bool(a.events["early_stopping/metric_missing"]) for _, a in trace]
    improved = [bool(a.events["early_stopping/improved"]) for _, a in trace]
    assert missing == [False, True, True, False, True]
    assert improved == [True, False, False, False, False]
    # the stop at check 3 is repeated by a later check without the metric
    assert _first_stop(trace) == (3, StopReason.PATIENCE)
    assert bool(trace[4][1].stop)
    chex.assert_trees_all_equal(states[4], states[3])


def test_missing_metric_with_strict_true_raises_listing_the_keys(check):
    es = fcb.EarlyStopping(KEY)
    with pytest.raises(fcb.MissingMetricError, match=r"available keys: \['loss', 'val_acc'\]"):
        check(es, es.init(), {"val_acc": 1.0, "loss": 2.0}, 0)


@pytest.mark.parametrize(
    "value",
    [
        0.1,
        np.float32(0.1),
        np.float64(0.1),
        jnp.float32(0.1),
        jnp.asarray(0.1),
        np.asarray([0.1]),
        jnp.asarray([[0.1]], jnp.float32),
        np.asarray(0.1),
    ],
    ids=["float", "np.float32", "np.float64", "jnp.float32", "jnp-0d", "np-(1,)", "jnp-(1,1)",
         "np-0d-float64"],
)
def test_metric_types(check, value):
    es = fcb.EarlyStopping(KEY, patience=1)
    state, actions = check(es, es.init(), {KEY: value}, 0)
    assert state.best.shape == ()
    assert state.best.dtype == jnp.float32
    assert float(state.best) == float(np.float32(0.1))
    assert int(state.best_step) == 0
    # and a second, equal value is a tie whatever the type
    state, actions = check(es, state, {KEY: value}, 1)
    assert int(actions.stop_reason) == StopReason.PATIENCE


@pytest.mark.parametrize("value", [3, np.int64(3), True])
def test_integer_and_bool_metrics_are_read_as_numbers(value):
    es = fcb.EarlyStopping(KEY, mode="max")
    state, _ = es(es.init(), {KEY: value}, step=0)
    assert float(state.best) == float(value)


# --- reference model --------------------------------------------------------------------------


def _reference(values, steps, *, mode, patience, min_delta, check_finite, stopping_threshold,
               divergence_threshold, baseline, start_from_step):
    """The documented rule in plain Python, with float32 numbers (np.float32) as fcb uses."""
    f32 = np.float32

    def better(a, b):
        return bool(a < b) if mode == "min" else bool(a > b)

    if baseline is not None:
        best = f32(baseline)
    else:
        best = f32(INF) if mode == "min" else f32(-INF)
    delta = f32(min_delta)
    best_step, wait, stopped_step, reason = -1, 0, -1, StopReason.NONE
    rows = []
    for value, step in zip(values, steps, strict=True):
        value = f32(value)
        improved = False
        if stopped_step < 0 and step >= start_from_step:
            finite = math.isfinite(value)
            bound = best - delta if mode == "min" else best + delta
            improved = finite and better(value, bound)
            if improved:
                best, best_step, wait = value, step, 0
            else:
                wait += 1
            new_reason = StopReason.NONE
            if check_finite and not finite:
                new_reason = StopReason.NON_FINITE
            elif stopping_threshold is not None and better(value, f32(stopping_threshold)):
                new_reason = StopReason.STOPPING_THRESHOLD
            elif divergence_threshold is not None and better(f32(divergence_threshold), value):
                new_reason = StopReason.DIVERGENCE_THRESHOLD
            elif not improved and wait >= patience:
                new_reason = StopReason.PATIENCE
            if new_reason != StopReason.NONE:
                stopped_step, reason = step, new_reason
        rows.append({
            "stop": stopped_step >= 0,
            "reason": reason,
            "best": float(best),
            "best_step": best_step,
            "wait": wait,
            "stopped_step": stopped_step,
            "improved": improved,
        })
    return rows


_POOL = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
_VALUES = st.one_of(
    st.sampled_from(_POOL),
    st.sampled_from([NAN, INF, -INF]),
    # normal float32 values (XLA on CPU flushes subnormals to zero, NumPy does not)
    st.floats(min_value=-8.0, max_value=8.0, width=32).filter(lambda x: x == 0 or abs(x) > 1e-6),
)
_THRESHOLD = st.one_of(st.none(), st.sampled_from([*_POOL, INF, -INF]))


@st.composite
def _configs(draw, patience):
    return {
        "mode": draw(st.sampled_from(["min", "max"])),
        "patience": draw(patience),
        "min_delta": draw(st.one_of(
            st.sampled_from([0.0, 0.5, 1.0]),
            st.floats(min_value=0.0, max_value=4.0, width=32, allow_subnormal=False))),
        "check_finite": draw(st.booleans()),
        "stopping_threshold": draw(_THRESHOLD),
        "divergence_threshold": draw(_THRESHOLD),
        "baseline": draw(_THRESHOLD),
        "start_from_step": draw(st.integers(0, 6)),
    }


_PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_PROPERTY_SETTINGS
@given(
    config=_configs(st.integers(0, 4)),
    values=st.lists(_VALUES, min_size=1, max_size=12),
    stride=st.sampled_from([1, 2]),
)
def test_matches_reference_model(config, values, stride):
    es = fcb.EarlyStopping(KEY, **config)
    steps = [i * stride for i in range(len(values))]
    expected = _reference(values, steps, **config)
    state = es.init()
    for i, (value, step) in enumerate(zip(values, steps, strict=True)):
        state, actions = _JIT_CHECK(es, state, {KEY: np.float32(value)}, np.int32(step))
        got = {
            **_summary(state, actions),
            "improved": bool(actions.events["early_stopping/improved"]),
        }
        assert int(state.stop_reason) == int(actions.stop_reason)
        assert got == expected[i], f"check {i} (step {step}, value {value})"


# --- jit / scan / vmap / while_loop -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "values"),
    [
        (dict(patience=2), [0.5, 0.4, 0.45, 0.41, 0.3, 0.5, 0.6]),
        (dict(patience=3, check_finite=False, min_delta=0.01), [1.0, NAN, 0.9, INF, -INF, 0.95]),
        (dict(mode="max", patience=1, stopping_threshold=0.9, baseline=0.1, start_from_step=1),
         [0.95, 0.2, 0.5, 0.92, 0.1]),
        (dict(patience=5, divergence_threshold=10.0), [1.0, 2.0, NAN, 3.0, 4.0]),
    ],
)
def test_eager_jit_and_scan_agree(kwargs, values):
    es = fcb.EarlyStopping(KEY, **kwargs)
    fcb.testing.assert_jit_equivalent(es, {KEY: np.asarray(values, np.float32)})


def test_jitted_check_does_not_retrace():
    es = fcb.EarlyStopping(KEY, patience=30, min_delta=0.001, check_finite=False)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(state, metrics, step):
        return es(state, metrics, step=step)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted_python_scalars(state, metrics, step):
        return es(state, metrics, step=step)

    state = state_py = es.init()
    values = np.linspace(1.0, 0.5, 20).astype(np.float32)
    values[[4, 9, 13]] = [2.0, NAN, 3.0]
    for step, value in enumerate(values):
        state, actions = jitted(state, {KEY: jnp.asarray(value)}, jnp.asarray(step, jnp.int32))
        state_py, _ = jitted_python_scalars(state_py, {KEY: float(value)}, step)
        chex.assert_trees_all_equal(state_py, state)
    # the values fall by about 0.026 a step, so every check but the three outliers improves
    assert (int(state.best_step), int(state.wait_count)) == (19, 0)
    assert not bool(actions.stop)


def test_vmap_over_stacked_hyperparameters():
    patiences = jnp.asarray([0, 1, 2, 3, 1, 4], jnp.int32)
    deltas = jnp.asarray([0.0, 0.25, 0.0, 0.125, 1.0, 0.5], jnp.float32)
    stacked = jax.vmap(lambda p, d: fcb.EarlyStopping(KEY, patience=p, min_delta=d))(
        patiences, deltas)
    assert stacked.patience.shape == (6,)
    singles = [fcb.EarlyStopping(KEY, patience=int(p), min_delta=float(d))
               for p, d in zip(patiences, deltas, strict=True)]
    history = {KEY: np.asarray([2.0, 1.0, 0.875, 0.75, 0.75, 0.5, 0.625, 0.625, 0.625, 0.25],
                               np.float32)}
    fcb.testing.assert_vmap_equivalent(stacked, singles, history)
    # the configurations really differ: they do not all stop at the same check
    stops = {_first_stop(_run(_eager_check, single, list(history[KEY]))) for single in singles}
    assert len(stops) > 2


def test_vmap_over_thresholds_baseline_and_start():
    thresholds = jnp.asarray([0.3, -INF, 0.6], jnp.float32)
    baselines = jnp.asarray([INF, 0.7, INF], jnp.float32)
    starts = jnp.asarray([0, 2, 4], jnp.int32)
    stacked = jax.vmap(lambda t, b, s: fcb.EarlyStopping(
        KEY, patience=2, stopping_threshold=t, baseline=b, start_from_step=s))(
        thresholds, baselines, starts)
    singles = [fcb.EarlyStopping(KEY, patience=2, stopping_threshold=float(t), baseline=float(b),
                                 start_from_step=int(s))
               for t, b, s in zip(thresholds, baselines, starts, strict=True)]
    history = {KEY: np.asarray([1.0, 0.8, 0.9, 0.5, 0.55, 0.2, 0.6, 0.7], np.float32)}
    fcb.testing.assert_vmap_equivalent(stacked, singles, history)


@pytest.mark.parametrize(
    ("kwargs", "values"),
    [
        (dict(patience=2), [1.0, 0.5, 0.75, 0.5, 0.25, 0.3, 0.3, 0.1, 0.1]),
        (dict(patience=5), [1.0, 0.5, NAN, 0.25]),
        (dict(patience=5, mode="max"), [1.0, 2.0, 3.0, 4.0]),  # never stops
    ],
)
def test_while_loop_stops_at_the_same_step_as_the_eager_loop(kwargs, values):
    es = fcb.EarlyStopping(KEY, **kwargs)
    column = jnp.asarray(values, jnp.float32)
    n = len(values)

    eager_state = es.init()
    eager_checks = 0
    for step in range(n):
        eager_state, actions = es(eager_state, {KEY: column[step]}, step=step)
        eager_checks += 1
        if bool(actions.stop):
            break

    def cond(carry):
        step, state = carry
        return (step < n) & ~state.stopped

    def body(carry):
        step, state = carry
        state, _ = es(state, {KEY: column[step]}, step=step)
        return step + 1, state

    checks, state = jax.jit(lambda s: jax.lax.while_loop(cond, body, (jnp.int32(0), s)))(es.init())
    assert int(checks) == eager_checks
    chex.assert_trees_all_equal(state, eager_state)
