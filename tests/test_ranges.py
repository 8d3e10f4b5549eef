"""Numbers beyond what the callbacks store (float32, int32) are typed errors, never silent.

Before: a metric of 1e39 became inf and stopped the run as "NaN or infinite"; min_delta=1e40
became inf; integer options >= 2**31 raised a raw OverflowError; a state dict's None became
NaN and 1.7 became 1.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb

KEY = "val_loss"
BEYOND = r"must be a real scalar within float32's range \(magnitude at most 3\.4028235e\+38\)"


# -- metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1e39, r"1e\+39"),
        (-1e39, r"-1e\+39"),
        (np.float64(5e38), r"5e\+38"),
        (np.asarray([1e300]), r"1e\+300"),
        (10**40, "1" + "0" * 40),
    ],
)
@pytest.mark.parametrize(
    "callback",
    [
        fcb.EarlyStopping(KEY),
        fcb.ModelCheckpoint(KEY),
        fcb.BestCheckpoint(KEY, tolerances=(1,)),
        fcb.ReduceLROnPlateau(KEY),
        fcb.TerminateOnNaN(keys=(KEY,)),
    ],
    ids=lambda c: type(c).__name__,
)
def test_a_finite_metric_beyond_float32_is_an_error_naming_it(callback, value, shown):
    owner = type(callback).__name__
    with pytest.raises(fcb.MetricTypeError, match=rf"^{owner}: metric 'val_loss' {BEYOND}"):
        callback(callback.init(), {KEY: value}, step=0)
    runner_message = rf"^Runner: metric 'val_loss' {BEYOND}, got {shown}"
    with pytest.raises(fcb.MetricTypeError, match=runner_message):
        fcb.Runner(callback).check({KEY: value}, step=0)


def test_metrics_at_the_edge_of_float32_are_read():
    es = fcb.EarlyStopping(KEY)
    largest = float(np.finfo(np.float32).max)
    state, actions = es(es.init(), {KEY: largest}, step=0)
    assert float(state.best) == largest and not bool(actions.stop)
    state, _ = es(es.init(), {KEY: 10**30}, step=0)  # a large Python int
    assert float(state.best) == pytest.approx(1e30)
    # infinity itself is still a non-finite check, not an error
    _, actions = es(es.init(), {KEY: float("inf")}, step=0)
    assert actions.stop_reason == fcb.StopReason.NON_FINITE


# -- options -------------------------------------------------------------------------------

FLOAT_OPTIONS = [
    (lambda v: fcb.EarlyStopping(KEY, min_delta=v), "EarlyStopping", "min_delta"),
    (lambda v: fcb.EarlyStopping(KEY, stopping_threshold=v), "EarlyStopping",
     "stopping_threshold"),
    (lambda v: fcb.EarlyStopping(KEY, divergence_threshold=v), "EarlyStopping",
     "divergence_threshold"),
    (lambda v: fcb.EarlyStopping(KEY, baseline=-v), "EarlyStopping", "baseline"),
    (lambda v: fcb.BestCheckpoint(KEY, min_delta=v), "BestCheckpoint", "min_delta"),
    (lambda v: fcb.ReduceLROnPlateau(KEY, threshold=v), "ReduceLROnPlateau", "threshold"),
    (lambda v: fcb.ReduceLROnPlateau(KEY, min_lr=v), "ReduceLROnPlateau", "min_lr"),
    (lambda v: fcb.ReduceLROnPlateau(KEY, eps=v), "ReduceLROnPlateau", "eps"),
    (lambda v: fcb.VRAMDrift(max_drift_bytes=v), "VRAMDrift", "max_drift_bytes"),
]


@pytest.mark.parametrize(("build", "owner", "field"), FLOAT_OPTIONS,
                         ids=[f"{o}.{f}" for _, o, f in FLOAT_OPTIONS])
@pytest.mark.parametrize("value", [1e40, np.asarray([0.0, 1e39])], ids=["scalar", "sweep"])
def test_a_real_option_beyond_float32_is_a_config_error(build, owner, field, value):
    with pytest.raises(
        fcb.ConfigError,
        match=rf"^{owner}: `{field}` must be within float32's range \(magnitude at most "
        rf"3\.4028235e\+38: fcb keeps it as float32, where it would become infinite\), got "
        rf"{field} = ",
    ):
        build(value)


def test_a_real_option_at_the_edge_of_float32_is_kept():
    largest = float(np.finfo(np.float32).max)
    assert float(fcb.EarlyStopping(KEY, min_delta=largest).min_delta) == largest
    assert float(fcb.EarlyStopping(KEY, stopping_threshold=-np.inf).stopping_threshold) == -np.inf


INT_OPTIONS = [
    (lambda v: fcb.EarlyStopping(KEY, patience=v), "EarlyStopping", "patience"),
    (lambda v: fcb.EarlyStopping(KEY, start_from_step=v), "EarlyStopping", "start_from_step"),
    (lambda v: fcb.ReduceLROnPlateau(KEY, patience=v), "ReduceLROnPlateau", "patience"),
    (lambda v: fcb.ReduceLROnPlateau(KEY, cooldown=v), "ReduceLROnPlateau", "cooldown"),
    (lambda v: fcb.ModelCheckpoint(KEY, every_n=v), "ModelCheckpoint", "every_n"),
    (lambda v: fcb.BestCheckpoint(KEY, every_n=v), "BestCheckpoint", "every_n"),
]


@pytest.mark.parametrize(("build", "owner", "field"), INT_OPTIONS,
                         ids=[f"{o}.{f}" for _, o, f in INT_OPTIONS])
@pytest.mark.parametrize(
    "value", [2**31, 10**40, 3e9, np.asarray([1, 2**31])], ids=["2**31", "10**40", "3e9", "sweep"]
)
def test_an_integer_option_beyond_int32_is_a_config_error(build, owner, field, value):
    with pytest.raises(
        fcb.ConfigError,
        match=rf"^{owner}: `{field}` must be at most 2147483647 \(2\*\*31 - 1: fcb keeps it as "
        rf"int32\), got {field} = ",
    ):
        build(value)


@pytest.mark.parametrize(("build", "owner", "field"), INT_OPTIONS,
                         ids=[f"{o}.{f}" for _, o, f in INT_OPTIONS])
def test_the_largest_int32_is_accepted(build, owner, field):
    assert int(getattr(build(2**31 - 1), field)) == 2**31 - 1


def test_a_tolerance_beyond_int32_is_a_config_error():
    with pytest.raises(
        fcb.ConfigError,
        match=r"^BestCheckpoint: every tolerance must be at most 2147483647 .*got 2147483648 in "
        r"tolerances = \(1, 2147483648\)\.",
    ):
        fcb.BestCheckpoint(KEY, tolerances=(1, 2**31))


@pytest.mark.parametrize(
    "callback",
    [fcb.EarlyStopping(KEY), fcb.ModelCheckpoint(KEY), fcb.BestCheckpoint(KEY),
     fcb.ReduceLROnPlateau(KEY), fcb.TerminateOnNaN(keys=(KEY,)),
     fcb.VRAMDrift(max_drift_bytes=1.0, key=KEY)],
    ids=lambda c: type(c).__name__,
)
@pytest.mark.parametrize(("step", "match"), [
    (2**31,
     r"`step` must be below 2\*\*31 \(callbacks keep steps as int32\), got step = 2147483648"),
    (1.5, r"`step` must be an integer, got step = 1\.5"),
])
def test_a_step_int32_cannot_hold_is_a_config_error(callback, step, match):
    with pytest.raises(fcb.ConfigError, match=rf"^{type(callback).__name__}: {match}\."):
        callback(callback.init(), {KEY: 0.5}, step=step)


def test_steps_still_trace():
    es = fcb.EarlyStopping(KEY)
    check = jax.jit(lambda s, step: es(s, {KEY: jnp.float32(0.5)}, step=step))
    state, _ = check(es.init(), jnp.int32(2**31 - 1))
    assert int(state.best_step) == 2**31 - 1


# -- state dicts ---------------------------------------------------------------------------


def _saved():
    es = fcb.EarlyStopping(KEY, patience=3)
    state = es.init()
    for step, value in enumerate([1.0, 2.0]):
        state, _ = es(state, {KEY: value}, step=step)
    return es, json.loads(json.dumps(fcb.state_dict(state, es)))


@pytest.mark.parametrize(
    ("leaf", "value", "match"),
    [
        (".best", None, r"\.best: value None is not a number \(float32 expected\)"),
        (".wait_count", 1.7, r"\.wait_count: value 1\.7 is not an integer \(int32 expected\)"),
        (".wait_count", True, r"\.wait_count: value True is not an integer"),
        (".wait_count", None, r"\.wait_count: value None is not an integer"),
        (".wait_count", "nan", r"\.wait_count: value nan is not an integer"),
        (".best_step", 2**31,
         r"\.best_step: value 2147483648 is out of the range of int32 \[-2147483648, 2147483647\]"),
        (".best", 1e39,
         r"\.best: value 1e\+39 is beyond the range of float32 \(largest finite value "
         r"3\.4028235e\+38\)"),
        (".best", False, r"\.best: value False is not a number"),
    ],
)
def test_a_state_dict_value_its_leaf_cannot_hold_is_a_state_dict_error(leaf, value, match):
    es, saved = _saved()
    saved = copy.deepcopy(saved)
    saved["state"]["leaves"][leaf]["value"] = value
    with pytest.raises(
        fcb.StateDictError,
        match=r"^EarlyStopping: the state dict does not fit this callback: .*" + match,
    ):
        fcb.load_state_dict(es, saved)


def test_a_batched_leaf_is_checked_element_by_element():
    stacked = jax.vmap(lambda p: fcb.EarlyStopping(KEY, patience=p))(jnp.arange(3))
    saved = json.loads(json.dumps(fcb.state_dict(jax.vmap(lambda c: c.init())(stacked), stacked)))
    saved["state"]["leaves"][".wait_count"]["value"] = [0, 2.5, 0]
    with pytest.raises(fcb.StateDictError, match=r"\.wait_count: value 2\.5 is not an integer"):
        fcb.load_state_dict(stacked, saved)


def test_exact_values_still_load():
    es, saved = _saved()
    saved["state"]["leaves"][".wait_count"]["value"] = 1.0  # an integral float is exact
    saved["state"]["leaves"][".best"]["value"] = "-inf"
    state = fcb.load_state_dict(es, saved)
    assert int(state.wait_count) == 1 and float(state.best) == -np.inf
