"""The post-training pass (`adapter.evaluate_checkpoints`), Torch and orbax: each slot's saved
weights are evaluated (not the live model's), the live model is left as it was, the manifest
and BestCheckpoint's own state are untouched while its nested callbacks see the results,
empty slots are skipped, a fresh adapter and a finished one work, the evaluation function is
looked up per slot, `model_names` loads only the saved submodules, and a sharded (FSDP2) run
evaluates on every rank what one process loads."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fcb
import fcb.orbax
import fcb.torch
from fcb._history import read_records, read_rows

X = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(4, 2)
LOSSES = [0.5, 0.4, 0.6, 0.7, 0.8, 0.3, 0.45]
"""Overall best: step 5; tolerance 2 freezes at step 1 (steps 2 and 3 do not improve); the
last step (6) is the live model's."""


def child():
    return fcb.EarlyStopping("best=val_loss/out", "max", patience=100)


def callbacks(*, tolerances=(2,), children=True, model_names=None, extra=()):
    return fcb.chain(
        fcb.BestCheckpoint(
            "val_loss", tolerances=tolerances, callbacks=[child()] if children else [],
            model_names=model_names,
        ),
        fcb.ModelCheckpoint(save_last=True),
        *extra,
    )


# -- the two frameworks ------------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(2, 3)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


def torch_score(model):
    with torch.no_grad():
        out = model(torch.as_tensor(X))
    return {"out": float(out.sum()), "sq": float((out**2).mean())}


def orbax_score(state):
    model = state["model"]
    hidden = jnp.tanh(jnp.asarray(X) @ model["encoder"]["w"] + model["encoder"]["b"])
    out = hidden @ model["head"]["w"]
    return {"out": float(out.sum()), "sq": float((out**2).mean())}


class TorchRun:
    """A Torch loop whose weights move at every check."""

    name = "torch"
    score = staticmethod(torch_score)

    def __init__(self, dirpath, chain, *, evaluate=torch_score, **options):
        torch.manual_seed(0)
        self.dirpath = str(dirpath)
        self.model = Net()
        self.adapter = self.new_adapter(chain, evaluate=evaluate, **options)

    def new_adapter(self, chain, *, model=None, **options):
        options.setdefault("evaluate", torch_score)
        return fcb.torch.TorchAdapter(
            chain, model=self.model if model is None else model, dirpath=self.dirpath, **options
        )

    def check(self, step, metrics):
        with torch.no_grad():
            for i, p in enumerate(self.model.parameters()):
                p.add_(0.1 * (i + 1))
        return self.adapter.on_validation_end(metrics, step=step)

    def evaluate(self, adapter, slots=None):
        return adapter.evaluate_checkpoints(slots)

    def live(self):
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def assert_live(self, before):
        after = self.model.state_dict()
        assert set(after) == set(before)
        for key, value in before.items():
            assert torch.equal(after[key], value), key

    def saved(self, slot, fn=torch_score, live=None):
        """`fn` on the weights the slot's file holds, in a fresh module (submodules the
        checkpoint does not hold keep the weights `live`)."""
        payload = fcb.torch.load_checkpoint(os.path.join(self.dirpath, f"{slot}.pt"))
        net = Net()
        if live is not None:
            net.load_state_dict(live)
        if payload.get("models"):
            for name in payload["models"]:
                getattr(net, name).load_state_dict(payload["model"][name])
        else:
            net.load_state_dict(payload["model"])
        net.eval()
        with torch.no_grad():
            return fn(net)


class OrbaxRun:
    """An orbax loop whose state moves at every check."""

    name = "orbax"
    score = staticmethod(orbax_score)

    def __init__(self, dirpath, chain, *, evaluate=orbax_score, **options):
        self.dirpath = str(dirpath)
        key = jax.random.split(jax.random.PRNGKey(0), 3)
        self.state = {"model": {
            "encoder": {"w": jax.random.normal(key[0], (2, 3)),
                        "b": jax.random.normal(key[1], (3,))},
            "head": {"w": jax.random.normal(key[2], (3, 1))},
        }}
        self.adapter = self.new_adapter(chain, evaluate=evaluate, **options)

    def new_adapter(self, chain, **options):
        options.setdefault("evaluate", orbax_score)
        return fcb.orbax.OrbaxAdapter(chain, self.dirpath, background=False, **options)

    def check(self, step, metrics):
        leaves, treedef = jax.tree_util.tree_flatten(self.state)
        self.state = jax.tree_util.tree_unflatten(
            treedef, [leaf + 0.1 * (i + 1) for i, leaf in enumerate(leaves)]
        )
        return self.adapter.on_validation_end(metrics, step=step, state=self.state)

    def template(self):
        return jax.tree_util.tree_map(jnp.zeros_like, self.state)

    def evaluate(self, adapter, slots=None):
        if adapter.session.last_step < 0:  # never checked here: no state to restore like
            return adapter.evaluate_checkpoints(slots, like=self.template())
        return adapter.evaluate_checkpoints(slots)

    def live(self):
        return self.state, jax.tree_util.tree_map(np.array, self.state)

    def assert_live(self, before):
        state, arrays = before
        assert self.state is state
        for leaf, array in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(arrays),
                               strict=True):
            np.testing.assert_array_equal(np.asarray(leaf), array)
        context = self.adapter.session._check_context  # the last check's state is the same
        assert context is None or context.value is None or context.value is state

    def saved(self, slot, fn=orbax_score, live=None):
        record = fcb.orbax.read_manifest(self.dirpath)["slots"][slot]
        if record.get("models"):
            restored = fcb.orbax.restore(self.dirpath, slot, like=self.template())
            model = {**live["model"], **restored["model"]}
            return fn({**live, "model": model})
        return fn(fcb.orbax.restore(self.dirpath, slot, like=self.template()))


RUNS = [TorchRun, OrbaxRun]
frameworks = pytest.mark.parametrize("Run", RUNS, ids=[r.name for r in RUNS])


def train(Run, dirpath, chain=None, losses=LOSSES, *, end=True, **options):
    run = Run(dirpath, callbacks() if chain is None else chain, **options)
    for step, loss in enumerate(losses):
        run.check(step, {"val_loss": loss})
    if end:
        run.adapter.on_fit_end()
    return run


def manifest(dirpath):
    with open(os.path.join(dirpath, "manifest.json"), "rb") as f:
        raw = f.read()
    return raw, json.loads(raw)


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def assert_same_leaves(a, b):
    a, b = leaves(a), leaves(b)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def without_children(best_state):
    return dataclasses.replace(best_state, children=())


# -- 1. each slot's saved weights are evaluated ------------------------------------------------


@frameworks
@pytest.mark.parametrize(
    "slots, expected",
    [
        (None, ["best.val_loss"]),
        ("all", ["best.val_loss", "best.val_loss.tolerance=2"]),
        ("last", ["last"]),
        (["best.val_loss.tolerance=2", "best_model", "best.val_loss.tolerance=2"],
         ["best.val_loss.tolerance=2", "best_model"]),
    ],
    ids=["default", "all", "last", "list"],
)
def test_each_slot_evaluates_the_weights_it_holds(tmp_path, Run, slots, expected):
    run = train(Run, tmp_path)
    _, listed = manifest(tmp_path)
    live = run.score(run.model) if Run is TorchRun else run.score(run.state)
    evaluated = run.evaluate(run.adapter, slots)
    assert list(evaluated) == expected
    for slot, result in evaluated.items():
        assert isinstance(result, fcb.EvaluatedSlot)
        assert result.step == listed["slots"][slot]["step"]
        assert result.results == pytest.approx(run.saved(slot), rel=0, abs=0)
    steps = {slot: listed["slots"][slot]["step"] for slot in expected}
    assert steps.get("best.val_loss", 5) == 5 and steps.get("best.val_loss.tolerance=2", 1) == 1
    if "last" not in expected:  # the last step is the live model: an older slot is not it
        for result in evaluated.values():
            assert result.results["out"] != live["out"]


@frameworks
@settings(max_examples=8, deadline=None)
@given(
    losses=st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.8, 1.0]), min_size=1, max_size=7),
    tolerance=st.integers(1, 3),
)
def test_every_slot_evaluates_its_step_whatever_the_losses(Run, losses, tolerance):
    with tempfile.TemporaryDirectory() as dirpath:
        run = train(Run, dirpath, callbacks(tolerances=(tolerance,)), losses)
        raw, listed = manifest(dirpath)
        parent = without_children(run.adapter.runner.state[0])
        evaluated = {**run.evaluate(run.adapter, "all"), **run.evaluate(run.adapter, "last")}
        assert set(evaluated) == {"best.val_loss", f"best.val_loss.tolerance={tolerance}", "last"}
        for slot, result in evaluated.items():
            assert result.step == listed["slots"][slot]["step"]
            assert result.results == run.saved(slot)
        best = int(np.argmin(np.asarray(losses, np.float32)))
        assert evaluated["best.val_loss"].step == best
        assert evaluated["last"].step == len(losses) - 1
        assert manifest(dirpath)[0] == raw
        assert_same_leaves(without_children(run.adapter.runner.state[0]), parent)


# -- 2. the live model is left as it was -------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_torch_live_weights_and_mode_are_kept(tmp_path, training):
    seen = []

    def evaluate(model):
        seen.append((model.training, {k: v.clone() for k, v in model.state_dict().items()}))
        return torch_score(model)

    run = train(TorchRun, tmp_path, evaluate=evaluate)
    run.model.train(training)
    before = run.live()
    seen.clear()
    evaluated = run.adapter.evaluate_checkpoints("all")
    run.assert_live(before)
    assert run.model.training is training
    assert all(module.training is training for module in run.model.modules())
    assert len(seen) == 2 and not any(mode for mode, _ in seen)  # evaluated in eval mode
    for (_, weights), slot in zip(seen, evaluated, strict=True):  # the slot's weights
        saved = fcb.torch.load_checkpoint(tmp_path / f"{slot}.pt")["model"]
        assert all(torch.equal(weights[k], saved[k]) for k in saved)
        assert not torch.equal(weights["head.weight"], before["head.weight"])


def test_orbax_evaluates_a_copy_of_the_slot(tmp_path):
    seen = []

    def evaluate(state):
        seen.append(state)
        return orbax_score(state)

    run = train(OrbaxRun, tmp_path, evaluate=evaluate)
    before = run.live()
    seen.clear()
    run.adapter.evaluate_checkpoints("all")
    run.assert_live(before)
    assert len(seen) == 2 and all(state is not run.state for state in seen)
    for state, slot in zip(seen, ["best.val_loss", "best.val_loss.tolerance=2"], strict=True):
        assert_same_leaves(state, fcb.orbax.restore(tmp_path, slot, like=run.template()))
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(run.state)


# -- 3. only the nested callbacks' state changes -----------------------------------------------


@frameworks
def test_manifest_and_best_state_are_untouched_and_children_see_prefixed_keys(tmp_path, Run):
    outs = []

    def evaluate(model_or_state):
        results = Run.score(model_or_state)
        outs.append(results["out"])
        return results

    run = train(Run, tmp_path, evaluate=evaluate)
    assert len(outs) == 3  # the new bests at steps 0, 1, 5 during training
    raw, _ = manifest(tmp_path)
    files = sorted(os.listdir(tmp_path / "steps"))
    state = run.adapter.runner.state
    parent_leaves = fcb.state_dict(state, run.adapter.callbacks)["state"]["leaves"]
    evaluated = run.evaluate(run.adapter, "all")
    assert manifest(tmp_path)[0] == raw
    assert sorted(os.listdir(tmp_path / "steps")) == files  # nothing written
    after = run.adapter.runner.state
    assert_same_leaves(without_children(after[0]), without_children(state[0]))
    assert_same_leaves(after[1:], state[1:])  # ModelCheckpoint's state too
    # the nested EarlyStopping saw `best=val_loss/out` of each evaluation, at the slot's step
    assert outs[3:] == [r.results["out"] for r in evaluated.values()]
    standalone = fcb.EarlyStopping("m", "max", patience=100)
    expected = standalone.init()
    steps = [0, 1, 5] + [r.step for r in evaluated.values()]
    for step, out in zip(steps, outs, strict=True):
        expected, _ = standalone(expected, {"m": np.float32(out)}, step=step)
    assert_same_leaves(after[0].children[0], expected)
    new_leaves = fcb.state_dict(after, run.adapter.callbacks)["state"]["leaves"]
    assert set(new_leaves) == set(parent_leaves)
    changed = {path for path in parent_leaves if parent_leaves[path] != new_leaves[path]}
    assert changed and all(path.startswith("[0].children[0].") for path in changed), changed


def test_the_childrens_logs_are_prefixed_and_follow_their_state(tmp_path):
    """A nested callback that logs (a smoothed EarlyStopping) goes on from its state in
    training: it saw each new best's evaluation, then the pass's; its log is prefixed."""
    nested = fcb.EarlyStopping("best=val_loss/out", "max", patience=100, alpha=0.5)
    chain = fcb.chain(fcb.BestCheckpoint("val_loss", callbacks=[nested]))
    outs, logged = [], []

    def evaluate(model):
        results = torch_score(model)
        outs.append(results["out"])
        return results

    run = train(TorchRun, tmp_path, chain, evaluate=evaluate,
                log=lambda step, scalars: logged.append((step, scalars)))
    assert len(outs) == 3  # the new bests at steps 0, 1, 5
    logged.clear()
    evaluated = run.adapter.evaluate_checkpoints()["best.val_loss"]
    standalone = fcb.EarlyStopping("m", "max", patience=100, alpha=0.5)
    state = standalone.init()
    for step, out in zip([0, 1, 5, 5], outs, strict=True):
        state, actions = standalone(state, {"m": np.float32(out)}, step=step)
    assert set(evaluated.log) == {"best=val_loss/early_stopping/smoothed"}
    assert evaluated.log["best=val_loss/early_stopping/smoothed"] == pytest.approx(
        float(actions.log["early_stopping/smoothed"]), rel=1e-6
    )
    [(step, scalars)] = logged
    assert step == len(LOSSES)  # after the last check
    assert scalars == {
        "best.val_loss/out": evaluated.results["out"], "best.val_loss/sq": evaluated.results["sq"],
        **evaluated.log,
    }


def test_the_core_answers_a_loaded_slot_without_touching_the_best():
    cb = fcb.BestCheckpoint("val_loss", tolerances=[1], callbacks=[child()])
    state = cb.init()
    for step, loss in enumerate(LOSSES):
        state, _ = cb(state, {"val_loss": loss}, step=step)
    for request in ("loaded:best.val_loss", "loaded:best.val_loss.tolerance=1"):
        new, actions = cb.evaluated(state, request, {"out": 2.5}, step=3)
        assert_same_leaves(without_children(new), without_children(state))
        assert float(new.children[0].best) == 2.5 and int(new.children[0].best_step) == 3
        assert not bool(actions.save) and actions.slots == {} and actions.evaluate == {}
    new, _ = cb.evaluated(state, "loaded:last", {"out": 2.5}, step=3)  # another's slot
    assert_same_leaves(new, state)
    with pytest.raises(fcb.ConfigError, match=r"`slot` must be one of this callback's slots"):
        cb.evaluated_slot(state, "last", {"out": 2.5}, step=3)


# -- 4. a slot that never held a step ----------------------------------------------------------


@frameworks
def test_a_slot_without_a_checkpoint_is_none_and_not_evaluated(tmp_path, Run):
    calls = []

    def never(model_or_state):
        calls.append(1)
        return {"x": 1.0}

    never_seen = fcb.BestCheckpoint("val_acc", "max", strict=False)  # the metric never comes
    run = train(Run, tmp_path, callbacks(extra=[never_seen]),
                evaluate={"best.val_acc": never, "best.val_loss": Run.score}, history=True)
    _, listed = manifest(tmp_path)
    assert "best.val_acc" not in listed["slots"]
    state = run.adapter.runner.state
    lines = len(read_records(tmp_path / "history.jsonl"))
    summary = dict(run.adapter.summary)
    evaluated = run.evaluate(run.adapter, ["best.val_acc"])
    assert evaluated == {"best.val_acc": None} and calls == []
    assert_same_leaves(run.adapter.runner.state, state)
    assert len(read_records(tmp_path / "history.jsonl")) == lines
    assert run.adapter.summary == summary
    evaluated = run.evaluate(run.adapter)  # the default: each BestCheckpoint's best slot
    assert evaluated["best.val_acc"] is None and calls == []
    assert evaluated["best.val_loss"].step == 5


# -- 5. a fresh adapter, a finished one: history, summary, log ----------------------------------


@frameworks
def test_a_fresh_adapter_evaluates_the_committed_checkpoints(tmp_path, Run):
    run = train(Run, tmp_path)
    raw, listed = manifest(tmp_path)
    trained = run.evaluate(run.adapter, "all")
    fresh = run.new_adapter(callbacks())
    if Run is TorchRun:  # another module of the same architecture: its weights are kept
        torch.manual_seed(1)
        fresh.model = Net()
        fresh_before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    evaluated = run.evaluate(fresh, "all")
    assert not fresh.session.started
    assert evaluated == trained
    for slot, result in evaluated.items():
        assert result.step == listed["slots"][slot]["step"]
        assert result.results == run.saved(slot)
    assert float(fresh.runner.state[0].children[0].best) == pytest.approx(
        max(r.results["out"] for r in evaluated.values()), rel=1e-6
    )
    assert manifest(tmp_path)[0] == raw
    if Run is TorchRun:
        assert all(torch.equal(v, fresh_before[k]) for k, v in fresh.model.state_dict().items())
    again = run.new_adapter(callbacks())  # the run still resumes
    again.on_fit_start(**({} if Run is TorchRun else {"like": run.template()}))
    assert again.resumed_step == len(LOSSES) - 1
    again.on_fit_end()


def test_orbax_fresh_adapter_without_a_template_asks_for_one(tmp_path):
    run = train(OrbaxRun, tmp_path)
    fresh = run.new_adapter(callbacks())
    with pytest.raises(fcb.ConfigError, match=r"evaluate_checkpoints\(like=template\)"):
        fresh.evaluate_checkpoints()


@frameworks
@pytest.mark.parametrize("finished", [True, False], ids=["after-fit-end", "between-checks"])
def test_history_summary_and_log(tmp_path, Run, finished):
    logged = []
    run = train(Run, tmp_path, end=finished, history=True,
                log=lambda step, scalars: logged.append((step, scalars)))
    history = tmp_path / "history.jsonl"
    rows = read_rows(tmp_path)
    records = read_records(history)
    logged.clear()
    evaluated = run.evaluate(run.adapter, ["best.val_loss", "last"])
    added = read_records(history)[len(records):]
    assert added == [
        {"step": result.step, "evaluated": slot, "results": result.results, "log": result.log}
        for slot, result in evaluated.items()
    ]
    assert read_rows(tmp_path) == rows
    assert [row["step"] for row in rows] == list(range(len(LOSSES)))
    replayed = fcb.replay(fcb.BestCheckpoint("val_loss", tolerances=[2]), tmp_path)
    assert replayed.slots["best.val_loss"].tolist() == [5]
    assert int(replayed.checks[0]) == len(LOSSES)
    for slot, result in evaluated.items():
        for key, value in result.results.items():
            assert run.adapter.summary[f"{slot}/{key}"] == value
    assert [step for step, _ in logged] == [len(LOSSES)] * 2
    assert [scalars for _, scalars in logged] == [
        {**{f"{slot}/{k}": v for k, v in result.results.items()}, **result.log}
        for slot, result in evaluated.items()
    ]
    if not finished:  # the run goes on: the next check is recorded as usual
        run.check(len(LOSSES), {"val_loss": 0.9})
        run.adapter.on_fit_end()
        assert [row["step"] for row in read_rows(tmp_path)] == list(range(len(LOSSES) + 1))


# -- 6. which evaluation function; bad arguments -----------------------------------------------


@frameworks
def test_a_loaded_request_function_serves_its_slot_and_the_training_one_the_rest(tmp_path, Run):
    calls = []

    def for_loaded(model_or_state):
        calls.append("loaded")
        return {"out": 1.0}

    def for_training(model_or_state):
        calls.append("training")
        return {"out": 2.0}

    run = train(Run, tmp_path, evaluate={"best.val_loss": Run.score})
    run.adapter.evaluate = {
        "loaded:best.val_loss.tolerance=2": for_loaded, "best.val_loss": for_training,
    }
    evaluated = run.evaluate(run.adapter, "all")
    assert calls == ["training", "loaded"]
    assert evaluated["best.val_loss"].results == {"out": 2.0}
    assert evaluated["best.val_loss.tolerance=2"].results == {"out": 1.0}
    run.adapter.evaluate = {"last": for_training, "loaded:last": for_loaded}
    assert run.evaluate(run.adapter, "last")["last"].results == {"out": 1.0}
    run.adapter.evaluate = {"last": for_training}  # a ModelCheckpoint slot: by its name
    assert run.evaluate(run.adapter, "last")["last"].results == {"out": 2.0}


@frameworks
def test_a_mapping_without_the_slots_function_names_the_keys(tmp_path, Run):
    run = train(Run, tmp_path)
    run.adapter.evaluate = {"val": Run.score}
    with pytest.raises(fcb.ConfigError, match=r"'loaded:last' or 'last'.*only for \['val'\]"):
        run.evaluate(run.adapter, "last")
    with pytest.raises(
        fcb.ConfigError, match=r"'loaded:best.val_loss' or 'best.val_loss'.*evaluate=\{'best"
    ):
        run.evaluate(run.adapter)
    run.adapter.evaluate = None
    with pytest.raises(fcb.ConfigError, match=r"no evaluate function was given"):
        run.evaluate(run.adapter)


@frameworks
def test_bad_slots_are_config_errors(tmp_path, Run):
    run = train(Run, tmp_path)
    state = run.adapter.runner.state
    raw, _ = manifest(tmp_path)
    with pytest.raises(fcb.ConfigError, match=r"`slots` names \['nope'\], which the callbacks do "
                                              r"not keep; their slots are \['best.val_loss', "):
        run.evaluate(run.adapter, ["last", "nope"])
    for bad in (3, ["last", 3], {"last": 1}, b"last"):
        with pytest.raises(fcb.ConfigError, match=r"`slots` must be None .* got "):
            run.evaluate(run.adapter, bad)
    assert_same_leaves(run.adapter.runner.state, state)
    assert manifest(tmp_path)[0] == raw

    other = train(Run, tmp_path / "plain", fcb.ModelCheckpoint(save_last=True))
    with pytest.raises(fcb.ConfigError, match=r"defaults to the best slot of each "
                                              r"fcb.BestCheckpoint, but the callbacks have none.*"
                                              r"\['best_model', 'last'\]"):
        other.evaluate(other.adapter)
    with pytest.raises(fcb.ConfigError, match=r"the callbacks have none"):
        other.evaluate(other.adapter, "all")
    assert other.evaluate(other.adapter, "best_model")["best_model"].step == 5


def not_a_mapping(model_or_state):
    return 1.0


def not_a_scalar(model_or_state):
    return {"out": "x"}


def other_key(model_or_state):
    return {"other": 1.0}


@frameworks
@pytest.mark.parametrize(
    "evaluate, slots, error, match",
    [
        ({}, ["best.val_loss", "last"], fcb.ConfigError, r"'loaded:last' or 'last'"),
        ({"last": not_a_mapping}, ["best.val_loss", "last"], fcb.MetricTypeError,
         r"the evaluate function for (slot )?'last' must return a mapping "
         r"from metric name to scalar, got float: 1.0"),
        ({"last": not_a_scalar}, ["best.val_loss", "last"], fcb.MetricTypeError,
         r"metric 'out' must be a real scalar"),
        ({"loaded:best.val_loss.tolerance=2": other_key}, "all", fcb.MissingMetricError,
         r"'best=val_loss/out' is not in the metrics"),
    ],
    ids=["no-function", "not-a-mapping", "not-a-scalar", "child-refuses"],
)
def test_a_pass_that_fails_on_a_later_slot_changes_nothing(tmp_path, Run, evaluate, slots,
                                                           error, match):
    logged = []
    run = train(Run, tmp_path, history=True, log=lambda step, scalars: logged.append(scalars))
    run.adapter.evaluate = {"best.val_loss": Run.score, **evaluate}
    state, summary = run.adapter.runner.state, dict(run.adapter.summary)
    records = read_records(tmp_path / "history.jsonl")
    raw, _ = manifest(tmp_path)
    before = run.live()
    logged.clear()
    with pytest.raises(error, match=match):
        run.evaluate(run.adapter, slots)
    assert_same_leaves(run.adapter.runner.state, state)
    assert run.adapter.summary == summary and logged == []
    assert read_records(tmp_path / "history.jsonl") == records
    assert manifest(tmp_path)[0] == raw
    run.assert_live(before)
    run.adapter.evaluate = Run.score  # fixed: the pass runs as if the failure never happened
    fixed = run.evaluate(run.adapter, slots)
    assert len(read_records(tmp_path / "history.jsonl")) == len(records) + len(fixed)


@pytest.mark.parametrize("model_names", [None, ["encoder"]], ids=["whole", "encoder"])
def test_torch_live_weights_come_back_when_the_evaluation_raises(tmp_path, model_names):
    def boom(model):
        raise RuntimeError("boom")

    run = train(TorchRun, tmp_path, callbacks(model_names=model_names))
    run.adapter.evaluate = boom
    before = run.live()
    with pytest.raises(RuntimeError, match="boom"):
        run.adapter.evaluate_checkpoints()
    run.assert_live(before)
    assert run.model.training


# -- 7. model_names: only the saved submodules ------------------------------------------------


def test_torch_model_names_loads_only_the_saved_submodules(tmp_path):
    seen = []

    def evaluate(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return torch_score(model)

    run = train(TorchRun, tmp_path, callbacks(model_names=["encoder"]), evaluate=evaluate)
    before = run.live()
    seen.clear()
    evaluated = run.adapter.evaluate_checkpoints("all")
    run.assert_live(before)
    assert len(seen) == 2
    for weights, (slot, result) in zip(seen, evaluated.items(), strict=True):
        saved = fcb.torch.load_checkpoint(tmp_path / f"{slot}.pt")
        assert saved["models"] == ["encoder"] and set(saved["model"]) == {"encoder"}
        for key, value in saved["model"]["encoder"].items():
            assert torch.equal(weights[f"encoder.{key}"], value)
            assert not torch.equal(value, before[f"encoder.{key}"])
        for key in ("head.weight", "head.bias"):
            assert torch.equal(weights[key], before[key])  # the live head
        assert result.results == run.saved(slot, live=before)


def test_orbax_model_names_restores_only_the_saved_submodules(tmp_path):
    seen = []

    def evaluate(state):
        seen.append(state)
        return orbax_score(state)

    run = train(OrbaxRun, tmp_path, callbacks(model_names=["encoder"]), evaluate=evaluate)
    before = run.live()
    seen.clear()
    evaluated = run.adapter.evaluate_checkpoints("all")
    run.assert_live(before)
    for state, (slot, result) in zip(seen, evaluated.items(), strict=True):
        saved = fcb.orbax.restore(tmp_path, slot, like=run.template())
        assert set(saved["model"]) == {"encoder"}
        assert_same_leaves(state["model"]["encoder"], saved["model"]["encoder"])
        assert_same_leaves(state["model"]["head"], run.state["model"]["head"])  # the live head
        assert result.results == run.saved(slot, live=run.state)


# -- 8. a sharded run (FSDP2 over 2 gloo ranks) ------------------------------------------------

SHARDED_WORKER = pathlib.Path(__file__).parent / "post_training_sharded_worker.py"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_pass_on_every_rank_matches_the_checkpoint_loaded_whole(tmp_path):
    sys.path.insert(0, str(SHARDED_WORKER.parent))
    try:
        from post_training_sharded_worker import build_model, score
    finally:
        sys.path.remove(str(SHARDED_WORKER.parent))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29662", str(SHARDED_WORKER), str(tmp_path / "run"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    _, listed = manifest(tmp_path / "run")
    by_rank = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for report in by_rank:
        assert report["live_kept"] and report["fresh_live_kept"], report
        assert report["evaluated"] == by_rank[0]["evaluated"]
        assert report["fresh"] == report["evaluated"]  # a fresh adapter: the same results
    assert set(by_rank[0]["evaluated"]) == {"best.val_loss", "best.val_loss.tolerance=1", "last"}
    for slot, (step, results) in by_rank[0]["evaluated"].items():
        assert step == listed["slots"][slot]["step"]
        payload = fcb.torch.load_checkpoint(tmp_path / "run" / slot)
        model = build_model()
        model.load_state_dict(payload["model"])
        model.eval()
        with torch.no_grad():
            expected = score(model)
        assert results == pytest.approx(expected, rel=1e-6, abs=1e-7), slot
