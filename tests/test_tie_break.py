"""Tie-break: ModelCheckpoint / BestCheckpoint order checks of equal value by a second metric."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb.testing import assert_jit_equivalent, assert_resume_equivalent, assert_vmap_equivalent, run

NAN = float("nan")


def _reference_top_k(checks, k, mode, tie_mode):
    """Plain Python: the kept (step, ...) best first, after each check.

    Key: the value (better first), then the second value (better first, NaN last), then the
    order of entry (oldest first). A finite value enters when the table has room or its key
    is strictly better than the worst kept key (ignoring entry order); it evicts the oldest of
    the entries tied with the worst in value and second value.
    """
    sign = 1 if mode == "min" else -1
    tie_sign = 1 if tie_mode == "min" else -1

    def key(entry):
        value, tie, _, entered = entry
        tie_rank = float("inf") if np.isnan(tie) else tie_sign * tie
        return (sign * value, tie_rank, entered)

    table, out = [], []
    for step, (value, tie) in enumerate(checks):
        value, tie = float(np.float32(value)), float(np.float32(tie))
        entry = (value, tie, step, step)
        if np.isfinite(value):
            if len(table) < k:
                table.append(entry)
            else:
                worst = max(table, key=key)
                if key(entry)[:2] < key(worst)[:2]:
                    tied = [e for e in table if key(e)[:2] == key(worst)[:2]]
                    table.remove(min(tied, key=lambda e: e[3]))
                    table.append(entry)
        table.sort(key=key)
        out.append([e[2] for e in table])
    return out


_CHECK = jax.jit(lambda cb, state, metrics, step: cb(state, metrics, step=step))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.25, 0.5, 0.75, NAN]), st.sampled_from([1.0, 2.0, 3.0, NAN])),
        min_size=1,
        max_size=14,
    ),
    st.integers(1, 4),
    st.sampled_from(["min", "max"]),
    st.sampled_from(["min", "max"]),
)
def test_model_checkpoint_tie_break_matches_a_reference(checks, k, mode, tie_mode):
    ckpt = fcb.ModelCheckpoint(
        "val_loss", mode=mode, save_top_k=k, tie_break="val_acc", tie_break_mode=tie_mode
    )
    expected = _reference_top_k(checks, k, mode, tie_mode)
    state = ckpt.init()
    for step, (value, tie) in enumerate(checks):
        metrics = {"val_loss": jnp.float32(value), "val_acc": jnp.float32(tie)}
        state, actions = _CHECK(ckpt, state, metrics, jnp.int32(step))
        kept = [int(actions.slots[s]) for s in ckpt.rank_slots()]
        assert [s for s in kept if s >= 0] == expected[step], (step, kept)


def test_without_tie_break_the_oldest_of_equal_values_is_the_best():
    history = {"val_loss": np.array([0.3, 0.3, 0.3]), "val_acc": np.array([0.8, 0.9, 0.85])}
    plain = run(fcb.ModelCheckpoint("val_loss", save_top_k=2), history)[1]
    tied = run(
        fcb.ModelCheckpoint("val_loss", save_top_k=2, tie_break="val_acc", tie_break_mode="max"),
        history,
    )[1]
    assert int(plain.slots["best_model"][-1]) == 0
    assert int(tied.slots["best_model"][-1]) == 1
    assert int(tied.slots["best_model-top2"][-1]) == 2


HISTORY = {
    "val_loss": np.array([0.5, 0.4, 0.4, 0.45, 0.4, 0.3, 0.3, 0.35]),
    "val_acc": np.array([0.6, 0.7, 0.8, 0.5, 0.75, 0.6, 0.65, 0.9]),
}


@pytest.mark.parametrize(
    "make",
    [
        lambda: fcb.ModelCheckpoint(
            "val_loss", save_top_k=3, tie_break="val_acc", tie_break_mode="max"
        ),
        lambda: fcb.BestCheckpoint(
            "val_loss", tolerances=(1, 2), tie_break="val_acc", tie_break_mode="max"
        ),
    ],
    ids=["model_checkpoint", "best_checkpoint"],
)
def test_jit_scan_and_resume_equivalent(make):
    assert_jit_equivalent(make(), HISTORY)
    assert_resume_equivalent(make(), HISTORY)


def test_best_checkpoint_tie_break_moves_the_overall_best_only():
    cb = fcb.BestCheckpoint("val_loss", tolerances=(5,), tie_break="val_acc", tie_break_mode="max")
    state, actions = run(cb, HISTORY)
    assert int(state.best_step) == 6  # 0.3 at 5 and 6; 6 has the better accuracy
    assert float(state.best_tie) == np.float32(0.65)
    # the tolerance slot follows EarlyStopping: a tie is not an improvement
    assert int(actions.slots["best.val_loss.tolerance=5"][-1]) == 5
    plain = run(fcb.BestCheckpoint("val_loss", tolerances=(5,)), HISTORY)[0]
    assert int(plain.best_step) == 5


def test_grid_over_every_n_with_a_tie_break():
    grid = fcb.grid(fcb.ModelCheckpoint, monitor="val_loss", tie_break="val_acc", every_n=[1, 2])
    singles = [fcb.ModelCheckpoint("val_loss", tie_break="val_acc", every_n=n) for n in (1, 2)]
    assert_vmap_equivalent(grid.callback, singles, HISTORY)


def test_tie_break_must_name_another_metric():
    with pytest.raises(fcb.ConfigError, match=r"ModelCheckpoint: `tie_break` must name another"):
        fcb.ModelCheckpoint("val_loss", tie_break="val_loss")
    with pytest.raises(
        fcb.ConfigError, match=r"`tie_break_mode` must be 'min' or 'max', got tie_break_mode = 'up'"
    ):
        fcb.BestCheckpoint("val_loss", tie_break="val_acc", tie_break_mode="up")
