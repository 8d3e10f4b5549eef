"""The one improvement rule (`fcb.monitor`): strictness, min_delta, signs, rel/abs, non-finite."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb import Outcome, monitor

INF = math.inf
NAN = math.nan

_STATIC = ("mode", "threshold_mode")


def _variant(fn, use_jit):
    """`fn` called with plain arguments, or through `jax.jit` with the string options static."""
    if not use_jit:
        return fn
    names = [n for n in _STATIC if n in fn.__code__.co_varnames]
    return jax.jit(fn, static_argnames=names)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def use_jit(request):
    return request.param


# (current, best, min_delta, mode, threshold_mode, expected improves). Values are exactly
# representable in float32, so each boundary case is an exact tie, not a rounding accident.
IMPROVES_CASES = [
    # min mode, absolute margin
    (0.5, 1.0, 0.0, "min", "abs", True),
    (1.0, 1.0, 0.0, "min", "abs", False),  # a tie is not an improvement
    (1.5, 1.0, 0.0, "min", "abs", False),
    (0.75, 1.0, 0.25, "min", "abs", False),  # exactly best - min_delta: still a tie
    (0.625, 1.0, 0.25, "min", "abs", True),
    (0.875, 1.0, 0.25, "min", "abs", False),  # better, but not by more than min_delta
    # max mode, absolute margin
    (1.5, 1.0, 0.0, "max", "abs", True),
    (1.0, 1.0, 0.0, "max", "abs", False),
    (0.5, 1.0, 0.0, "max", "abs", False),
    (1.25, 1.0, 0.25, "max", "abs", False),
    (1.375, 1.0, 0.25, "max", "abs", True),
    # negative (signed) metrics: the margin is subtracted / added, never scaled by the sign
    (-2.0, -1.0, 0.5, "min", "abs", True),
    (-1.5, -1.0, 0.5, "min", "abs", False),
    (-1.25, -1.0, 0.5, "min", "abs", False),
    (-0.5, -1.0, 0.0, "min", "abs", False),
    (-0.5, -1.0, 0.25, "max", "abs", True),
    (-0.75, -1.0, 0.25, "max", "abs", False),
    (-1.5, -1.0, 0.0, "max", "abs", False),
    (-0.25, 0.0, 0.0, "min", "abs", True),
    (0.0, -0.0, 0.0, "min", "abs", False),  # +0 and -0 are equal: a tie
    # relative margin, torch's rule: min: current < best * (1 - t); max: current > best * (1 + t)
    (6.0, 8.0, 0.25, "min", "rel", False),
    (5.5, 8.0, 0.25, "min", "rel", True),
    (7.0, 8.0, 0.25, "min", "rel", False),
    (10.0, 8.0, 0.25, "max", "rel", False),
    (10.5, 8.0, 0.25, "max", "rel", True),
    (9.0, 8.0, 0.25, "max", "rel", False),
    (8.0, 8.0, 0.0, "min", "rel", False),
    (7.5, 8.0, 0.0, "min", "rel", True),
    # A negative best: the margin is relative to |best| and points the good way (torch's
    # -8 * (1 - 0.25) = -6 would count -6.5, which is worse than -8, as an improvement).
    (-6.5, -8.0, 0.25, "min", "rel", False),
    (-9.5, -8.0, 0.25, "min", "rel", False),  # bound -8 - 0.25 * 8 = -10
    (-10.5, -8.0, 0.25, "min", "rel", True),
    (-9.5, -8.0, 0.25, "max", "rel", False),
    (-6.5, -8.0, 0.25, "max", "rel", False),  # bound -8 + 0.25 * 8 = -6
    (-5.5, -8.0, 0.25, "max", "rel", True),
    # A best of 0 (a zero-crossing metric): any strictly better value improves.
    (-0.001, 0.0, 0.25, "min", "rel", True),
    (0.0, 0.0, 0.25, "min", "rel", False),
    (0.001, 0.0, 0.25, "max", "rel", True),
    (0.5, -1.0, 0.25, "max", "rel", True),  # crossing zero: bound -0.75
    (-0.5, 1.0, 0.25, "min", "rel", True),  # bound 0.75
]


@pytest.mark.parametrize(
    ("current", "best", "min_delta", "mode", "threshold_mode", "expected"), IMPROVES_CASES
)
def test_improves(use_jit, current, best, min_delta, mode, threshold_mode, expected):
    improves = _variant(monitor.improves, use_jit)
    result = improves(current, best, min_delta, mode=mode, threshold_mode=threshold_mode)
    assert result.dtype == jnp.bool_
    assert bool(result) is expected
    code = _variant(monitor.outcome, use_jit)(
        current, best, min_delta, mode=mode, threshold_mode=threshold_mode
    )
    assert code.dtype == jnp.int32
    assert int(code) == (Outcome.IMPROVED if expected else Outcome.NOT_IMPROVED)


def test_default_threshold_mode_is_abs(use_jit):
    improves = _variant(monitor.improves, use_jit)
    # abs: bound 8 - 0.25 = 7.75; rel would be 6.
    assert bool(improves(7.5, 8.0, 0.25, mode="min"))
    assert not bool(improves(7.5, 8.0, 0.25, mode="min", threshold_mode="rel"))


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode", ["abs", "rel"])
@pytest.mark.parametrize("current", [NAN, INF, -INF])
@pytest.mark.parametrize("best", [1.0, -1.0, INF, -INF, NAN])
def test_non_finite_never_improves(use_jit, mode, threshold_mode, current, best):
    improves = _variant(monitor.improves, use_jit)
    outcome = _variant(monitor.outcome, use_jit)
    assert not bool(improves(current, best, 0.0, mode=mode, threshold_mode=threshold_mode))
    code = outcome(current, best, 0.0, mode=mode, threshold_mode=threshold_mode)
    assert int(code) == Outcome.NON_FINITE


@pytest.mark.parametrize(("mode", "start"), [("min", INF), ("max", -INF)])
def test_every_finite_value_improves_on_the_worst_value(use_jit, mode, start):
    assert monitor.worst_value(mode) == start
    improves = _variant(monitor.improves, use_jit)
    for value in [0.0, -1e30, 1e30, 3.5, -2.25]:
        for min_delta in [0.0, 1.0, 1e30]:
            assert bool(improves(value, start, min_delta, mode=mode))


# (current, threshold, mode, reached, exceeded)
THRESHOLD_CASES = [
    (0.5, 1.0, "min", True, False),
    (1.0, 1.0, "min", False, False),  # strict both ways
    (1.5, 1.0, "min", False, True),
    (1.5, 1.0, "max", True, False),
    (1.0, 1.0, "max", False, False),
    (0.5, 1.0, "max", False, True),
    (-2.0, -1.0, "min", True, False),
    (-0.5, -1.0, "min", False, True),
    (-0.5, -1.0, "max", True, False),
    (-2.0, -1.0, "max", False, True),
    (NAN, 1.0, "min", False, False),
    (NAN, 1.0, "max", False, False),
    (NAN, INF, "min", False, False),
    (NAN, -INF, "min", False, False),
    (NAN, NAN, "max", False, False),
    (1.0, NAN, "min", False, False),
    (-INF, 1.0, "min", True, False),
    (INF, 1.0, "min", False, True),
    (INF, 1.0, "max", True, False),
    (-INF, -INF, "min", False, False),
]


@pytest.mark.parametrize(("current", "threshold", "mode", "is_reached", "is_exceeded"),
                         THRESHOLD_CASES)
def test_reached_and_exceeded(use_jit, current, threshold, mode, is_reached, is_exceeded):
    reached = _variant(monitor.reached, use_jit)
    exceeded = _variant(monitor.exceeded, use_jit)
    assert bool(reached(current, threshold, mode=mode)) is is_reached
    assert bool(exceeded(current, threshold, mode=mode)) is is_exceeded


@pytest.mark.parametrize(
    ("best", "min_delta", "mode", "threshold_mode", "bound"),
    [
        (1.0, 0.25, "min", "abs", 0.75),
        (1.0, 0.25, "max", "abs", 1.25),
        (-1.0, 0.25, "min", "abs", -1.25),
        (8.0, 0.25, "min", "rel", 6.0),
        (8.0, 0.25, "max", "rel", 10.0),
        (-8.0, 0.25, "min", "rel", -10.0),
        (-8.0, 0.25, "max", "rel", -6.0),
        (INF, 1.0, "min", "rel", INF),  # no finite best yet: the bound is the best
        (-INF, 2.0, "max", "rel", -INF),
        (INF, 0.5, "min", "abs", INF),
        (-INF, 0.5, "max", "abs", -INF),
    ],
)
def test_improvement_bound(use_jit, best, min_delta, mode, threshold_mode, bound):
    fn = _variant(monitor.improvement_bound, use_jit)
    assert float(fn(best, min_delta, mode=mode, threshold_mode=threshold_mode)) == bound


def test_rule_is_elementwise_over_batches(use_jit):
    """Batched values and margins (as in a vmapped sweep) give each element's own answer."""
    improves = _variant(monitor.improves, use_jit)
    current = jnp.asarray([0.5, 0.75, NAN, -INF, 2.0], jnp.float32)
    min_delta = jnp.asarray([0.25, 0.25, 0.0, 0.0, 0.0], jnp.float32)
    result = improves(current, 1.0, min_delta, mode="min")
    np.testing.assert_array_equal(np.asarray(result), [True, False, False, False, False])
    codes = _variant(monitor.outcome, use_jit)(current, 1.0, min_delta, mode="min")
    np.testing.assert_array_equal(
        np.asarray(codes),
        [Outcome.IMPROVED, Outcome.NOT_IMPROVED, Outcome.NON_FINITE, Outcome.NON_FINITE,
         Outcome.NOT_IMPROVED],
    )


def test_outcome_is_public():
    assert fcb.Outcome is Outcome
    assert {o.name for o in Outcome} == {"IMPROVED", "NOT_IMPROVED", "NON_FINITE"}


_F32 = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 2.0, -0.5, NAN, INF, -INF]),
    # normal float32 values far from the subnormal range (XLA on CPU flushes subnormals)
    st.floats(min_value=-1e6, max_value=1e6, width=32).filter(lambda x: x == 0 or abs(x) > 1e-6),
)
_DELTA = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    st.floats(min_value=0.0009765625, max_value=1024.0, width=32),
)

_JITTED_IMPROVES = _variant(monitor.improves, True)
_JITTED_OUTCOME = _variant(monitor.outcome, True)


def _reference_improves(current, best, min_delta, mode, threshold_mode):
    current, best, min_delta = np.float32(current), np.float32(best), np.float32(min_delta)
    if not math.isfinite(current):
        return False
    one = np.float32(1)
    if threshold_mode == "abs":
        bound = best - min_delta if mode == "min" else best + min_delta
    else:  # best -/+ min_delta * |best|, as best * (1 -/+ min_delta) by the sign of best
        toward = -1 if mode == "min" else 1
        sign = 1 if best >= 0 else -1
        bound = best * (one + np.float32(toward * sign) * min_delta)
        if not math.isfinite(best):
            bound = best
    return bool(current < bound) if mode == "min" else bool(current > bound)


@settings(max_examples=200, deadline=None)
@given(
    current=_F32,
    best=_F32.filter(lambda x: not math.isnan(x)),
    min_delta=_DELTA,
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["abs", "rel"]),
)
def test_improves_matches_reference(current, best, min_delta, mode, threshold_mode):
    expected = _reference_improves(current, best, min_delta, mode, threshold_mode)
    args = (np.float32(current), np.float32(best), np.float32(min_delta))
    got = _JITTED_IMPROVES(*args, mode=mode, threshold_mode=threshold_mode)
    assert bool(got) is expected
    code = int(_JITTED_OUTCOME(*args, mode=mode, threshold_mode=threshold_mode))
    if not math.isfinite(current):
        assert code == Outcome.NON_FINITE
    else:
        assert code == (Outcome.IMPROVED if expected else Outcome.NOT_IMPROVED)
