"""fcb.orbax: bit-exact round trips, files match the manifest and the decisions, resume,
the best_fn + max_to_keep trap, subsets of a model, faults, guards, the memory probe."""

import errno
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import orbax_training
import pytest

import fcb
import fcb.orbax


def manifest(dirpath):
    with open(os.path.join(dirpath, "manifest.json")) as f:
        return json.load(f)


def orbax_steps(dirpath):
    return sorted(ocp.utils.checkpoint_steps(os.path.join(dirpath, "steps")))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted reference run."""
    dirpath = str(tmp_path_factory.mktemp("full"))
    decisions, params = orbax_training.train(dirpath)
    return dirpath, decisions, params


# -- round trips ------------------------------------------------------------------------------


@eqx.filter_jit
def trained_model_and_opt_state():
    """An equinox model and an optax Adam state after a few updates (non-trivial moments);
    compiled once rather than op by op."""
    model = eqx.nn.MLP(5, 2, 16, depth=2, key=jax.random.PRNGKey(3))
    optimizer = optax.adam(1e-2)
    params = eqx.filter(model, eqx.is_array)
    opt_state = optimizer.init(params)
    x = jax.random.normal(jax.random.PRNGKey(4), (8, 5))
    for _ in range(3):
        grads = jax.grad(lambda p: jnp.sum(jax.vmap(eqx.combine(p, model))(x) ** 2))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return eqx.combine(params, model), opt_state


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_round_trip_of_model_and_optimizer_state_is_bit_exact(tmp_path, async_save):
    model, opt_state = trained_model_and_opt_state()
    extra = {
        "key": jax.random.key_data(jax.random.PRNGKey(9)),  # uint32
        "count": jnp.asarray(7, jnp.int32),
        "half": jnp.asarray([1.0009765625, -2.5], jnp.bfloat16),
        "flags": np.asarray([True, False]),
        "tiny": jnp.asarray([np.finfo(np.float32).tiny, -0.0, np.inf], jnp.float32),
    }
    state = {"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state, "extra": extra}
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path, async_save=async_save)
    adapter.on_fit_start()
    adapter.on_validation_end({"val_loss": 0.5}, step=0, state=state)
    adapter.on_fit_end()

    restored = fcb.orbax.restore(tmp_path, "best_model", like=state)
    chex.assert_trees_all_equal(restored, state, strict=True)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert isinstance(jax.tree_util.tree_leaves(restored)[0], jax.Array)

    fresh = eqx.nn.MLP(5, 2, 16, depth=2, key=jax.random.PRNGKey(99))
    loaded = fcb.orbax.restore_model(tmp_path, fresh, "last")
    chex.assert_trees_all_equal(eqx.filter(loaded, eqx.is_array), eqx.filter(model, eqx.is_array))
    x = jnp.ones((5,))
    assert np.array_equal(loaded(x), model(x))

    # A part of the state (the model alone), and the state as orbax stores it.
    part = fcb.orbax.restore(tmp_path, like={"model": eqx.filter(fresh, eqx.is_array)})
    chex.assert_trees_all_equal(part["model"], state["model"])
    raw = fcb.orbax.restore(tmp_path)
    assert sorted(raw) == ["extra", "model", "opt_state"]
    assert np.array_equal(raw["extra"]["key"], extra["key"])


# -- the reference run ------------------------------------------------------------------------


def test_orbax_steps_match_manifest_and_decisions(full_run):
    dirpath, decisions, _ = full_run
    m = manifest(dirpath)
    final = decisions[-1]
    assert final["stop"] and len(decisions) < 40
    table = {name: slot["step"] for name, slot in m["slots"].items()}
    assert {k: v for k, v in final["slots"].items() if v >= 0} == table
    # Exactly the referenced steps are on disk, each once, whatever the number of slots.
    assert (
        orbax_steps(dirpath)
        == sorted(set(table.values()))
        == sorted(record["step"] for record in m["files"].values())
    )
    assert len(set(table.values())) < len(table)  # some step is shared by several slots
    assert not [n for n in os.listdir(os.path.join(dirpath, "steps")) if "tmp" in n]
    for name, slot in m["slots"].items():
        meta = fcb.orbax._store.read_meta(os.path.join(dirpath, slot["file"]))
        assert meta["step"] == slot["step"], name
        assert meta["slots"][name] == slot["step"]
    assert m["resume"]["step"] == final["step"] and m["resume"]["stop_message"]
    # The tolerance slot froze on an earlier step than the overall best.
    assert final["slots"]["best.val_loss.tolerance=1"] < final["slots"]["best.val_loss"]
    # The plateau callback lowered the learning rate in the optimizer state.
    assert decisions[-1]["lr"] < decisions[0]["lr"]


def test_best_slot_holds_the_best_weights(full_run):
    dirpath, _, _ = full_run
    (_, _), (x_val, y_val) = orbax_training.data()
    model, _ = orbax_training.model_and_opt_state()
    best = fcb.orbax.restore_model(dirpath, model, "best_model")
    loss = float(orbax_training.loss_fn(best, x_val, y_val))
    assert loss == pytest.approx(manifest(dirpath)["slots"]["best_model"]["value"], rel=1e-6)
    tolerance = fcb.orbax.restore_model(dirpath, model, "best.val_loss.tolerance=1")
    value = manifest(dirpath)["slots"]["best.val_loss.tolerance=1"]["value"]
    assert float(orbax_training.loss_fn(tolerance, x_val, y_val)) == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("k", [2, 5, 9])
def test_resume_equivalence(full_run, tmp_path, k):
    """Stop after check k, drop everything in memory, resume from disk: the same decisions,
    manifest and final weights as the uninterrupted run (k=5 is a new best; k=9 is after
    the tolerance-1 slot froze and the learning rate fell)."""
    reference_dir, decisions, params = full_run
    dirpath = str(tmp_path)
    first, _ = orbax_training.train(dirpath, stop_after=k)
    assert first == decisions[: k + 1]
    rest, resumed_params = orbax_training.train(dirpath, resume=True)
    assert first + rest == decisions
    chex.assert_trees_all_equal(resumed_params, params)
    reference, resumed = manifest(reference_dir), manifest(dirpath)
    for key in ("slots", "event_step", "callbacks", "files", "resume", "archive"):
        assert resumed[key] == reference[key], key
    assert orbax_steps(dirpath) == orbax_steps(reference_dir)


def test_resume_at_a_learning_rate_change(full_run, tmp_path):
    """The check that lowers the learning rate saves the state with the lowered rate (the
    state is a function of the actions), so a run resumed there trains on at that rate."""
    _, decisions, params = full_run
    k = next(e["step"] for d, e in itertools.pairwise(decisions) if e["lr"] != d["lr"])
    first, _ = orbax_training.train(str(tmp_path), stop_after=k)
    assert first[-1]["lr"] < first[-2]["lr"]
    rest, resumed_params = orbax_training.train(str(tmp_path), resume=True)
    assert first + rest == decisions
    chex.assert_trees_all_equal(resumed_params, params)


def test_a_state_from_before_a_learning_rate_change_is_warned_about(tmp_path, caplog):
    plateau = fcb.chain(
        fcb.ReduceLROnPlateau("val_loss", patience=0), fcb.ModelCheckpoint(save_top_k=0)
    )
    adapter = fcb.orbax.OrbaxAdapter(plateau, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fcb"):
        for step, loss in enumerate([1.0, 2.0, 3.0]):
            adapter.on_validation_end({"val_loss": loss}, step=step, state={"w": jnp.zeros(1)})
    adapter.on_fit_end()
    warnings = [r.message for r in caplog.records if "learning rate" in r.message]
    assert len(warnings) == 1 and "Pass state=lambda actions" in warnings[0]


def test_resume_of_a_stopped_run_does_not_train_on(full_run, tmp_path):
    _, decisions, _ = full_run
    dirpath = str(tmp_path)
    orbax_training.train(dirpath)
    rest, _ = orbax_training.train(dirpath, resume=True)
    assert rest == []
    adapter = fcb.orbax.OrbaxAdapter(orbax_training.callbacks(), dirpath, resume=True)
    adapter.on_fit_start()
    assert adapter.should_stop and "did not improve" in adapter.stop_message
    assert adapter.resumed_step == decisions[-1]["step"]
    assert sorted(adapter.restored_state) == ["model", "opt_state"]  # no template: raw
    adapter.on_fit_end()


def test_sync_saves_give_the_same_files_and_decisions(full_run, tmp_path):
    dirpath, decisions, params = full_run
    got, got_params = orbax_training.train(str(tmp_path), async_save=False)
    assert got == decisions
    chex.assert_trees_all_equal(got_params, params)
    assert manifest(str(tmp_path))["slots"] == manifest(dirpath)["slots"]


# -- NaN and the orbax best_fn + max_to_keep trap --------------------------------------------


HISTORY = [0.5, 0.3, math.nan, 0.4, math.nan, math.inf, 0.35, math.nan]


def test_nan_never_evicts_the_best_and_best_and_last_are_both_kept(tmp_path):
    callbacks = fcb.chain(
        fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=[2], check_finite=False),
    )
    adapter = fcb.orbax.OrbaxAdapter(callbacks, tmp_path)
    adapter.on_fit_start()
    for step, loss in enumerate(HISTORY):
        state = {"w": jnp.full((3,), float(step))}
        adapter.on_validation_end({"val_loss": loss}, step=step, state=state)
        assert adapter.slots["best_model"] == 1 or step == 0
        assert adapter.slots["last"] == step
    adapter.on_fit_end()
    m = manifest(tmp_path)
    assert {n: s["step"] for n, s in m["slots"].items()} == {
        "best_model": 1,
        "best.val_loss": 1,
        "best.val_loss.tolerance=2": 1,
        "last": 7,
    }
    assert m["slots"]["last"]["value"] == "nan"  # JSON-safe, never a bare NaN
    assert orbax_steps(tmp_path) == [1, 7]
    like = {"w": jnp.zeros(3)}
    assert float(fcb.orbax.restore(tmp_path, "best_model", like=like)["w"][0]) == 1.0
    assert float(fcb.orbax.restore(tmp_path, "last", like=like)["w"][0]) == 7.0
    meta = fcb.orbax._store.read_meta(os.path.join(tmp_path, "steps", "7"))
    assert meta["metrics"] == {"val_loss": "nan"}


def test_plain_orbax_best_fn_with_max_to_keep_loses_the_best_or_the_latest(tmp_path):
    """Why fcb gives orbax no max_to_keep and no best_fn: with them, a NaN metric evicts
    the true best, and a latest step that is not among the best is deleted (no resume)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["val_loss"], best_mode="min"
    )

    def kept(history, directory):
        with ocp.CheckpointManager(directory, options=options) as manager:
            for step, loss in enumerate(history):
                args = ocp.args.StandardSave({"w": np.zeros(1)})
                manager.save(step, args=args, metrics={"val_loss": loss})
                manager.wait_until_finished()
            return manager.all_steps()

    assert kept([0.5, 0.3, math.nan], tmp_path / "nan") == [2]  # the best (0.3) is gone
    assert kept([0.3, 0.5], tmp_path / "latest") == [0]  # the latest is gone


# -- model_names: subsets of a composite model ------------------------------------------------


class Composite(eqx.Module):
    encoder: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.encoder = eqx.nn.Linear(4, 3, key=k1)
        self.head = eqx.nn.Linear(3, 1, key=k2)


def test_model_names_save_only_those_submodules(tmp_path):
    model = Composite(jax.random.PRNGKey(0))
    chain = fcb.chain(
        fcb.BestCheckpoint("val_loss", tolerances=[2], model_names=["encoder"]),
        fcb.ModelCheckpoint("val_loss", save_top_k=0, save_last=True),
    )
    adapter = fcb.orbax.OrbaxAdapter(chain, tmp_path, async_save=False)
    adapter.on_fit_start()
    states = []
    for step, loss in enumerate([1.0, 2.0, 3.0]):
        trained = jax.tree_util.tree_map(lambda x, s=step: x + s, model)
        states.append(trained)
        state = {"model": eqx.filter(trained, eqx.is_array), "opt_state": ()}
        adapter.on_validation_end({"val_loss": loss}, step=step, state=state)
    adapter.on_fit_end()
    m = manifest(tmp_path)
    assert m["slots"]["best.val_loss"]["models"] == ["encoder"]
    assert m["files"]["steps/0"]["models"] is None  # shared with `last` at step 0: everything
    assert m["slots"]["last"]["step"] == 2
    # Restoring a subset slot gives the subset; restore_model replaces only that submodule.
    sub = fcb.orbax.restore(tmp_path, "best.val_loss", like={"model": model})
    assert sorted(sub["model"]) == ["encoder"]
    other = Composite(jax.random.PRNGKey(5))
    restored = fcb.orbax.restore_model(tmp_path, other, "best.val_loss")
    chex.assert_trees_all_equal(restored.encoder, states[0].encoder)
    chex.assert_trees_all_equal(restored.head, other.head)

    bad = fcb.orbax.OrbaxAdapter(
        fcb.BestCheckpoint("val_loss", model_names=["decoder"]), tmp_path / "bad"
    )
    with pytest.raises(
        fcb.ConfigError,
        match=r"submodule 'decoder', but the model \(Composite\) has "
        r"\['encoder', 'head'\]",
    ):
        bad.on_fit_start(like={"model": model})


def test_subset_only_steps_store_only_the_subset(tmp_path):
    model = Composite(jax.random.PRNGKey(0))
    adapter = fcb.orbax.OrbaxAdapter(
        fcb.BestCheckpoint("val_loss", model_names=["head"]), tmp_path, async_save=False
    )
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"model": model})
    adapter.on_fit_end()
    assert manifest(tmp_path)["files"]["steps/0"]["models"] == ["head"]
    raw = fcb.orbax.restore(tmp_path, "best.val_loss")
    assert sorted(raw) == ["model"] and sorted(raw["model"]) == ["head"]
    restored = fcb.orbax.restore_model(tmp_path, Composite(jax.random.PRNGKey(1)), "best.val_loss")
    chex.assert_trees_all_equal(restored.head, model.head)


# -- evaluation, summary, retracing -----------------------------------------------------------


class CountCalls(fcb.Callback):
    def init(self):
        return jnp.asarray(0, jnp.int32)

    def __call__(self, state, metrics, *, step):
        return state + 1, self.no_actions()


def test_nested_callbacks_evaluate_the_live_state_at_each_new_best(tmp_path):
    chain = fcb.BestCheckpoint("val_loss", tolerances=[1], callbacks=[CountCalls()])
    seen = []

    def evaluate(state):
        seen.append(float(state["w"][0]))
        return {"test_loss": jnp.float32(0.1)}

    adapter = fcb.orbax.OrbaxAdapter(chain, tmp_path, evaluate=evaluate)
    adapter.on_fit_start()
    for step, value in enumerate([1.0, 0.5, 0.7, 0.9, 0.2]):
        adapter.on_validation_end(
            {"val_loss": value}, step=step, state={"w": jnp.full((1,), float(step))}
        )
    summary = adapter.on_fit_end()
    assert seen == [0.0, 1.0, 4.0]  # the state at steps 0, 1 and 4 (new bests)
    assert int(adapter.runner.state.children[0]) == 3
    assert summary["best.val_loss/best_step"] == 4.0
    assert summary["best.val_loss.tolerance=1/best_step"] == 1.0


def test_no_retracing_over_many_events(tmp_path):
    adapter = fcb.orbax.OrbaxAdapter(
        fcb.chain(fcb.EarlyStopping("val_loss", patience=1000), fcb.ModelCheckpoint()),
        tmp_path,
    )
    rng = np.random.default_rng(0)
    for step in range(30):
        adapter.on_validation_end(
            {"val_loss": jnp.float32(rng.random())}, step=step, state={"w": jnp.zeros(2)}
        )
    assert adapter.runner._check._cache_size() == 1
    adapter.on_fit_end()
    assert len(orbax_steps(tmp_path)) <= 2


# -- faults and guards ------------------------------------------------------------------------


def test_failed_background_commit_surfaces_at_the_next_check(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path

    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path)
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
    adapter.wait()

    async def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(async_path, "rename", full_disk)
    adapter.on_validation_end({"val_loss": 0.5}, step=1, state={"w": jnp.ones(2)})
    with pytest.raises(fcb.CheckpointWriteError, match=r"could not commit step 1 .*No space"):
        adapter.wait()
    monkeypatch.undo()
    assert {n: s["step"] for n, s in manifest(tmp_path)["slots"].items()} == {
        "best_model": 0,
        "last": 0,
    }
    assert orbax_steps(tmp_path) == [0]
    assert os.listdir(tmp_path / "steps") == ["0"]
    adapter.on_fit_end()  # the disk is back: step 1 is written again, and committed
    assert {n: s["step"] for n, s in manifest(tmp_path)["slots"].items()} == {
        "best_model": 1,
        "last": 1,
    }
    assert orbax_steps(tmp_path) == [1]


def test_failed_synchronous_save_keeps_the_previous_checkpoint_and_state(tmp_path, monkeypatch):
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path, async_save=False)
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
    before, state_before = manifest(tmp_path), adapter.state_dict()

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(adapter.manager, "save", fail)
    with pytest.raises(fcb.CheckpointWriteError, match=r"could not write step 1 .*Input/output"):
        adapter.on_validation_end({"val_loss": 0.5}, step=1, state={"w": jnp.ones(2)})
    monkeypatch.undo()
    assert manifest(tmp_path) == before
    assert adapter.state_dict() == state_before  # the failed check did not happen
    actions = adapter.on_validation_end({"val_loss": 0.5}, step=1, state={"w": jnp.ones(2)})
    assert int(actions.slots["best_model"]) == 1
    adapter.on_fit_end()
    assert orbax_steps(tmp_path) == [1]


DISK_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to write 176 bytes to '
    "file 4: No space left on device [os_error_code='28']"
)


def full_disk(monkeypatch):
    """Make orbax's array writes fail as tensorstore does on a full disk."""
    from orbax.checkpoint._src.serialization import type_handlers

    async def no_space(*args, **kwargs):
        raise ValueError(DISK_FULL)

    monkeypatch.setattr(type_handlers.NumpyHandler, "_open_and_write", no_space)


def leftovers(dirpath):
    return [n for n in os.listdir(os.path.join(dirpath, "steps")) if "tmp" in n]


def test_a_synchronous_save_on_a_full_disk_is_a_write_error_and_leaves_nothing(
    tmp_path, monkeypatch
):
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path, background=False)
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
    before, state_before = manifest(tmp_path), adapter.state_dict()
    full_disk(monkeypatch)
    for _ in range(2):
        with pytest.raises(
            fcb.CheckpointWriteError,
            match=r"could not write step 1 .*RESOURCE_EXHAUSTED.*the disk is full: free space",
        ):
            adapter.on_validation_end({"val_loss": 0.5}, step=1, state={"w": jnp.ones(2)})
        assert manifest(tmp_path) == before and adapter.state_dict() == state_before
        assert leftovers(tmp_path) == [] and orbax_steps(tmp_path) == [0]
    monkeypatch.undo()  # space is freed: the same check goes through
    adapter.on_validation_end({"val_loss": 0.5}, step=1, state={"w": jnp.ones(2)})
    adapter.on_fit_end()
    assert manifest(tmp_path)["slots"]["best_model"]["step"] == 1 and orbax_steps(tmp_path) == [1]


LOSSES_7 = [1.0, 0.5, 0.7, 0.9]


def tagged(step):
    """200 kB that do not compress (a real disk fills up), starting with the step."""
    w = np.random.default_rng(step).standard_normal(50_000).astype(np.float32)
    w[0] = step
    return jnp.asarray(w)


def _full_disk_run(dirpath, fill=None, free=None):
    """Checks of LOSSES_7 with background saves; `fill()` makes the disk full after step 0,
    `free()` frees it after the checks that fail. Returns the errors of each check."""
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(save_last=True), dirpath)
    errors = {}
    step = 0
    while step < len(LOSSES_7):
        state = {"w": tagged(step)}
        try:
            adapter.on_validation_end({"val_loss": LOSSES_7[step]}, step=step, state=state)
        except fcb.CheckpointWriteError as error:
            errors.setdefault(step, []).append(str(error))
            assert manifest(dirpath)["slots"]["last"]["step"] == 0  # still the last commit
            if len(errors[step]) == 2 and free is not None:
                free()
            continue  # the loop retries the check that failed
        if step == 0:
            adapter.wait()
            if fill is not None:
                fill()
        step += 1
    adapter.on_fit_end()
    return adapter, errors


def test_a_background_save_that_failed_is_written_again_once_the_disk_is_back(
    tmp_path, monkeypatch
):
    """The failure of step 1's background save is found at the next check, once step 1's
    check has happened (its decisions returned to the loop): step 1 is written again until
    it commits, and the run ends exactly as one that never failed."""
    reference, _ = _full_disk_run(str(tmp_path / "reference"))
    adapter, errors = _full_disk_run(
        str(tmp_path / "run"), fill=lambda: full_disk(monkeypatch), free=monkeypatch.undo
    )
    assert sorted(errors) == [2] and len(errors[2]) == 2
    assert re.search(r"could not commit step 1 .*RESOURCE_EXHAUSTED", errors[2][0])
    assert "its step is written again at the next check that saves" in errors[2][0]
    assert "step 1" in errors[2][1]
    assert adapter.state_dict() == reference.state_dict()
    ran = manifest(tmp_path / "run")
    assert ran["slots"] == manifest(tmp_path / "reference")["slots"]
    assert {n: s["step"] for n, s in ran["slots"].items()} == {"best_model": 1, "last": 3}
    best = fcb.orbax.restore(tmp_path / "run", "best_model", like={"w": jnp.zeros(50_000)})
    assert float(best["w"][0]) == 1.0  # step 1's own state, written again
    assert orbax_steps(tmp_path / "run") == [1, 3] and leftovers(tmp_path / "run") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_sync_and_background(tmp_path):
    """The same on a real full disk: a 4 MB tmpfs filled up by another file."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    filler = mount / "filler"
    try:

        def fill():
            stat = os.statvfs(mount)
            with open(filler, "wb") as f:  # leave less than a step needs (200 kB)
                f.write(b"\1" * max(0, stat.f_bavail * stat.f_frsize - 120_000))

        def free():
            filler.unlink()

        reference, _ = _full_disk_run(str(tmp_path / "reference"))
        adapter, errors = _full_disk_run(str(mount / "run"), fill=fill, free=free)
        assert sorted(errors) == [2]
        assert "No space left on device" in errors[2][0]
        assert "the disk is full: free space" in errors[2][0]
        assert manifest(mount / "run")["slots"] == manifest(tmp_path / "reference")["slots"]
        assert adapter.state_dict() == reference.state_dict()
        assert orbax_steps(mount / "run") == [1, 3] and leftovers(mount / "run") == []

        sync = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), mount / "sync", background=False)
        sync.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
        fill()
        with pytest.raises(fcb.CheckpointWriteError, match=r"could not write step 1 .*space"):
            sync.on_validation_end({"val_loss": 0.5}, step=1, state={"w": tagged(1)})
        assert leftovers(mount / "sync") == []
        free()
        sync.on_validation_end({"val_loss": 0.5}, step=1, state={"w": tagged(1)})
        sync.on_fit_end()
        assert orbax_steps(mount / "sync") == [1]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_background_save_lost_after_orbax_let_go_of_it_names_the_fix(
    tmp_path, monkeypatch
):
    """A failure after orbax has finalized the step's data and let go of its state (in the
    final rename of the step) cannot be written again: a slot still asking for that step is
    refused with the way out."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(save_last=True), tmp_path)
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
    adapter.wait()

    def rename_fails(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", rename_fails)
    adapter.on_validation_end({"val_loss": 0.5}, step=1, state={"w": jnp.ones(2)})
    with pytest.raises(fcb.CheckpointWriteError, match=r"could not commit step 1"):
        adapter.on_validation_end({"val_loss": 0.7}, step=2, state={"w": jnp.ones(2)})
    monkeypatch.undo()
    with pytest.raises(
        fcb.CheckpointWriteError,
        match=r"slot 'best_model' holds step 1, whose background save failed .*Resume from the "
        r"last committed checkpoint \(resume_from=dirpath, step 0\)",
    ):
        adapter.on_validation_end({"val_loss": 0.7}, step=2, state={"w": jnp.ones(2)})
    adapter.on_fit_end()
    resumed = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(save_last=True), tmp_path,
                                     resume_from=tmp_path)
    resumed.on_fit_start()
    assert resumed.resumed_step == 0
    resumed.on_fit_end()


def test_second_writer_is_refused_and_a_new_run_replaces_an_old_one(tmp_path, caplog):
    first = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path)
    first.on_fit_start()
    second = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path)
    with pytest.raises(fcb.DirectoryInUseError, match=r"being written by another fcb adapter"):
        second.on_fit_start()
    for step, loss in enumerate([1.0, 2.0, 3.0]):
        first.on_validation_end({"val_loss": loss}, step=step, state={"w": jnp.full(1, step)})
    first.on_fit_end()
    resumed = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path, resume=True)
    resumed.on_fit_start()  # free again, and resumable
    assert resumed.resumed_step == 2
    resumed.on_fit_end()
    # Never replaced implicitly: without a template the run cannot be resumed, so it stays.
    with pytest.raises(fcb.ConfigError, match=r"resumable at step 2 .* Pass on_fit_start\(like"):
        second.on_fit_start()
    assert orbax_steps(tmp_path) == [0, 2]
    # A new run over the old one, asked for: the old steps go, step 0 is the new weights.
    second = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path, existing_run="start_over")
    with caplog.at_level(logging.WARNING, logger="fcb"):
        second.on_fit_start()
    assert "held a run (2 checkpoints); a new run replaces it" in caplog.text
    assert orbax_steps(tmp_path) == [] and manifest(tmp_path)["slots"] == {}
    second.on_validation_end({"val_loss": 5.0}, step=0, state={"w": jnp.full(1, 7)})
    second.on_fit_end()
    assert orbax_steps(tmp_path) == [0]
    assert (
        int(fcb.orbax.restore(tmp_path, "last", like={"w": jnp.zeros(1, jnp.int32)})["w"][0]) == 7
    )


def test_bad_input_is_named(tmp_path):
    model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.PRNGKey(0))
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path)
    with pytest.raises(fcb.ConfigError, match=r"leaf \['model'\]\.activation is a function"):
        adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"model": model})
    with pytest.raises(fcb.ConfigError, match=r"keep step 0 .* no state was given"):
        adapter.on_validation_end({"val_loss": 1.0}, step=0)
    with pytest.raises(fcb.ConfigError, match=r"typed PRNG key; save its data"):
        adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"k": jax.random.key(0)})
    with pytest.raises(fcb.ConfigError, match=r"`step` must be an integer >= 0.*step = -1"):
        adapter.on_validation_end({"val_loss": 1.0}, step=-1, state={})
    with pytest.raises(fcb.MissingMetricError, match=r"available keys: \['loss'\]"):
        adapter.on_validation_end({"loss": 1.0}, step=0, state={})
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
    adapter.on_fit_end()
    with pytest.raises(fcb.CheckpointError, match=r"no checkpoint in slot 'best'; its slots "):
        fcb.orbax.restore(tmp_path, "best")
    with pytest.raises(fcb.ConfigError, match=r"1 leaves the checkpoint .* does not store"):
        fcb.orbax.restore(tmp_path, like={"w": jnp.zeros(2), "v": jnp.zeros(1)})
    with pytest.raises(fcb.ConfigError, match=r"`dirpath` must be a non-empty path"):
        fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), "")
    with pytest.raises(fcb.CheckpointCorruptError, match=r"no resumable checkpoint"):
        fcb.orbax.OrbaxAdapter(fcb.EarlyStopping(), tmp_path / "empty", resume=True).on_fit_start()


def test_torch_and_orbax_run_directories_are_not_mixed(tmp_path):
    import fcb.torch

    torch_dir = tmp_path / "torch"
    adapter = fcb.torch.TorchAdapter(fcb.ModelCheckpoint(), dirpath=str(torch_dir))
    adapter.on_validation_end({"val_loss": 1.0}, step=0)
    adapter.on_fit_end()
    with pytest.raises(fcb.CheckpointCorruptError, match=r"written by fcb\.torch; open it"):
        fcb.orbax.read_manifest(torch_dir)
    with pytest.raises(fcb.CheckpointCorruptError, match=r"written by fcb\.torch"):
        fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), torch_dir, resume=True).on_fit_start()


def test_a_loop_that_exits_without_on_fit_end_still_commits_its_last_save(tmp_path):
    code = (
        "import sys, jax.numpy as jnp, fcb, fcb.orbax\n"
        "adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), sys.argv[1])\n"
        "for step in range(3):\n"
        "    state = {'w': jnp.full((1000,), step)}\n"
        "    adapter.on_validation_end({'val_loss': 1.0 / (step + 1)}, step=step, state=state)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert manifest(tmp_path)["slots"]["last"]["step"] == 2
    assert orbax_steps(tmp_path) == [2]


def test_a_template_that_does_not_match_is_named(tmp_path):
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path)
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(3)})
    adapter.on_fit_end()
    with pytest.raises(fcb.ConfigError, match=r"`like` does not match the state saved in .*3"):
        fcb.orbax.restore(tmp_path, like={"w": jnp.zeros(4)})
    resumed = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), tmp_path, resume=True)
    with pytest.raises(fcb.ConfigError, match=r"`like` does not match .* structure"):
        resumed.on_fit_start(like={"v": jnp.zeros(3)})
    resumed.on_fit_start(like={"w": jnp.ones(3)})  # the directory was released
    chex.assert_trees_all_equal(resumed.restored_state, {"w": jnp.zeros(3)})
    resumed.on_fit_end()


def test_import_fcb_does_not_import_orbax():
    code = "import sys, fcb; print(any(m.startswith('orbax') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


# -- the device memory probe ------------------------------------------------------------------


class FakeDevice:
    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_device_free_memory():
    GiB = 2**30
    stats = {"bytes_limit": 16 * GiB, "bytes_in_use": 5 * GiB}
    assert fcb.orbax.device_free_memory(FakeDevice(stats)) == 11 * GiB
    assert fcb.orbax.device_free_memory(FakeDevice(None)) is None
    assert fcb.orbax.device_free_memory(FakeDevice({"bytes_in_use": 1})) is None


def test_vram_drift_is_a_logged_no_op_on_cpu(tmp_path, caplog):
    adapter = fcb.orbax.OrbaxAdapter(fcb.VRAMDrift(max_drift_bytes=1.0), tmp_path)
    with caplog.at_level(logging.INFO, logger="fcb"):
        adapter.on_fit_start()
        actions = adapter.on_validation_end({}, step=0)
        adapter.on_validation_end({}, step=1)
    adapter.on_fit_end()
    assert bool(actions.events["vram_drift/metric_missing"])
    infos = [r for r in caplog.records if "reports no memory statistics" in r.message]
    assert len(infos) == 1 and infos[0].levelno == logging.INFO


def test_vram_drift_reads_the_device_memory_stats(tmp_path, caplog, monkeypatch):
    GiB = 2**30
    in_use = iter([1, 1, 2, 3, 4, 5])
    device = FakeDevice(None)
    device.memory_stats = lambda: {"bytes_limit": 16 * GiB, "bytes_in_use": next(in_use) * GiB}
    monkeypatch.setattr(fcb.orbax._adapter.jax, "local_devices", lambda: [device])
    adapter = fcb.orbax.OrbaxAdapter(fcb.VRAMDrift(max_drift_bytes=2 * GiB), tmp_path)
    fired = []
    with caplog.at_level(logging.WARNING, logger="fcb"):
        adapter.on_fit_start()  # reads the stats once to see that the device has them
        for step in range(5):
            actions = adapter.on_validation_end({}, step=step)
            fired.append(bool(actions.events["vram_drift/drift"]))
    adapter.on_fit_end()
    assert fired == [False, False, False, True, False]  # 15 GiB baseline; 12 GiB free at 3
    assert [r.levelno for r in caplog.records if "vram_drift/drift" in r.message] == [
        logging.WARNING
    ]
