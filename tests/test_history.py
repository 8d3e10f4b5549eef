"""history.jsonl: what TorchAdapter(history=True) records, torn lines, resume, replay of it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fcb
import fcb.torch
from fcb._history import read_records, read_rows

LOSSES = [0.9, 0.7, 0.72, 0.69, 0.75, 0.8, 0.85, 0.9]


def _chain():
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=3),
        fcb.ModelCheckpoint("val_loss", save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(1,)),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=0),
    )


def _fit(dirpath, losses, *, resume=False, crash_after=None):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adapter = fcb.torch.TorchAdapter(
        _chain(), model=model, optimizer=optimizer, dirpath=dirpath, history=True,
        resume_from=dirpath if resume else None,
    )
    adapter.on_fit_start()
    start = 0 if adapter.resumed_step is None else adapter.resumed_step + 1
    for step in range(start, len(losses)):
        adapter.on_validation_end({"val_loss": losses[step], "train_loss": 1.0}, step=step)
        if crash_after is not None and step >= crash_after:
            adapter.on_exception()
            return adapter
        if adapter.should_stop:
            break
    adapter.on_fit_end()
    return adapter


def test_one_line_per_check_and_a_summary(tmp_path):
    _fit(tmp_path, LOSSES)
    records = read_records(str(tmp_path / "history.jsonl"))
    checks, summary = records[:-1], records[-1]
    assert [r["step"] for r in checks] == [0, 1, 2, 3, 4, 5, 6]  # stopped at 6 (patience 3)
    assert checks[0]["metrics"] == {"val_loss": pytest.approx(0.9), "train_loss": 1.0}
    assert checks[2]["lr"] == [pytest.approx(0.05)]  # the plateau halved it at step 2
    assert "best.val_loss/improved" in checks[3]["events"]
    assert checks[-1]["stop"].startswith("the monitored metric did not improve")
    assert all(r["stop"] is None for r in checks[:-1])
    assert summary["summary"]["best.val_loss.tolerance=1/stopped_step"] == 2.0


def test_non_finite_values_round_trip_as_strict_json(tmp_path):
    _fit(tmp_path, [0.5, math.inf, 0.4], crash_after=1)
    text = (tmp_path / "history.jsonl").read_text()
    assert '"inf"' in text and "Infinity" not in text
    [_, second] = read_records(str(tmp_path / "history.jsonl"))
    assert second["metrics"]["val_loss"] == math.inf


def test_torn_last_line_is_ignored_but_a_torn_middle_line_is_an_error(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 0, "metrics": {"val_loss": 1}}\n{"step": 1, "metr')
    assert [r["step"] for r in read_records(str(path))] == [0]
    path.write_text('{"step": 0, "metr\n{"step": 1, "metrics": {"val_loss": 1}}\n')
    with pytest.raises(ValueError, match="line 1: not a JSON object"):
        read_records(str(path))


def test_a_new_run_starts_a_new_history_and_a_resume_keeps_its_prefix(tmp_path):
    (tmp_path / "history.jsonl").write_text('{"step": 0, "metrics": {"val_loss": 5}}\n')
    _fit(tmp_path, LOSSES, crash_after=4)  # a stale history is replaced; the run is killed
    assert [r["step"] for r in read_records(str(tmp_path / "history.jsonl"))] == [0, 1, 2, 3, 4]
    assert read_records(str(tmp_path / "history.jsonl"))[0]["metrics"]["val_loss"] == 0.9
    _fit(tmp_path, LOSSES, resume=True)
    steps = [r.get("step") for r in read_records(str(tmp_path / "history.jsonl"))]
    assert steps == [0, 1, 2, 3, 4, 5, 6, None]


def test_replay_reads_the_recorded_history(tmp_path):
    _fit(tmp_path, LOSSES)
    rows = read_rows(tmp_path)
    assert rows[0] == {"step": 0, "val_loss": pytest.approx(0.9), "train_loss": 1.0}
    result = fcb.replay(fcb.grid(fcb.EarlyStopping, patience=[1, 3]), tmp_path)
    assert result.stop_step.tolist() == [2, 6]
    assert json.loads(json.dumps(result.rows()))[1]["best_step"] == 3
