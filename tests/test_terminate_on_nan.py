"""TerminateOnNaN: transitions, several keys, strictness, jit / scan / vmap, resume, bad input."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb
from fcb import StopReason, TerminateOnNaN, TerminateOnNaNState
from fcb.testing import (
    assert_jit_equivalent,
    assert_resume_equivalent,
    assert_vmap_equivalent,
    run,
)

INF = math.inf
NAN = math.nan
MISSING = "terminate_on_nan/metric_missing"


def json_round_trip(d):
    return json.loads(json.dumps(d))


def state_of(stopped_step=-1, non_finite_key=-1):
    return TerminateOnNaNState(
        stopped_step=jnp.asarray(stopped_step, jnp.int32),
        non_finite_key=jnp.asarray(non_finite_key, jnp.int32),
    )


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def call(request):
    def check(callback, state, metrics, step):
        return callback(state, metrics, step=step)

    return jax.jit(check) if request.param else check


def test_defaults():
    guard = TerminateOnNaN()
    assert guard.keys == ("loss",)
    assert guard.strict is True
    chex.assert_trees_all_equal(guard.init(), state_of())
    assert guard.action_names() == fcb.ActionNames(events=(MISSING,))


def test_finite_values_do_not_stop(call):
    guard = TerminateOnNaN()
    for value in (0.0, -1e30, 3.4e38, -0.0):
        state, actions = call(guard, guard.init(), {"loss": value}, 5)
        chex.assert_trees_all_equal(state, state_of())
        assert not bool(actions.stop)
        assert int(actions.stop_reason) == StopReason.NONE
        assert not bool(actions.events[MISSING])


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_value_stops(call, value):
    guard = TerminateOnNaN()
    state, actions = call(guard, guard.init(), {"loss": value}, 7)
    chex.assert_trees_all_equal(state, state_of(stopped_step=7, non_finite_key=0))
    assert bool(actions.stop)
    assert int(actions.stop_reason) == StopReason.TERMINATE_ON_NAN
    assert not bool(actions.save)
    assert float(actions.lr_scale) == 1.0


def test_frozen_after_stop(call):
    guard = TerminateOnNaN(keys=("loss", "grad_norm"))
    stopped = state_of(stopped_step=3, non_finite_key=1)
    # finite values afterwards, and another non-finite key: the first stop is kept
    for metrics in ({"loss": 1.0, "grad_norm": 1.0}, {"loss": NAN, "grad_norm": 1.0}):
        state, actions = call(guard, stopped, metrics, 9)
        chex.assert_trees_all_equal(state, stopped)
        assert bool(actions.stop)
        assert int(actions.stop_reason) == StopReason.TERMINATE_ON_NAN


@pytest.mark.parametrize(
    "loss, grad_norm, lr, expected_key",
    [
        (NAN, 1.0, 1.0, 0),
        (1.0, INF, 1.0, 1),
        (1.0, 1.0, -INF, 2),
        (1.0, NAN, NAN, 1),  # the first non-finite key in `keys` order
        (INF, NAN, NAN, 0),
    ],
)
def test_several_keys_record_the_first_non_finite_one(call, loss, grad_norm, lr, expected_key):
    guard = TerminateOnNaN(keys=("loss", "grad_norm", "lr"))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "other": NAN}
    state, actions = call(guard, guard.init(), metrics, 2)
    chex.assert_trees_all_equal(state, state_of(stopped_step=2, non_finite_key=expected_key))
    assert bool(actions.stop)


def test_keys_not_watched_are_ignored(call):
    guard = TerminateOnNaN(keys=("loss",))
    state, actions = call(guard, guard.init(), {"loss": 1.0, "val_loss": NAN}, 0)
    chex.assert_trees_all_equal(state, state_of())
    assert not bool(actions.stop)


def test_a_single_string_is_one_key():
    assert TerminateOnNaN(keys="val_loss").keys == ("val_loss",)


def test_missing_key_strict_lists_available_keys():
    guard = TerminateOnNaN(keys=("loss", "grad_norm"))
    with pytest.raises(
        fcb.MissingMetricError,
        match=r"^TerminateOnNaN: the monitored metric 'grad_norm' is not in the metrics of this "
        r"check; available keys: \['loss', 'lr'\]",
    ):
        guard(guard.init(), {"loss": 1.0, "lr": 0.1}, step=0)


def test_missing_key_not_strict_checks_the_others(call):
    guard = TerminateOnNaN(keys=("loss", "grad_norm"), strict=False)
    # one key missing, the other finite: nothing happens but the event
    state, actions = call(guard, guard.init(), {"loss": 1.0}, 0)
    chex.assert_trees_all_equal(state, state_of())
    assert bool(actions.events[MISSING])
    assert not bool(actions.stop)
    # one key missing, the other NaN: stop, and the index is that of the present key
    state, actions = call(guard, guard.init(), {"grad_norm": NAN}, 1)
    chex.assert_trees_all_equal(state, state_of(stopped_step=1, non_finite_key=1))
    assert bool(actions.events[MISSING])
    assert bool(actions.stop)
    # every key missing: nothing to check
    state, actions = call(guard, guard.init(), {"val_loss": NAN}, 2)
    chex.assert_trees_all_equal(state, state_of())
    assert bool(actions.events[MISSING])
    assert not bool(actions.stop)
    # every key present: no event
    _, actions = call(guard, guard.init(), {"loss": 1.0, "grad_norm": 2.0}, 3)
    assert not bool(actions.events[MISSING])


def test_stops_a_chain_with_its_reason():
    cb = fcb.chain(fcb.EarlyStopping("val_loss", patience=10), TerminateOnNaN())
    state = cb.init()
    state, actions = cb(state, {"val_loss": 1.0, "loss": 1.0}, step=0)
    assert not bool(actions.stop)
    state, actions = cb(state, {"val_loss": 0.5, "loss": INF}, step=1)
    assert bool(actions.stop)
    assert actions.stop_message() == StopReason.TERMINATE_ON_NAN.message


# --- jit, scan, vmap, resume -------------------------------------------------------------------

HISTORIES = {
    "finite": {"loss": [1.0, 0.5, 0.25, 0.2], "grad_norm": [3.0, 2.0, 1.0, 1.0]},
    "nan_in_loss": {"loss": [1.0, 0.5, NAN, 0.2, 0.1], "grad_norm": [3.0, 2.0, 1.0, INF, 1.0]},
    "inf_in_grad_norm": {"loss": [1.0, 0.5, 0.4, 0.3], "grad_norm": [3.0, -INF, 1.0, 1.0]},
    "at_first_check": {"loss": [NAN, 0.5, 0.4], "grad_norm": [INF, 2.0, 1.0]},
}


def _columns(history):
    return {k: np.asarray(v) for k, v in history.items()}


@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_eager_jit_scan_equivalent(history):
    assert_jit_equivalent(TerminateOnNaN(keys=("loss", "grad_norm")), _columns(history))


@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_resume_equivalent_at_every_split(history):
    assert_resume_equivalent(TerminateOnNaN(keys=("loss", "grad_norm")), _columns(history))


def test_run_over_a_history():
    guard = TerminateOnNaN(keys=("loss", "grad_norm"))
    state, actions = run(guard, _columns(HISTORIES["nan_in_loss"]))
    chex.assert_trees_all_equal(state, state_of(stopped_step=2, non_finite_key=0))
    assert np.asarray(actions.stop).tolist() == [False, False, True, True, True]


def test_vmap_in_a_stacked_sweep_equals_single_runs():
    """TerminateOnNaN has no numeric options; in a vmapped sweep its state is broadcast."""
    patiences = [0, 1, 3]

    def build(patience):
        return fcb.chain(
            fcb.EarlyStopping("loss", patience=patience, check_finite=False),
            TerminateOnNaN(keys=("loss", "grad_norm")),
        )

    stacked = jax.vmap(build)(jnp.array(patiences))
    history = {"loss": np.asarray([1.0, 1.0, 0.5, 0.5, 0.25, NAN]),
               "grad_norm": np.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}
    assert_vmap_equivalent(stacked, [build(p) for p in patiences], history)
    # the sweep really mixes the two stop reasons
    reasons = {int(run(build(p), history)[1].stop_reason[-1]) for p in patiences}
    assert reasons == {StopReason.PATIENCE, StopReason.TERMINATE_ON_NAN}


def test_vmap_over_runs():
    """One guard over a batch of runs (e.g. seeds): each run stops on its own."""
    guard = TerminateOnNaN()
    losses = jnp.asarray([[1.0, 0.5, 0.4], [1.0, NAN, 0.4], [INF, 0.5, 0.4]], jnp.float32)
    check = jax.jit(jax.vmap(lambda s, m, i: guard(s, m, step=i), in_axes=(0, 0, None)))
    states = jax.vmap(lambda _: guard.init())(jnp.arange(3))
    for i in range(3):
        states, actions = check(states, {"loss": losses[:, i]}, jnp.int32(i))
    assert np.asarray(states.stopped_step).tolist() == [-1, 1, 0]
    assert np.asarray(actions.stop).tolist() == [False, True, True]


def test_state_dict_round_trip():
    guard = TerminateOnNaN(keys=("loss", "grad_norm"))
    state, _ = run(guard, _columns(HISTORIES["inf_in_grad_norm"]))
    restored = fcb.load_state_dict(guard, json_round_trip(fcb.state_dict(state, guard)))
    chex.assert_trees_all_equal(restored, state)


def test_state_dict_with_other_keys_warns():
    state, _ = run(TerminateOnNaN(keys=("loss",)), {"loss": np.asarray([1.0])})
    saved = fcb.state_dict(state, TerminateOnNaN(keys=("loss",)))
    with pytest.warns(fcb.ConfigChangedWarning, match=r"keys = \['loss'\].*keys = \['loss', 'x'\]"):
        fcb.load_state_dict(TerminateOnNaN(keys=("loss", "x")), saved)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, match",
    [
        ((), r"`keys` must be a non-empty sequence of metric names, got keys = \(\)"),
        ([], r"`keys` must be a non-empty sequence of metric names, got keys = \[\]"),
        (None, r"`keys` must be a non-empty sequence of metric names, got keys = None"),
        (3, r"`keys` must be a non-empty sequence of metric names, got keys = 3"),
        ("", r"`keys` must be a non-empty metric name \(str\), got keys = ''"),
        (("loss", ""), r"`keys` must be a non-empty metric name \(str\), got keys = ''"),
        (("loss", 1), r"`keys` must be a non-empty metric name \(str\), got keys = 1"),
        (("loss", "loss"), r"`keys` must not repeat a name, got keys = \('loss', 'loss'\) "
         r"\(repeated: 'loss'\)"),
    ],
)
def test_bad_keys(keys, match):
    with pytest.raises(fcb.ConfigError, match="^TerminateOnNaN: " + match):
        TerminateOnNaN(keys=keys)


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({"loss": "nan"}, fcb.MetricTypeError, "metric 'loss' must be a real scalar, got str"),
        ({"loss": None}, fcb.MetricTypeError, "metric 'loss' must be a real scalar, got None"),
        ({"loss": np.ones(2)}, fcb.MetricShapeError, "metric 'loss' must be a scalar, got shape"),
        (None, fcb.MetricTypeError, "metrics must be a mapping from name to scalar, got NoneType"),
    ],
)
def test_bad_metrics(metrics, error, match):
    guard = TerminateOnNaN()
    with pytest.raises(error, match="^TerminateOnNaN: " + match):
        guard(guard.init(), metrics, step=0)
