"""Lightning resume through fcb's checkpoints: a relaunch never replaces the run, and a run
resumed with `ckpt_path=fcb.lightning.resume_path(...)` trains exactly as an uninterrupted one
(random generators included)."""

import logging
import warnings

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import fcb  # noqa: E402
import fcb.lightning  # noqa: E402


class Noisy(pl.LightningModule):
    """Dropout and a shuffling loader: every epoch draws from the global generators."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.losses = []

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.losses.append(float(loss))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def loaders():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 1.5 * torch.randn(64, 1, generator=g)
    train = torch.utils.data.TensorDataset(x[:48], y[:48])
    val = torch.utils.data.TensorDataset(x[48:], y[48:])
    return (
        torch.utils.data.DataLoader(train, batch_size=8, shuffle=True),
        torch.utils.data.DataLoader(val, batch_size=16),
    )


def fit(root, max_epochs, *, seed=0, ckpt_path=None, **options):
    pl.seed_everything(seed, verbose=False)
    model = Noisy()
    callbacks = fcb.chain(
        fcb.EarlyStopping("val_loss", patience=50), fcb.ModelCheckpoint("val_loss", save_top_k=1)
    )
    callback = fcb.lightning.FcbCallback(callbacks, **options)
    trainer = pl.Trainer(
        default_root_dir=str(root), max_epochs=max_epochs, callbacks=[callback],
        enable_model_summary=False, num_sanity_val_steps=1,
    )
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return callback, model


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_resumed_run_trains_exactly_as_the_uninterrupted_one(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _, whole = fit(tmp_path / "whole", 6)
    assert "weights_only" not in caplog.text  # fcb's writes say what they save
    run = tmp_path / "split" / "checkpoints"
    assert fcb.lightning.resume_path(run) is None  # a first launch: nothing to resume
    _, first = fit(tmp_path / "split", 3, ckpt_path=fcb.lightning.resume_path(run))
    path = fcb.lightning.resume_path(run)
    assert path is not None and path.endswith("step-00000002.ckpt")
    # another seed: only the checkpoint's generators can make the resumed epochs agree
    callback, second = fit(tmp_path / "split", 6, seed=123, ckpt_path=path)
    assert callback.adapter.resumed_step == 2
    assert first.losses + second.losses == whole.losses
    for name, value in weights(whole).items():
        assert torch.equal(weights(second)[name], value), name


def test_a_relaunch_without_ckpt_path_refuses_and_keeps_the_run(tmp_path):
    fit(tmp_path, 2)
    run = tmp_path / "checkpoints"
    before = sorted(p.name for p in (run / "steps").iterdir())
    with pytest.raises(fcb.RunExistsError, match=r"resumable at step 1.*resume_path"):
        fit(tmp_path, 4)
    assert sorted(p.name for p in (run / "steps").iterdir()) == before
    callback, _ = fit(tmp_path, 3, existing_run="start_over")
    assert callback.adapter.resumed_step is None
    assert sorted(p.name for p in (run / "steps").iterdir())[-1] == "step-00000002.ckpt"
