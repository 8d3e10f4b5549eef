"""fcb callbacks in a real Lightning Trainer, through the `fcb.lightning` bridge.

Run: python examples/lightning_trainer.py  (writes ./runs/lightning)

`fcb.lightning.FcbCallback` runs the chain at every validation end, sets
`trainer.should_stop`, scales the optimizers' learning rates, and writes checkpoints with the
Trainer's own `save_checkpoint`: one file per checkpointed step, one stable name per slot.
"""

import logging
import os
import shutil
import warnings

import pytorch_lightning as pl
import torch

import fcb
import fcb.lightning


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
        )

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def loaders(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(768, 16, generator=generator)
    w = torch.randn(16, 1, generator=generator) / 4
    y = x @ w + 0.5 * torch.sin(3 * x[:, :1]) + 0.5 * torch.randn(768, 1, generator=generator)
    train = torch.utils.data.TensorDataset(x[:256], y[:256])
    val = torch.utils.data.TensorDataset(x[256:], y[256:])
    return (
        torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, generator=generator),
        torch.utils.data.DataLoader(val, batch_size=512),
    )


def main() -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # keep the output short
    pl.seed_everything(0, verbose=False)
    root = os.path.join("runs", "lightning")
    shutil.rmtree(root, ignore_errors=True)
    callbacks = fcb.chain(
        fcb.EarlyStopping("val_loss", patience=5, min_delta=1e-3),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(2, 4)),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=2),
    )
    bridge = fcb.lightning.FcbCallback(callbacks)
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=60,
        callbacks=[bridge],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about DataLoader workers
        trainer.fit(Regression(), train, val)
    directory = os.path.join(root, "checkpoints")
    manifest = fcb.torch.read_manifest(os.path.join(directory, "manifest.json"))
    # fcb's steps are Lightning's epoch numbers, counted from 0; after fit,
    # trainer.current_epoch is the number of epochs run, one more than the last epoch.
    last_epoch = manifest["slots"]["last"]["step"]
    print(f"Trainer stopped after epoch {last_epoch} (epochs count from 0; "
          f"{trainer.current_epoch} epochs run): {bridge.adapter.stop_message}")
    print(f"{'slot':<28}{'epoch':>5}{'val_loss':>10}  file")
    for slot, record in sorted(manifest["slots"].items()):
        print(f"{slot:<28}{record['step']:>5}{record['value']:>10.5f}  {record['link']}")

    # A slot is an ordinary Lightning checkpoint: load it as usual.
    best = Regression.load_from_checkpoint(os.path.join(directory, "best_model.ckpt"))
    print(f"best model: epoch {manifest['slots']['best_model']['step']}, "
          f"{sum(p.numel() for p in best.parameters())} parameters")

    # FcbCallback is the Trainer's checkpoint callback: ckpt_path="best" is fcb's best slot
    # (the first BestCheckpoint's overall best), and validating it adds no check to the run.
    model = Regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = trainer.validate(model, val, ckpt_path="best", verbose=False)
    slot = bridge.best_slot()
    print(f"trainer.validate(ckpt_path='best') loaded {os.path.basename(bridge.best_model_path)}"
          f": val_loss {metrics['val_loss']:.5f} (the slot records "
          f"{manifest['slots'][slot]['value']:.5f})")


if __name__ == "__main__":
    main()
