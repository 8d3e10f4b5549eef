"""The compiled-loop examples stop where the eager loop stops and keep the same checkpoints;
`OrbaxAdapter.apply_actions` guards its input."""

import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import pytest

import fcb
import fcb.orbax

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


while_loop = load("jax_while_loop")
scan_chunks = load("jax_scan_chunks")
DATA = while_loop.make_data(jax.random.PRNGKey(0))


@pytest.mark.parametrize("patience", [2, 8])
def test_while_loop_stops_where_the_eager_loop_stops(patience):
    compiled = while_loop.run_compiled(DATA, patience=patience)
    eager = while_loop.run_eager(DATA, patience=patience)
    stopped = int(compiled.callbacks["stop"].stopped_step)
    assert 0 < stopped < while_loop.MAX_EPOCHS - 1
    assert stopped == int(eager.callbacks["stop"].stopped_step)
    assert int(compiled.epoch) == stopped + 1  # the loop ran exactly the checks it needed
    chex.assert_trees_all_equal(compiled.callbacks, eager.callbacks)
    chex.assert_trees_all_equal(compiled.best, eager.best)
    chex.assert_trees_all_equal(compiled.tolerance, eager.tolerance)
    # The carried best weights are those of BestCheckpoint's best step (and its tolerance's).
    (_, _), (x_val, y_val) = DATA
    best = compiled.callbacks["best"]
    assert int(compiled.best.step) == int(best.best_step)
    assert int(compiled.tolerance.step) == int(best.tolerances.best_step[0])
    assert float(while_loop.loss_fn(compiled.best.value(), x_val, y_val)) == pytest.approx(
        float(best.best), rel=1e-6
    )


def test_chunked_scan_keeps_the_checkpoints_of_the_eager_loop(tmp_path):
    chunked, chunks = scan_chunks.run_chunked(DATA, str(tmp_path / "chunked"), k=3, patience=3)
    eager = scan_chunks.run_eager(DATA, str(tmp_path / "eager"), patience=3)
    chunked_manifest = fcb.orbax.read_manifest(tmp_path / "chunked")
    eager_manifest = fcb.orbax.read_manifest(tmp_path / "eager")
    for key in ("slots", "resume", "callbacks", "event_step", "files"):
        assert chunked_manifest[key] == eager_manifest[key], key
    stopped = chunked_manifest["resume"]["step"]
    assert chunked.should_stop and eager.should_stop
    assert chunks == stopped // 3 + 1  # the chunk that saw the stop was the last one
    like = {"w": jnp.zeros(48), "lr": jnp.float32(0.0)}
    for slot in chunked_manifest["slots"]:
        chex.assert_trees_all_equal(
            fcb.orbax.restore(tmp_path / "chunked", slot, like=like),
            fcb.orbax.restore(tmp_path / "eager", slot, like=like),
        )


def test_apply_actions_guards_its_input(tmp_path):
    callbacks = fcb.BestCheckpoint("val_loss", callbacks=[fcb.EarlyStopping("x")])
    state, actions = callbacks(callbacks.init(), {"val_loss": 1.0}, step=0)
    adapter = fcb.orbax.OrbaxAdapter(callbacks, tmp_path)
    with pytest.raises(fcb.ConfigError, match=r"request evaluations \['best.val_loss'\]"):
        adapter.apply_actions(actions, step=0, callbacks_state=state, state={"w": jnp.ones(1)})
    plain = fcb.ModelCheckpoint()
    state, actions = plain(plain.init(), {"val_loss": 1.0}, step=0)
    adapter = fcb.orbax.OrbaxAdapter(plain, tmp_path / "plain")
    with pytest.raises(fcb.ConfigError, match=r"`callbacks_state` must have the structure"):
        adapter.apply_actions(actions, step=0, callbacks_state=(), state={"w": jnp.ones(1)})
    adapter.apply_actions(actions, step=0, callbacks_state=state, state={"w": jnp.ones(1)})
    assert adapter.slots == {"best_model": 0, "last": 0}
    assert adapter.state_dict() == fcb.state_dict(state, plain)
    adapter.on_fit_end()
