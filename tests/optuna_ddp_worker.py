"""A Lightning Trainer with strategy="ddp" on 2 CPU processes (gloo), an FcbCallback and
fcb.optuna.PruningCallback reporting to a trial of a SQLite study.

    python tests/optuna_ddp_worker.py ROOT OUT STORAGE STUDY
Every rank logs its own scripted val_loss (the ranks differ; fcb reduces them to the mean)
and appends its per-check decisions to OUT/rank{rank}.jsonl; after fit, rank 0 tells the
study whether the trial was pruned.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import optuna
import pytorch_lightning as pl
import torch

import fcb
import fcb.lightning
import fcb.optuna

# per rank (binary fractions, so the mean is exact): alone, rank 0 would stop at epoch 5 and
# rank 1 at epoch 9; their mean, which the ranks agree on, stops at epoch 11
VALUES = {
    0: [1, 0.875, 0.75, 0.8125, 0.8125, 0.8125, 0.5, 0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    1: [1, 0.875, 0.75, 0.625, 0.5625, 0.5625, 0.25, 0.875, 0.875, 0.875, 0.875, 0.875,
        0.875, 0.875],
}
MEAN_STOP = 11
PATIENCE = 3


class Scripted(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        # deliberately not synced: fcb reduces the metric over ranks itself
        self.log("val_loss", VALUES[self.global_rank][self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


# a checkpoint callback, listed after the FcbCallback: Lightning runs checkpoint callbacks
# after the others, in their order, so this one sees each check's decisions
class Record(pl.callbacks.Checkpoint):
    def __init__(self, fcb_callback, pruning, out):
        self.fcb_callback, self.pruning, self.out = fcb_callback, pruning, out

    def on_validation_end(self, trainer, pl_module):
        line = {
            "rank": trainer.global_rank,
            "step": trainer.current_epoch,
            "stop": bool(trainer.should_stop),
            "pruned_step": self.pruning.pruned_step,
            "fcb_stop": bool(self.fcb_callback.adapter.session.should_stop),
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def main(root, out, storage, study_name):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pl.seed_everything(0, verbose=False)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    study = trial = None
    if rank == 0:
        study = optuna.load_study(
            study_name=study_name, storage=storage,
            pruner=fcb.optuna.Pruner(fcb.EarlyStopping("value", patience=PATIENCE)),
        )
        trial = study.ask()
    x = torch.randn(8, 2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=4)
    # the training loop itself runs no EarlyStopping: the stop comes from the pruner
    callback = fcb.lightning.FcbCallback(fcb.ModelCheckpoint("val_loss"))
    pruning = fcb.optuna.PruningCallback(trial, "val_loss")
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=len(VALUES[0]),
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[callback, pruning, Record(callback, pruning, out)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Scripted(), data, data)
    try:
        pruning.check_pruned()
    except optuna.TrialPruned:
        if study is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        with open(os.path.join(out, f"pruned{rank}"), "w") as f:
            f.write(str(pruning.pruned_step))
    else:
        if study is not None:
            study.tell(trial, VALUES[0][-1])
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
