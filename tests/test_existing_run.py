"""A directory that holds a run is never emptied implicitly: the same script resumes it
(`existing_run="resume"`, default), replaces it only when asked (`"start_over"`), refuses
with `"error"`; `adapter.epochs(n)` counts the epochs left and ends at a stop, also one the
resumed run had already made. Torch and orbax (Lightning: test_lightning_resume.py)."""

import json
import os

import jax.numpy as jnp
import pytest
import torch

import fcb
import fcb.orbax
import fcb.torch

LOSSES = [0.9, 0.7, 0.72, 0.71, 0.73, 0.5, 0.4]  # stops at step 4 (patience 3)


def chain():
    return fcb.chain(fcb.EarlyStopping("val_loss", patience=3), fcb.ModelCheckpoint(save_last=True))


def torch_run(dirpath, max_epochs, **options):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    adapter = fcb.torch.TorchAdapter(chain(), model=model, dirpath=str(dirpath), **options)
    trained = []
    for epoch in adapter.epochs(max_epochs):
        with torch.no_grad():
            model.weight.add_(1.0)
        trained.append(epoch)
        adapter.on_validation_end({"val_loss": LOSSES[epoch]}, step=epoch)
    adapter.on_fit_end()
    return adapter, trained, model


def orbax_run(dirpath, max_epochs, *, like=True, **options):
    adapter = fcb.orbax.OrbaxAdapter(chain(), dirpath, background=False, **options)
    adapter.on_fit_start(like={"w": jnp.zeros(2)} if like else None)
    w = jnp.zeros(2) if adapter.restored_state is None else adapter.restored_state["w"]
    trained = []
    for epoch in adapter.epochs(max_epochs):
        w = w + 1.0
        trained.append(epoch)
        adapter.on_validation_end({"val_loss": LOSSES[epoch]}, step=epoch, state={"w": w})
    adapter.on_fit_end()
    return adapter, trained, w


def steps_on_disk(dirpath):
    return sorted(os.listdir(os.path.join(dirpath, "steps")))


def manifest_bytes(dirpath):
    with open(os.path.join(dirpath, "manifest.json"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("run", [torch_run, orbax_run], ids=["torch", "orbax"])
def test_a_relaunch_resumes_and_a_finished_run_trains_no_further(tmp_path, run):
    first, trained, _ = run(tmp_path, 2)  # interrupted after step 1
    assert trained == [0, 1] and first.resumed_step is None
    second, trained, final = run(tmp_path, 10)  # the same script, launched again
    assert second.resumed_step == 1 and trained == [2, 3, 4] and second.should_stop
    _, whole, whole_final = run(tmp_path / "whole", 10)
    assert whole == [0, 1, 2, 3, 4]
    if run is torch_run:
        assert torch.equal(final.weight, whole_final.weight)  # resumed, not restarted
    else:
        assert jnp.array_equal(final, whole_final)
    before = manifest_bytes(tmp_path)
    third, trained, _ = run(tmp_path, 10)  # the run had stopped: nothing more to train
    assert third.resumed_step == 4 and trained == [] and third.should_stop
    assert "did not improve" in third.stop_message
    assert manifest_bytes(tmp_path) == before


@pytest.mark.parametrize("run", [torch_run, orbax_run], ids=["torch", "orbax"])
def test_start_over_and_error_are_explicit(tmp_path, run):
    run(tmp_path, 3)
    kept, before = steps_on_disk(tmp_path), manifest_bytes(tmp_path)
    with pytest.raises(fcb.RunExistsError, match=r"resumable at step 2; existing_run='error'"):
        run(tmp_path, 3, existing_run="error")
    assert steps_on_disk(tmp_path) == kept and manifest_bytes(tmp_path) == before
    adapter, trained, _ = run(tmp_path, 1, existing_run="start_over")
    assert adapter.resumed_step is None and trained == [0]
    assert json.loads(manifest_bytes(tmp_path))["resume"]["step"] == 0


def test_a_run_that_cannot_be_resumed_is_kept(tmp_path):
    best_only = fcb.ModelCheckpoint(save_last=False)
    adapter = fcb.torch.TorchAdapter(best_only, model=torch.nn.Linear(2, 1), dirpath=str(tmp_path))
    with adapter:
        adapter.on_validation_end({"val_loss": 1.0})
    before = manifest_bytes(tmp_path)
    again = fcb.torch.TorchAdapter(best_only, model=torch.nn.Linear(2, 1), dirpath=str(tmp_path))
    with pytest.raises(fcb.RunExistsError, match=r"no resumable checkpoint .* never replaced "
                       r"implicitly\. Pass existing_run='start_over'"):
        again.on_fit_start()
    assert manifest_bytes(tmp_path) == before


def test_orbax_resume_needs_a_template_and_keeps_the_run(tmp_path):
    orbax_run(tmp_path, 2)
    before = manifest_bytes(tmp_path)
    with pytest.raises(fcb.ConfigError, match=r"resumable at step 1 .*on_fit_start\(like="):
        orbax_run(tmp_path, 5, like=False)
    assert manifest_bytes(tmp_path) == before


def test_resuming_another_run_into_a_directory_holding_one_is_refused(tmp_path):
    torch_run(tmp_path / "a", 2)
    torch_run(tmp_path / "b", 3)
    before = manifest_bytes(tmp_path / "b")
    with pytest.raises(fcb.RunExistsError, match=r"resuming the run in .*a into it would"):
        torch_run(tmp_path / "b", 5, resume_from=str(tmp_path / "a"))
    assert manifest_bytes(tmp_path / "b") == before


def test_bad_options_are_named(tmp_path):
    with pytest.raises(fcb.ConfigError, match=r"existing_run` must be one of \['resume', "
                       r"'start_over', 'error'\], got existing_run = 'overwrite'"):
        fcb.torch.TorchAdapter(chain(), dirpath=str(tmp_path), existing_run="overwrite")
    with pytest.raises(fcb.ConfigError, match=r"existing_run"):
        fcb.orbax.OrbaxAdapter(chain(), tmp_path, existing_run=True)
    adapter = fcb.torch.TorchAdapter(chain(), dirpath=str(tmp_path))
    with pytest.raises(fcb.ConfigError, match=r"max_epochs` must be an int >= 0.*-1"):
        list(adapter.epochs(-1))
    with pytest.raises(fcb.ConfigError, match=r"got a list of 2; combine them with fcb.chain"):
        fcb.torch.TorchAdapter([fcb.EarlyStopping(), fcb.ModelCheckpoint()], dirpath=str(tmp_path))


def test_the_lock_file_goes_with_a_finished_run(tmp_path):
    torch_run(tmp_path, 2)
    assert ".fcb.lock" not in os.listdir(tmp_path)
