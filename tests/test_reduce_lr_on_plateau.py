"""ReduceLROnPlateau: transitions, parity with torch's scheduler, jit / scan / vmap, resume."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import fcb
from fcb import ReduceLROnPlateau, ReduceLROnPlateauState
from fcb.testing import (
    assert_jit_equivalent,
    assert_resume_equivalent,
    assert_vmap_equivalent,
    run,
)

INF = math.inf
NAN = math.nan
REDUCED = "reduce_lr_on_plateau/reduced"
MISSING = "reduce_lr_on_plateau/metric_missing"


def state_of(best, num_bad_checks=0, cooldown_count=0, num_reductions=0, last_reduced_step=-1):
    return ReduceLROnPlateauState(
        best=jnp.asarray(best, jnp.float32),
        num_bad_checks=jnp.asarray(num_bad_checks, jnp.int32),
        cooldown_count=jnp.asarray(cooldown_count, jnp.int32),
        num_reductions=jnp.asarray(num_reductions, jnp.int32),
        last_reduced_step=jnp.asarray(last_reduced_step, jnp.int32),
    )


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def call(request):
    """One check, called directly or through `jax.jit` (the callback is a pytree argument)."""

    def check(callback, state, metrics, step):
        return callback(state, metrics, step=step)

    return jax.jit(check) if request.param else check


# --- hand-built transitions -------------------------------------------------------------------


def test_initial_state_per_mode():
    chex.assert_trees_all_equal(ReduceLROnPlateau(mode="min").init(), state_of(INF))
    chex.assert_trees_all_equal(ReduceLROnPlateau(mode="max").init(), state_of(-INF))


@pytest.mark.parametrize(
    "mode, threshold_mode, best, value, improves",
    [
        # rel, min: improves when value < best * (1 - threshold) = 0.75
        ("min", "rel", 1.0, 0.625, True),
        ("min", "rel", 1.0, 0.75, False),  # exactly on the bound: a tie is not an improvement
        ("min", "rel", 1.0, 0.875, False),
        # a negative best: bound -2 - 0.25 * 2 = -2.5 (torch's -1.5 would count a worse value)
        ("min", "rel", -2.0, -2.625, True),
        ("min", "rel", -2.0, -2.5, False),
        ("min", "rel", -2.0, -1.75, False),
        ("max", "rel", -2.0, -1.375, True),  # bound -2 + 0.25 * 2 = -1.5
        ("max", "rel", -2.0, -1.5, False),
        # rel, max: improves when value > best * (1 + threshold) = 1.25
        ("max", "rel", 1.0, 1.375, True),
        ("max", "rel", 1.0, 1.25, False),
        # abs, min: improves when value < best - threshold = 0.75
        ("min", "abs", 1.0, 0.5, True),
        ("min", "abs", 1.0, 0.75, False),
        ("min", "abs", -1.0, -1.5, True),
        # abs, max: improves when value > best + threshold = 1.25
        ("max", "abs", 1.0, 1.5, True),
        ("max", "abs", 1.0, 1.25, False),
    ],
)
def test_improvement_margin(call, mode, threshold_mode, best, value, improves):
    cb = ReduceLROnPlateau(
        mode=mode, threshold=0.25, threshold_mode=threshold_mode, patience=5
    )
    state, actions = call(cb, state_of(best, num_bad_checks=2), {"val_loss": value}, 7)
    if improves:
        chex.assert_trees_all_equal(state, state_of(value, num_bad_checks=0))
    else:
        chex.assert_trees_all_equal(state, state_of(best, num_bad_checks=3))
    assert not bool(actions.events[REDUCED])


def test_first_finite_value_becomes_best(call):
    for mode in ("min", "max"):
        cb = ReduceLROnPlateau(mode=mode, patience=0)
        state, actions = call(cb, cb.init(), {"val_loss": -3.5}, 0)
        chex.assert_trees_all_equal(state, state_of(-3.5))
        assert not bool(actions.events[REDUCED])


def test_reduces_when_bad_checks_exceed_patience(call):
    cb = ReduceLROnPlateau(factor=0.5, patience=2, threshold=0.0, min_lr=0.001, eps=1e-6)
    state = state_of(1.0, num_bad_checks=1)
    # the second bad check equals patience: not yet
    state, actions = call(cb, state, {"val_loss": 1.0}, 4)
    chex.assert_trees_all_equal(state, state_of(1.0, num_bad_checks=2))
    assert not bool(actions.events[REDUCED])
    assert float(actions.lr_scale) == 1.0
    assert float(actions.min_lr) == 0.0
    assert float(actions.min_lr_change) == 0.0
    # the third is more than patience: reduce, reset the count
    state, actions = call(cb, state, {"val_loss": 2.0}, 5)
    chex.assert_trees_all_equal(
        state, state_of(1.0, num_bad_checks=0, num_reductions=1, last_reduced_step=5)
    )
    assert bool(actions.events[REDUCED])
    assert float(actions.lr_scale) == 0.5
    assert float(actions.min_lr) == np.float32(0.001)
    assert float(actions.min_lr_change) == np.float32(1e-6)
    assert not bool(actions.stop)


def test_patience_zero_reduces_at_every_non_improving_check(call):
    cb = ReduceLROnPlateau(factor=0.5, patience=0, threshold=0.0)
    state = cb.init()
    reduced = []
    for step, value in enumerate([3.0, 2.0, 2.0, 4.0, 1.0, 1.0]):
        state, actions = call(cb, state, {"val_loss": value}, step)
        reduced.append(bool(actions.events[REDUCED]))
    assert reduced == [False, False, True, True, False, True]
    assert int(state.num_reductions) == 3
    assert int(state.last_reduced_step) == 5


def test_cooldown_ignores_bad_checks_and_is_consumed_first(call):
    cb = ReduceLROnPlateau(factor=0.5, patience=0, cooldown=2, threshold=0.0)
    # in cooldown: the bad check is forgotten, even though it exceeds patience
    state, actions = call(cb, state_of(1.0, cooldown_count=2), {"val_loss": 5.0}, 3)
    chex.assert_trees_all_equal(state, state_of(1.0, cooldown_count=1))
    assert not bool(actions.events[REDUCED])
    # the check that ends the cooldown cannot reduce either
    state, actions = call(cb, state, {"val_loss": 5.0}, 4)
    chex.assert_trees_all_equal(state, state_of(1.0, cooldown_count=0))
    assert not bool(actions.events[REDUCED])
    # after the cooldown, normal operation
    state, actions = call(cb, state, {"val_loss": 5.0}, 5)
    chex.assert_trees_all_equal(
        state, state_of(1.0, cooldown_count=2, num_reductions=1, last_reduced_step=5)
    )
    assert bool(actions.events[REDUCED])


def test_improvement_during_cooldown_updates_best(call):
    cb = ReduceLROnPlateau(patience=0, cooldown=3, threshold=0.0)
    state, _ = call(cb, state_of(1.0, cooldown_count=3), {"val_loss": 0.5}, 2)
    chex.assert_trees_all_equal(state, state_of(0.5, cooldown_count=2))


@pytest.mark.parametrize(
    "mode, value",
    [("min", NAN), ("max", NAN), ("min", -INF), ("min", INF), ("max", INF), ("max", -INF)],
)
def test_non_finite_is_a_bad_check_and_never_the_best(call, mode, value):
    cb = ReduceLROnPlateau(mode=mode, patience=1, threshold=0.0)
    state, actions = call(cb, state_of(1.0), {"val_loss": value}, 0)
    chex.assert_trees_all_equal(state, state_of(1.0, num_bad_checks=1))
    state, actions = call(cb, state, {"val_loss": value}, 1)
    chex.assert_trees_all_equal(
        state, state_of(1.0, num_bad_checks=0, num_reductions=1, last_reduced_step=1)
    )
    assert bool(actions.events[REDUCED])


def test_missing_metric_strict_lists_available_keys():
    cb = ReduceLROnPlateau("val_loss")
    with pytest.raises(
        fcb.MissingMetricError, match=r"'val_loss'.*available keys: \['train_loss', 'val_acc'\]"
    ):
        cb(cb.init(), {"val_acc": 0.5, "train_loss": 1.0}, step=0)


def test_missing_metric_not_strict_changes_nothing(call):
    cb = ReduceLROnPlateau("val_loss", patience=0, strict=False)
    before = state_of(1.0, num_bad_checks=3, cooldown_count=1)
    state, actions = call(cb, before, {"train_loss": 5.0}, 0)
    chex.assert_trees_all_equal(state, before)
    assert bool(actions.events[MISSING])
    assert not bool(actions.events[REDUCED])
    assert float(actions.lr_scale) == 1.0
    # present again: the events swap
    state, actions = call(cb, before, {"val_loss": 5.0}, 1)
    assert not bool(actions.events[MISSING])


def test_action_names_are_declared_and_match_actions():
    cb = ReduceLROnPlateau()
    names = cb.action_names()
    assert names.events == (REDUCED, MISSING)
    assert names.slots == () and names.log == ()
    _, actions = cb(cb.init(), {"val_loss": 1.0}, step=0)
    assert sorted(actions.events) == sorted(names.events)


def test_scaled_lr_applies_factor_floor_and_eps():
    cb = ReduceLROnPlateau(factor=0.5, patience=0, threshold=0.0, min_lr=0.25, eps=0.0)
    state = state_of(1.0)
    lrs = []
    lr = jnp.float32(1.0)
    for step in range(4):
        state, actions = cb(state, {"val_loss": 2.0}, step=step)
        lr = fcb.scaled_lr(lr, actions)
        lrs.append(float(lr))
    assert lrs == [0.5, 0.25, 0.25, 0.25]
    # eps larger than the change: the rule fires but the LR is left alone
    cb = ReduceLROnPlateau(factor=0.5, patience=0, threshold=0.0, eps=0.5)
    _, actions = cb(state_of(1.0), {"val_loss": 2.0}, step=0)
    assert bool(actions.events[REDUCED])
    assert float(fcb.scaled_lr(jnp.float32(1.0), actions)) == 1.0
    assert float(fcb.scaled_lr(jnp.float32(2.0), actions)) == 1.0


def test_chain_with_early_stopping():
    cb = fcb.chain(
        ReduceLROnPlateau(factor=0.5, patience=0, threshold=0.0),
        fcb.EarlyStopping(patience=2),
    )
    state = cb.init()
    for step, value in enumerate([1.0, 2.0, 2.0]):
        state, actions = cb(state, {"val_loss": value}, step=step)
    assert bool(actions.stop)
    assert float(actions.lr_scale) == 0.5


# --- parity with torch.optim.lr_scheduler.ReduceLROnPlateau ------------------------------------


class RecordingTorchPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """torch's scheduler, recording the checks at which its rule fired.

    With `magnitude_rel=True` its relative margin is taken of `|best|` (fcb's rule, which
    is torch's for a best >= 0): `best -/+ threshold * |best|`, computed as torch does,
    `best * (1 -/+ threshold)`, with the factor's sign chosen by the sign of best.
    """

    def __init__(self, *args, magnitude_rel=False, **kwargs):
        self.fired_at: list[int] = []
        self.magnitude_rel = magnitude_rel
        super().__init__(*args, **kwargs)

    def _is_better(self, a, best):
        if self.magnitude_rel and self.threshold_mode == "rel":
            toward = -1.0 if self.mode == "min" else 1.0
            sign = 1.0 if best >= 0 else -1.0
            # an infinite best (no finite check yet) is its own bound (torch's inf * 0 is
            # NaN for threshold 1, after which nothing improves)
            bound = best * (1.0 + toward * sign * self.threshold) if math.isfinite(best) else best
            return a < bound if self.mode == "min" else a > bound
        return super()._is_better(a, best)

    def _reduce_lr(self, epoch):
        self.fired_at.append(epoch - 1)  # torch counts checks from 1
        super()._reduce_lr(epoch)


assert hasattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "_reduce_lr")
assert hasattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "_is_better")


@jax.jit
def _check_and_scale(callback, state, value, step, lr):
    state, actions = callback(state, {"val_loss": value}, step=step)
    return state, actions.events[REDUCED], fcb.scaled_lr(lr, actions)


def _dyadic(numerator_max, exponent_max):
    """Numbers `c / 2**d` with a few significant bits: exact in float32 and in float64."""
    return st.builds(
        lambda c, d: c / 2.0**d, st.integers(1, numerator_max), st.integers(0, exponent_max)
    )


@st.composite
def plateau_cases(draw):
    """A configuration, an initial LR and a metric history on which float32 is exact.

    fcb compares in float32 and its adapters hold the LR in float32; torch uses Python floats.
    The decisions agree exactly whenever every quantity involved is exact in float32:

    - threshold 0: the bound is `best` itself, so any float32 metric works;
    - threshold `j / 256` (up to 2): metrics are multiples of 1/16 up to 16 in magnitude, so
      `best * (1 - threshold)` and `best - threshold` need at most 18 significant bits;
    - factor `m / 2**e`: after k reductions the LR is `lr0 * m**k / 2**(e*k)`, and a change
      `lr - lr * factor` has one more factor `(2**e - m)`; the factor is drawn so that both fit
      in 24 bits for the largest possible number of reductions (one per `patience + 1`
      checks), and so that the LR stays a normal float32;
    - `lr0` is a power of two; `min_lr` and `eps` have at most 4 significant bits.

    The reference is torch's scheduler with its relative margin taken of `|best|` (see
    `RecordingTorchPlateau`), which is torch itself unless the best is negative (or the
    relative threshold is >= 1, where torch's first bound `inf * 0` is NaN).

    Excluded, and why: subnormal metrics (XLA on CPU flushes them to zero, torch does not);
    a good-direction infinity (`-inf` in min mode, `+inf` in max mode), where fcb differs
    from torch by design (see `test_good_direction_infinity_differs_from_torch_as_documented`).
    """
    mode = draw(st.sampled_from(["min", "max"]))
    threshold_mode = draw(st.sampled_from(["rel", "abs"]))
    patience = draw(st.integers(0, 5))
    cooldown = draw(st.integers(0, 4))
    threshold = draw(st.one_of(st.just(0.0), st.integers(1, 512).map(lambda j: j / 256)))
    if threshold == 0.0:
        finite = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    else:
        finite = st.integers(-256, 256).map(lambda k: k / 16)
    bad_infinity = INF if mode == "min" else -INF
    value = st.one_of(finite, st.just(NAN), st.just(bad_infinity))
    # A small pool drawn from repeatedly makes ties and repeated values common.
    pool = draw(st.lists(value, min_size=1, max_size=5))
    length = draw(st.integers(1, 40))
    history = draw(
        st.lists(st.one_of(st.sampled_from(pool), value), min_size=length, max_size=length)
    )

    max_reductions = max(1, len(history) // (patience + 1))
    factors = [
        m / 2**e
        for e in range(1, 7)
        for m in range(1, 2**e, 2)
        if math.floor(max_reductions * math.log2(m)) + 1 + e <= 24 and e * max_reductions <= 100
    ]
    factor = draw(st.sampled_from(factors))
    lr0 = 2.0 ** draw(st.integers(-3, 3))
    min_lr = draw(st.one_of(st.just(0.0), _dyadic(15, 12).map(lambda x: x * lr0)))
    eps = draw(st.one_of(st.just(0.0), _dyadic(15, 30).map(lambda x: x * lr0)))
    config = dict(
        mode=mode, threshold_mode=threshold_mode, patience=patience, cooldown=cooldown,
        threshold=threshold, factor=factor, min_lr=min_lr, eps=eps,
    )
    return config, lr0, history


def _run_torch(config, lr0, history, *, float32_exact=True, magnitude_rel=False):
    """torch's LR and internal counters after every check, and the checks where it fired.

    With `float32_exact`, also check the preconditions of exact parity (see plateau_cases):
    if one fails, the strategy is wrong, not the callback.
    """
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=lr0)
    scheduler = RecordingTorchPlateau(optimizer, magnitude_rel=magnitude_rel, **config)
    trace = []
    for value in history:
        old_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step(value)
        lr = optimizer.param_groups[0]["lr"]
        if float32_exact:
            candidate = max(old_lr * config["factor"], config["min_lr"])
            assert float(np.float32(lr)) == lr, f"LR {lr!r} is not exact in float32"
            assert float(np.float32(old_lr - candidate)) == old_lr - candidate
        trace.append(
            (lr, scheduler.best, scheduler.num_bad_epochs, scheduler.cooldown_counter)
        )
    return trace, scheduler.fired_at


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plateau_cases())
def test_parity_with_torch(case):
    config, lr0, history = case
    torch_trace, torch_fired = _run_torch(config, lr0, history, magnitude_rel=True)
    bests = [b for _, b, _, _ in torch_trace if math.isfinite(b)]
    rel = config["threshold_mode"] == "rel"
    if not rel or (min(bests, default=0.0) >= 0 and config["threshold"] < 1):
        # where torch's relative rule is right (abs margins, a best >= 0) fcb's is torch's
        assert _run_torch(config, lr0, history) == (torch_trace, torch_fired)
    event(f"a negative best with a relative margin: {min(bests, default=0.0) < 0}")

    cb = ReduceLROnPlateau("val_loss", **config)
    state, lr = cb.init(), jnp.float32(lr0)
    fired = []
    for step, (value, expected) in enumerate(zip(history, torch_trace, strict=True)):
        state, reduced, lr = _check_and_scale(
            cb, state, np.float32(value), np.int32(step), lr
        )
        if bool(reduced):
            fired.append(step)
        torch_lr, torch_best, torch_bad, torch_cooldown = expected
        assert float(lr) == torch_lr, (step, value)
        assert float(state.best) == torch_best, (step, value)
        assert int(state.num_bad_checks) == torch_bad, (step, value)
        assert int(state.cooldown_count) == torch_cooldown, (step, value)
    assert fired == torch_fired
    changes = sum(a[0] != b[0] for a, b in zip([(lr0,), *torch_trace], torch_trace))
    event(f"rule fired {min(len(fired), 3)}{'+' if len(fired) >= 3 else ''} times")
    event(f"a firing left the LR unchanged (floor or eps): {changes < len(fired)}")
    event(f"threshold == 0 (any float32 metric): {config['threshold'] == 0.0}")
    event(f"factor is a power of two: {math.log2(config['factor']).is_integer()}")
    assert int(state.num_reductions) == len(torch_fired)
    assert int(state.last_reduced_step) == (torch_fired[-1] if torch_fired else -1)


def test_parity_with_torch_defaults_on_a_plateau():
    """The default options (threshold 1e-4 rel, eps 1e-8, patience 10) agree on a plain run."""
    history = [1.0, 0.5, 0.25] + [0.25] * 30 + [0.125] + [0.2] * 20
    config = dict(mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                  cooldown=0, min_lr=0.0, eps=1e-8)
    _, torch_fired = _run_torch(config, 1.0, history, float32_exact=False)
    assert torch_fired == [13, 24, 44]
    cb = ReduceLROnPlateau()
    _, actions = run(cb, {"val_loss": np.asarray(history)})
    assert np.flatnonzero(np.asarray(actions.events[REDUCED])).tolist() == torch_fired


@pytest.mark.parametrize("mode, infinity", [("min", -INF), ("max", INF)])
def test_good_direction_infinity_differs_from_torch_as_documented(mode, infinity):
    history = [1.0, infinity, 1.0, 1.0]
    config = dict(mode=mode, factor=0.5, patience=5, threshold=0.0, threshold_mode="abs",
                  cooldown=0, min_lr=0.0, eps=0.0)
    torch_trace, _ = _run_torch(config, 1.0, history)
    assert torch_trace[1][1] == infinity  # torch takes the infinity as its best
    cb = ReduceLROnPlateau(**config)
    state, _ = run(cb, {"val_loss": np.asarray(history)})
    assert float(state.best) == 1.0  # fcb never does
    assert int(state.num_bad_checks) == 3


# --- jit, scan, vmap, resume -------------------------------------------------------------------

HISTORIES = {
    "plateau": [1.0, 0.9, 0.95, 0.97, 0.99, 0.98, 0.5, 0.6, 0.6, 0.6, 0.6],
    "nan_and_ties": [2.0, NAN, 2.0, 2.0, -1.0, -1.0, NAN, INF, -1.0, -1.5, -1.5],
    "negative_max": [-4.0, -3.0, -3.0, -3.5, -2.0, -2.0, -2.5, -3.0, -1.0, -1.0],
}

CONFIGS = {
    "defaults": {},
    "cooldown_floor": dict(factor=0.5, patience=1, cooldown=2, min_lr=0.2, eps=0.0),
    "abs_max": dict(mode="max", factor=0.25, patience=0, threshold=0.5, threshold_mode="abs"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_eager_jit_scan_equivalent(config, history):
    assert_jit_equivalent(ReduceLROnPlateau(**config), {"val_loss": np.asarray(history)})


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_resume_equivalent_at_every_split(config, history):
    assert_resume_equivalent(ReduceLROnPlateau(**config), {"val_loss": np.asarray(history)})


def test_vmap_over_patience_equals_single_runs():
    patiences = [0, 1, 2, 4]
    stacked = jax.vmap(lambda p: ReduceLROnPlateau(factor=0.5, patience=p))(
        jnp.array(patiences)
    )
    singles = [ReduceLROnPlateau(factor=0.5, patience=p) for p in patiences]
    assert_vmap_equivalent(stacked, singles, {"val_loss": np.asarray(HISTORIES["plateau"])})


def test_vmap_over_every_numeric_option_equals_single_runs():
    options = dict(
        factor=[0.5, 0.1, 0.25],
        patience=[0, 1, 2],
        threshold=[0.0, 0.1, 1e-4],
        cooldown=[0, 2, 1],
        min_lr=[0.0, 0.01, 0.2],
        eps=[1e-8, 0.0, 0.05],
    )
    stacked = jax.vmap(lambda kw: ReduceLROnPlateau(mode="min", threshold_mode="abs", **kw))(
        {k: jnp.asarray(v) for k, v in options.items()}
    )
    singles = [
        ReduceLROnPlateau(mode="min", threshold_mode="abs", **{k: v[i] for k, v in options.items()})
        for i in range(3)
    ]
    history = {"val_loss": np.asarray(HISTORIES["nan_and_ties"])}
    assert_vmap_equivalent(stacked, singles, history)
    # the configurations really do decide differently on this history
    decisions = {
        tuple(np.asarray(run(cb, history)[1].events[REDUCED]).tolist()) for cb in singles
    }
    assert len(decisions) == 3


def test_state_dict_round_trip_and_wrong_callback():
    cb = ReduceLROnPlateau(patience=0, threshold=0.0)
    state, _ = run(cb, {"val_loss": np.asarray([1.0, 2.0, NAN])})
    restored = fcb.load_state_dict(cb, fcb.state_dict(state, cb))
    chex.assert_trees_all_equal(restored, state)
    es = fcb.EarlyStopping()
    with pytest.raises(fcb.StateDictError, match="belongs to a ReduceLROnPlateau callback"):
        fcb.load_state_dict(es, fcb.state_dict(state, cb))


# --- bad input ---------------------------------------------------------------------------------


FACTOR_RANGE = r"`factor` must be a finite number in \(0.0, 1.0\), got factor = "


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factor=1.0), FACTOR_RANGE + r"1.0"),
        (dict(factor=1.5), FACTOR_RANGE + r"1.5"),
        (dict(factor=0.0), FACTOR_RANGE + r"0.0"),
        (dict(factor=-0.5), FACTOR_RANGE + r"-0.5"),
        (dict(factor=NAN), FACTOR_RANGE + r"nan"),
        (dict(factor="0.1"), r"`factor` must be a number, got factor = '0.1'"),
        (dict(factor=True), r"`factor` must be a real number, got factor = True"),
        (dict(patience=-1), r"`patience` must be an integer >= 0, got patience = -1"),
        (dict(patience=1.5), r"`patience` must be an integer, got patience = 1.5"),
        (dict(patience=None), r"`patience` must be a number, got patience = None"),
        (dict(cooldown=-2), r"`cooldown` must be an integer >= 0, got cooldown = -2"),
        (dict(threshold=-1e-4),
         r"`threshold` must be a finite number >= 0.0, got threshold = -0.0001. The sign is set"),
        (dict(threshold=INF), r"`threshold` must be a finite number >= 0.0, got threshold = inf"),
        (dict(min_lr=-0.1), r"`min_lr` must be a finite number >= 0.0, got min_lr = -0.1"),
        (dict(eps=-1e-8), r"`eps` must be a finite number >= 0.0, got eps = -1e-08"),
        (dict(eps=NAN), r"`eps` must be a finite number >= 0.0, got eps = nan"),
        (dict(mode="minimum"), r"`mode` must be 'min' or 'max', got mode = 'minimum'"),
        (dict(threshold_mode="relative"),
         r"`threshold_mode` must be 'abs' or 'rel', got threshold_mode = 'relative'"),
        (dict(monitor=""), r"`monitor` must be a non-empty metric name \(str\), got monitor = ''"),
        (dict(monitor=3), r"`monitor` must be a non-empty metric name \(str\), got monitor = 3"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(fcb.ConfigError, match="^ReduceLROnPlateau: " + match):
        ReduceLROnPlateau(**kwargs)


def test_bad_config_in_a_batch_is_caught():
    with pytest.raises(fcb.ConfigError, match=r"`factor` must be a finite number in \(0.0, 1.0\)"):
        ReduceLROnPlateau(factor=np.array([0.5, 1.0]))
    with pytest.raises(fcb.ConfigError, match=r"`patience` must be an integer >= 0"):
        ReduceLROnPlateau(patience=np.array([1, -1]))


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({"val_loss": "0.5"}, fcb.MetricTypeError, "'val_loss' must be a real scalar, got str"),
        ({"val_loss": None}, fcb.MetricTypeError, "'val_loss' must be a real scalar, got None"),
        ({"val_loss": np.ones(3)}, fcb.MetricShapeError, "'val_loss' must be a scalar, got shape"),
        ([("val_loss", 0.5)], fcb.MetricTypeError, "metrics must be a mapping from name to scalar"),
    ],
)
def test_bad_metrics(metrics, error, match):
    cb = ReduceLROnPlateau()
    with pytest.raises(error, match="^ReduceLROnPlateau: (metric )?" + match):
        cb(cb.init(), metrics, step=0)
