"""fcb.state_dict / fcb.load_state_dict: JSON round trips, exact resume, config changes."""

from __future__ import annotations

import json
import math
import warnings

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


def _through_json(d, **kwargs):
    return json.loads(json.dumps(d, **kwargs))


def _assert_plain_python(value, path="d"):
    """Only the types `json` produces: dict with str keys, list, str, int, float, bool, None."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path}: key {key!r}"
            _assert_plain_python(item, f"{path}[{key!r}]")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_plain_python(item, f"{path}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{path}: {value!r}"


def _run(callback, values, state=None, start=0):
    state = callback.init() if state is None else state
    for step, value in enumerate(values[start:], start=start):
        state, _ = callback(state, {KEY: value}, step=step)
    return state


# --- property: resume equivalence -------------------------------------------------------------

_VALUES = st.one_of(
    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]),
    st.sampled_from([NAN, INF, -INF]),
    st.floats(min_value=-4.0, max_value=4.0, width=32).filter(lambda x: x == 0 or abs(x) > 1e-6),
)
_OPTIONAL = st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, INF, -INF]))


@st.composite
def _early_stopping(draw):
    return fcb.EarlyStopping(
        KEY,
        mode=draw(st.sampled_from(["min", "max"])),
        patience=draw(st.integers(0, 3)),
        min_delta=draw(st.sampled_from([0.0, 0.25, 1.0])),
        check_finite=draw(st.booleans()),
        stopping_threshold=draw(_OPTIONAL),
        divergence_threshold=draw(_OPTIONAL),
        baseline=draw(_OPTIONAL),
        start_from_step=draw(st.integers(0, 3)),
        strict=draw(st.booleans()),
    )


_SETTINGS = settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(es=_early_stopping(), values=st.lists(_VALUES, min_size=2, max_size=6))
def test_resume_through_json_is_exact_at_every_split(es, values):
    history = {KEY: np.asarray(values, np.float32)}
    fcb.testing.assert_resume_equivalent(es, history)


@_SETTINGS
@given(es=_early_stopping(), values=st.lists(_VALUES, min_size=1, max_size=6))
def test_state_dict_is_strict_json_and_round_trips_exactly(es, values):
    state = _run(es, np.asarray(values, np.float32))
    d = fcb.state_dict(state, es)
    _assert_plain_python(d)
    text = json.dumps(d, allow_nan=False)  # non-finite numbers are spelled as strings
    restored = fcb.load_state_dict(es, json.loads(text))
    chex.assert_trees_all_equal(restored, state, strict=True)
    assert isinstance(restored, fcb.EarlyStoppingState)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    patiences=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    values=st.lists(st.tuples(_VALUES, _VALUES), min_size=2, max_size=5),
)
def test_resume_of_a_named_chain(patiences, values):
    chained = fcb.named_chain(
        val=fcb.EarlyStopping("val_loss", patience=patiences[0]),
        train=fcb.EarlyStopping("train_loss", mode="max", patience=patiences[1],
                                check_finite=False),
    )
    history = {"val_loss": np.asarray([v for v, _ in values], np.float32),
               "train_loss": np.asarray([t for _, t in values], np.float32)}
    fcb.testing.assert_resume_equivalent(chained, history)


# --- hand-picked round trips ------------------------------------------------------------------


def test_initial_state_round_trips_through_strict_json():
    es = fcb.EarlyStopping(KEY, mode="max")
    d = fcb.state_dict(es.init(), es)
    text = json.dumps(d, allow_nan=False)
    loaded = json.loads(text)
    assert loaded["format"] == "fcb.state_dict" and loaded["version"] == 1
    assert loaded["callback"] == "EarlyStopping"
    assert loaded["config"]["patience"] == 3
    restored = fcb.load_state_dict(es, loaded)
    assert float(restored.best) == -INF
    chex.assert_trees_all_equal(restored, es.init(), strict=True)


def test_nan_in_a_state_round_trips():
    # a NaN leaf (not a stored best, which is never NaN): a state built by hand
    es = fcb.EarlyStopping(KEY)
    state = fcb.EarlyStoppingState(
        best=jnp.asarray(NAN, jnp.float32), best_step=jnp.asarray(3, jnp.int32),
        wait_count=jnp.asarray(1, jnp.int32), stopped_step=jnp.asarray(-1, jnp.int32),
        stop_reason=jnp.asarray(0, jnp.int32))
    restored = fcb.load_state_dict(es, _through_json(fcb.state_dict(state, es), allow_nan=False))
    assert math.isnan(float(restored.best))
    assert restored.best.dtype == jnp.float32
    assert int(restored.best_step) == 3


def test_state_dict_without_the_callback_loads_without_config_checks():
    es = fcb.EarlyStopping(KEY, patience=2)
    state = _run(es, [1.0, 2.0])
    d = _through_json(fcb.state_dict(state))
    assert d["callback"] is None and d["config"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = fcb.load_state_dict(fcb.EarlyStopping(KEY, patience=5), d)
    chex.assert_trees_all_equal(restored, state, strict=True)


def test_same_config_loads_without_warnings():
    es = fcb.EarlyStopping(KEY, patience=2, min_delta=0.1, baseline=1.0)
    d = _through_json(fcb.state_dict(_run(es, [0.5]), es))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fcb.load_state_dict(fcb.EarlyStopping(KEY, patience=2, min_delta=0.1, baseline=1.0), d)


# --- config changes ---------------------------------------------------------------------------


def test_config_change_warns_naming_the_field_and_the_current_config_wins():
    saved_es = fcb.EarlyStopping(KEY, patience=2)
    values = [1.0, 1.5]  # one non-improving check: wait_count 1
    d = _through_json(fcb.state_dict(_run(saved_es, values), saved_es))

    current = fcb.EarlyStopping(KEY, patience=5)
    with pytest.warns(fcb.ConfigChangedWarning) as record:
        state = fcb.load_state_dict(current, d)
    messages = [str(w.message) for w in record if issubclass(w.category, fcb.ConfigChangedWarning)]
    assert len(messages) == 1, messages  # only the field that changed
    assert "saved with patience = 2" in messages[0]
    assert "the current config has patience = 5" in messages[0]
    assert int(state.wait_count) == 1

    # a second non-improving check: patience 2 would stop now, the current patience 5 does not
    state, actions = current(state, {KEY: 1.5}, step=2)
    assert not bool(actions.stop) and int(state.wait_count) == 2
    _, saved_actions = saved_es(fcb.load_state_dict(saved_es, d), {KEY: 1.5}, step=2)
    assert int(saved_actions.stop_reason) == StopReason.PATIENCE


def test_config_change_match_and_several_fields():
    saved_es = fcb.EarlyStopping(KEY, patience=2, min_delta=0.5)
    d = _through_json(fcb.state_dict(saved_es.init(), saved_es))
    with pytest.warns(fcb.ConfigChangedWarning, match=r"saved with patience = 2.*patience = 5"):
        fcb.load_state_dict(fcb.EarlyStopping(KEY, patience=5, min_delta=0.5), d)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fcb.load_state_dict(fcb.EarlyStopping(KEY, patience=5, min_delta=0.5, check_finite=False,
                                              stopping_threshold=1.0), d)
    messages = " | ".join(str(w.message) for w in record
                          if issubclass(w.category, fcb.ConfigChangedWarning))
    for field in ("check_finite", "patience", "stopping_threshold"):
        assert f"saved with {field} = " in messages, (field, messages)
    assert "min_delta" not in messages
    assert len(record) == 3


def test_config_change_inside_a_chain_names_the_nested_field():
    saved = fcb.chain(fcb.EarlyStopping(KEY, patience=2))
    d = _through_json(fcb.state_dict(saved.init(), saved))
    with pytest.warns(fcb.ConfigChangedWarning,
                      match=r"Chain: .*callbacks\[0\]\.config\.patience = 2.*patience = 4"):
        fcb.load_state_dict(fcb.chain(fcb.EarlyStopping(KEY, patience=4)), d)


# --- batched states ---------------------------------------------------------------------------


def test_batched_states_round_trip():
    patiences = jnp.asarray([0, 1, 2, 5], jnp.int32)
    starts = jnp.asarray([0, 0, 1, 10], jnp.int32)
    stacked = jax.vmap(lambda p, s: fcb.EarlyStopping(KEY, patience=p, start_from_step=s))(
        patiences, starts)
    check = jax.jit(jax.vmap(lambda c, s, m, i: c(s, m, step=i), in_axes=(0, 0, None, None)))
    values = [1.0, 0.5, 0.75, NAN, 0.25, 0.125]
    states = jax.vmap(lambda c: c.init())(stacked)
    for step, value in enumerate(values[:3]):
        states, _ = check(stacked, states, {KEY: jnp.float32(value)}, jnp.int32(step))

    d = _through_json(fcb.state_dict(states, stacked), allow_nan=False)
    assert d["state"]["leaves"][".best"]["shape"] == [4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = fcb.load_state_dict(stacked, d)
    chex.assert_trees_all_equal(restored, states, strict=True)
    # the config with start_from_step=10 has not started: its best is still +inf
    assert float(restored.best[3]) == INF

    resumed = restored
    for step, value in enumerate(values[3:], start=3):
        args = ({KEY: jnp.float32(value)}, jnp.int32(step))
        states, actions = check(stacked, states, *args)
        resumed, resumed_actions = check(stacked, resumed, *args)
        chex.assert_trees_all_equal(resumed_actions, actions, strict=True)
    chex.assert_trees_all_equal(resumed, states, strict=True)


def test_identity_option_change_is_refused_not_warned():
    """A state saved in min mode is meaningless in max mode (its best is +inf): refuse it."""
    es = fcb.EarlyStopping("val_loss", patience=2)
    state, _ = es(es.init(), {"val_loss": 1.0}, step=0)
    saved = json.loads(json.dumps(fcb.state_dict(state, es)))
    with pytest.raises(fcb.StateDictError, match=r"mode was 'min', is now 'max'"):
        fcb.load_state_dict(fcb.EarlyStopping("val_loss", mode="max"), saved)
    with pytest.raises(fcb.StateDictError, match=r"monitor was 'val_loss', is now 'acc'"):
        fcb.load_state_dict(fcb.EarlyStopping("acc"), saved)
    chain = fcb.chain(es, fcb.ModelCheckpoint("val_loss"))
    saved = fcb.state_dict(chain.init(), chain)
    with pytest.raises(fcb.StateDictError, match=r"callbacks\[1\]\.monitor was 'val_loss'"):
        fcb.load_state_dict(fcb.chain(es, fcb.ModelCheckpoint("acc", mode="max")), saved)
