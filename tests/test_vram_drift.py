"""VRAMDrift: baseline, thresholds, one warning, logs, precision, jit / scan / vmap, resume."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb
from fcb import VRAMDrift, VRAMDriftState
from fcb.testing import (
    assert_jit_equivalent,
    assert_resume_equivalent,
    assert_vmap_equivalent,
    run,
)

INF = math.inf
NAN = math.nan
MiB = 2**20
GiB = 2**30
KEY = "free_memory_bytes"
DRIFT = "vram_drift/drift"
MISSING = "vram_drift/metric_missing"
BASELINE_LOG = "vram_drift/baseline_bytes"
FREE_LOG = "vram_drift/free_bytes"
DRIFT_LOG = "vram_drift/drift_bytes"


def state_of(baseline_mib=NAN, baseline_step=-1, warned_step=-1):
    return VRAMDriftState(
        baseline_mib=jnp.asarray(baseline_mib, jnp.float32),
        baseline_step=jnp.asarray(baseline_step, jnp.int32),
        warned_step=jnp.asarray(warned_step, jnp.int32),
    )


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def call(request):
    def check(callback, state, metrics, step):
        return callback(state, metrics, step=step)

    return jax.jit(check) if request.param else check


def test_defaults_and_names():
    drift = VRAMDrift(max_drift_bytes=GiB)
    assert drift.key == KEY
    assert drift.strict is False
    assert float(drift.max_drift_fraction) == INF  # not given: never fires
    chex.assert_trees_all_equal(drift.init(), state_of())
    names = drift.action_names()
    assert names.log == (BASELINE_LOG, FREE_LOG, DRIFT_LOG)
    assert names.events == (DRIFT, MISSING)
    assert names.slots == ()
    _, actions = drift(drift.init(), {KEY: 8 * GiB}, step=0)
    assert sorted(actions.log) == sorted(names.log)
    assert sorted(actions.events) == sorted(names.events)


def test_first_check_records_the_baseline(call):
    drift = VRAMDrift(max_drift_bytes=0)
    state, actions = call(drift, drift.init(), {KEY: 24.0 * GiB}, 3)
    chex.assert_trees_all_equal(state, state_of(baseline_mib=24 * 1024, baseline_step=3))
    assert not bool(actions.events[DRIFT])  # the baseline never drifts from itself
    assert float(actions.log[BASELINE_LOG]) == 24 * GiB
    assert float(actions.log[FREE_LOG]) == 24 * GiB
    assert float(actions.log[DRIFT_LOG]) == 0.0
    assert not bool(actions.stop)


@pytest.mark.parametrize(
    "free_gib, fires",
    [
        (20.0, False),
        (18.5, False),
        (18.0, False),  # drift == max_drift_bytes: strictly greater is needed
        (17.75, True),
        (25.0, False),  # more free memory than at the start: no drift
    ],
)
def test_max_drift_bytes(call, free_gib, fires):
    drift = VRAMDrift(max_drift_bytes=2 * GiB)
    baseline = state_of(baseline_mib=20 * 1024, baseline_step=0)
    state, actions = call(drift, baseline, {KEY: free_gib * GiB}, 4)
    chex.assert_trees_all_equal(
        state, state_of(baseline_mib=20 * 1024, baseline_step=0, warned_step=4 if fires else -1)
    )
    assert bool(actions.events[DRIFT]) == fires
    assert float(actions.log[DRIFT_LOG]) == (20 - free_gib) * GiB
    assert float(actions.log[FREE_LOG]) == free_gib * GiB
    assert float(actions.log[BASELINE_LOG]) == 20 * GiB
    assert not bool(actions.stop)


@pytest.mark.parametrize(
    "free_gib, fires",
    [(16.0, False), (15.0, False), (14.0, True)],  # 25% of a 20 GiB baseline is 5 GiB
)
def test_max_drift_fraction(call, free_gib, fires):
    drift = VRAMDrift(max_drift_fraction=0.25)
    baseline = state_of(baseline_mib=20 * 1024, baseline_step=0)
    state, actions = call(drift, baseline, {KEY: free_gib * GiB}, 1)
    assert bool(actions.events[DRIFT]) == fires
    assert int(state.warned_step) == (1 if fires else -1)


@pytest.mark.parametrize(
    "free_gib, fires",
    [(19.0, False), (17.5, True), (16.5, True)],
)
def test_either_threshold_fires(call, free_gib, fires):
    # Baseline 20 GiB: the fraction allows 2 GiB, the byte threshold 3 GiB.
    drift = VRAMDrift(max_drift_bytes=3 * GiB, max_drift_fraction=0.1)
    baseline = state_of(baseline_mib=20 * 1024, baseline_step=0)
    _, actions = call(drift, baseline, {KEY: free_gib * GiB}, 1)
    assert bool(actions.events[DRIFT]) == fires
    # Now the byte threshold (1 GiB) is the tighter one; the fraction allows 10 GiB.
    drift = VRAMDrift(max_drift_bytes=1 * GiB, max_drift_fraction=0.5)
    _, actions = call(drift, baseline, {KEY: 18.5 * GiB}, 1)
    assert bool(actions.events[DRIFT])


def test_warns_only_once_and_never_stops():
    drift = VRAMDrift(max_drift_bytes=GiB)
    history = {KEY: np.asarray([10, 9.5, 8.0, 7.0, 9.875, 6.0]) * GiB}
    state, actions = run(drift, history)
    assert np.asarray(actions.events[DRIFT]).tolist() == [False, False, True, False, False, False]
    assert not np.asarray(actions.stop).any()
    assert int(state.warned_step) == 2
    assert (np.asarray(actions.log[DRIFT_LOG]) / GiB).tolist() == [0, 0.5, 2, 3, 0.125, 4]
    # the baseline is kept: a later recovery does not reset it
    assert np.asarray(actions.log[BASELINE_LOG]).tolist() == [10 * GiB] * 6


@pytest.mark.parametrize("figure", [NAN, INF, -INF])
def test_non_finite_figure_is_ignored(call, figure):
    drift = VRAMDrift(max_drift_bytes=0)
    # before a baseline: no baseline is taken from it
    state, actions = call(drift, drift.init(), {KEY: figure}, 0)
    chex.assert_trees_all_equal(state, state_of())
    assert not bool(actions.events[DRIFT])
    # after a baseline: never compared
    baseline = state_of(baseline_mib=1024, baseline_step=0)
    state, actions = call(drift, baseline, {KEY: figure}, 1)
    chex.assert_trees_all_equal(state, baseline)
    assert not bool(actions.events[DRIFT])
    assert math.isnan(float(actions.log[DRIFT_LOG]))
    assert float(actions.log[BASELINE_LOG]) == GiB
    # the next finite figure becomes the baseline
    state, _ = call(drift, drift.init(), {KEY: 2.0 * GiB}, 2)
    chex.assert_trees_all_equal(state, state_of(baseline_mib=2048, baseline_step=2))


def test_missing_figure_not_strict_changes_nothing(call):
    drift = VRAMDrift(max_drift_bytes=GiB)
    before = state_of(baseline_mib=1024, baseline_step=0)
    state, actions = call(drift, before, {"val_loss": 0.5}, 1)
    chex.assert_trees_all_equal(state, before)
    assert bool(actions.events[MISSING])
    assert not bool(actions.events[DRIFT])
    assert all(math.isnan(float(v)) for v in actions.log.values())
    _, actions = call(drift, before, {KEY: float(GiB)}, 2)
    assert not bool(actions.events[MISSING])


def test_missing_figure_strict_lists_available_keys():
    drift = VRAMDrift(max_drift_bytes=GiB, strict=True)
    with pytest.raises(
        fcb.MissingMetricError,
        match=r"^VRAMDrift: the monitored metric 'free_memory_bytes' is not in the metrics of "
        r"this check; available keys: \['loss', 'val_loss'\]",
    ):
        drift(drift.init(), {"val_loss": 0.5, "loss": 1.0}, step=0)


def test_custom_key():
    drift = VRAMDrift(max_drift_bytes=0, key="cuda:1/free")
    state, _ = drift(drift.init(), {"cuda:1/free": 4 * GiB, KEY: 1.0}, step=0)
    assert float(state.baseline_mib) == 4096


def test_float32_precision_of_large_figures():
    """80 GiB figures are held to within 4 KiB; a 1 MiB drift threshold still works exactly."""
    drift = VRAMDrift(max_drift_bytes=MiB)
    baseline = 80 * GiB + 12_345  # not a float32 value
    state, actions = drift(drift.init(), {KEY: baseline}, step=0)
    assert abs(float(state.baseline_mib) * MiB - baseline) <= 4 * 1024
    assert abs(float(actions.log[FREE_LOG]) - baseline) <= 4 * 1024
    state, actions = drift(state, {KEY: baseline - MiB}, step=1)  # exactly the threshold
    assert float(actions.log[DRIFT_LOG]) == MiB
    assert not bool(actions.events[DRIFT])
    _, actions = drift(state, {KEY: baseline - MiB - 16 * 1024}, step=2)
    assert bool(actions.events[DRIFT])


def test_in_a_chain_with_a_stopping_callback():
    cb = fcb.chain(fcb.EarlyStopping("val_loss", patience=1), VRAMDrift(max_drift_bytes=GiB))
    state = cb.init()
    state, actions = cb(state, {"val_loss": 1.0, KEY: 8 * GiB}, step=0)
    state, actions = cb(state, {"val_loss": 0.5, KEY: 6 * GiB}, step=1)
    assert bool(actions.events[DRIFT])
    assert not bool(actions.stop)  # the drift warns; stopping is for other callbacks
    state, actions = cb(state, {"val_loss": 0.6}, step=2)  # no probe at this check
    assert bool(actions.stop)
    assert bool(actions.events[MISSING])


# --- jit, scan, vmap, resume -------------------------------------------------------------------

HISTORIES = {
    "leak": np.asarray([20, 19.9, 19.5, 19.0, 18.2, 17.9, 17.0, 16.5]) * GiB,
    "nan_then_baseline": np.asarray([NAN, 8.0, 7.5, NAN, 6.5, 6.4, 8.0]) * GiB,
    "stable": np.asarray([4.0, 4.0, 4.1, 3.99, 4.0]) * GiB,
}
CONFIGS = {
    "bytes": dict(max_drift_bytes=GiB),
    "fraction": dict(max_drift_fraction=0.1),
    "both": dict(max_drift_bytes=3 * GiB, max_drift_fraction=0.05),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_eager_jit_scan_equivalent(config, history):
    assert_jit_equivalent(VRAMDrift(**config), {KEY: history})


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_resume_equivalent_at_every_split(config, history):
    assert_resume_equivalent(VRAMDrift(**config), {KEY: history})


def test_vmap_over_max_drift_bytes_equals_single_runs():
    thresholds = [0.25 * GiB, GiB, 2 * GiB, 8 * GiB]
    stacked = jax.vmap(lambda b: VRAMDrift(max_drift_bytes=b))(jnp.array(thresholds))
    singles = [VRAMDrift(max_drift_bytes=b) for b in thresholds]
    history = {KEY: HISTORIES["leak"]}
    assert_vmap_equivalent(stacked, singles, history)
    warned = [int(run(cb, history)[0].warned_step) for cb in singles]
    assert warned == [2, 4, 5, -1]


def test_vmap_over_both_thresholds_equals_single_runs():
    options = dict(max_drift_bytes=[GiB, 10 * GiB, 0.5 * GiB], max_drift_fraction=[0.5, 0.05, 0.9])
    stacked = jax.vmap(lambda kw: VRAMDrift(**kw))({k: jnp.asarray(v) for k, v in options.items()})
    singles = [VRAMDrift(**{k: v[i] for k, v in options.items()}) for i in range(3)]
    assert_vmap_equivalent(stacked, singles, {KEY: HISTORIES["nan_then_baseline"]})


def test_state_dict_round_trip():
    drift = VRAMDrift(max_drift_fraction=0.1)
    state, _ = run(drift, {KEY: HISTORIES["leak"]})
    restored = fcb.load_state_dict(drift, fcb.state_dict(state, drift))
    chex.assert_trees_all_equal(restored, state)
    with pytest.warns(fcb.ConfigChangedWarning, match="max_drift_fraction"):
        fcb.load_state_dict(VRAMDrift(max_drift_fraction=0.2), fcb.state_dict(state, drift))


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, r"give `max_drift_bytes` and/or `max_drift_fraction`, got neither"),
        (
            dict(max_drift_bytes=-1),
            r"`max_drift_bytes` must be a finite number >= 0.0, got "
            r"max_drift_bytes = -1",
        ),
        (
            dict(max_drift_bytes=INF),
            r"`max_drift_bytes` must be a finite number >= 0.0, got "
            r"max_drift_bytes = inf",
        ),
        (
            dict(max_drift_bytes="2GB"),
            r"`max_drift_bytes` must be a number, got "
            r"max_drift_bytes = '2GB'",
        ),
        (
            dict(max_drift_fraction=1.0),
            r"`max_drift_fraction` must be a finite number in \[0.0, 1.0\)"
            r", got max_drift_fraction = 1.0. It is a fraction of the baseline",
        ),
        (
            dict(max_drift_fraction=10),
            r"`max_drift_fraction` must be a finite number in \[0.0, 1.0\)"
            r", got max_drift_fraction = 10",
        ),
        (
            dict(max_drift_fraction=-0.1),
            r"`max_drift_fraction` must be a finite number in \[0.0, 1.0\)"
            r", got max_drift_fraction = -0.1",
        ),
        (
            dict(max_drift_fraction=NAN),
            r"`max_drift_fraction` must be a finite number in \[0.0, 1.0\)"
            r", got max_drift_fraction = nan",
        ),
        (
            dict(max_drift_bytes=GiB, key=""),
            r"`key` must be a non-empty metric name \(str\), "
            r"got key = ''",
        ),
        (
            dict(max_drift_bytes=GiB, key=None),
            r"`key` must be a non-empty metric name \(str\), "
            r"got key = None",
        ),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(fcb.ConfigError, match="^VRAMDrift: " + match):
        VRAMDrift(**kwargs)


def test_bad_config_in_a_batch_is_caught():
    with pytest.raises(fcb.ConfigError, match=r"`max_drift_fraction` must be a finite number"):
        VRAMDrift(max_drift_fraction=np.array([0.1, 1.5]))


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({KEY: "8GB"}, fcb.MetricTypeError, "metric 'free_memory_bytes' must be a real scalar"),
        ({KEY: np.ones(2)}, fcb.MetricShapeError, "metric 'free_memory_bytes' must be a scalar"),
        ("free", fcb.MetricTypeError, "metrics must be a mapping from name to scalar, got str"),
    ],
)
def test_bad_metrics(metrics, error, match):
    drift = VRAMDrift(max_drift_bytes=GiB)
    with pytest.raises(error, match="^VRAMDrift: " + match):
        drift(drift.init(), metrics, step=0)
