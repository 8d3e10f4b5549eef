"""fcb.Runner: packed state and actions give exactly what the plain jitted chain gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb
from fcb._runner import Packing


def chains():
    return {
        "early_stopping": fcb.EarlyStopping("val_loss", patience=3),
        "full": fcb.chain(
            fcb.EarlyStopping("val_loss", patience=4, min_delta=0.01),
            fcb.ModelCheckpoint("val_loss", save_top_k=3, save_last=True),
            fcb.BestCheckpoint("val_loss", tolerances=(1, 3)),
            fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=1, cooldown=1),
            fcb.TerminateOnNaN(keys=("train_loss", "val_loss")),
        ),
        "named": fcb.named_chain(
            stop=fcb.EarlyStopping("val_loss", mode="max", patience=2),
            drift=fcb.VRAMDrift(max_drift_fraction=0.1, key="free_memory"),
        ),
    }


def metric_stream(seed, count=30):
    rng = np.random.default_rng(seed)
    values = rng.random(count).astype(np.float32)
    values[rng.random(count) < 0.1] = np.nan
    return [
        {"val_loss": float(v), "train_loss": float(rng.random()), "free_memory": 1e9 - 1e7 * i}
        for i, v in enumerate(values)
    ]


def assert_same(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), (x, y)  # bit for bit: NaN payloads, -0.0


@pytest.mark.parametrize("name", ["early_stopping", "full", "named"])
def test_packed_checks_match_the_plain_jitted_chain(name):
    callback = chains()[name]
    runner = fcb.Runner(callback)
    plain = jax.jit(lambda state, metrics, step: callback(state, metrics, step=step))
    state = callback.init()
    for step, metrics in enumerate(metric_stream(0)):
        actions = runner.check(metrics, step=step)
        host = {k: np.asarray(v, np.float32) for k, v in metrics.items()}
        state, expected = plain(state, host, np.int32(step))
        assert_same(actions, jax.device_get(expected))
        assert runner._buffer is not None  # the packed path was taken
        assert runner.state_dict() == fcb.state_dict(state, callback)
    assert_same(runner.state, state)
    assert runner._check._cache_size() == 1


def test_snapshot_and_restore_undo_an_event():
    runner = fcb.Runner(
        fcb.chain(fcb.EarlyStopping("val_loss"), fcb.ModelCheckpoint("val_loss", save_top_k=2))
    )
    runner.check({"val_loss": 1.0}, step=0)
    before, before_dict = runner.snapshot(), runner.state_dict()
    runner.check({"val_loss": 0.5}, step=1)
    assert runner.state_dict() != before_dict
    runner.restore(before)
    assert runner.state_dict() == before_dict
    actions = runner.check({"val_loss": 0.7}, step=1)  # 0.5 was never seen
    assert float(actions.slot_values["best_model"]) == pytest.approx(0.7)
    assert int(actions.slots["best_model-top2"]) == 0


def test_a_failed_check_keeps_the_state_and_later_checks_work():
    runner = fcb.Runner(fcb.EarlyStopping("val_loss", patience=1))
    runner.check({"val_loss": 1.0}, step=0)
    saved = runner.state_dict()
    with pytest.raises(fcb.MissingMetricError, match="available keys"):
        runner.check({"loss": 1.0}, step=1)
    assert runner.state_dict() == saved
    assert bool(runner.check({"val_loss": 2.0}, step=1).stop)


def test_setting_the_state_is_seen_by_the_next_check():
    callback = fcb.EarlyStopping("val_loss", patience=2)
    runner = fcb.Runner(callback)
    runner.check({"val_loss": 0.1}, step=0)
    runner.state = callback.init()
    actions = runner.check({"val_loss": 0.5}, step=1)
    assert int(actions.events["early_stopping/improved"]) == 1


class WeakState(fcb.Callback):
    """A state leaf without an explicit dtype: weakly typed, so it is not packed."""

    def init(self):
        return jnp.asarray(0.0)

    def __call__(self, state, metrics, *, step):
        return state + metrics["x"], self.no_actions()


class GrowingState(fcb.Callback):
    """A state whose structure changes at the first check: the plain path takes over."""

    def init(self):
        return ()

    def __call__(self, state, metrics, *, step):
        return jnp.asarray(metrics["x"], jnp.float32), self.no_actions()


@pytest.mark.parametrize("callback", [WeakState(), GrowingState()], ids=["weak", "growing"])
def test_states_that_cannot_be_packed_take_the_plain_path(callback):
    runner = fcb.Runner(callback)
    for step in range(3):
        actions = runner.check({"x": 1.5}, step=step)
        assert not bool(actions.stop)
    expected = 4.5 if isinstance(callback, WeakState) else 1.5
    assert float(runner.state) == expected
    assert runner.state_dict() == fcb.state_dict(runner.state, callback)


DTYPES = [jnp.bool_, jnp.int8, jnp.int16, jnp.int32, jnp.uint8, jnp.uint16, jnp.uint32]
DTYPES += [jnp.float16, jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (3,), (2, 2), (0,)])
def test_packing_round_trips_every_supported_dtype_exactly(dtype, shape):
    rng = np.random.default_rng(0)
    if jnp.issubdtype(dtype, jnp.floating):
        values = rng.standard_normal(shape).astype(np.float32)
        special = np.array([np.nan, -0.0, np.inf, -np.inf], np.float32)
        values.reshape(-1)[: min(4, values.size)] = special[: min(4, values.size)]
    else:
        info = jnp.iinfo(dtype) if dtype != jnp.bool_ else None
        values = (
            rng.integers(0, 2, shape)
            if info is None
            else rng.integers(int(info.min), int(info.max), shape, endpoint=True)
        )
    tree = {"a": jnp.asarray(values, dtype), "b": (jnp.asarray(7, jnp.int32),)}
    packing = Packing.of(tree)
    assert packing is not None
    buffer = jax.jit(packing.pack)(tree)
    assert buffer.dtype == jnp.int32 and buffer.shape == (packing.size,)
    assert_same(jax.jit(packing.unpack)(buffer), tree)
    assert_same(packing.unpack_host(np.asarray(buffer)), jax.device_get(tree))


def test_packing_refuses_what_it_cannot_store_exactly():
    assert Packing.of(jnp.asarray(1.0)) is None  # weakly typed
    assert Packing.of({"x": 1.0}) is None  # a Python scalar
    assert Packing.of(np.zeros(2, np.float64)) is None
    assert Packing.of(np.zeros(2, np.complex64)) is None


class MixedState(fcb.Callback):
    """State leaves of several dtypes, some non-finite: the state dict spells them as JSON."""

    def init(self):
        return {
            "half": jnp.asarray([1.0, jnp.nan], jnp.bfloat16),
            "single": jnp.asarray([jnp.inf, 2.0], jnp.float32),
            "count": jnp.asarray(3, jnp.int16),
            "flag": jnp.asarray([True, False]),
        }

    def __call__(self, state, metrics, *, step):
        return state, self.no_actions()


def test_the_packed_state_dict_spells_non_finite_values_like_fcb_state_dict():
    callback = MixedState()
    runner = fcb.Runner(callback)
    runner.check({"x": 1.0}, step=0)
    assert runner._buffer is not None
    saved = runner.state_dict()
    assert saved == fcb.state_dict(runner.state, callback)
    assert saved["state"]["leaves"]["['half']"]["value"] == [1.0, "nan"]


def test_an_evaluation_request_keeps_the_checks_slot_decisions():
    """A new best that asks for an evaluation must not reset the other callbacks' slots to
    their inactive defaults when the evaluation's actions are merged in."""
    child = fcb.EarlyStopping("best=val_loss/test_loss")
    nested = fcb.BestCheckpoint("val_loss", callbacks=[child])
    with_children = fcb.Runner(fcb.chain(fcb.ModelCheckpoint("val_loss"), nested))
    alone = fcb.Runner(fcb.chain(fcb.ModelCheckpoint("val_loss"), fcb.BestCheckpoint("val_loss")))
    for step, value in enumerate([1.0, 0.8, 0.9, 0.7]):
        got = with_children.check(
            {"val_loss": value}, step=step, evaluate=lambda request: {"test_loss": 0.5}
        )
        want = alone.check({"val_loss": value}, step=step)
        assert {k: int(v) for k, v in got.slots.items()} == {
            k: int(v) for k, v in want.slots.items()
        }
        assert bool(got.save) == bool(want.save)
        assert bool(got.events["best.val_loss/improved"]) == (step in (0, 1, 3))


@pytest.mark.parametrize("step", [2**31, -(2**31) - 1, 1.5, "3"])
def test_a_step_int32_cannot_hold_is_a_config_error(step):
    runner = fcb.Runner(fcb.EarlyStopping("val_loss"))
    with pytest.raises(fcb.ConfigError, match=r"Runner: `step` must be an integer below 2\*\*31"):
        runner.check({"val_loss": 1.0}, step=step)
    assert not bool(runner.check({"val_loss": 1.0}, step=0).stop)  # the state is unchanged


@pytest.mark.parametrize("tries, pause", [(8, 256), (2, 3), (1, 1)])
@pytest.mark.parametrize("name", ["early_stopping", "full"])
def test_a_repeated_outcome_shares_one_read_only_actions(monkeypatch, name, tries, pause):
    monkeypatch.setattr(fcb._runner, "_MEMO_TRIES", tries)
    monkeypatch.setattr(fcb._runner, "_MEMO_PAUSE", pause)
    callback = chains()[name]
    runner = fcb.Runner(callback)
    plain = jax.jit(lambda state, metrics, step: callback(state, metrics, step=step))
    state = callback.init()
    previous, previous_bits, shared, paused = None, None, 0, 0
    for step, metrics in enumerate(metric_stream(1, count=60)):
        actions = runner.check(metrics, step=step)
        host = {k: np.asarray(v, np.float32) for k, v in metrics.items()}
        state, expected = plain(state, host, np.int32(step))
        assert_same(actions, jax.device_get(expected))  # shared, new or read while paused
        bits = b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(actions))
        if actions is previous:
            assert bits == previous_bits
            shared += 1
        if actions is runner._last_actions[2]:  # kept for the next check: frozen
            for leaf in jax.tree_util.tree_leaves(actions):
                with pytest.raises(ValueError, match="read-only"):
                    leaf[...] = leaf
        paused += runner._memo_paused > 0
        previous, previous_bits = actions, bits
    if name == "early_stopping" and tries == 8:  # its actions hold no values: they repeat
        assert shared > 30
    if name == "full":  # the `last` slot names every check's step: nothing repeats
        assert shared == 0 and paused > 0
