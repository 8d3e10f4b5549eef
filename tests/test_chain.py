"""fcb.chain / fcb.named_chain: composition, merge rules, name checks, jit, resume."""

from __future__ import annotations

import dataclasses

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb
import fcb.testing
from fcb import StopReason


class _RecordState(eqx.Module):
    last: jax.Array
    count: jax.Array


class _Record(fcb.Callback):
    """Remembers the last value of `key`; fills every kind of action, stops from `stop_from`."""

    key: str = eqx.field(static=True)
    slot: str = eqx.field(static=True)
    log_name: str = eqx.field(static=True)
    event: str = eqx.field(static=True)
    reason: int = eqx.field(static=True)
    lr_scale: jax.Array
    stop_from: jax.Array

    def __init__(self, key="train_loss", slot="last", log_name="value", event="positive",
                 reason=StopReason.TERMINATE_ON_NAN, lr_scale=1.0, stop_from=1_000_000):
        self.key, self.slot, self.log_name, self.event = key, slot, log_name, event
        self.reason = int(reason)
        self.lr_scale = jnp.asarray(lr_scale, jnp.float32)
        self.stop_from = jnp.asarray(stop_from, jnp.int32)

    def action_names(self):
        return fcb.ActionNames(slots=(self.slot,), log=(self.log_name,), events=(self.event,))

    def init(self):
        return _RecordState(last=jnp.asarray(jnp.nan, jnp.float32),
                            count=jnp.asarray(0, jnp.int32))

    def __call__(self, state, metrics, *, step):
        value = jnp.asarray(metrics[self.key], jnp.float32)
        stop = jnp.asarray(step) >= self.stop_from
        actions = dataclasses.replace(
            self.no_actions(),
            stop=stop,
            stop_reason=jnp.where(stop, self.reason, int(StopReason.NONE)).astype(jnp.int32),
            save=value < 0,
            slots={self.slot: jnp.asarray(step, jnp.int32)},
            slot_values={self.slot: value},
            lr_scale=self.lr_scale,
            log={self.log_name: value},
            events={self.event: value > 0},
        )
        return _RecordState(last=value, count=state.count + 1), actions


HISTORY = {
    "val_loss": np.asarray([1.0, 0.5, 0.75, 0.625, np.nan, 0.25, 0.5], np.float32),
    "train_loss": np.asarray([2.0, -1.0, 1.5, np.inf, 0.5, -0.25, 3.0], np.float32),
}


def _metrics(i):
    return {k: jnp.asarray(v[i]) for k, v in HISTORY.items()}


def _parts():
    return (fcb.EarlyStopping("val_loss", patience=2, check_finite=False),
            _Record(lr_scale=0.5, stop_from=5))


_JIT_CALL = jax.jit(lambda cb, state, metrics, step: cb(state, metrics, step=step))


def test_chain_under_jit_equals_applying_the_parts_by_hand():
    es, record = _parts()
    chained = fcb.chain(es, record)
    state = chained.init()
    chex.assert_trees_all_equal(state, (es.init(), record.init()))
    es_state, record_state = es.init(), record.init()
    for i in range(len(HISTORY["val_loss"])):
        state, actions = _JIT_CALL(chained, state, _metrics(i), i)
        es_state, es_actions = es(es_state, _metrics(i), step=i)
        record_state, record_actions = record(record_state, _metrics(i), step=i)
        assert isinstance(state, tuple)
        chex.assert_trees_all_equal(state, (es_state, record_state))
        chex.assert_trees_all_equal(actions, fcb.merge_actions([es_actions, record_actions]))
        # the merge rules, spelled out
        assert bool(actions.stop) == (bool(es_actions.stop) or bool(record_actions.stop))
        assert bool(actions.save) == bool(record_actions.save)
        assert float(actions.lr_scale) == 0.5
        chex.assert_trees_all_equal(actions.events,
                                    {**es_actions.events, **record_actions.events})
        chex.assert_trees_all_equal(actions.log, record_actions.log)
        chex.assert_trees_all_equal(actions.slots, record_actions.slots)


def test_chain_declares_the_names_of_its_parts():
    es, record = _parts()
    names = fcb.chain(es, record).action_names()
    assert names == fcb.ActionNames(
        slots=("last",),
        log=("value",),
        events=("early_stopping/improved", "early_stopping/metric_missing", "positive"),
    )
    _, actions = fcb.chain(es, record)(fcb.chain(es, record).init(), _metrics(0), step=0)
    assert set(actions.events) == set(names.events)


def test_named_chain_state_is_a_dict_and_names_are_prefixed():
    es, record = _parts()
    named = fcb.named_chain(stop=es, rec=record)
    state = named.init()
    assert isinstance(state, dict) and set(state) == {"stop", "rec"}
    es_state, record_state = es.init(), record.init()
    for i in range(3):
        state, actions = _JIT_CALL(named, state, _metrics(i), i)
        es_state, es_actions = es(es_state, _metrics(i), step=i)
        record_state, record_actions = record(record_state, _metrics(i), step=i)
        chex.assert_trees_all_equal(state, {"stop": es_state, "rec": record_state})
    assert set(actions.events) == {
        "stop/early_stopping/improved", "stop/early_stopping/metric_missing", "rec/positive"}
    assert set(actions.log) == {"rec/value"}
    assert set(actions.slots) == {"last"}  # slot names name files: never prefixed
    assert bool(actions.events["rec/positive"]) == bool(record_actions.events["positive"])
    assert bool(actions.events["stop/early_stopping/improved"]) == bool(
        es_actions.events["early_stopping/improved"])
    assert named.action_names().log == ("rec/value",)


def test_named_chain_allows_the_same_callback_type_twice():
    named = fcb.named_chain(val=fcb.EarlyStopping("val_loss", patience=1),
                            train=fcb.EarlyStopping("train_loss", patience=3))
    state, actions = named(named.init(), _metrics(0), step=0)
    assert float(state["val"].best) == 1.0 and float(state["train"].best) == 2.0
    assert bool(actions.events["val/early_stopping/improved"])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: fcb.chain(fcb.EarlyStopping("val_loss"), fcb.EarlyStopping("train_loss")),
         r"fcb\.chain: the event name 'early_stopping/improved' is emitted by both callback 0 "
         r"\(EarlyStopping\) and callback 1 \(EarlyStopping\); names must be unique\. Use "
         r"fcb\.named_chain"),
        (lambda: fcb.chain(_Record(log_name="a", event="a"), _Record(log_name="b", event="b")),
         r"the slot name 'last' is emitted by both callback 0 \(_Record\) and callback 1 "
         r"\(_Record\).*distinct filenames"),
        (lambda: fcb.chain(_Record(slot="a", event="a"), _Record(slot="b", event="b")),
         r"the log name 'value' is emitted by both"),
        # named_chain prefixes log and event names, but not slots
        (lambda: fcb.named_chain(x=_Record(), y=_Record()),
         r"fcb\.named_chain: the slot name 'last' is emitted by both 'x' \(_Record\) and 'y' "
         r"\(_Record\)"),
        # clashes are found through nested chains too
        (lambda: fcb.chain(fcb.chain(fcb.EarlyStopping("a")), fcb.EarlyStopping("b")),
         r"event name 'early_stopping/improved' is emitted by both callback 0 \(Chain\)"),
    ],
)
def test_name_clashes_raise_at_construction(build, match):
    with pytest.raises(fcb.ConfigError, match=match):
        build()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: fcb.chain(fcb.EarlyStopping("val_loss"), "early_stopping"),
         r"fcb\.chain: callback 1 \(str\) must be an fcb\.Callback, got str: 'early_stopping'"),
        (lambda: fcb.chain(None), r"callback 0 \(NoneType\) must be an fcb\.Callback"),
        (lambda: fcb.named_chain(es=fcb.EarlyStopping, other=_Record()),
         r"fcb\.named_chain: 'es' \(.*\) must be an fcb\.Callback"),
        (lambda: fcb.named_chain(**{"a/b": _Record()}), r"name 'a/b' must not contain '/'"),
    ],
)
def test_bad_arguments_raise(build, match):
    with pytest.raises(fcb.ConfigError, match=match):
        build()


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        # both stop from step 2: the first in order gives the reason
        (("patience", "nan"), [None, None, StopReason.PATIENCE, StopReason.PATIENCE]),
        (("nan", "patience"), [None, None, StopReason.TERMINATE_ON_NAN,
                               StopReason.TERMINATE_ON_NAN]),
        # the later callback stops first; once the earlier one stops too, its reason wins
        (("late", "nan"),
         [None, None, StopReason.TERMINATE_ON_NAN, StopReason.DIVERGENCE_THRESHOLD]),
    ],
)
def test_stop_reason_is_the_first_stopping_callbacks(order, expected):
    makers = {
        "patience": lambda: _Record(slot="p", log_name="p", event="p",
                                    reason=StopReason.PATIENCE, stop_from=2),
        "nan": lambda: _Record(slot="n", log_name="n", event="n",
                               reason=StopReason.TERMINATE_ON_NAN, stop_from=2),
        "late": lambda: _Record(slot="l", log_name="l", event="l",
                                reason=StopReason.DIVERGENCE_THRESHOLD, stop_from=3),
    }
    chained = fcb.chain(*(makers[name]() for name in order))
    state = chained.init()
    for i, reason in enumerate(expected):
        state, actions = _JIT_CALL(chained, state, _metrics(i), i)
        assert bool(actions.stop) is (reason is not None)
        assert int(actions.stop_reason) == (StopReason.NONE if reason is None else reason)


def test_stop_reason_with_real_early_stopping():
    chained = fcb.named_chain(
        train=fcb.EarlyStopping("train_loss", patience=10),  # stops on inf at step 3
        val=fcb.EarlyStopping("val_loss", patience=1),  # stops on patience at step 2
    )
    state = chained.init()
    reasons = []
    for i in range(4):
        state, actions = chained(state, _metrics(i), step=i)
        reasons.append(int(actions.stop_reason))
    assert reasons == [StopReason.NONE, StopReason.NONE, StopReason.PATIENCE,
                       StopReason.NON_FINITE]


def test_a_second_jitted_call_does_not_recompile():
    es, record = _parts()
    chained = fcb.chain(es, record)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def check(state, metrics, step):
        return chained(state, metrics, step=step)

    state = chained.init()
    for i in range(len(HISTORY["val_loss"])):
        state, _ = check(state, _metrics(i), jnp.asarray(i, jnp.int32))
    assert int(state[1].count) == len(HISTORY["val_loss"])


def test_other_hyperparameters_with_the_same_structure_do_not_recompile():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def check(callback, state, metrics, step):
        return callback(state, metrics, step=step)

    for patience, scale in [(1, 0.5), (3, 0.25), (7, 1.0)]:
        chained = fcb.chain(fcb.EarlyStopping("val_loss", patience=patience),
                            _Record(lr_scale=scale))
        _, actions = check(chained, chained.init(), _metrics(0), jnp.asarray(0, jnp.int32))
        assert float(actions.lr_scale) == scale


def test_finalize_runs_every_part():
    es, record = _parts()
    chained = fcb.chain(es, record)
    state, _ = chained(chained.init(), _metrics(0), step=0)
    final_state, actions = chained.finalize(state)
    chex.assert_trees_all_equal(final_state, state)
    assert set(actions.events) == set(chained.action_names().events)
    assert not bool(actions.stop)
    named = fcb.named_chain(a=es, b=record)
    named_state, named_actions = named.finalize(named.init())
    chex.assert_trees_all_equal(named_state, named.init())
    assert set(named_actions.log) == {"b/value"}


@pytest.mark.parametrize("kind", ["chain", "named_chain"])
def test_resume_equivalence_of_a_chain_of_two_callbacks(kind):
    es, record = _parts()
    chained = fcb.chain(es, record) if kind == "chain" else fcb.named_chain(es=es, rec=record)
    fcb.testing.assert_resume_equivalent(chained, HISTORY)
