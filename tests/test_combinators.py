"""fcb.all_of / fcb.any_of: a conjunction of stop conditions, and the chain's rule by name."""

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


def _pair(patience_loss=1, patience_acc=1, **loss_options):
    return fcb.all_of(
        fcb.named_chain(loss=fcb.EarlyStopping("val_loss", patience=patience_loss, **loss_options)),
        fcb.named_chain(acc=fcb.EarlyStopping("val_acc", mode="max", patience=patience_acc)),
    )


def _holds(values, patience, mode):
    """Plain Python: at each check, whether `EarlyStopping(patience)`'s condition holds (it
    has not improved for `patience` checks), asked afresh at every check (never latched)."""
    best = float("inf") if mode == "min" else float("-inf")
    wait, out = 0, []
    for v in values:
        v = float(np.float32(v))
        improved = v < best if mode == "min" else v > best
        if improved:
            best, wait = v, 0
        else:
            wait += 1
        out.append(not improved and wait >= patience)
    return out


def _first_all(*conditions):
    for i, held in enumerate(zip(*conditions)):
        if all(held):
            return i
    return -1


_CHECK = jax.jit(lambda cb, state, metrics, step: cb(state, metrics, step=step))


def _last(actions):
    return jax.tree_util.tree_map(lambda a: a[-1], actions)


HISTORY = {
    "val_loss": np.array([0.5, 0.6, 0.4, 0.45, 0.46, 0.3, 0.35, 0.36]),
    "val_acc": np.array([0.7, 0.8, 0.75, 0.74, 0.9, 0.85, 0.84, 0.83]),
}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=20),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_all_of_equals_a_hand_written_conjunction(pairs, patience_loss, patience_acc):
    loss = [a / 8 for a, _ in pairs]
    acc = [b / 8 for _, b in pairs]
    expected = _first_all(_holds(loss, patience_loss, "min"), _holds(acc, patience_acc, "max"))
    cb = _pair(patience_loss, patience_acc)
    state, stops = cb.init(), []
    for i, (a, b) in enumerate(zip(loss, acc, strict=True)):
        # patience is an array leaf: one compilation serves every example
        state, actions = _CHECK(cb, state, {"val_loss": a, "val_acc": b}, i)
        stops.append(bool(actions.stop))
    stops = np.asarray(stops)
    assert int(state.stopped_step) == expected
    if expected >= 0:
        assert not stops[:expected].any() and stops[expected:].all()
    else:
        assert not stops.any()


def test_a_member_whose_condition_held_alone_keeps_checking():
    cb = _pair()
    state, actions = run(cb, HISTORY)
    # loss held at 1 (acc improved), acc held at 2 (loss improved): neither stops the pair;
    # at 3 both held
    assert np.asarray(actions.stop).tolist() == [False, False, False, True] + [True] * 4
    loss_state = state.members[0]["loss"]
    assert int(loss_state.best_step) == 2  # the loss's improvement at 2 was counted
    assert int(state.stopped_step) == 3


def test_stop_message_reports_every_member():
    cb = _pair()
    state, actions = run(cb, HISTORY)
    message = fcb.stop_message(cb, state, _last(actions))
    assert message.startswith("every condition held at step 3 (fcb.all_of): ")
    assert (
        "val_loss did not improve for 1 check (patience=1, min_delta=0); best 0.4 at step 2"
        in message
    )
    assert (
        "; and val_acc did not improve for 2 checks (patience=1, min_delta=0); best 0.8 at step 1"
        in message
    )


def test_all_of_with_terminate_on_nan_member():
    cb = fcb.all_of(fcb.EarlyStopping("val_loss", patience=0), fcb.TerminateOnNaN(("loss",)))
    history = {
        "val_loss": np.array([1.0, 2.0, 0.5, 3.0]),
        "loss": np.array([np.nan, 1.0, np.nan, np.nan]),
    }
    state, actions = run(cb, history)
    # check 0: NaN, but val_loss improved; check 2: NaN, improved; check 3: both
    assert np.asarray(actions.stop).tolist() == [False, False, False, True]
    assert "loss is NaN or infinite (TerminateOnNaN) at step 3" in fcb.stop_message(
        cb, state, _last(actions)
    )


@pytest.mark.parametrize("make", [lambda: _pair(), lambda: _pair(2, 0, min_delta=0.05)])
def test_jit_scan_and_resume_equivalent(make):
    assert_jit_equivalent(make(), HISTORY)
    assert_resume_equivalent(make(), HISTORY)


def test_vmap_over_a_grid_equals_each_configuration():
    grid = fcb.grid(_pair, patience_loss=[0, 1, 2], patience_acc=[1, 3])
    singles = [_pair(**c) for c in grid.configs]
    assert_vmap_equivalent(grid.callback, singles, HISTORY)


def test_composes_with_chain_and_does_not_retrace():
    cb = fcb.chain(_pair(), fcb.ModelCheckpoint("val_loss"))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def check(state, metrics, step):
        return cb(state, metrics, step=step)

    state = cb.init()
    for i in range(len(HISTORY["val_loss"])):
        metrics = {k: jnp.float32(v[i]) for k, v in HISTORY.items()}
        state, actions = check(state, metrics, jnp.int32(i))
    assert bool(actions.stop) and int(actions.slots["best_model"]) == 5


def test_state_dict_round_trip():
    cb = _pair()
    state, _ = run(cb, HISTORY, stop=3)
    chex.assert_trees_all_equal(fcb.load_state_dict(cb, fcb.state_dict(state, cb)), state)


def test_any_of_is_the_chain_rule():
    members = (fcb.EarlyStopping("val_loss", patience=1), fcb.TerminateOnNaN(("val_acc",)))
    any_state, any_actions = run(fcb.any_of(*members), HISTORY)
    chain_state, chain_actions = run(fcb.chain(*members), HISTORY)
    chex.assert_trees_all_equal(any_state, chain_state)
    chex.assert_trees_all_equal(any_actions, chain_actions)


def test_all_of_needs_two_callbacks():
    with pytest.raises(fcb.ConfigError, match=r"fcb\.all_of: give at least two callbacks"):
        fcb.all_of(fcb.EarlyStopping("val_loss"))
    with pytest.raises(fcb.ConfigError, match=r"fcb\.all_of: callback 1 \(int\) must be an"):
        fcb.all_of(fcb.EarlyStopping("val_loss"), 3)
