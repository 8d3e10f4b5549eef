"""history.jsonl: what TorchAdapter(history=True) records, torn lines, resume, replay of it."""

from __future__ import annotations

import json
import logging
import math
import re

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
    assert checks[-1]["stop"].startswith("val_loss did not improve for 3 checks (patience=3")
    assert all(r["stop"] is None for r in checks[:-1])
    assert summary["summary"]["best.val_loss.tolerance=1/stopped_step"] == 2.0
    assert summary["step"] == 6  # the summary follows the run's last check


def test_non_finite_values_round_trip_as_strict_json(tmp_path):
    _fit(tmp_path, [0.5, math.inf, 0.4], crash_after=1)
    text = (tmp_path / "history.jsonl").read_text()
    assert '"inf"' in text and "Infinity" not in text
    [_, second] = read_records(str(tmp_path / "history.jsonl"))
    assert second["metrics"]["val_loss"] == math.inf


def test_a_torn_last_line_is_ignored_and_a_damaged_middle_line_is_skipped(tmp_path, caplog):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 0, "metrics": {"val_loss": 1}}\n{"step": 1, "metr')
    with caplog.at_level(logging.WARNING, logger="fcb"):
        assert [r["step"] for r in read_records(str(path))] == [0]
    assert not caplog.records  # what a kill leaves is expected
    path.write_text(
        '{"step": 0, "metr\n'
        '{"step": 1, "metrics": {"val_loss": 1}}\n'
        "[1, 2]\n"
        '{"step": "two", "metrics": {"val_loss": 1}}\n'
        '{"step": 4, "metrics": {"val_loss": "low"}}\n'
        '{"step": 5, "metrics": {"val_loss": "nan"}}\n'
    )
    with caplog.at_level(logging.WARNING, logger="fcb"):
        records = read_records(str(path))
    assert [r["step"] for r in records] == [1, 5] and math.isnan(records[1]["metrics"]["val_loss"])
    [warning] = caplog.records
    assert re.search(
        r"has 4 damaged lines, skipped \(line 1: not JSON .*; line 3: not a JSON object: "
        r"\[1, 2\]; line 4: `step` is not an integer >= 0: \"two\"; \.\.\.\); the other 2 "
        r"records are read",
        warning.getMessage(),
    )


DAMAGE = [
    b"\x00\x00\x00\x00\x00\x00",  # a block of zeros, as a crash of the disk leaves
    b'{"step": 1, "metrics": {"val_loss": 0.7, "train_loss": 1.0}, "lr": [0.1], "ev',
    b'{"step": 1, "metrics": [0.7]}',
]


@pytest.mark.parametrize("damage", DAMAGE, ids=["zeros", "torn", "wrong-shape"])
def test_a_damaged_history_line_does_not_block_a_resume(tmp_path, caplog, damage):
    _fit(tmp_path, LOSSES, crash_after=4)
    path = tmp_path / "history.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = damage  # the check of step 1
    path.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="fcb"):
        adapter = _fit(tmp_path, LOSSES, resume=True)
    assert adapter.resumed_step == 4
    assert "history.jsonl has 1 damaged line, skipped (line 2:" in caplog.text
    # The resumed run rewrote the history without it: every line reads again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fcb"):
        steps = [r.get("step") for r in read_records(str(path))]
    assert steps == [0, 2, 3, 4, 5, 6, 6] and not caplog.records  # 6 twice: the summary


def test_plot_and_replay_read_the_rest_of_a_damaged_history(tmp_path, caplog, capsys):
    _fit(tmp_path, LOSSES)
    path = tmp_path / "history.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[5] = b"\xff\xfe garbage"  # the check of step 5
    path.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="fcb"):
        rows = read_rows(tmp_path)
        result = fcb.replay(fcb.grid(fcb.EarlyStopping, patience=[1, 3]), tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4, 6]
    # patience 3 no longer stops: only two checks after the best at step 3 are left
    assert result.stop_step.tolist() == [2, -1]
    assert "line 6: not JSON" in caplog.text
    pytest.importorskip("matplotlib")
    from fcb import cli

    png = tmp_path / "run.png"
    assert cli.main(["plot", str(tmp_path), "-o", str(png)]) == 0
    assert capsys.readouterr().out.strip() == f"plot: {png}"
    assert png.stat().st_size > 10_000


def test_a_new_run_starts_a_new_history_and_a_resume_keeps_its_prefix(tmp_path):
    (tmp_path / "history.jsonl").write_text('{"step": 0, "metrics": {"val_loss": 5}}\n')
    _fit(tmp_path, LOSSES, crash_after=4)  # a stale history is replaced; the run is killed
    assert [r["step"] for r in read_records(str(tmp_path / "history.jsonl"))] == [0, 1, 2, 3, 4]
    assert read_records(str(tmp_path / "history.jsonl"))[0]["metrics"]["val_loss"] == 0.9
    _fit(tmp_path, LOSSES, resume=True)
    steps = [r.get("step") for r in read_records(str(tmp_path / "history.jsonl"))]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6]  # the summary carries the last check's step


def test_a_line_lost_between_the_commit_and_the_append_comes_back_on_resume(tmp_path):
    """A kill after a check's manifest is committed and before its history line is appended:
    the resumed history holds that check's line (the manifest's resume record carries it)."""
    _fit(tmp_path, LOSSES, crash_after=4)
    path = tmp_path / "history.jsonl"
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4
    path.write_text("\n".join(lines[:-1]) + "\n")  # what the kill lost
    _fit(tmp_path, LOSSES, resume=True)
    records = read_records(str(path), decode=False)
    assert [r.get("step") for r in records] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert json.dumps(records[4], sort_keys=True) == json.dumps(json.loads(lines[-1]),
                                                                  sort_keys=True)


def test_replay_reads_the_recorded_history(tmp_path):
    _fit(tmp_path, LOSSES)
    rows = read_rows(tmp_path)
    assert rows[0] == {"step": 0, "val_loss": pytest.approx(0.9), "train_loss": 1.0}
    result = fcb.replay(fcb.grid(fcb.EarlyStopping, patience=[1, 3]), tmp_path)
    assert result.stop_step.tolist() == [2, 6]
    assert json.loads(json.dumps(result.rows()))[1]["best_step"] == 3
