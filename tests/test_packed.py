"""fcb.packed: the wrapped callback's checks, actions and state, bit for bit, with the state
carried as one vector per dtype."""

from __future__ import annotations

import collections
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fcb
import fcb.testing

NAN = float("nan")

CHAINS = {
    "lightning trio": lambda: fcb.chain(
        fcb.EarlyStopping("loss", patience=3, min_delta=0.01),
        fcb.ModelCheckpoint("loss", save_top_k=2, save_last=True),
        fcb.ReduceLROnPlateau("loss", factor=0.5, patience=1),
    ),
    "best checkpoint with tolerances": lambda: fcb.named_chain(
        best=fcb.BestCheckpoint("loss", tolerances=(2, 4)),
        nan=fcb.TerminateOnNaN(keys=("loss",)),
    ),
    "all_of": lambda: fcb.all_of(
        fcb.named_chain(loss=fcb.EarlyStopping("loss", patience=2)),
        fcb.named_chain(acc=fcb.EarlyStopping("acc", mode="max", patience=4)),
    ),
    "one callback": lambda: fcb.EarlyStopping("loss", patience=2),
}

_values = st.one_of(st.floats(0, 2, width=32), st.just(NAN))
_histories = st.integers(2, 12).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            "loss": st.lists(_values, min_size=n, max_size=n),
            "acc": st.lists(st.floats(0, 1, width=32), min_size=n, max_size=n),
        }
    )
)
_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _as_history(values):
    return {k: np.asarray(v, np.float32) for k, v in values.items()}


@pytest.mark.parametrize("name", list(CHAINS))
@_SETTINGS
@given(values=_histories)
def test_the_packed_callback_makes_the_wrapped_callbacks_checks(name, values):
    chain = CHAINS[name]()
    callbacks = fcb.packed(chain)
    history = _as_history(values)
    state, actions = fcb.testing.run(chain, history)
    packed_state, packed_actions = fcb.testing.run(callbacks, history)
    chex.assert_trees_all_equal(packed_actions, actions)
    chex.assert_trees_all_equal(callbacks.unpack(packed_state), state)
    chex.assert_trees_all_equal(callbacks.pack(state), packed_state)


@pytest.mark.parametrize("name", list(CHAINS))
def test_jit_scan_and_eager_agree(name):
    history = _as_history(
        {"loss": [0.9, 0.7, NAN, 0.8, 0.6, 0.65, 0.7, 0.72], "acc": [0.1, 0.2, 0.3, 0.3] * 2}
    )
    callbacks = fcb.packed(CHAINS[name]())
    fcb.testing.assert_jit_equivalent(callbacks, history)
    fcb.testing.assert_resume_equivalent(callbacks, history, splits=(1, 4, 7))


def test_the_state_is_one_vector_per_dtype_of_8_leaves_at_most_and_reads_back():
    chain = CHAINS["lightning trio"]()
    callbacks = fcb.packed(chain)
    state = callbacks.init()
    leaves = jax.tree_util.tree_leaves(chain.init())
    assert isinstance(state, tuple)
    # a vector per dtype for every 8 leaves (XLA:CPU fuses a concatenate of 8 operands)
    per_dtype = collections.Counter(leaf.dtype.name for leaf in leaves)
    assert max(per_dtype.values()) > 8  # the trio's int32 leaves take two vectors
    assert sorted(v.dtype.name for v in state) == sorted(
        name for name, count in per_dtype.items() for _ in range(-(-count // 8))
    )
    held = collections.Counter(vector for vector, *_ in callbacks.layout.leaves)
    assert max(held.values()) <= 8
    assert all(v.ndim == 1 for v in state)
    assert sum(v.size for v in state) == sum(leaf.size for leaf in leaves)
    state, _ = callbacks(state, {"loss": jnp.float32(0.5)}, step=3)
    inner = callbacks.unpack(state)
    assert int(inner[0].best_step) == 3 and float(inner[0].best) == 0.5
    # the wrapped callback's state dict, through JSON, and back into a packed state
    saved = json.loads(json.dumps(fcb.state_dict(inner, chain)))
    chex.assert_trees_all_equal(callbacks.pack(fcb.load_state_dict(chain, saved)), state)
    # host copies read back too
    chex.assert_trees_all_equal(callbacks.unpack(jax.device_get(state)), jax.device_get(inner))


def test_its_config_is_the_wrapped_callbacks():
    chain = CHAINS["lightning trio"]()
    config = fcb.state_dict(fcb.packed(chain).init(), fcb.packed(chain))["config"]
    wrapped = fcb.state_dict((), chain)["config"]
    assert config == {"callback": {"callback": "Chain", "config": wrapped}}
    assert "layout" not in repr(fcb.packed(chain))


def test_a_compiled_loop_traces_its_step_once():
    callbacks = fcb.packed(CHAINS["lightning trio"]())

    @jax.jit
    @chex.assert_max_traces(n=1)
    def check(state, loss, step):
        return callbacks(state, {"loss": loss}, step=step)

    state = callbacks.init()
    for i, loss in enumerate([0.9, 0.8, 0.85, 0.7]):
        state, _ = check(state, jnp.float32(loss), jnp.int32(i))


def test_under_vmap_each_configuration_runs_alone():
    patiences = [1, 2, 3]
    stacked = jax.vmap(lambda p: fcb.packed(fcb.EarlyStopping("loss", patience=p)))(
        jnp.asarray(patiences)
    )
    history = _as_history({"loss": [0.9, 0.95, 0.97, 0.99, 0.98, 1.0]})
    singles = [fcb.packed(fcb.EarlyStopping("loss", patience=p)) for p in patiences]
    fcb.testing.assert_vmap_equivalent(stacked, singles, history)


def test_stop_messages_and_the_stop_cleared_are_the_wrapped_callbacks():
    chain = fcb.chain(fcb.EarlyStopping("loss", patience=1))
    callbacks = fcb.packed(chain)
    state, _ = fcb.testing.run(callbacks, _as_history({"loss": [0.5, 0.6, 0.7]}))
    inner = callbacks.unpack(state)
    assert callbacks.stop_details(state) == chain.stop_details(inner)
    assert "patience=1" in callbacks.stop_details(state)
    cleared = callbacks.unpack(callbacks.unstopped(state))
    chex.assert_trees_all_equal(cleared, chain.unstopped(inner))


def test_bad_input_is_refused():
    with pytest.raises(fcb.ConfigError, match=r"fcb.packed: `callback` must be an fcb.Callback"):
        fcb.packed([fcb.EarlyStopping("loss")])
    callbacks = fcb.packed(fcb.EarlyStopping("loss"))
    with pytest.raises(fcb.ConfigError, match=r"keeps the structure of init\(\)"):
        callbacks.pack((jnp.float32(0.0),))
    state = fcb.EarlyStopping("loss").init()
    with pytest.raises(fcb.ConfigError, match=r"keeps the dtypes and shapes of init\(\)"):
        callbacks.pack(state._replace(best_step=jnp.float32(0)) if hasattr(state, "_replace")
                       else jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), state))
