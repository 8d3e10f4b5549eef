"""fcb.resume_with_changes: a changed numeric setting on resume rebuilds the state from history."""

from __future__ import annotations

import json
import warnings

import chex
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb.testing import assert_changed_resume_equivalent, run

KEY = "val_loss"


def _records(values, start=0):
    return [{"step": start + i, "metrics": {KEY: float(v)}} for i, v in enumerate(values)]


def _saved(callback, values):
    state, _ = run(callback, {KEY: np.asarray(values)})
    return state, json.loads(json.dumps(fcb.state_dict(state, callback)))


STOPPED = [0.5, 0.4, 0.45, 0.44, 0.43]  # patience=2 stops at step 3


def test_raising_patience_after_a_stop_continues_the_run():
    before = fcb.EarlyStopping(KEY, patience=2)
    state, saved = _saved(before, STOPPED[:4])
    assert bool(state.stopped)
    after = fcb.EarlyStopping(KEY, patience=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rebuilt state warns about nothing
        rebuilt, report = fcb.resume_with_changes(after, saved, _records(STOPPED[:4]))
    assert report.rebuilt and report.was_stopped and not report.stopped
    assert not bool(rebuilt.stopped) and int(rebuilt.wait_count) == 2
    expected, _ = run(after, {KEY: np.asarray(STOPPED[:4])})
    chex.assert_trees_all_equal(rebuilt, expected)
    (line,) = report.lines
    assert line == (
        "EarlyStopping: patience 2 -> 5; rebuilt from 4 recorded checks: was stopped (val_loss "
        "did not improve for 2 checks (patience=2, min_delta=0); best 0.4 at step 1), now running"
    )


def test_lowering_patience_stops_where_the_new_setting_would_have():
    before = fcb.EarlyStopping(KEY, patience=5)
    _, saved = _saved(before, STOPPED)
    rebuilt, report = fcb.resume_with_changes(
        fcb.EarlyStopping(KEY, patience=1), saved, _records(STOPPED)
    )
    assert not report.was_stopped and report.stopped
    assert int(rebuilt.stopped_step) == 2
    assert "now stopped (val_loss did not improve for 1 check (patience=1" in report.lines[0]


def test_unchanged_config_loads_the_saved_state_and_reports_nothing():
    es = fcb.EarlyStopping(KEY, patience=2)
    state, saved = _saved(es, STOPPED[:3])
    loaded, report = fcb.resume_with_changes(es, saved, [])
    chex.assert_trees_all_equal(loaded, state)
    assert report.lines == () and not report.rebuilt


def test_a_static_change_keeps_todays_rule():
    before = fcb.EarlyStopping(KEY, patience=2)
    state, saved = _saved(before, STOPPED[:4])
    after = fcb.EarlyStopping(KEY, patience=2, threshold_mode="rel")
    with pytest.warns(fcb.ConfigChangedWarning, match=r"threshold_mode = 'abs'.*'rel'"):
        loaded, report = fcb.resume_with_changes(after, saved, _records(STOPPED[:4]))
    chex.assert_trees_all_equal(loaded, state)
    assert not report.rebuilt and report.stopped
    assert "not rebuilt (a changed option is not a numeric setting)" in report.lines[0]


def test_a_history_that_does_not_reproduce_the_state_is_not_trusted():
    before = fcb.EarlyStopping(KEY, patience=2)
    state, saved = _saved(before, STOPPED[:4])
    wrong = _records([0.5, 0.4, 0.3, 0.2])
    with pytest.warns(fcb.ConfigChangedWarning, match=r"patience = 2.*patience = 5"):
        loaded, report = fcb.resume_with_changes(fcb.EarlyStopping(KEY, patience=5), saved, wrong)
    chex.assert_trees_all_equal(loaded, state)
    assert "the 4 recorded checks do not reproduce the saved state" in report.lines[0]


def test_one_line_per_changed_callback_of_a_chain():
    def make(patience, factor):
        return fcb.named_chain(
            stop=fcb.EarlyStopping(KEY, patience=patience),
            plateau=fcb.ReduceLROnPlateau(KEY, factor=factor, patience=0),
            best=fcb.ModelCheckpoint(KEY),
        )

    before = make(2, 0.5)
    _, saved = _saved(before, STOPPED[:4])
    rebuilt, report = fcb.resume_with_changes(make(4, 0.25), saved, _records(STOPPED[:4]))
    assert [line.split(":")[0] for line in report.lines] == [
        "EarlyStopping ['stop']",
        "ReduceLROnPlateau ['plateau']",
    ]
    assert "factor 0.5 -> 0.25" in report.lines[1]
    assert not bool(rebuilt["stop"].stopped)


def test_history_jsonl_records_with_a_summary_line():
    before = fcb.EarlyStopping(KEY, patience=2)
    _, saved = _saved(before, STOPPED[:4])
    records = [*_records(STOPPED[:4]), {"summary": {"x": 1.0}}]
    _, report = fcb.resume_with_changes(fcb.EarlyStopping(KEY, patience=3), saved, records)
    assert report.rebuilt


_VALUES = st.integers(0, 16).map(lambda k: k / 16)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(_VALUES, min_size=2, max_size=14),
    st.integers(0, 3),
    st.integers(0, 6),
    st.sampled_from([0.0, 0.0625]),
)
def test_resume_with_another_patience_equals_that_patience_from_the_start(
    values, patience_before, patience_after, min_delta
):
    before = fcb.EarlyStopping(KEY, patience=patience_before, min_delta=min_delta)
    after = fcb.EarlyStopping(KEY, patience=patience_after, min_delta=min_delta)
    split = len(values) // 2
    assert_changed_resume_equivalent(before, after, {KEY: np.asarray(values)}, splits=[split])


def test_resume_with_changes_in_a_grid_member_and_smoothing():
    history = {KEY: np.asarray([0.5, 0.7, 0.4, 0.6, 0.65, 0.5, 0.45, 0.7])}
    assert_changed_resume_equivalent(
        fcb.EarlyStopping(KEY, patience=1, alpha=0.5),
        fcb.EarlyStopping(KEY, patience=3, alpha=0.25),
        history,
        splits=[3, 6],
    )


def test_a_history_without_the_monitored_metric_is_not_trusted():
    before = fcb.EarlyStopping(KEY, patience=2)
    state, saved = _saved(before, STOPPED[:4])
    with pytest.warns(fcb.ConfigChangedWarning):
        loaded, report = fcb.resume_with_changes(
            fcb.EarlyStopping(KEY, patience=5), saved, [{"loss": 1.0}] * 4
        )
    chex.assert_trees_all_equal(loaded, state)
    assert (
        "the history cannot be replayed: EarlyStopping: the monitored metric 'val_loss'"
        in (report.lines[0])
    )
