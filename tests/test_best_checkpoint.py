"""BestCheckpoint: overall best, tolerance slots, nested callbacks, every_n, resume."""

import dataclasses
import json
import math

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

POOL = [-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0, math.nan, math.inf]


def early_stopping_best_step(values, steps, t, mode, min_delta, check_finite):
    """The best step an EarlyStopping(patience=t) keeps over these checks, run on its own."""
    es = fcb.EarlyStopping("m", mode, patience=t, min_delta=min_delta, check_finite=check_finite)
    state = es.init()
    for value, step in zip(values, steps, strict=True):
        state, _ = es(state, {"m": np.float32(value)}, step=step)
    return int(state.best_step)


def reference_overall_best(values, steps, mode):
    """argmin / argmax over finite values, earliest on ties (plain Python)."""
    sign = 1.0 if mode == "min" else -1.0
    best, best_step = math.inf, -1
    for value, step in zip(values, steps, strict=True):
        if math.isfinite(value) and sign * value < best:
            best, best_step = sign * value, step
    return best_step


@settings(max_examples=120, deadline=None)
@given(
    values=st.lists(st.sampled_from(POOL), min_size=1, max_size=20),
    tolerances=st.lists(st.integers(0, 6), max_size=4, unique=True).map(sorted),
    mode=st.sampled_from(["min", "max"]),
    every_n=st.integers(1, 3),
    check_finite=st.booleans(),
)
def test_tolerance_slots_equal_early_stopping_replays(
    values, tolerances, mode, every_n, check_finite
):
    cb = fcb.BestCheckpoint(
        "val/loss", mode, tolerances, every_n=every_n, check_finite=check_finite
    )
    _, actions = run(cb, {"val/loss": np.asarray(values, np.float32)})
    for end in range(len(values)):  # after every check, not only at the end
        scheduled = [i for i in range(end + 1) if (i + 1) % every_n == 0]
        seen = [values[i] for i in scheduled]
        assert int(actions.slots["best.val.loss"][end]) == reference_overall_best(
            seen, scheduled, mode
        )
        for t in tolerances:
            expected = early_stopping_best_step(seen, scheduled, t, mode, 0.0, check_finite)
            assert int(actions.slots[f"best.val.loss.tolerance={t}"][end]) == expected, (end, t)


def test_tolerance_slot_freezes_once_exceeded():
    cb = fcb.BestCheckpoint("val_loss", tolerances=[2])
    history = [0.5, 0.6, 0.7, 0.1]  # two non-improving checks after step 0, then a new best
    state = cb.init()
    exceeded = []
    for step, value in enumerate(history):
        state, a = cb(state, {"val_loss": value}, step=step)
        exceeded.append(bool(a.events["best.val_loss/tolerance_exceeded"]))
    assert int(a.slots["best.val_loss.tolerance=2"]) == 0
    assert int(a.slots["best.val_loss"]) == 3
    assert exceeded == [False, False, True, False]
    assert int(state.tolerances.stopped_step[0]) == 2


def test_higher_is_better_and_slot_values():
    cb = fcb.BestCheckpoint("acc", higher_is_better=True, tolerances=[1])
    state = cb.init()
    for step, value in enumerate([0.5, 0.7, 0.6, 0.9]):
        state, a = cb(state, {"acc": value}, step=step)
    assert int(a.slots["best.acc"]) == 3
    assert float(a.slot_values["best.acc"]) == pytest.approx(0.9)
    assert int(a.slots["best.acc.tolerance=1"]) == 1
    assert float(a.slot_values["best.acc.tolerance=1"]) == pytest.approx(0.7)


def test_save_only_when_a_slot_takes_the_current_step():
    cb = fcb.BestCheckpoint("val_loss", tolerances=[1])
    _, a = run(cb, {"val_loss": np.array([0.5, 0.6, 0.4, 0.3], np.float32)})
    assert list(np.asarray(a.save)) == [True, False, True, True]
    # Step 2 is a new overall best; tolerance 1 froze at step 1 and still holds step 0.
    assert list(np.asarray(a.slots["best.val_loss.tolerance=1"])) == [0, 0, 0, 0]


def test_model_names_are_recorded_for_every_slot():
    cb = fcb.BestCheckpoint("val_loss", tolerances=[3], model_names=["encoder"])
    _, a = cb(cb.init(), {"val_loss": 1.0}, step=0)
    assert dict(a.slot_models) == {
        "best.val_loss": ("encoder",),
        "best.val_loss.tolerance=3": ("encoder",),
    }
    assert fcb.BestCheckpoint("val_loss").action_names().slot_models == ()


class RecordMetrics(fcb.Callback):
    """A nested callback that records the last value it saw and how many times it ran."""

    key: str

    def init(self):
        return {"calls": jnp.asarray(0, jnp.int32), "last": jnp.asarray(jnp.nan, jnp.float32)}

    def __call__(self, state, metrics, *, step):
        value = fcb._validate.read_metric("RecordMetrics", metrics, self.key, strict=True)
        actions = self.no_actions()
        log = {"seen": value}
        state = {"calls": state["calls"] + 1, "last": value}
        return state, fcb.Actions(**{**_fields(actions), "log": log})

    def action_names(self):
        return fcb.ActionNames(log=("seen",))

    def finalize(self, state):
        return state, fcb.Actions(**{**_fields(self.no_actions()), "log": {"seen": state["last"]}})


def _fields(actions):
    return {f: getattr(actions, f) for f in actions.__dataclass_fields__}


def test_nested_callbacks_see_prefixed_results_only_on_new_best():
    child = RecordMetrics(key="best=loss.val/test_acc")
    cb = fcb.BestCheckpoint("loss/val", tolerances=[1], callbacks=[child])
    state = cb.init()
    history = [0.5, 0.6, 0.7, 0.4]  # tolerance 1 is exceeded at step 1; new bests at 0 and 3
    requested = []
    for step, value in enumerate(history):
        state, a = cb(state, {"loss/val": value}, step=step)
        requested.append(bool(a.evaluate["best.loss.val"]))
        if requested[-1]:
            # the adapter evaluates the live model and feeds the results back
            state, child_actions = cb.evaluated(
                state, "best.loss.val", {"test_acc": 10.0 + step}, step=step
            )
            assert float(child_actions.log["best=loss.val/seen"]) == 10.0 + step
    assert requested == [True, False, False, True]
    assert int(state.children[0]["calls"]) == 2
    assert float(state.children[0]["last"]) == 13.0
    # Another request name is ignored.
    same, nothing = cb.evaluated(state, "other", {"test_acc": 0.0}, step=9)
    assert int(same.children[0]["calls"]) == 2 and nothing.log == {}
    # finalize reaches the children unconditionally, with the prefix.
    _, final = cb.finalize(state)
    assert float(final.log["best=loss.val/seen"]) == 13.0


def test_finalize_reports_best_per_tolerance():
    cb = fcb.BestCheckpoint("val_loss", tolerances=[1, 4])
    state, _ = run(cb, {"val_loss": np.array([0.5, 0.4, 0.45, 0.3, 0.35], np.float32)})
    _, a = cb.finalize(state)
    assert float(a.log["best.val_loss/best_value"]) == pytest.approx(0.3)
    assert a.log["best.val_loss/best_step"] == 3
    assert a.log["best.val_loss.tolerance=1/best_step"] == 1
    assert a.log["best.val_loss.tolerance=1/stopped_step"] == 2
    assert a.log["best.val_loss.tolerance=4/best_step"] == 3
    assert a.log["best.val_loss.tolerance=4/stopped_step"] == -1


def test_missing_metric():
    cb = fcb.BestCheckpoint("val_loss", tolerances=[1], strict=False)
    state, a = cb(cb.init(), {"loss": 1.0}, step=0)
    assert bool(a.events["best.val_loss/metric_missing"])
    assert int(state.check_count) == 0
    with pytest.raises(fcb.MissingMetricError, match=r"'val_loss' .* available keys: \['loss'\]"):
        fcb.BestCheckpoint("val_loss")(cb.init(), {"loss": 1.0}, step=0)


HISTORY = {"val_loss": np.array([0.5, 0.4, 0.45, np.nan, 0.3, 0.35, 0.36, 0.37, 0.2], np.float32)}


@pytest.mark.parametrize("every_n", [1, 2])
def test_jit_scan_and_resume_with_tolerances(every_n):
    cb = fcb.BestCheckpoint("val_loss", tolerances=[1, 2, 5], every_n=every_n)
    assert_jit_equivalent(cb, HISTORY)
    assert_resume_equivalent(cb, HISTORY)


def test_resume_mid_run_keeps_frozen_tolerances():
    cb = fcb.BestCheckpoint("val_loss", tolerances=[1, 3])
    state, _ = run(cb, HISTORY, stop=5)
    restored = fcb.load_state_dict(cb, json.loads(json.dumps(fcb.state_dict(state, cb))))
    assert int(restored.tolerances.stopped_step[0]) >= 0
    with pytest.raises(fcb.StateDictError, match=r"shape \(2,\), expected \(3,\)"):
        fcb.load_state_dict(
            fcb.BestCheckpoint("val_loss", tolerances=[1, 3, 5]), fcb.state_dict(state, cb)
        )


def test_vmap_over_min_delta():
    deltas = jnp.array([0.0, 0.05, 0.2], jnp.float32)
    stacked = jax.vmap(lambda d: fcb.BestCheckpoint("val_loss", tolerances=[1, 2], min_delta=d))(
        deltas
    )
    singles = [
        fcb.BestCheckpoint("val_loss", tolerances=[1, 2], min_delta=float(d)) for d in deltas
    ]
    assert_vmap_equivalent(stacked, singles, HISTORY)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"tolerances": [3, 1]},
            r"strictly increasing .* got tolerances = \(3, 1\); pass \(1, 3\)",
        ),
        ({"tolerances": [2, 2]}, r"strictly increasing .* pass \(2,\)"),
        ({"tolerances": [-1]}, r"every tolerance must be an integer >= 0, got -1"),
        ({"tolerances": [1.5]}, r"got 1.5 in tolerances"),
        ({"tolerances": "5"}, r"`tolerances` must be a sequence of integers"),
        ({"mode": "max", "higher_is_better": False}, r"contradicts higher_is_better = False"),
        ({"higher_is_better": "yes"}, r"`higher_is_better` must be True or False"),
        ({"model_names": []}, r"`model_names` must be None or non-empty submodule names"),
        ({"model_names": ["enc", "enc"]}, r"`model_names` has duplicates"),
        ({"every_n": 0}, r"`every_n` must be an integer >= 1"),
        ({"min_delta": -0.1}, r"`min_delta` must be a finite number >= 0.0"),
        ({"filename": "../x"}, r"`filename` must be a file name stem"),
        ({"callbacks": [object()]}, r"callback 0 \(object\) must be an fcb.Callback"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(fcb.ConfigError, match=match):
        fcb.BestCheckpoint("val_loss", **kwargs)


def noether_tolerance_step(values, tolerance, mode):
    """The tolerance checkpoint of noether's counter rule, in plain Python: a counter of
    consecutive non-improving checks, reset by a new best; the tolerance is exceeded once
    `tolerance_counter > tolerance`, and until then every new best is saved for it."""
    sign = 1.0 if mode == "min" else -1.0
    best, counter, exceeded, saved = math.inf, 0, False, -1
    for step, value in enumerate(values):
        if sign * value < best:  # NaN never improves, as in noether's `<` / `>`
            best, counter = sign * value, 0
            if not exceeded:
                saved = step
        else:
            counter += 1
            exceeded = exceeded or counter > tolerance
    return saved


@settings(max_examples=150, deadline=None)
@given(
    # noether can make an infinity the best (-inf in min mode, +inf in max mode); fcb never
    # does, so infinities are left out. NaN is a non-improving check in both.
    values=st.lists(
        st.sampled_from([v for v in POOL if not math.isinf(v)]), min_size=1, max_size=25
    ),
    tolerance=st.integers(0, 5),
    mode=st.sampled_from(["min", "max"]),
)
def test_noethers_tolerance_t_is_fcbs_tolerance_t_plus_one(values, tolerance, mode):
    """Documented in docs/callbacks/best_checkpoint.md: noether's counter freezes a tolerance
    at the (t+1)-th non-improving check, fcb's (EarlyStopping's patience) at the t-th."""
    cb = fcb.BestCheckpoint("m", mode, tolerances=(tolerance + 1,), check_finite=False)
    _, actions = run(cb, {"m": np.asarray(values, np.float32)})
    slot = cb.tolerance_slots()[0]
    assert int(actions.slots[slot][-1]) == noether_tolerance_step(values, tolerance, mode)


def test_best_follows_the_min_delta_margin_and_replay_reports_the_margin_free_best():
    """Documented: `best.<key>` moves only on an improvement by more than min_delta (as
    EarlyStopping's best); fcb.replay's best_step is the margin-free best of the checks run
    (ModelCheckpoint's), and the slot itself is in `result.slots`."""
    history = {"val_loss": np.asarray([1.0, 0.99, 0.985, 0.97], np.float32)}
    cb = fcb.BestCheckpoint("val_loss", min_delta=0.02)
    _, actions = run(cb, history)
    assert np.asarray(actions.slots["best.val_loss"]).tolist() == [0, 0, 0, 3]
    result = fcb.replay(fcb.BestCheckpoint("val_loss", min_delta=0.02), {"val_loss": [1.0, 0.99]})
    assert result.best_step.tolist() == [1] and result.best_value.tolist() == [np.float32(0.99)]
    assert result.slots["best.val_loss"].tolist() == [0]


def _evaluated_slot_setup():
    child = fcb.EarlyStopping("best=val_loss/acc", "max", patience=1)
    cb = fcb.BestCheckpoint("val_loss", tolerances=(1,), callbacks=[child])
    state = cb.init()
    for step, loss in enumerate([0.5, 0.4, 0.6, 0.7]):
        state, _ = cb(state, {"val_loss": loss}, step=step)
    return cb, state


@pytest.mark.parametrize("slot", ["best.val_loss", "best.val_loss.tolerance=1"])
def test_evaluated_slot_changes_only_the_children_and_asks_no_save(slot):
    cb, state = _evaluated_slot_setup()
    new, actions = cb.evaluated_slot(state, slot, {"acc": 0.7}, step=1)
    assert float(new.children[0].best) == pytest.approx(0.7)
    assert bool(actions.save) is False and bool(actions.archive) is False
    assert actions.slots == {} and actions.evaluate == {}
    parent = lambda s: dataclasses.replace(s, children=())  # noqa: E731
    chex_equal = jax.tree_util.tree_map(np.array_equal, parent(new), parent(state))
    assert all(jax.tree_util.tree_leaves(chex_equal))


def test_evaluated_slot_jit_parity_and_chain_routing():
    cb, state = _evaluated_slot_setup()
    eager = cb.evaluated_slot(state, "best.val_loss", {"acc": 0.3}, step=1)
    jitted = jax.jit(lambda s, r: cb.evaluated_slot(s, "best.val_loss", r, step=1))(
        state, {"acc": jnp.float32(0.3)}
    )
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    chained = fcb.chain(cb)
    routed, _ = chained.evaluated((state,), "loaded:best.val_loss", {"acc": 0.3}, step=1)
    assert float(routed[0].children[0].best) == pytest.approx(0.3)


def test_evaluated_slot_unknown_slot_is_a_config_error():
    cb, state = _evaluated_slot_setup()
    with pytest.raises(fcb.ConfigError, match=r"best\.val_loss\.tolerance=1.*got slot = .last."):
        cb.evaluated_slot(state, "last", {"acc": 0.3}, step=1)
