"""fcb.stop_message: the metric, the setting and the values; no backticks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import fcb
from fcb.testing import run

KEY = "val_loss"


def _message(callback, values, key=KEY):
    state, actions = run(callback, {key: np.asarray(values)} if isinstance(key, str) else values)
    return fcb.stop_message(callback, state, jax.tree_util.tree_map(lambda a: a[-1], actions))


def test_patience():
    es = fcb.EarlyStopping(KEY, patience=2, min_delta=0.001)
    assert _message(es, [0.5, 0.4461, 0.45, 0.4455]) == (
        "val_loss did not improve for 2 checks (patience=2, min_delta=0.001); best 0.4461 at step 1"
    )


def test_relative_min_delta_and_baseline():
    es = fcb.EarlyStopping(KEY, patience=1, min_delta=0.1, threshold_mode="rel", baseline=0.3)
    assert _message(es, [0.5, 0.4]) == (
        "val_loss did not improve for 1 check (patience=1, min_delta=0.1 relative to |best|); "
        "no check beat the baseline 0.3"
    )


def test_thresholds_and_non_finite():
    es = fcb.EarlyStopping(KEY, stopping_threshold=0.1, divergence_threshold=5.0)
    assert _message(es, [0.5, 0.05]) == (
        "val_loss reached stopping_threshold=0.1 at step 1; best 0.05 at step 1"
    )
    assert _message(es, [0.5, 6.0]) == (
        "val_loss crossed divergence_threshold=5 at step 1; best 0.5 at step 0"
    )
    assert _message(es, [0.5, float("nan")]) == (
        "val_loss is NaN or infinite (check_finite=True) at step 1; best 0.5 at step 0"
    )
    assert _message(es, [float("inf")]) == (
        "val_loss is NaN or infinite (check_finite=True) at step 0; no finite value yet"
    )


def test_terminate_on_nan():
    guard = fcb.TerminateOnNaN(("loss", "grad_norm"))
    history = {"loss": np.array([1.0, 0.9]), "grad_norm": np.array([1.0, np.inf])}
    assert _message(guard, history, key=None) == (
        "grad_norm is NaN or infinite (TerminateOnNaN) at step 1; watched keys: loss, grad_norm"
    )


def test_a_chain_reports_its_first_stopping_member():
    cb = fcb.named_chain(
        ckpt=fcb.ModelCheckpoint(KEY),
        stop=fcb.EarlyStopping(KEY, patience=1),
        guard=fcb.TerminateOnNaN((KEY,)),
    )
    assert _message(cb, [0.5, float("nan")]) == (
        "val_loss is NaN or infinite (check_finite=True) at step 1; best 0.5 at step 0"
    )


def test_not_stopping_is_empty_and_a_batch_falls_back_to_the_generic_message():
    es = fcb.EarlyStopping(KEY, patience=5)
    assert _message(es, [0.5, 0.6]) == ""
    grid = fcb.grid(fcb.EarlyStopping, monitor=KEY, patience=[0])
    state, actions = run(grid, {KEY: np.asarray([0.5, 0.6])})
    last = jax.tree_util.tree_map(lambda a: a[-1, 0], actions)
    assert fcb.stop_message(grid, state, last) == (
        "the monitored metric did not improve for patience consecutive checks"
    )


@pytest.mark.parametrize("reason", list(fcb.StopReason))
def test_generic_messages_have_no_backticks(reason):
    assert "`" not in reason.message
