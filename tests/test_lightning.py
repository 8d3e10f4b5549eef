"""fcb.lightning with a real pytorch_lightning.Trainer on a tiny model (CPU)."""

import json
import os
import warnings

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import fcb  # noqa: E402
import fcb.lightning  # noqa: E402


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def loaders():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 1.5 * torch.randn(64, 1, generator=g)
    train = torch.utils.data.TensorDataset(x[:32], y[:32])
    val = torch.utils.data.TensorDataset(x[32:], y[32:])
    return (
        torch.utils.data.DataLoader(train, batch_size=8),
        torch.utils.data.DataLoader(val, batch_size=32),
    )


def chain():
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=4),
        fcb.ModelCheckpoint("val_loss", save_top_k=2),
        fcb.BestCheckpoint("val_loss", tolerances=[1, 3]),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=1),
    )


def fit(root, max_epochs, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    model = Regression()
    callback = fcb.lightning.FcbCallback(chain())
    trainer = pl.Trainer(
        default_root_dir=str(root),
        max_epochs=max_epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer, callback, model


def test_real_trainer_stops_and_writes_slots(tmp_path):
    trainer, callback, _ = fit(tmp_path, max_epochs=60)
    assert trainer.should_stop and trainer.current_epoch < 59
    directory = tmp_path / "checkpoints"
    with open(directory / "manifest.json") as f:
        manifest = json.load(f)
    assert {"best_model", "last", "best.val_loss", "best.val_loss.tolerance=1"} <= set(
        manifest["slots"]
    )
    for slot in manifest["slots"].values():
        checkpoint = torch.load(directory / slot["link"], weights_only=False)
        assert checkpoint["epoch"] == slot["step"]  # Lightning's own checkpoint of that epoch
        assert "fcb" in checkpoint["callbacks"]
    steps = sorted(os.listdir(directory / "steps"))
    assert len(steps) == len({slot["file"] for slot in manifest["slots"].values()})
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.02  # the plateau reduced it
    assert (
        callback.adapter.summary["best.val_loss/best_step"]
        == manifest["slots"]["best.val_loss"]["step"]
    )


def test_resume_with_ckpt_path_restores_the_chain(tmp_path):
    full, full_callback, _ = fit(tmp_path / "full", max_epochs=60)
    stopped_at = full.current_epoch
    k = max(1, stopped_at // 2)
    fit(tmp_path / "part", max_epochs=k + 1)
    resumed, callback, _ = fit(
        tmp_path / "part",
        max_epochs=60,
        ckpt_path=str(tmp_path / "part" / "checkpoints" / "last.ckpt"),
    )
    assert resumed.current_epoch == stopped_at
    with open(tmp_path / "full" / "checkpoints" / "manifest.json") as f:
        expected = json.load(f)["slots"]
    with open(tmp_path / "part" / "checkpoints" / "manifest.json") as f:
        got = json.load(f)["slots"]
    assert {k: v["step"] for k, v in got.items()} == {k: v["step"] for k, v in expected.items()}
    assert callback.adapter.state_dict() == full_callback.adapter.state_dict()


def test_resuming_a_stopped_run_trains_no_further_and_keeps_its_slots(tmp_path):
    """A run fcb stopped, resumed with ckpt_path=last.ckpt and more epochs: it stays stopped
    (no epoch trained, `last` not moved), and the run keeps exactly its slots."""
    trainer, _, _ = fit(tmp_path, max_epochs=60)
    assert trainer.should_stop
    directory = tmp_path / "checkpoints"
    with open(directory / "manifest.json") as f:
        before = json.load(f)
    resumed, callback, _ = fit(tmp_path, max_epochs=80, ckpt_path=str(directory / "last.ckpt"))
    with open(directory / "manifest.json") as f:
        after = json.load(f)
    assert resumed.current_epoch <= trainer.current_epoch + 1  # Lightning's epoch counter
    assert callback.adapter.should_stop and callback.adapter.resumed_step == before["event_step"]
    assert {k: v["step"] for k, v in after["slots"].items()} == {
        k: v["step"] for k, v in before["slots"].items()
    }
    assert after["event_step"] == before["event_step"]


def test_resuming_from_another_slot_than_last_is_refused_with_the_fix(tmp_path):
    fit(tmp_path, max_epochs=60)
    directory = tmp_path / "checkpoints"
    with open(directory / "manifest.json") as f:
        manifest = json.load(f)
    slot = next(
        name for name, s in manifest["slots"].items() if s["step"] != manifest["resume"]["step"]
    )
    link = manifest["slots"][slot]["link"]
    with pytest.raises(fcb.ConfigError, match=r"Pass ckpt_path=.*last\.ckpt"):
        fit(tmp_path, max_epochs=80, ckpt_path=str(directory / link))
    with open(directory / "manifest.json") as f:
        assert json.load(f)["slots"] == manifest["slots"]  # nothing changed
