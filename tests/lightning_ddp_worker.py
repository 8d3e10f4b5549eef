"""A Lightning Trainer with strategy="ddp" on 2 CPU processes, driven by fcb.lightning.

    python tests/lightning_ddp_worker.py ROOT OUT
Each rank appends its per-check decisions to OUT/rank{rank}.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytorch_lightning as pl
import torch

import fcb
import fcb.lightning


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        # deliberately not synced: fcb reduces the metric over ranks itself
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


# a checkpoint callback, listed after the FcbCallback: Lightning runs checkpoint callbacks
# after the others, in their order, so this one sees each check's decisions
class Record(pl.callbacks.Checkpoint):
    def __init__(self, fcb_callback, out):
        self.fcb_callback, self.out = fcb_callback, out

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        adapter = self.fcb_callback.adapter
        line = {
            "rank": trainer.global_rank,
            "step": trainer.current_epoch,
            "stop": bool(trainer.should_stop),
            "best": adapter.runner.state[1].steps.tolist(),
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def main(root, out):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(128, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + torch.randn(128, 1, generator=g)
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=16
    )
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[64:], y[64:]), batch_size=16)
    callback = fcb.lightning.FcbCallback(
        fcb.chain(
            fcb.EarlyStopping("val_loss", patience=3), fcb.ModelCheckpoint("val_loss", save_top_k=2)
        )
    )
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=60,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[callback, Record(callback, out)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regression(), train, val)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
