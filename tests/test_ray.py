"""fcb.ray on a real Ray Tune (a local 2-CPU session, started once for the module): the
stopper stops each trial at its callback's stop step, its state survives an experiment
restore, and checkpoints reported at slot steps make Tune keep exactly fcb's slots."""

import json
import os
import pickle
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
tune = pytest.importorskip("ray.tune")

import fcb  # noqa: E402
import fcb.ray  # noqa: E402


def scripted_series(count, seed, length=12):
    """Walks on a 1/64 grid (exact in float32) that improve, then plateau."""
    rng = np.random.default_rng(seed)
    series = []
    for _ in range(count):
        improving = int(rng.integers(2, 7))
        steps = np.concatenate([-rng.integers(1, 5, improving), rng.integers(-1, 4, length)])
        series.append([float(v) for v in (1.0 + np.cumsum(steps[:length]) / 64)])
    return series


def reference_stop(settings, values, steps):
    es = fcb.EarlyStopping("val_loss", **settings)
    state = es.init()
    for step, value in zip(steps, values):
        state, actions = es(state, {"val_loss": value}, step=step)
        if bool(actions.stop):
            return step
    return None


def test_a_restored_stopper_continues_where_it_was_and_rewinds_a_replayed_step():
    stopper = fcb.ray.Stopper(fcb.EarlyStopping("val_loss", patience=3))
    values = [0.5, 0.4, 0.45, 0.46, 0.47, 0.3]
    first = [stopper("t", {"training_iteration": i + 1, "val_loss": v})
             for i, v in enumerate(values[:3])]
    restored = pickle.loads(pickle.dumps(stopper))  # what Tune's experiment snapshot does
    assert restored.state("t").wait_count == 1
    # the trial resumes from a checkpoint of iteration 2: iteration 3 comes again
    rest = [restored("t", {"training_iteration": i + 1, "val_loss": values[i]})
            for i in range(2, 5)]
    assert first + rest[1:] == [False, False, False, False, True]
    assert restored.stop_step("t") == 5 and restored("t", {"training_iteration": 6,
                                                           "val_loss": 0.3})
    with pytest.raises(fcb.MissingMetricError, match=r"no step key 'epoch'; available"):
        fcb.ray.Stopper(fcb.EarlyStopping("val_loss"), step="epoch")("t", {"val_loss": 1.0})
    with pytest.raises(fcb.MissingMetricError, match=r"report it with ray.tune.report"):
        fcb.ray.Stopper(fcb.EarlyStopping("val_loss"))("t", {"training_iteration": 1})
    with pytest.raises(fcb.ConfigError, match=r"one fcb callback or chain"):
        fcb.ray.Stopper(fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2]))
    # every trial's checks run through one compiled function: compiled once
    many = fcb.ray.Stopper(fcb.EarlyStopping("val_loss", patience=2))
    for trial in range(6):
        for i, value in enumerate(scripted_series(1, seed=trial)[0]):
            many(f"t{trial}", {"training_iteration": i, "val_loss": value, "config": {}})
    assert many._runner._check._cache_size() == 1
    all_stop = fcb.ray.Stopper(fcb.EarlyStopping("val_loss", patience=0), stop_all=True)
    all_stop("a", {"training_iteration": 1, "val_loss": 1.0})
    assert not all_stop.stop_all()
    all_stop("a", {"training_iteration": 2, "val_loss": 1.0})
    assert all_stop.stop_all()


@pytest.fixture(scope="module")
def ray_session():
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}})
    print(f"ray.init: {time.perf_counter() - started:.1f} s")
    yield
    ray.shutdown()


def _run_config(tmp_path, name, stopper, **options):
    return tune.RunConfig(name=name, storage_path=str(tmp_path), stop=stopper, verbose=0,
                          **options)


# six that plateau, two that improve at every check (never stopped)
SERIES = [
    *scripted_series(6, seed=3),
    [1 - i / 64 for i in range(12)],
    [1 - i / 32 for i in range(12)],
]
SETTINGS = {"patience": 2}


def test_trials_stop_at_their_callbacks_stop_step_and_tune_keeps_fcbs_slots(
    ray_session, tmp_path
):
    series = SERIES

    def train(config):
        model = {"weight": config["index"]}
        slots = fcb.ray.Checkpoints(
            fcb.ModelCheckpoint("val_loss"),
            save=lambda d: open(os.path.join(d, "model.json"), "w").write(json.dumps(model)),
        )
        for step, value in enumerate(series[config["index"]]):
            slots.report({"val_loss": value, "step": step}, step=step)  # the stop is Tune's

    stopper = fcb.ray.Stopper(fcb.EarlyStopping("val_loss", **SETTINGS), step="step")
    started = time.perf_counter()
    tuner = tune.Tuner(
        train,
        param_space={"index": tune.grid_search(list(range(len(series))))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=_run_config(
            tmp_path, "stop", stopper,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="fcb/score",
                checkpoint_score_order="min",
            ),
        ),
    )
    results = tuner.fit()
    print(f"Tune: {len(results)} trials in {time.perf_counter() - started:.1f} s")
    assert len(results) == len(series) >= 8 and not results.errors
    stopped = 0
    for result in results:
        values = series[result.config["index"]]
        stop = reference_stop(SETTINGS, values, range(len(values)))
        steps = [int(s) for s in result.metrics_dataframe["step"]]
        assert steps == list(range(len(values) if stop is None else stop + 1))
        stopped += stop is not None
        # Tune's checkpoint table (what it keeps in the trial's directory) is fcb's: the
        # best step and the last one
        kept = {}
        for name in sorted(os.listdir(result.path)):
            if name.startswith("checkpoint_"):
                with open(os.path.join(result.path, name, "fcb.json")) as file:
                    record = json.load(file)
                kept[record["step"]] = record["slots"]
        last_slots = kept[max(kept)]
        assert result.checkpoint.path.endswith(f"checkpoint_{len(steps) - 1:06d}")
        assert set(kept) == set(last_slots.values()) == {
            int(np.argmin(values[: steps[-1] + 1])), steps[-1]
        }
    assert 0 < stopped < len(series)


def test_an_experiment_restore_keeps_the_stoppers_state(ray_session, tmp_path):
    """Trials fail once mid-run (after checks that did not improve); the restored
    experiment resumes them from their checkpoints and stops them where an uninterrupted
    run would, which a stopper starting afresh would not."""
    settings = {"patience": 3}
    series = [[1.0, 0.75, 0.5, 0.625, 0.625, 0.625, 0.5, 0.5, 0.5],
              [1.0, 0.5, 0.75, 0.75, 0.25, 0.5, 0.5, 0.5, 0.5]]
    fail_at = 5  # two non-improving checks reported before the failure
    marker = tmp_path / "failed-once"

    def train(config):
        checkpoint = tune.get_checkpoint()
        start = 0
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                with open(os.path.join(directory, "step")) as file:
                    start = int(file.read()) + 1
        for step in range(start, len(series[config["index"]])):
            if step == fail_at and not os.path.exists(marker):
                raise RuntimeError("preempted")
            import tempfile

            with tempfile.TemporaryDirectory() as directory:
                with open(os.path.join(directory, "step"), "w") as file:
                    file.write(str(step))
                tune.report({"val_loss": series[config["index"]][step], "step": step},
                            checkpoint=tune.Checkpoint.from_directory(directory))

    stopper = fcb.ray.Stopper(fcb.EarlyStopping("val_loss", **settings), step="step")
    tuner = tune.Tuner(
        train,
        param_space={"index": tune.grid_search([0, 1])},
        run_config=_run_config(tmp_path, "restore", stopper,
                               failure_config=tune.FailureConfig(max_failures=0)),
    )
    first = tuner.fit()
    assert len(first.errors) == 2
    marker.write_text("")
    restored = tune.Tuner.restore(str(tmp_path / "restore"), train, resume_errored=True)
    results = restored.fit()
    assert not results.errors
    for result in results:
        values = series[result.config["index"]]
        stop = reference_stop(settings, values, range(len(values)))
        afresh = reference_stop(settings, values[fail_at:], range(fail_at, len(values)))
        assert stop is not None and stop != afresh
        assert result.metrics["step"] == stop
