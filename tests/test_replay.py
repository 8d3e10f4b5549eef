"""fcb.replay: each configuration decides exactly as in its own run; inputs; results."""

from __future__ import annotations

import json
import logging
import math

import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
import fcb.testing
from fcb import StopReason

NAN, INF = math.nan, math.inf

# One jitted check for every reference run: the callback is an argument, so the members of a
# grid (same structure) share one trace.
_CHECK = jax.jit(lambda callback, state, metrics, step: callback(state, metrics, step=step))


def _reference(callback, history, steps=None):
    """Run checks one at a time until the first stop: (state, actions at the end, stop index)."""
    n = fcb.testing.history_length(history)
    steps = np.arange(n) if steps is None else np.asarray(steps)
    state = callback.init()
    for i in range(n):
        metrics = {k: np.float32(np.asarray(v)[i]) for k, v in history.items()}
        state, actions = _CHECK(callback, state, metrics, np.int32(steps[i]))
        if bool(actions.stop):
            return state, actions, i
    return state, actions, -1


def _reference_best(values, mode="min"):
    """The earliest best finite value (strict improvement): (index, value) or (-1, nan)."""
    values = np.asarray(values, np.float32)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        return -1, NAN
    pick = values[finite].argmin() if mode == "min" else values[finite].argmax()
    return int(finite[pick]), float(values[finite[pick]])


def _assert_matches_reference(result, g, history, key="val_loss", mode="min", steps=None):
    n = fcb.testing.history_length(history)
    steps = np.arange(n) if steps is None else np.asarray(steps)
    for index in range(len(g)):
        state, actions, stop = _reference(g[index], history, steps)
        checks = n if stop < 0 else stop + 1
        assert result.checks[index] == checks
        assert result.stop_step[index] == (-1 if stop < 0 else steps[stop])
        assert result.stop_reason[index] == int(actions.stop_reason)
        chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda x, i=index: x[i], result.state),
                                    state)
        for slot, held in actions.slots.items():
            assert result.slots[slot][index] == int(held), slot
            np.testing.assert_array_equal(
                result.slot_values[slot][index], actions.slot_values[slot]
            )
        best_index, best_value = _reference_best(np.asarray(history[key])[:checks], mode)
        assert result.best_step[index] == (-1 if best_index < 0 else steps[best_index])
        np.testing.assert_array_equal(result.best_value[index], np.float32(best_value))


def _chain(patience, min_delta, every_n):
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=patience, min_delta=min_delta),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, every_n=every_n),
        fcb.BestCheckpoint("val_loss", tolerances=(1, 3), min_delta=min_delta),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=1),
    )


values = st.one_of(
    st.sampled_from([0.1, 0.2, 0.3, 0.5, NAN, INF, -INF]),
    st.floats(-2, 2, allow_nan=False, allow_subnormal=False, width=32),
)


# Fixed lengths: the scan length is static, so every new length compiles the replay again.
@settings(max_examples=25, deadline=None)
@given(history=st.lists(values, min_size=16, max_size=16))
def test_replay_of_a_grid_equals_each_configuration_run_alone(history):
    g = fcb.grid(_chain, patience=[0, 2, 5], min_delta=[0, 0.05], every_n=[1, 2])
    data = {"val_loss": np.asarray(history, np.float32)}
    result = fcb.replay(g, data)
    assert len(result) == 12 and result.configs == g.configs
    _assert_matches_reference(result, g, data)


@settings(max_examples=15, deadline=None)
@given(
    history=st.lists(values, min_size=12, max_size=12),
    check_finite=st.booleans(),
)
def test_replay_in_max_mode_with_terminate_on_nan(history, check_finite):
    def factory(patience, start):
        return fcb.chain(
            fcb.EarlyStopping(
                "acc", "max", patience=patience, start_from_step=start, check_finite=check_finite
            ),
            fcb.TerminateOnNaN(keys=("loss",)),
        )

    g = fcb.grid(factory, patience=[1, 4], start=[0, 3])
    data = {"acc": np.asarray(history, np.float32), "loss": np.asarray(history[::-1], np.float32)}
    steps = np.arange(len(history)) * 10 + 5
    result = fcb.replay(g, data, steps=steps)
    _assert_matches_reference(result, g, data, key="acc", mode="max", steps=steps)


def test_each_configuration_equals_fcb_testing_run():
    """The same, against fcb.testing.run (eager) on the prefix each configuration ran."""
    g = fcb.grid(_chain, patience=[1, 3], min_delta=[0.02], every_n=[1])
    history = {"val_loss": np.array([0.9, 0.7, 0.72, 0.69, 0.71, NAN, 0.74, 0.6, 0.65, 0.66])}
    result = fcb.replay(g, history)
    for index in range(len(g)):
        member = g[index]
        _, full = fcb.testing.run(member, history)
        stops = np.flatnonzero(np.asarray(full.stop))
        checks = int(stops[0]) + 1 if stops.size else 10
        state, actions = fcb.testing.run(member, history, stop=checks)
        assert result.checks[index] == checks
        chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda x, i=index: x[i], result.state),
                                    state)
        for slot, steps in actions.slots.items():
            assert result.slots[slot][index] == int(steps[-1])


def test_a_single_callback_is_one_row():
    result = fcb.replay(
        fcb.EarlyStopping("val_loss", patience=2), {"val_loss": [0.5, 0.4, 0.45, 0.41, 0.3]}
    )
    assert len(result) == 1 and result.configs == [{}]
    assert result.stop_step.tolist() == [3]
    assert result.stop_reason.tolist() == [StopReason.PATIENCE]
    assert result.best_step.tolist() == [1]
    assert result.best_value.dtype == np.float32


def test_slots_freeze_at_the_stop():
    """`last` holds the stopping check, not the end of the history: training ended there."""
    chain = fcb.chain(
        fcb.EarlyStopping("val_loss", patience=1),
        fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
    )
    result = fcb.replay(chain, {"val_loss": [0.5, 0.4, 0.45, 0.3, 0.2]})
    assert result.stop_step.tolist() == [2]
    assert result.slots == {"best_model": [1], "last": [2]}


def test_tolerance_slots_show_the_best_each_patience_would_keep():
    history = {"val_loss": [0.5, 0.4, 0.45, 0.3, 0.35, 0.36, 0.2]}
    result = fcb.replay(fcb.BestCheckpoint("val_loss", tolerances=(1, 3)), history)
    assert {k: v.tolist() for k, v in result.slots.items()} == {
        "best.val_loss": [6],
        "best.val_loss.tolerance=1": [1],
        "best.val_loss.tolerance=3": [6],
    }
    assert result.stop_step.tolist() == [-1]


# -- inputs ----------------------------------------------------------------------------------


HISTORY_ROWS = [
    {"step": 0, "val_loss": 0.5},
    {"step": 1, "val_loss": 0.4},
    {"step": 2, "val_loss": 0.45},
    {"step": 3, "val_loss": 0.41},
]


def test_list_of_dicts_skips_rows_without_the_monitored_metric():
    rows = [{"step": 10 * i, "train_loss": 1.0} for i in range(4)]
    rows += [{"step": 10 * r["step"] + 5, "val_loss": r["val_loss"]} for r in HISTORY_ROWS]
    rows.sort(key=lambda r: r["step"])
    result = fcb.replay(fcb.EarlyStopping("val_loss", patience=2), rows)
    assert result.steps.tolist() == [5, 15, 25, 35]
    assert result.stop_step.tolist() == [35]
    assert result.best_step.tolist() == [15]


def test_csv_file_with_empty_cells(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train_loss,val_loss\n"
        "0,9,1.0,\n0,9,,0.5\n1,19,0.9,\n1,19,,0.4\n2,29,0.8,\n2,29,,nan\n3,39,,0.41\n"
    )
    es = fcb.EarlyStopping("val_loss", patience=2, check_finite=False)
    result = fcb.replay(es, str(path))
    assert result.steps.tolist() == [9, 19, 29, 39]
    assert result.stop_step.tolist() == [39]
    by_epoch = fcb.replay(es, path, steps="epoch")
    assert by_epoch.steps.tolist() == [0, 1, 2, 3]
    assert by_epoch.best_step.tolist() == [1]


def test_jsonl_history_and_run_directory(tmp_path):
    lines = [
        json.dumps({"step": r["step"], "metrics": {"val_loss": r["val_loss"]}, "events": []})
        for r in HISTORY_ROWS
    ]
    lines.append(json.dumps({"summary": {"best.val_loss/best_value": 0.4}}))
    (tmp_path / "history.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 4, "metr')
    es = fcb.EarlyStopping("val_loss", patience=2)
    for source in (tmp_path / "history.jsonl", tmp_path):
        result = fcb.replay(es, source)
        assert result.steps.tolist() == [0, 1, 2, 3]  # the torn last line is ignored
        assert result.stop_step.tolist() == [3]


def test_mapping_with_a_step_column():
    history = {"step": [100, 200, 300], "val_loss": [0.3, 0.2, 0.25]}
    result = fcb.replay(fcb.ModelCheckpoint("val_loss", save_last=True), history)
    assert result.slots["best_model"].tolist() == [200]
    assert result.slots["last"].tolist() == [300]


# -- monitor ---------------------------------------------------------------------------------


def test_best_follows_the_monitored_metric():
    history = {"acc": [0.5, 0.7, 0.6], "val_loss": [0.3, 0.2, 0.1]}
    result = fcb.replay(fcb.EarlyStopping("acc", "max", patience=5), history)
    assert (result.monitor, result.mode) == ("acc", "max")
    assert result.best_step.tolist() == [1]


def test_several_monitors_need_monitor_argument():
    chain = fcb.chain(
        fcb.EarlyStopping("val_loss", patience=5),
        fcb.ModelCheckpoint("acc", "max"),
    )
    history = {"acc": [0.5, 0.7, 0.6], "val_loss": [0.3, 0.2, 0.1]}
    with pytest.raises(fcb.ConfigError, match=r"monitor several metrics.*pass monitor="):
        fcb.replay(chain, history)
    result = fcb.replay(chain, history, monitor="val_loss")
    assert (result.monitor, result.mode, result.best_step.tolist()) == ("val_loss", "min", [2])
    assert fcb.replay(chain, history, mode="max").monitor == "acc"


def test_no_monitor():
    result = fcb.replay(fcb.TerminateOnNaN(keys=("loss",)), {"loss": [1.0, NAN, 2.0]})
    assert result.monitor is None
    assert result.best_step.tolist() == [-1] and np.isnan(result.best_value[0])
    assert result.stop_step.tolist() == [1]
    assert "best_value" in result.table()


# -- results ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep():
    g = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2, 4], min_delta=[0, 0.02])
    history = {"val_loss": [0.9, 0.7, 0.72, 0.69, 0.71, 0.73, 0.74, 0.6]}
    return fcb.replay(g, history)


def test_results_read_back_their_configuration(sweep):
    assert sweep.names == ("patience", "min_delta")
    assert sweep.row(3) == {
        "patience": 2,
        "min_delta": 0.02,
        "stop_step": 3,
        "stop_reason": "patience",
        "checks": 4,
        "best_step": 3,
        "best_value": pytest.approx(0.69),
    }
    assert [r["patience"] for r in sweep.rows()] == [1, 1, 2, 2, 4, 4]
    assert sweep.best()["patience"] == 4 and sweep.best()["best_step"] == 7
    assert sweep.pareto().tolist() == [0, 3, 4]
    assert sweep.order("checks").tolist()[:2] == [0, 1]
    assert sweep.order("patience").tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(fcb.ConfigError, match="cannot sort by 'nope'"):
        sweep.order("nope")


def test_table(sweep):
    text = str(sweep)
    lines = text.splitlines()
    assert lines[0] == "replay: 6 configurations x 8 checks; best = lowest val_loss"
    assert lines[1].split() == [
        "#", "patience", "min_delta", "stop_step", "reason", "checks", "best_step", "best",
        "val_loss",
    ]
    assert lines[6].split() == ["4", "4", "0", ">", "7", "history", "ended", "8", "7", "0.6"]
    short = sweep.table(max_rows=4, sort_by="best_value").splitlines()
    assert short[2].split()[0] == "4"  # the best configuration first
    assert "... 2 more rows" in short
    assert len(short) == 2 + 4 + 1
    assert "ReplayResult(6 configurations x 8 checks" in repr(sweep)


def test_replay_is_fast_for_a_large_grid():
    rng = np.random.default_rng(0)
    steps = np.arange(1000)
    history = {"val_loss": 1 / (1 + steps / 50) + 4e-4 * steps + 0.02 * rng.standard_normal(1000)}
    g = fcb.grid(
        fcb.EarlyStopping, monitor="val_loss", patience=np.arange(1, 101),
        min_delta=np.linspace(0, 0.01, 20),
    )
    result = fcb.replay(g, history)
    assert len(result) == 2000
    # more patience never stops earlier (same min_delta)
    checks = result.checks.reshape(100, 20)
    assert np.all(np.diff(checks, axis=0) >= 0)


# -- errors ----------------------------------------------------------------------------------


def test_missing_metric_lists_the_history_keys():
    with pytest.raises(fcb.MissingMetricError, match=r"'val_loss' is not in.*\['train_loss'\]"):
        fcb.replay(fcb.EarlyStopping("val_loss"), {"train_loss": [1.0, 2.0]})


def test_bad_histories():
    es = fcb.EarlyStopping("val_loss")
    with pytest.raises(fcb.ConfigError, match=r"one value per check, got lengths"):
        fcb.replay(es, {"val_loss": [1.0, 2.0], "step": [0, 1, 2]})
    with pytest.raises(fcb.ConfigError, match="must be 1-D"):
        fcb.replay(es, {"val_loss": [[1.0, 2.0]]})
    with pytest.raises(fcb.MetricTypeError, match="'val_loss' must hold numbers"):
        fcb.replay(es, {"val_loss": ["a", "b"]})
    with pytest.raises(fcb.MetricTypeError, match=r"check 1: metric 'val_loss' must be a number"):
        fcb.replay(es, [{"val_loss": 1.0}, {"val_loss": "high"}])
    with pytest.raises(fcb.ConfigError, match="item 0 is int"):
        fcb.replay(es, [1, 2])
    with pytest.raises(fcb.ConfigError, match="no check with every metric"):
        fcb.replay(es, [{"val_loss": None, "x": 1}])
    with pytest.raises(fcb.ConfigError, match="must be a mapping of 1-D arrays"):
        fcb.replay(es, 3.0)
    with pytest.raises(fcb.ConfigError, match="does not exist"):
        fcb.replay(es, "/nonexistent/history.csv")
    with pytest.raises(fcb.ConfigError, match=r"must be an fcb.Callback or an fcb.grid"):
        fcb.replay("EarlyStopping", {"val_loss": [1.0]})


def test_bad_steps():
    es = fcb.EarlyStopping("val_loss")
    history = {"val_loss": [1.0, 2.0]}
    with pytest.raises(fcb.ConfigError, match=r"whole numbers >= 0, got \[0.5, 1.0\]"):
        fcb.replay(es, history, steps=[0.5, 1])
    with pytest.raises(fcb.ConfigError, match="one step number per check"):
        fcb.replay(es, history, steps=[0, 1, 2])
    with pytest.raises(fcb.MissingMetricError, match="steps = 'epoch' names no history column"):
        fcb.replay(es, history, steps="epoch")
    with pytest.raises(fcb.ConfigError, match="`mode` must be 'min' or 'max'"):
        fcb.replay(es, history, mode="down")
    with pytest.raises(fcb.MissingMetricError, match="monitor = 'acc' is not a metric"):
        fcb.replay(es, history, monitor="acc")


def _compiled(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]


def test_replay_compiles_one_program_and_reuses_it(caplog: pytest.LogCaptureFixture) -> None:
    """A replay compiles its own function and nothing else (no slicing or conversion
    programs on the side); another replay of the same shapes compiles nothing."""
    batch = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2, 3, 5, 8, 13, 21])
    history = {"val_loss": np.linspace(1.0, 0.5, 23) + np.sin(np.arange(23.0)) / 10}
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        first = fcb.replay(batch, history)
        compiled = _compiled(caplog)
        caplog.clear()
        again = fcb.replay(batch, {"val_loss": history["val_loss"][::-1].copy()})
        assert _compiled(caplog) == []
    assert len(compiled) == 1 and "_replay_batch" in compiled[0], compiled
    assert len(first) == len(again) == 7


def _assert_same_results(one, other):
    for field in ("stop_step", "stop_reason", "checks", "best_step", "best_value", "steps"):
        np.testing.assert_array_equal(getattr(one, field), getattr(other, field), err_msg=field)
    assert one.configs == other.configs
    chex.assert_trees_all_equal(one.slots, other.slots)
    chex.assert_trees_all_equal(one.slot_values, other.slot_values)
    chex.assert_trees_all_equal(one.state, other.state)


@settings(max_examples=10, deadline=None)
@given(
    history=st.lists(values, min_size=16, max_size=16),
    chunk_size=st.sampled_from([1, 5, 7, 11]),
)
def test_replay_in_chunks_equals_the_replay_at_once(history, chunk_size):
    """A grid larger than `chunk_size` runs in chunks (the last padded); every result, the
    final states included, equals the replay of the whole grid at once, bit for bit."""
    g = fcb.grid(_chain, patience=[0, 2, 5], min_delta=[0, 0.05], every_n=[1, 2])
    data = {"val_loss": np.asarray(history, np.float32)}
    _assert_same_results(fcb.replay(g, data, chunk_size=chunk_size), fcb.replay(g, data))


def test_chunks_of_equal_size_share_one_program(caplog: pytest.LogCaptureFixture) -> None:
    """11 configurations in chunks of at most 4: three chunks of 4 (the last padded), one
    compiled program and no side programs for the slicing."""
    from fcb._replay import _chunk_bounds

    assert _chunk_bounds(11, 4) == (4, [(0, 4), (4, 8), (8, 11)])
    assert _chunk_bounds(10, 4) == (4, [(0, 4), (4, 8), (8, 10)])
    assert _chunk_bounds(100, 100) == (100, [(0, 100)])
    assert _chunk_bounds(101, 50) == (34, [(0, 34), (34, 68), (68, 101)])
    batch = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=list(range(1, 12)))
    history = {"val_loss": np.linspace(1.0, 0.5, 19) + np.sin(np.arange(19.0)) / 10}
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        chunked = fcb.replay(batch, history, chunk_size=4)
    compiled = _compiled(caplog)
    assert len(compiled) == 1 and "_replay_batch" in compiled[0], compiled
    _assert_same_results(chunked, fcb.replay(batch, history))


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "16"])
def test_bad_chunk_size(chunk_size):
    batch = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2])
    with pytest.raises(fcb.ConfigError, match=r"chunk_size = .* must be a whole number"):
        fcb.replay(batch, {"val_loss": [0.5, 0.4]}, chunk_size=chunk_size)
