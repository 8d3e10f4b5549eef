"""fcb.InMemorySlot: the copy holds exactly the weights of the step its slot names, in a
compiled loop, eagerly and under vmap."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fcb

NAN = float("nan")

CHAINS = {
    "top-1 and last": (
        lambda: fcb.ModelCheckpoint("loss", save_top_k=1, save_last=True),
        ("best_model", "last"),
    ),
    "top-2 in the Lightning trio": (
        lambda: fcb.chain(
            fcb.EarlyStopping("loss", patience=4),
            fcb.ModelCheckpoint("loss", save_top_k=2, mode="min"),
            fcb.ReduceLROnPlateau("loss", patience=1),
        ),
        None,  # every slot: best_model-top2 takes steps of the past (the copy then holds none)
    ),
    "best checkpoint with tolerances": (
        lambda: fcb.BestCheckpoint("loss", tolerances=(1, 3)),
        None,  # every slot of the chain
    ),
}

_values = st.one_of(st.floats(0, 2, width=32), st.just(NAN))
_losses = st.lists(_values, min_size=1, max_size=14)
_SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def params_at(step):
    """Parameters that differ at every step, in three dtypes (the copy must keep each)."""
    step = jnp.asarray(step)
    return {
        "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + step,
        "scale": (step * 0.5).astype(jnp.bfloat16),
        "count": jnp.stack([step, -step]).astype(jnp.int32),
    }


def slot_names(name, callbacks):
    wanted = CHAINS[name][1]
    return wanted if wanted is not None else tuple(callbacks.action_names().slots)


def compiled_run(callbacks, slots, losses):
    """One scan over the checks: the chain's actions and a copy per slot."""

    def step(carry, loss_and_step):
        state, copies = carry
        loss, i = loss_and_step
        state, actions = callbacks(state, {"loss": loss}, step=i)
        copies = {n: c.update(actions, params_at(i), step=i) for n, c in copies.items()}
        return (state, copies), actions.slots

    copies = {n: fcb.InMemorySlot(n, params_at(0)) for n in slots}
    losses = jnp.asarray(losses, jnp.float32)
    (_, copies), slot_steps = jax.lax.scan(
        step, (callbacks.init(), copies), (losses, jnp.arange(len(losses)))
    )
    return copies, slot_steps


def expected_copy(slot_steps):
    """The rule, check by check: the slot takes the current step -> copy it; it keeps the
    step held -> keep it; any other step -> hold none."""
    held = -1
    for i, wanted in enumerate(np.asarray(slot_steps).tolist()):
        if wanted == i:
            held = i
        elif wanted != held:
            held = -1
    return held


def assert_holds(copy, step):
    assert int(copy.step) == step
    if step >= 0:
        chex.assert_trees_all_equal(copy.value(), params_at(step))


@pytest.mark.parametrize("name", list(CHAINS))
@_SETTINGS
@given(losses=_losses)
def test_each_copy_holds_the_weights_of_the_step_it_names(name, losses):
    callbacks = fcb.packed(CHAINS[name][0]())
    slots = slot_names(name, callbacks)
    run = jax.jit(lambda values: compiled_run(callbacks, slots, values))
    copies, slot_steps = run(jnp.asarray(losses, jnp.float32))
    for slot in slots:
        held = expected_copy(slot_steps[slot])
        assert_holds(copies[slot], held)
        final = int(slot_steps[slot][-1])
        if slot in ("best_model", "last"):  # they only ever take the current step
            assert held == final


@_SETTINGS
@given(losses=_losses)
def test_the_best_copy_is_the_step_a_per_array_select_keeps(losses):
    """The same best parameters as selecting every array at every step (B2b's old loop)."""
    callbacks = fcb.packed(fcb.ModelCheckpoint("loss", save_top_k=1))

    def step(carry, loss_and_step):
        state, copy, selected = carry
        loss, i = loss_and_step
        state, actions = callbacks(state, {"loss": loss}, step=i)
        params = params_at(i)
        copy = copy.update(actions, params, step=i)
        is_best = actions.slots["best_model"] == i
        selected = jax.tree_util.tree_map(lambda b, p: jnp.where(is_best, p, b), selected, params)
        return (state, copy, selected), actions.slots["best_model"]

    carry = (callbacks.init(), fcb.InMemorySlot("best_model", params_at(0)), params_at(0))
    losses = jnp.asarray(losses, jnp.float32)
    (_, copy, selected), best = jax.jit(lambda c, x: jax.lax.scan(step, c, x))(
        carry, (losses, jnp.arange(len(losses)))
    )
    if int(best[-1]) >= 0:
        assert int(copy.step) == int(best[-1])
        chex.assert_trees_all_equal(copy.value(), selected)
    else:  # every loss NaN: the slot never took a step
        assert int(copy.step) == -1


def test_eager_jit_and_scan_agree():
    callbacks = fcb.packed(fcb.ModelCheckpoint("loss", save_top_k=1, save_last=True))
    losses = [0.9, 0.5, NAN, 0.7, 0.4, 0.6]
    update = jax.jit(lambda c, a, p, i: c.update(a, p, step=i))
    state = callbacks.init()
    eager = {n: fcb.InMemorySlot(n, params_at(0)) for n in ("best_model", "last")}
    jitted = dict(eager)
    for i, loss in enumerate(losses):
        state, actions = callbacks(state, {"loss": jnp.float32(loss)}, step=i)
        eager = {n: c.update(actions, params_at(i), step=i) for n, c in eager.items()}
        jitted = {n: update(c, actions, params_at(i), jnp.int32(i)) for n, c in jitted.items()}
    scanned, _ = compiled_run(callbacks, ("best_model", "last"), losses)
    for slot, step in (("best_model", 4), ("last", 5)):
        for copies in (eager, jitted, scanned):
            assert_holds(copies[slot], step)


def test_no_retrace_across_steps_and_values():
    callbacks = fcb.packed(fcb.ModelCheckpoint("loss", save_top_k=1))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def check(state, copy, loss, i):
        state, actions = callbacks(state, {"loss": loss}, step=i)
        return state, copy.update(actions, params_at(i), step=i)

    state, copy = callbacks.init(), fcb.InMemorySlot("best_model", params_at(0))
    for i, loss in enumerate([0.5, 0.4, 0.6, 0.3]):
        state, copy = check(state, copy, jnp.float32(loss), jnp.int32(i))
    assert_holds(copy, 3)


def test_vmap_over_configurations_keeps_one_copy_each():
    callbacks = fcb.packed(fcb.ModelCheckpoint("loss", save_top_k=1))
    histories = jnp.asarray(
        [[0.9, 0.5, 0.7, 0.8], [0.9, 0.8, 0.7, 0.6], [NAN, NAN, NAN, NAN]], jnp.float32
    )
    copies, _ = jax.vmap(lambda h: compiled_run(callbacks, ("best_model",), h))(histories)
    copy = copies["best_model"]
    assert copy.step.tolist() == [1, 3, -1]
    with pytest.raises(fcb.CheckpointError, match=r"holds no step \(configurations \[2\]\)"):
        copy.value()
    one, _ = jax.vmap(lambda h: compiled_run(callbacks, ("best_model",), h))(histories[:2])
    values = one["best_model"].value()
    for row, step in enumerate((1, 3)):
        config = jax.tree_util.tree_map(lambda v, row=row: v[row], values)
        chex.assert_trees_all_equal(config, params_at(step))


def test_a_copy_built_from_shape_structs():
    like = jax.eval_shape(lambda: params_at(0))
    copy = fcb.InMemorySlot("best_model", like)
    assert int(copy.step) == -1
    assert [v.dtype for v in copy.vectors] == [jnp.dtype(jnp.int32), jnp.dtype(jnp.bfloat16),
                                               jnp.dtype(jnp.float32)]


def test_bad_input_is_refused():
    with pytest.raises(fcb.ConfigError, match=r"`slot` must be the name of a checkpoint slot"):
        fcb.InMemorySlot("", params_at(0))
    with pytest.raises(fcb.ConfigError, match=r"`like` must be a pytree of arrays"):
        fcb.InMemorySlot("best_model", {"w": 1.0})
    with pytest.raises(fcb.ConfigError, match=r"`like` has no arrays to copy"):
        fcb.InMemorySlot("best_model", {})
    callbacks = fcb.ModelCheckpoint("loss", save_top_k=1)
    _, actions = callbacks(callbacks.init(), {"loss": jnp.float32(0.5)}, step=0)
    copy = fcb.InMemorySlot("best", params_at(0))
    with pytest.raises(fcb.ConfigError, match=r"no checkpoint slot 'best'; its slots: "):
        copy.update(actions, params_at(0), step=0)
    copy = fcb.InMemorySlot("best_model", params_at(0))
    with pytest.raises(fcb.ConfigError, match=r"`actions` must be the fcb.Actions"):
        copy.update({"best_model": 0}, params_at(0), step=0)
    with pytest.raises(fcb.ConfigError, match=r"keeps the structure of the pytree it was built"):
        copy.update(actions, {"w": params_at(0)["w"]}, step=0)
    wrong = {**params_at(0), "w": params_at(0)["w"].astype(jnp.float16)}
    with pytest.raises(fcb.ConfigError, match=r"is float16\[2, 3\], the pytree it was built "
                                              r"with made it float32\[2, 3\]"):
        copy.update(actions, wrong, step=0)
    with pytest.raises(fcb.CheckpointError, match=r"'best_model'\) holds no step: "):
        copy.value()
