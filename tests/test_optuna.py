"""fcb.optuna on a real Optuna with SQLite storage: the pruner against fcb.EarlyStopping and
Lightning's EarlyStopping, two workers sharing a study, a 2-rank Lightning run, and the
replay of a finished study against replaying each trial."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")
torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

import fcb  # noqa: E402
import fcb.lightning  # noqa: E402
import fcb.optuna  # noqa: E402
from fcb import _replay  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
HERE = pathlib.Path(__file__).parent

SETTINGS = [
    {"patience": 2, "min_delta": 0.0, "mode": "min"},
    {"patience": 3, "min_delta": 1 / 16, "mode": "min"},
    {"patience": 1, "min_delta": 0.0, "mode": "max"},
    {"patience": 0, "min_delta": 1 / 32, "mode": "min"},
]


def scripted_series(count, seed, max_length=14, nan_every=7):
    """Random walks on a 1/64 grid (exact in float32), some with a NaN or an infinity."""
    rng = np.random.default_rng(seed)
    series = []
    for index in range(count):
        length = int(rng.integers(3, max_length + 1))
        walk = 1.0 + np.cumsum(rng.integers(-6, 7, size=length)) / 64
        values = [float(v) for v in walk]
        if index % nan_every == nan_every - 1:
            values[int(rng.integers(0, length))] = float("nan") if index % 2 else float("inf")
        series.append(values)
    return series


def fcb_stop(settings, values, steps=None):
    """The step at which fcb.EarlyStopping, driven eagerly, stops (None: never)."""
    es = fcb.EarlyStopping("value", **settings)
    state = es.init()
    for step, value in zip(steps or range(len(values)), values):
        state, actions = es(state, {"value": value}, step=step)
        if bool(actions.stop):
            return step
    return None


def lightning_stop(settings, values):
    """The step at which Lightning's EarlyStopping, driven by hand, stops (None: never)."""
    es = pl.callbacks.EarlyStopping(monitor="value", check_finite=True, **settings)
    for step, value in enumerate(values):
        should_stop, _ = es._evaluate_stopping_criteria(torch.tensor(value))
        if should_stop:
            return step
    return None


def run_trial(study, values):
    """Report the values one by one as an objective would; the step of the prune."""
    trial = study.ask()
    for step, value in enumerate(values):
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, values[-1])
    return None


def direction(settings):
    return "minimize" if settings["mode"] == "min" else "maximize"


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_each_trial_is_pruned_where_early_stopping_stops(tmp_path, settings):
    series = scripted_series(24, seed=settings["patience"])
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    pruner = fcb.optuna.Pruner(fcb.EarlyStopping("value", **settings))
    study = optuna.create_study(
        storage=storage, study_name="s", pruner=pruner, direction=direction(settings)
    )
    compiled = _replay._replay_batch._cached._cache_size()
    pruned = [run_trial(study, values) for values in series]
    reference = [fcb_stop(settings, values) for values in series]
    assert pruned == reference
    assert reference == [lightning_stop(settings, values) for values in series]
    assert any(p is None for p in pruned) and any(p is not None for p in pruned)
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert [s == optuna.trial.TrialState.PRUNED for s in states] == [
        p is not None for p in pruned
    ]
    # every history of up to 16 checks is padded to one length: one compilation at most
    assert _replay._replay_batch._cached._cache_size() - compiled <= 1
    print(f"{settings}: {sum(p is not None for p in pruned)}/{len(series)} trials pruned, "
          f"as fcb.EarlyStopping and Lightning's EarlyStopping")


def test_a_longer_history_and_reported_steps_with_gaps(tmp_path):
    settings = {"patience": 4, "min_delta": 0.0, "mode": "min"}
    values = [1.0 - i / 64 for i in range(30)] + [0.6] * 5
    steps = [3 * i + 1 for i in range(len(values))]
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        pruner=fcb.optuna.Pruner(fcb.EarlyStopping("value", **settings)),
    )
    trial = study.ask()
    decisions = []
    for step, value in zip(steps, values):
        trial.report(value, step)
        decisions.append(trial.should_prune())
    stop = fcb_stop(settings, values, steps)
    assert stop == steps[33]
    assert decisions == [step >= stop for step in steps]


def test_two_workers_share_one_study(tmp_path):
    settings = {"patience": 2, "min_delta": 1 / 64}
    series = scripted_series(16, seed=11)
    config = tmp_path / "series.json"
    config.write_text(json.dumps({"early_stopping": settings, "series": series}))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=storage, study_name="shared")
    workers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "optuna_worker.py"), storage, "shared", name, "8",
             str(config)],
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for name in ("a", "b")
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 0, stderr[-4000:]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert len(trials) == 16 and {t.user_attrs["worker"] for t in trials} == {"a", "b"}
    for trial in trials:
        stop = fcb_stop({**settings, "mode": "min"}, series[trial.number])
        assert trial.user_attrs.get("pruned_at") == stop
        assert (trial.state == optuna.trial.TrialState.PRUNED) == (stop is not None)
        reported = len(series[trial.number]) if stop is None else stop + 1
        assert sorted(trial.intermediate_values) == list(range(reported))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A study of 20 trials, most pruned by its own fcb pruner (histories of 3 to 40 checks,
    reported at every other step), four improving to the end."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('study') / 'study.db'}"
    study = optuna.create_study(
        storage=storage, study_name="done",
        pruner=fcb.optuna.Pruner(fcb.EarlyStopping("value", patience=6)),
    )
    improving = [[1 - k * i / 256 for i in range(30)] for k in (1, 2, 3, 4)]
    for values in [*scripted_series(16, seed=5, max_length=40, nan_every=9), *improving]:
        trial = study.ask()
        for index, value in enumerate(values):
            trial.report(value, 2 * index)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, values[-1])
    return storage, study


GRID = dict(monitor="value", patience=[0, 1, 2, 4], min_delta=[0.0, 1 / 16])


def test_replay_of_a_study_equals_replaying_each_trial(finished_study):
    storage, study = finished_study
    batch = fcb.grid(fcb.EarlyStopping, **GRID)
    result = fcb.replay(batch, storage, study_name="done")
    trials = study.get_trials()
    assert list(result.trials) == [t.number for t in trials]
    assert sorted(set(result.lengths.tolist())) != [result.lengths[0]]  # varied lengths
    for column, trial in enumerate(trials):
        steps, values = zip(*sorted(trial.intermediate_values.items()))
        alone = fcb.replay(batch, {"value": list(values)}, steps=list(steps))
        for name in ("stop_step", "stop_reason", "checks", "best_step"):
            np.testing.assert_array_equal(getattr(result, name)[:, column], getattr(alone, name))
        np.testing.assert_array_equal(result.best_value[:, column], alone.best_value)
    # the study-wide figures, from the per-trial columns by hand
    objective = np.asarray([t.value if t.value is not None else
                            sorted(t.intermediate_values.items())[-1][1] for t in trials])
    np.testing.assert_array_equal(result.trial_values, objective)
    for index in range(len(result)):
        kept = result.stop_step[index] < 0
        assert result.pruned[index] == (~kept).sum()
        assert result.saved[index] == 1 - result.checks[index].sum() / result.lengths.sum()
        finite = objective[kept & np.isfinite(objective)]
        expected = finite.min() if len(finite) else np.nan
        np.testing.assert_array_equal(result.best_kept[index], expected)
        np.testing.assert_array_equal(
            result.lost[index], abs(expected - objective[np.isfinite(objective)].min())
        )
    # the Study object itself is a history too
    same = fcb.replay(batch, study)
    np.testing.assert_array_equal(same.stop_step, result.stop_step)
    print(result.table(max_rows=None))


def test_fcb_replay_command_over_a_study(finished_study, capsys):
    from fcb.cli import main

    storage, study = finished_study
    code = main(["replay", storage, "--study", "done", "--monitor", "value",
                 "--patience", "0,2,6", "--min-delta", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    expected = fcb.replay(fcb.grid(fcb.EarlyStopping, monitor="value", patience=[0, 2, 6],
                                   min_delta=[0.0]), storage, study_name="done")
    assert out.startswith(expected.table() + "\n")
    assert "most compute saved without losing the best trial" in out
    # patience=6 is the study's own pruner: it prunes exactly the trials the study pruned
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    assert expected.row(2)["pruned"] == pruned
    assert main(["replay", storage, "--study", "nope", "--monitor", "value"]) == 2
    assert "has no study named 'nope'; its studies: 'done'" in capsys.readouterr().err


def test_bad_input_names_the_field_and_the_fix(finished_study):
    storage, study = finished_study
    with pytest.raises(fcb.MissingMetricError, match=r"build it with monitor='value'"):
        fcb.optuna.Pruner(fcb.EarlyStopping("val_loss"))
    with pytest.raises(fcb.ConfigError, match=r"one fcb callback or chain .* got Grid"):
        fcb.optuna.Pruner(fcb.grid(fcb.EarlyStopping, monitor="value", patience=[1, 2]))
    es = fcb.EarlyStopping("value", mode="max")
    with pytest.raises(fcb.ConfigError, match=r"mode 'max', but the study minimizes it"):
        fcb.replay(es, study)
    with pytest.raises(fcb.ConfigError, match=r"drop steps = 'step'"):
        fcb.replay(fcb.EarlyStopping("value"), storage, study_name="done", steps="step")
    with pytest.raises(fcb.ConfigError, match=r"`history` must be the study's storage URL"):
        fcb.replay(fcb.EarlyStopping("value"), {"value": [1.0]}, study_name="done")
    # listed first or last, the FcbCallback (a checkpoint callback) runs after it
    pruning = fcb.optuna.PruningCallback(optuna.create_study().ask(), "val_loss")
    bridge = fcb.lightning.FcbCallback(fcb.EarlyStopping("a"), step="global_step")
    for callbacks in ([pruning, bridge], [bridge, pruning]):
        trainer = pl.Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False)
        assert trainer.callbacks.index(pruning) < trainer.callbacks.index(bridge)
        pruning.on_fit_start(trainer, None)
        assert pruning._step(trainer) == trainer.global_step  # numbered as the bridge's
    with pytest.raises(fcb.ConfigError, match=r"`reduce` must be one of"):
        fcb.optuna.PruningCallback(None, "val_loss", reduce="median")
    with pytest.raises(fcb.ConfigError, match=r"primary rank needs the trial"):
        trainer = pl.Trainer(callbacks=[fcb.optuna.PruningCallback(None, "val_loss")],
                             logger=False, enable_progress_bar=False)
        trainer.callbacks[0].on_fit_start(trainer, None)


def test_import_fcb_imports_neither_optuna_nor_ray():
    code = ("import sys, fcb; print(sorted(m for m in ('optuna', 'ray', 'torch', "
            "'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_prune_at_the_same_step(tmp_path):
    """2 gloo ranks under Lightning: the primary's decision (on the mean of the ranks'
    values) stops both at the same step, after FcbCallback committed it."""
    sys.path.insert(0, str(HERE))
    try:
        from optuna_ddp_worker import MEAN_STOP, VALUES
    finally:
        sys.path.remove(str(HERE))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=storage, study_name="ddp")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    result = subprocess.run(
        [sys.executable, str(HERE / "optuna_ddp_worker.py"), str(tmp_path / "root"), str(out),
         storage, "ddp"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [
        [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    assert [line["step"] for line in ranks[0]] == list(range(MEAN_STOP + 1))
    for lines in ranks:
        assert [line["pruned_step"] for line in lines] == [None] * MEAN_STOP + [MEAN_STOP]
        assert lines[-1]["stop"] and not any(line["stop"] for line in lines[:-1])
    assert (out / "pruned0").read_text() == (out / "pruned1").read_text() == str(MEAN_STOP)
    mean = [(a + b) / 2 for a, b in zip(VALUES[0], VALUES[1])]
    assert fcb_stop({"patience": 3}, mean) == MEAN_STOP
    assert fcb_stop({"patience": 3}, VALUES[0]) != MEAN_STOP != fcb_stop({"patience": 3},
                                                                          VALUES[1])
    trial = optuna.load_study(study_name="ddp", storage=storage).trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.intermediate_values == {i: mean[i] for i in range(MEAN_STOP + 1)}
    # the pruned step's checkpoint was committed before the trial ended
    manifest = json.loads((tmp_path / "root" / "checkpoints" / "manifest.json").read_text())
    assert manifest["slots"]["last"]["step"] == MEAN_STOP
