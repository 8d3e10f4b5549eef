"""Who owns a run directory, for every store: the lock and the directory are checked before
every write and every commit, so a writer whose lock was bypassed (`.fcb.lock` deleted, the
directory deleted or created again) stops with a typed error and never mixes its steps or
its slot table into another run; and a failed `on_fit_start` leaves nothing behind (not
the lock, not the callbacks' state, not the directory)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fcb
import fcb.orbax
import fcb.torch
from fcb._files import LOCK_NAME

CHAIN = fcb.chain(
    fcb.EarlyStopping("val_loss", patience=100),
    fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
)
STOPPING = fcb.chain(
    fcb.EarlyStopping("val_loss", patience=0),
    fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
)


class TorchRun:
    """A Torch run whose model weight is a tag: a slot's file says which run wrote it."""

    def __init__(self, dirpath, callbacks=CHAIN, *, width=1, **options):
        self.model = torch.nn.Linear(width, 1, bias=False)
        self.adapter = fcb.torch.TorchAdapter(
            callbacks, model=self.model, dirpath=str(dirpath), **options
        )

    def check(self, step, loss, tag):
        with torch.no_grad():
            self.model.weight.fill_(tag)
        return self.adapter.on_validation_end({"val_loss": loss}, step=step)

    @staticmethod
    def weight(dirpath, slot):
        payload = fcb.torch.load_checkpoint(os.path.join(dirpath, f"{slot}.pt"))
        return float(payload["model"]["weight"].flatten()[0])


class OrbaxRun:
    def __init__(self, dirpath, callbacks=CHAIN, *, width=1, background=False, **options):
        self.width = width
        self.adapter = fcb.orbax.OrbaxAdapter(
            callbacks, str(dirpath), background=background, **options
        )

    def check(self, step, loss, tag):
        state = {"w": jnp.full((self.width,), tag, jnp.float32)}
        return self.adapter.on_validation_end({"val_loss": loss}, step=step, state=state)

    @staticmethod
    def weight(dirpath, slot):
        return float(fcb.orbax.restore(dirpath, slot, like={"w": np.zeros(1, np.float32)})["w"][0])


RUNS = pytest.mark.parametrize("Run", [TorchRun, OrbaxRun], ids=["torch", "orbax"])


def read_manifest(dirpath):
    with open(os.path.join(dirpath, "manifest.json")) as f:
        return json.load(f)


def slots(dirpath):
    return {name: slot["step"] for name, slot in read_manifest(dirpath)["slots"].items()}


def listed_only(dirpath):
    """The step locations on disk are exactly those the manifest lists."""
    on_disk = sorted(f"steps/{n}" for n in os.listdir(os.path.join(dirpath, "steps")))
    assert on_disk == sorted(read_manifest(dirpath)["files"])


def snapshot(dirpath):
    """Every file of the directory (but the lock) with a digest of its bytes."""
    found = {}
    for root, _, names in os.walk(dirpath):
        for name in names:
            path = os.path.join(root, name)
            if name != LOCK_NAME:
                with open(path, "rb") as f:
                    found[os.path.relpath(path, dirpath)] = hashlib.sha256(f.read()).hexdigest()
    return found


# -- item 5: a bypassed lock never lets two writers share a slot table ------------------------


@RUNS
def test_a_deleted_lock_file_stops_the_first_writer_before_it_writes(Run, tmp_path):
    dirpath = str(tmp_path / "run")
    first = Run(dirpath)
    first.adapter.on_fit_start()
    first.check(0, 1.0, tag=1.0)
    first.check(1, 0.9, tag=1.0)
    os.unlink(os.path.join(dirpath, LOCK_NAME))  # a clean-up job, or a user
    second = Run(dirpath, existing_run="start_over")
    second.adapter.on_fit_start()  # the directory looks free: a new run replaces the old one
    second.check(0, 5.0, tag=2.0)
    state = first.adapter.state_dict()
    with pytest.raises(fcb.DirectoryInUseError, match=r"\.fcb\.lock was (deleted|replaced)"):
        first.check(2, 0.1, tag=1.0)  # a new best of the first run
    assert first.adapter.state_dict() == state  # the check did not happen
    with pytest.raises(fcb.DirectoryInUseError, match=r"Give every run its own directory"):
        first.check(2, 0.1, tag=1.0)  # and never will
    first.adapter.on_exception()
    second.check(1, 6.0, tag=2.0)
    second.adapter.on_fit_end()
    assert slots(dirpath) == {"best_model": 0, "last": 1}
    assert Run.weight(dirpath, "best_model") == 2.0 and Run.weight(dirpath, "last") == 2.0
    listed_only(dirpath)


@RUNS
def test_a_deleted_lock_file_without_a_second_writer_keeps_the_run_resumable(Run, tmp_path):
    dirpath = str(tmp_path / "run")
    first = Run(dirpath)
    first.adapter.on_fit_start()
    first.check(0, 1.0, tag=1.0)
    committed = snapshot(dirpath)
    os.unlink(os.path.join(dirpath, LOCK_NAME))
    with pytest.raises(fcb.DirectoryInUseError, match=r"\.fcb\.lock was deleted .*resume_from"):
        first.check(1, 0.5, tag=1.0)
    first.adapter.on_exception()
    assert snapshot(dirpath) == committed  # nothing written, nothing deleted
    resumed = Run(dirpath, resume_from=dirpath)
    resumed.adapter.on_fit_start()
    assert resumed.adapter.resumed_step == 0
    resumed.check(1, 0.5, tag=3.0)
    resumed.adapter.on_fit_end()
    assert slots(dirpath) == {"best_model": 1, "last": 1}
    assert Run.weight(dirpath, "best_model") == 3.0


@RUNS
def test_a_directory_created_again_by_another_run_is_never_written_over(Run, tmp_path):
    dirpath = str(tmp_path / "run")
    first = Run(dirpath)
    first.adapter.on_fit_start()
    first.check(0, 1.0, tag=1.0)
    shutil.rmtree(dirpath)
    second = Run(dirpath)
    second.adapter.on_fit_start()
    second.check(0, 5.0, tag=2.0)
    with pytest.raises(fcb.DirectoryInUseError, match=r"deleted and created again.*process"):
        first.check(1, 0.5, tag=1.0)
    first.adapter.on_exception()
    second.check(1, 6.0, tag=2.0)
    second.adapter.on_fit_end()
    assert slots(dirpath) == {"best_model": 0, "last": 1}
    assert Run.weight(dirpath, "best_model") == 2.0 and Run.weight(dirpath, "last") == 2.0
    listed_only(dirpath)


def test_a_lock_replaced_between_open_and_lock_is_not_taken(tmp_path, monkeypatch):
    """`acquire` locks the file it opened; if the name was re-pointed meanwhile (the old
    file deleted, another writer's created), it locks the new one or refuses."""
    from fcb import _files

    lock = _files.DirectoryLock(str(tmp_path))
    other = _files.DirectoryLock(str(tmp_path))
    real_flock = _files.fcntl.flock
    swapped = []

    def flock(fd, operation):
        if not swapped:  # between our open and our flock: the name goes to another writer
            swapped.append(True)
            os.unlink(lock.path)
            other.acquire()
        return real_flock(fd, operation)

    monkeypatch.setattr(_files.fcntl, "flock", flock)
    with pytest.raises(fcb.DirectoryInUseError, match=r"being written by another fcb adapter"):
        lock.acquire()
    other.release()
    monkeypatch.undo()
    lock.acquire()
    lock.check()
    lock.release()


# -- item 6: a deleted directory is reported at the next write --------------------------------


@RUNS
def test_a_deleted_directory_is_reported_at_the_next_write(Run, tmp_path):
    dirpath = str(tmp_path / "run")
    first = Run(dirpath)
    first.adapter.on_fit_start()
    first.check(0, 1.0, tag=1.0)
    shutil.rmtree(dirpath)
    with pytest.raises(fcb.CheckpointWriteError, match=r"run directory .* was deleted"):
        first.check(1, 0.5, tag=1.0)
    with pytest.raises(fcb.CheckpointWriteError, match=r"was deleted"):
        first.check(1, 0.5, tag=1.0)  # every later write too: nothing is recreated
    assert not os.path.exists(dirpath)
    first.adapter.on_exception()


def test_orbax_directory_deleted_while_a_background_save_is_in_flight(tmp_path):
    dirpath = str(tmp_path / "run")
    first = OrbaxRun(dirpath, background=True, width=200_000)
    first.adapter.on_fit_start()
    first.check(0, 1.0, tag=1.0)
    first.adapter.wait()
    first.check(1, 0.5, tag=1.0)  # saved in the background
    os.rename(dirpath, dirpath + ".gone")  # the directory is gone at once, mid-save
    with pytest.raises(fcb.CheckpointWriteError, match=r"was deleted"):
        first.adapter.wait()
    first.adapter.on_exception()
    shutil.rmtree(dirpath + ".gone")
    # Whatever orbax left, a new run in the directory starts cleanly.
    again = OrbaxRun(dirpath)
    again.adapter.on_fit_start()
    again.check(0, 1.0, tag=4.0)
    again.adapter.on_fit_end()
    assert OrbaxRun.weight(dirpath, "best_model") == 4.0
    listed_only(dirpath)


# -- item 8: a failed on_fit_start leaves everything as it was --------------------------------


def assert_free(Run, dirpath, callbacks=CHAIN):
    """Another adapter can open the directory: the failed one holds no lock."""
    other = Run(dirpath, callbacks, resume_from=dirpath)
    other.adapter.on_fit_start()
    assert other.adapter.resumed_step == 1
    other.adapter.on_exception()


def fitted(Run, dirpath, callbacks=CHAIN):
    run = Run(dirpath, callbacks)
    run.adapter.on_fit_start()
    run.check(0, 1.0, tag=1.0)
    run.check(1, 2.0, tag=1.0)
    run.adapter.on_fit_end()


@RUNS
def test_resuming_into_a_model_of_the_wrong_shape_leaves_everything_as_it_was(Run, tmp_path):
    dirpath = str(tmp_path / "run")
    fitted(Run, dirpath)
    before = snapshot(dirpath)
    wrong = Run(dirpath, width=3, resume_from=dirpath)
    fresh = wrong.adapter.state_dict()
    with pytest.raises((RuntimeError, fcb.ConfigError), match=r"size|shape|does not match"):
        if Run is OrbaxRun:
            wrong.adapter.on_fit_start(like={"w": jnp.zeros(3)})
        else:
            wrong.adapter.on_fit_start()
    assert wrong.adapter.store is None and not wrong.adapter.session.started
    assert wrong.adapter.state_dict() == fresh
    assert wrong.adapter.resumed_step is None and not wrong.adapter.should_stop
    assert snapshot(dirpath) == before
    assert_free(Run, dirpath)


@RUNS
def test_a_history_that_cannot_be_written_fails_the_start_and_changes_nothing(
    Run, tmp_path, monkeypatch
):
    from fcb import _history

    dirpath = str(tmp_path / "run")
    fitted(Run, dirpath, STOPPING)  # step 1 is worse: patience 0 stops the run there
    before = snapshot(dirpath)

    def full_disk(path, write):
        raise fcb.CheckpointWriteError(f"could not write {path}: No space left on device")

    monkeypatch.setattr(_history, "atomic_write", full_disk)
    resumed = Run(dirpath, STOPPING, resume_from=dirpath, history=True)
    fresh = resumed.adapter.state_dict()
    with pytest.raises(fcb.CheckpointWriteError, match=r"history\.jsonl: No space"):
        resumed.adapter.on_fit_start()
    assert resumed.adapter.state_dict() == fresh  # the resume point's state is not kept
    assert resumed.adapter.resumed_step is None
    assert not resumed.adapter.should_stop and resumed.adapter.stop_message == ""
    assert snapshot(dirpath) == before
    assert_free(Run, dirpath, STOPPING)
    monkeypatch.undo()
    resumed.adapter.on_fit_start()  # the same adapter starts once the disk is back
    assert resumed.adapter.resumed_step == 1 and resumed.adapter.should_stop
    resumed.adapter.on_fit_end()


def test_a_failed_torch_resume_releases_the_lock_for_a_second_start_of_the_same_adapter(
    tmp_path,
):
    dirpath = str(tmp_path / "run")
    fitted(TorchRun, dirpath)
    run = TorchRun(dirpath, width=3, resume_from=dirpath)
    with pytest.raises(fcb.ConfigError, match=r"does not fit the model given.*other shapes"):
        run.adapter.on_fit_start()
    run.model = torch.nn.Linear(1, 1, bias=False)
    run.adapter.model = run.model
    run.adapter.on_fit_start()
    assert run.adapter.resumed_step == 1
    assert float(run.model.weight.detach()[0, 0]) == 1.0
    run.check(2, 0.5, tag=7.0)
    run.adapter.on_fit_end()
    assert slots(dirpath) == {"best_model": 2, "last": 2}


def test_a_resume_that_fails_part_way_loads_nothing(tmp_path):
    """A model whose first layer fits and second does not, or an optimizer that does not fit:
    nothing is loaded (torch's load_state_dict copies every matching tensor before it raises)."""
    dirpath = str(tmp_path / "run")
    saved = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        for p in saved.parameters():
            p.fill_(3.0)
    adapter = fcb.torch.TorchAdapter(
        fcb.ModelCheckpoint("val_loss", save_last=True), model=saved,
        optimizer=torch.optim.SGD(saved.parameters(), lr=0.1), dirpath=dirpath,
    )
    adapter.on_fit_start()
    adapter.on_validation_end({"val_loss": 1.0}, step=0)
    adapter.on_fit_end()

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = fcb.torch.TorchAdapter(
        fcb.ModelCheckpoint("val_loss", save_last=True), model=model, dirpath=dirpath,
        resume_from=dirpath,
    )
    with pytest.raises(fcb.ConfigError, match=r"other shapes \['1.bias"):
        resumed.on_fit_start()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # another parameter layout
    resumed = fcb.torch.TorchAdapter(
        fcb.ModelCheckpoint("val_loss", save_last=True), model=model, optimizer=adam,
        dirpath=dirpath, resume_from=dirpath,
    )
    with pytest.raises(ValueError):
        resumed.on_fit_start()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
