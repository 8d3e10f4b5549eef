"""Resuming a run with a changed numeric setting through an adapter: the state is rebuilt
from the run's history, a stop the new setting would not have made is undone, and the run
then equals one made with the new setting from the start (one line per changed callback)."""

import logging

import torch

import fcb
import fcb.torch

LOSSES = [0.9, 0.7, 0.72, 0.71, 0.74, 0.69, 0.75, 0.76, 0.77, 0.78, 0.79, 0.8]


EPOCHS = len(LOSSES)


def run(dirpath, patience, epochs=EPOCHS):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    callbacks = fcb.chain(
        fcb.EarlyStopping("val_loss", patience=patience),
        fcb.ModelCheckpoint("val_loss", save_last=True),
    )
    adapter = fcb.torch.TorchAdapter(callbacks, model=model, dirpath=str(dirpath),
                                     history=True, preempt_on=())
    trained = []
    for epoch in adapter.epochs(epochs):
        trained.append(epoch)
        adapter.on_validation_end({"val_loss": LOSSES[epoch]}, step=epoch)
    slots = dict(adapter.slots)
    adapter.on_fit_end()
    return adapter, trained, slots


def test_a_larger_patience_after_a_stop_trains_on_and_equals_the_larger_patience_run(
    tmp_path, caplog
):
    first, trained, _ = run(tmp_path / "run", patience=2)
    assert trained == [0, 1, 2, 3] and "did not improve" in first.stop_message
    with caplog.at_level(logging.WARNING, logger="fcb"):
        resumed, more, slots = run(tmp_path / "run", patience=4)
    assert resumed.resumed_step == 3
    assert "patience 2 -> 4; rebuilt from 4 recorded checks: was stopped" in caplog.text
    assert "now running" in caplog.text and "trains on" in caplog.text
    _, whole, whole_slots = run(tmp_path / "whole", patience=4)
    assert trained + more == whole and slots == whole_slots
    assert resumed.stop_message and resumed.should_stop


def test_a_setting_that_would_also_have_stopped_keeps_the_stop(tmp_path, caplog):
    run(tmp_path, patience=2)
    with caplog.at_level(logging.WARNING, logger="fcb"):
        resumed, more, _ = run(tmp_path, patience=1)
    assert more == [] and resumed.should_stop
    assert "patience 2 -> 1" in caplog.text and "now stopped" in caplog.text


def test_without_a_history_the_current_config_wins_with_a_warning(tmp_path, caplog):
    run(tmp_path, patience=2)
    (tmp_path / "history.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="fcb"):
        resumed, more, _ = run(tmp_path, patience=4)
    assert more == [] and resumed.should_stop  # nothing to rebuild from: the stop stays
    assert "not rebuilt" in caplog.text
