"""Callback base class, Actions, merge_actions, scaled_lr and StopReason."""

from __future__ import annotations

import dataclasses
import math

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb import StopReason


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    return jax.jit if request.param else (lambda f, **kwargs: f)


def _actions(names=None, **fields):
    """Inactive actions with some fields set (Python values become arrays of the field dtype)."""
    base = fcb.Actions.no_actions(fcb.ActionNames() if names is None else names)
    converted = {}
    for key, value in fields.items():
        old = getattr(base, key)
        if isinstance(old, dict):
            converted[key] = {k: jnp.asarray(v, old[k].dtype if k in old else None)
                              for k, v in value.items()}
        else:
            converted[key] = jnp.asarray(value, old.dtype)
    return dataclasses.replace(base, **converted)


def _stopping(reason):
    return _actions(stop=True, stop_reason=int(reason))


# --- Callback ---------------------------------------------------------------------------------


def test_callback_cannot_be_instantiated():
    with pytest.raises(TypeError, match=r"fcb\.Callback is abstract: subclass it"):
        fcb.Callback()


class _OnlyInit(fcb.Callback):
    def init(self):
        return jnp.asarray(7, jnp.int32)


class _OnlyCall(fcb.Callback):
    def __call__(self, state, metrics, *, step):
        return state, dataclasses.replace(self.no_actions(), stop=jnp.asarray(True))


class _Named(fcb.Callback):
    def action_names(self):
        return fcb.ActionNames(slots=("best",), log=("lr",), events=("improved",))


def test_subclass_overriding_only_init_uses_no_op_defaults():
    cb = _OnlyInit()
    assert isinstance(cb, eqx.Module)
    state = cb.init()
    new_state, actions = cb(state, {"loss": 1.0}, step=0)
    chex.assert_trees_all_equal(new_state, state)
    chex.assert_trees_all_equal(actions, fcb.Actions.no_actions())
    final_state, final_actions = cb.finalize(new_state)
    chex.assert_trees_all_equal(final_state, state)
    chex.assert_trees_all_equal(final_actions, fcb.Actions.no_actions())
    assert cb.action_names() == fcb.ActionNames()


def test_subclass_overriding_only_call_gets_the_empty_initial_state():
    cb = _OnlyCall()
    assert cb.init() == ()
    state, actions = jax.jit(lambda s: cb(s, {}, step=0))(cb.init())
    assert state == ()
    assert bool(actions.stop)


def test_no_actions_carries_the_declared_names():
    actions = _Named().no_actions()
    assert set(actions.slots) == {"best"}
    assert set(actions.slot_values) == {"best"}
    assert set(actions.log) == {"lr"}
    assert set(actions.events) == {"improved"}
    _, called = _Named()((), {}, step=0)
    chex.assert_trees_all_equal(called, actions)


# --- Actions.no_actions -----------------------------------------------------------------------


def test_no_actions_defaults(maybe_jit):
    names = fcb.ActionNames(slots=("best", "last"), log=("value",), events=("improved",))
    actions = maybe_jit(lambda: fcb.Actions.no_actions(names))()
    expected = {
        "stop": (False, jnp.bool_),
        "stop_reason": (int(StopReason.NONE), jnp.int32),
        "save": (False, jnp.bool_),
        "lr_scale": (1.0, jnp.float32),
        "min_lr": (0.0, jnp.float32),
        "min_lr_change": (0.0, jnp.float32),
    }
    for field, (value, dtype) in expected.items():
        leaf = getattr(actions, field)
        assert leaf.shape == () and leaf.dtype == dtype, field
        assert leaf.item() == value, field
    assert int(StopReason.NONE) == 0
    for name in ("best", "last"):
        assert actions.slots[name].dtype == jnp.int32
        assert int(actions.slots[name]) == fcb.NO_STEP == -1
        assert actions.slot_values[name].dtype == jnp.float32
        assert math.isnan(float(actions.slot_values[name]))
    assert actions.log["value"].dtype == jnp.float32 and math.isnan(float(actions.log["value"]))
    assert actions.events["improved"].dtype == jnp.bool_ and not bool(actions.events["improved"])
    assert actions.stop_message() == "training was not stopped"


def test_no_actions_without_names_is_empty():
    actions = fcb.Actions.no_actions()
    assert actions.slots == actions.slot_values == actions.log == actions.events == {}


# --- merge_actions ----------------------------------------------------------------------------


def test_merge_of_nothing_is_no_actions():
    chex.assert_trees_all_equal(fcb.merge_actions([]), fcb.Actions.no_actions())


@pytest.mark.parametrize(
    ("parts", "stop", "reason"),
    [
        ([None, None], False, StopReason.NONE),
        ([None, StopReason.PATIENCE], True, StopReason.PATIENCE),
        ([StopReason.NON_FINITE, StopReason.PATIENCE], True, StopReason.NON_FINITE),
        ([StopReason.PATIENCE, StopReason.NON_FINITE], True, StopReason.PATIENCE),
        ([None, StopReason.DIVERGENCE_THRESHOLD, StopReason.TERMINATE_ON_NAN], True,
         StopReason.DIVERGENCE_THRESHOLD),
    ],
)
def test_merge_stop_is_any_and_reason_is_the_first_stopping(maybe_jit, parts, stop, reason):
    actions = [_actions() if p is None else _stopping(p) for p in parts]
    merged = maybe_jit(fcb.merge_actions)(actions)
    assert bool(merged.stop) is stop
    assert int(merged.stop_reason) == reason
    assert merged.stop_reason.dtype == jnp.int32


def test_merge_ignores_the_reason_of_a_callback_that_does_not_stop(maybe_jit):
    # A reason code without the stop flag must not win over a later callback that does stop.
    stray = _actions(stop=False, stop_reason=int(StopReason.NON_FINITE))
    merged = maybe_jit(fcb.merge_actions)([stray, _stopping(StopReason.PATIENCE)])
    assert int(merged.stop_reason) == StopReason.PATIENCE


@pytest.mark.parametrize(("saves", "expected"),
                         [([False, False], False), ([False, True], True), ([True, True], True)])
def test_merge_save_is_any(maybe_jit, saves, expected):
    merged = maybe_jit(fcb.merge_actions)([_actions(save=s) for s in saves])
    assert bool(merged.save) is expected


def test_merge_numeric_rules(maybe_jit):
    parts = [
        _actions(lr_scale=0.5, min_lr=0.25, min_lr_change=0.0),
        _actions(),
        _actions(lr_scale=0.25, min_lr=0.125, min_lr_change=0.5),
    ]
    merged = maybe_jit(fcb.merge_actions)(parts)
    assert float(merged.lr_scale) == 0.5 * 0.25
    assert float(merged.min_lr) == 0.25
    assert float(merged.min_lr_change) == 0.5
    for field in ("lr_scale", "min_lr", "min_lr_change"):
        assert getattr(merged, field).dtype == jnp.float32


def test_merge_unions_names_and_prefixes_log_and_events(maybe_jit):
    first = _actions(
        fcb.ActionNames(slots=("best",), log=("value",), events=("improved",)),
        slots={"best": 3}, slot_values={"best": 0.5}, log={"value": 0.5}, events={"improved": True},
    )
    second = _actions(
        fcb.ActionNames(slots=("last",), log=("value",), events=("improved",)),
        slots={"last": 4}, slot_values={"last": 0.75}, log={"value": 0.75},
        events={"improved": False},
    )
    merged = maybe_jit(lambda a: fcb.merge_actions(a, prefixes=("a", "b")))([first, second])
    # slots name files: never prefixed
    assert {k: int(v) for k, v in merged.slots.items()} == {"best": 3, "last": 4}
    assert {k: float(v) for k, v in merged.slot_values.items()} == {"best": 0.5, "last": 0.75}
    assert {k: float(v) for k, v in merged.log.items()} == {"a/value": 0.5, "b/value": 0.75}
    assert {k: bool(v) for k, v in merged.events.items()} == {
        "a/improved": True, "b/improved": False}

    unprefixed = fcb.merge_actions([first, _actions(fcb.ActionNames(log=("other",)))])
    assert set(unprefixed.log) == {"value", "other"}
    assert set(unprefixed.events) == {"improved"}


# --- scaled_lr --------------------------------------------------------------------------------


def _torch_reduce_lr(old_lr, factor, min_lr, eps):
    """torch.optim.lr_scheduler.ReduceLROnPlateau._reduce_lr for one parameter group."""
    new_lr = max(old_lr * factor, min_lr)
    if old_lr - new_lr > eps:
        return new_lr
    return old_lr


@pytest.mark.parametrize(
    ("lr", "scale", "min_lr", "min_lr_change", "expected"),
    [
        (1.0, 0.5, 0.0, 0.0, 0.5),
        (1.0, 1.0, 0.0, 0.0, 1.0),  # no_actions leaves the rate alone
        (1.0, 0.125, 0.25, 0.0, 0.25),  # floored at min_lr
        (0.125, 0.5, 0.25, 0.0, 0.125),  # already below the floor: never raised
        (1.0, 0.5, 0.0, 0.5, 1.0),  # change 0.5 <= min_lr_change: skipped
        (1.0, 0.5, 0.0, 0.25, 0.5),
        (1.0, 0.5, 0.75, 0.125, 0.75),  # the floor decides, the change 0.25 > 0.125 is applied
        (1.0, 0.5, 0.75, 0.25, 1.0),  # change 0.25 <= 0.25: skipped
    ],
)
def test_scaled_lr_examples(maybe_jit, lr, scale, min_lr, min_lr_change, expected):
    actions = _actions(lr_scale=scale, min_lr=min_lr, min_lr_change=min_lr_change)
    assert float(maybe_jit(fcb.scaled_lr)(lr, actions)) == expected
    assert _torch_reduce_lr(lr, scale, min_lr, min_lr_change) == expected


def test_scaled_lr_keeps_the_dtype_and_broadcasts():
    actions = _actions(lr_scale=0.5)
    lrs = jnp.asarray([1.0, 0.5, 0.25], jnp.float32)
    out = fcb.scaled_lr(lrs, actions)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [0.5, 0.25, 0.125])


_SCALED_LR = jax.jit(fcb.scaled_lr)


@settings(max_examples=200, deadline=None)
@given(
    lr=st.floats(min_value=2.0**-20, max_value=16.0, width=32),
    factor=st.one_of(st.just(1.0), st.floats(min_value=2.0**-10, max_value=1.0, width=32)),
    min_lr=st.one_of(st.just(0.0), st.floats(min_value=2.0**-20, max_value=16.0, width=32)),
    eps=st.one_of(st.just(0.0), st.just(1e-8), st.floats(min_value=0.0, max_value=4.0, width=32)),
)
def test_scaled_lr_matches_torch(lr, factor, min_lr, eps):
    f32 = np.float32
    expected = _torch_reduce_lr(f32(lr), f32(factor), f32(min_lr), f32(eps))
    actions = _actions(lr_scale=factor, min_lr=min_lr, min_lr_change=eps)
    got = _SCALED_LR(f32(lr), actions)
    assert got.dtype == jnp.float32
    assert float(got) == float(expected)


def test_scaled_lr_applies_the_merged_actions_of_a_chain():
    merged = fcb.merge_actions([_actions(lr_scale=0.5, min_lr=0.0625), _actions(lr_scale=0.5)])
    assert float(fcb.scaled_lr(1.0, merged)) == 0.25
    assert float(fcb.scaled_lr(0.125, merged)) == 0.0625


# --- StopReason -------------------------------------------------------------------------------


def test_stop_reasons_carry_distinct_messages():
    messages = [reason.message for reason in StopReason]
    assert all(isinstance(m, str) and m for m in messages)
    assert len(set(messages)) == len(messages)
    assert len({int(r) for r in StopReason}) == len(StopReason)
    assert StopReason(0) is StopReason.NONE


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (StopReason.NON_FINITE, "NaN or infinite"),
        (StopReason.STOPPING_THRESHOLD, "stopping_threshold"),
        (StopReason.DIVERGENCE_THRESHOLD, "divergence_threshold"),
        (StopReason.PATIENCE, "patience"),
        (StopReason.TERMINATE_ON_NAN, "TerminateOnNaN"),
    ],
)
def test_stop_message_of_actions(reason, words):
    assert words in reason.message
    actions = _stopping(reason)
    assert actions.stop_message() == reason.message
