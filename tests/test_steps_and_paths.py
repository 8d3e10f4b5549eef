"""A step names one checkpoint; a manifest names files inside its run directory only.

- A check whose step repeats (or goes back) is refused with a typed error naming the fix,
  in every adapter: a repeated step that improved used to record the new value while the
  step's file kept the first check's weights. The Lightning bridge numbers checks so that
  two validations of one epoch never share a step (`step="global_step"`).
- Every path a manifest holds (slot files and links, file-table keys, archive, resume point)
  must be a normalised relative path inside the run directory; otherwise the manifest is
  refused before anything is opened for writing or deleted.
"""

from __future__ import annotations

import json
import os
import warnings

import jax.numpy as jnp
import pytest
import torch

import fcb
import fcb.orbax
import fcb.torch


def _torch_adapter(dirpath, **kwargs):
    model = torch.nn.Linear(2, 1)
    return fcb.torch.TorchAdapter(
        fcb.ModelCheckpoint("val_loss", save_last=True), model=model, dirpath=str(dirpath),
        **kwargs,
    ), model


def test_torch_refuses_a_repeated_step_and_keeps_the_run(tmp_path):
    adapter, model = _torch_adapter(tmp_path)
    adapter.on_fit_start()
    adapter.on_validation_end({"val_loss": 1.0}, step=3)
    before = fcb.torch.read_manifest(tmp_path / "manifest.json")
    with torch.no_grad():
        model.weight.fill_(7.0)
    for step in (3, 2):
        with pytest.raises(fcb.ConfigError, match=rf"step {step} comes after step 3.*global step"):
            adapter.on_validation_end({"val_loss": 0.5}, step=step)
    assert fcb.torch.read_manifest(tmp_path / "manifest.json") == before
    adapter.on_validation_end({"val_loss": 0.5}, step=4)  # the next step is fine
    adapter.on_fit_end()
    best = fcb.torch.load_checkpoint(tmp_path / "best_model.pt")
    assert best["fcb"]["step"] == 4 and float(best["model"]["weight"].sum()) == 14.0


def test_orbax_refuses_a_repeated_step(tmp_path):
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint("val_loss"), tmp_path, background=False)
    adapter.on_validation_end({"val_loss": 1.0}, step=5, state={"w": jnp.zeros(2)})
    with pytest.raises(fcb.ConfigError, match=r"step 5 comes after step 5"):
        adapter.on_validation_end({"val_loss": 0.5}, step=5, state={"w": jnp.ones(2)})
    actions = adapter.on_validation_end({"val_loss": 0.5}, state={"w": jnp.ones(2)})
    assert int(actions.slots["best_model"]) == 6  # unnumbered: the previous step + 1
    adapter.on_fit_end()
    restored = fcb.orbax.restore(tmp_path, "best_model", like={"w": jnp.zeros(2)})
    assert float(restored["w"].sum()) == 2.0


def _lightning_fit(root, step):
    pl = pytest.importorskip("pytorch_lightning")
    import fcb.lightning

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x.sum(1, keepdim=True)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = fcb.lightning.FcbCallback(
        fcb.ModelCheckpoint("val_loss", save_last=True), step=step
    )
    trainer = pl.Trainer(
        default_root_dir=str(root), max_epochs=2, val_check_interval=0.5, callbacks=[callback],
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regression(), data, data)
    return trainer


def test_lightning_two_validations_per_epoch(tmp_path):
    with pytest.raises(fcb.ConfigError, match=r"comes after step 0"):
        _lightning_fit(tmp_path / "epoch", "epoch")  # both validations of epoch 0: step 0
    _lightning_fit(tmp_path / "global", "global_step")
    directory = tmp_path / "global" / "checkpoints"
    manifest = fcb.torch.read_manifest(directory)
    assert manifest["event_step"] == 16  # 4 validations, at global steps 4, 8, 12, 16
    for slot in manifest["slots"].values():  # each slot's file is Lightning's of that step
        checkpoint = torch.load(directory / slot["link"], weights_only=False)
        assert checkpoint["global_step"] == slot["step"]


# -- paths -------------------------------------------------------------------------------------


def _saved_torch_run(run):
    adapter, _ = _torch_adapter(run)
    adapter.on_fit_start()
    for step, value in enumerate([1.0, 0.5]):
        adapter.on_validation_end({"val_loss": value}, step=step)
    adapter.on_fit_end()


def _edit(run, edit):
    path = os.path.join(run, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    manifest.pop("checksum", None)  # as a hand edit would leave it
    with open(path, "w") as f:
        json.dump(manifest, f)


def _outside_link(manifest):
    manifest["slots"]["best_model"]["link"] = "../outside.pt"


def _outside_file(manifest):
    slot = manifest["slots"]["last"]
    record = manifest["files"].pop(slot["file"])
    slot["file"] = "steps/../../outside.pt"
    manifest["files"][slot["file"]] = record


def _absolute_file(manifest):
    manifest["archive"] = [os.path.abspath(os.sep + "tmp")]


@pytest.mark.parametrize(
    ("edit", "entry"),
    [
        (_outside_link, r"slots\['best_model'\]\['link'\] is '\.\./outside\.pt'"),
        (_outside_file, r"slots\['last'\]\['file'\] is 'steps/\.\./\.\./outside\.pt'"),
        (_absolute_file, r"archive\[0\] is '/tmp'"),
    ],
    ids=["link", "file", "absolute"],
)
def test_a_manifest_path_outside_the_run_is_refused_and_nothing_outside_changes(
    tmp_path, edit, entry
):
    run = tmp_path / "run"
    run.mkdir()
    _saved_torch_run(run)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"not yours")
    _edit(run, edit)
    for start in (
        lambda: _torch_adapter(run, resume_from=str(run))[0].on_fit_start(),  # resume
        lambda: _torch_adapter(run)[0].on_fit_start(),  # a new run in the directory
    ):
        with pytest.raises(fcb.CheckpointCorruptError, match=entry + r", which is not a"):
            start()
        assert outside.read_bytes() == b"not yours"
    with pytest.raises(fcb.CheckpointCorruptError, match=entry):
        fcb.torch.read_manifest(run)


def test_a_symlink_out_of_the_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _saved_torch_run(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, run / "escape")
    _edit(run, lambda m: m["archive"].append("escape/x.pt"))
    with pytest.raises(fcb.CheckpointCorruptError, match=r"archive\[0\] is 'escape/x\.pt'"):
        fcb.torch.read_manifest(run)
    _edit(run, lambda m: (m.update(archive=[]), m["slots"]["best_model"].update(link="escape")))
    with pytest.raises(fcb.CheckpointCorruptError, match=r"\['link'\] is 'escape', which is not"):
        fcb.torch.read_manifest(run)


def test_an_orbax_step_outside_the_run_is_refused(tmp_path):
    run = tmp_path / "run"
    adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint("val_loss"), run, background=False)
    adapter.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
    adapter.on_fit_end()

    def outside(manifest):
        slot = manifest["slots"]["best_model"]
        manifest["files"]["../steps/0"] = manifest["files"].pop(slot["file"])
        slot["file"] = "../steps/0"

    _edit(run, outside)
    with pytest.raises(fcb.CheckpointCorruptError, match=r"'\.\./steps/0', which is not a"):
        fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint("val_loss"), run).on_fit_start()
