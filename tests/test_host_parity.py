"""One scripted sequence of checks through every adapter: the shared host layer decides.

The same calls (unnumbered and numbered steps, a NaN, a learning-rate cut, new bests with an
evaluation request, a write that fails, an interruption and a resume) go through
`fcb.torch.TorchAdapter`, `fcb.orbax.OrbaxAdapter` and the Lightning bridge
`fcb.lightning.FcbCallback` (driven by a scripted trainer). The step numbers, slot tables,
manifests (modulo each backend's file format), history lines and callbacks' state must be
identical.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import pytest
import torch

import fcb
import fcb.orbax
import fcb.torch
from fcb._history import read_records
from fcb._host import store as host_store

pytest.importorskip("pytorch_lightning")
import fcb.lightning

LR = 0.5


def chain():
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=4),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.BestCheckpoint(
            "val_loss",
            tolerances=[1],
            callbacks=[fcb.EarlyStopping("best=val_loss/test_loss", patience=9)],
        ),
        fcb.ReduceLROnPlateau("val_loss", patience=1, factor=0.5),
    )


# (step or None, val_loss, the write of this check fails)
FIRST = [
    (None, 1.0, False),
    (None, 0.8, False),  # new best: evaluation
    (5, math.nan, False),  # numbered, jumps ahead; NaN
    (None, 0.9, False),  # step 6, no improvement: the learning rate is cut
    (7, 0.7, True),  # the manifest write fails: the check did not happen
    (7, 0.7, False),  # the same check again: new best
]
SECOND = [(None, 0.75, False), (10, 0.72, False)]  # after the resume: steps 8 and 10


def evaluate(model):
    return {"test_loss": 0.5}


class Torch:
    storage = "torch"

    def __init__(self, root, resume=False):
        self.dirpath = str(root / "torch")
        self.model = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.adapter = fcb.torch.TorchAdapter(
            chain(), model=self.model, optimizer=self.optimizer, dirpath=self.dirpath,
            evaluate=evaluate, history=True, resume_from=self.dirpath if resume else None,
        )
        self.adapter.on_fit_start()

    def check(self, step, value):
        return self.adapter.on_validation_end({"val_loss": value}, step=step)

    def close(self):
        self.adapter.on_exception()  # interrupted: nothing finalized


class Orbax:
    storage = "orbax"

    def __init__(self, root, resume=False):
        self.dirpath = str(root / "orbax")
        self.lr = LR
        self.adapter = fcb.orbax.OrbaxAdapter(
            chain(), self.dirpath, background=False, evaluate={"best.val_loss": evaluate},
            history=True, learning_rate=lambda state: state["lr"],
            resume_from=self.dirpath if resume else None,
        )
        like = {"w": jnp.zeros(2), "lr": jnp.asarray(LR, jnp.float32)}
        self.adapter.on_fit_start(like=like)
        if resume:
            self.lr = float(self.adapter.restored_state["lr"])

    def state(self, actions):
        return {"w": jnp.zeros(2), "lr": fcb.scaled_lr(jnp.float32(self.lr), actions)}

    def check(self, step, value):
        actions = self.adapter.on_validation_end({"val_loss": value}, step=step, state=self.state)
        self.lr = float(fcb.scaled_lr(jnp.float32(self.lr), actions))
        return actions

    def close(self):
        self.adapter.on_exception()


class ScriptedTrainer:
    """What the bridge reads of a Lightning Trainer, driven by the script."""

    def __init__(self, root, model, optimizer, callback, ckpt_path=None):
        self.default_root_dir = str(root)
        self.optimizers = [optimizer]
        self.should_stop = False
        self.sanity_checking = False
        self.current_epoch = 0
        self.global_step = -1  # the script's unnumbered checks are the previous step + 1
        self.callback_metrics = {}
        self.ckpt_path = ckpt_path
        self.model, self.callback = model, callback

    def save_checkpoint(self, path):
        torch.save(
            {
                "epoch": self.current_epoch,
                "global_step": self.global_step,
                "state_dict": self.model.state_dict(),
                "callbacks": {"fcb": self.callback.state_dict()},
            },
            path,
        )


class Lightning:
    storage = "torch"

    def __init__(self, root, resume=False):
        self.root = root / "lightning"
        self.dirpath = str(self.root / "checkpoints")
        self.model = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.callback = fcb.lightning.FcbCallback(
            chain(), evaluate=evaluate, step="global_step", history=True
        )
        last = os.path.join(self.dirpath, "last.ckpt") if resume else None
        self.trainer = ScriptedTrainer(self.root, self.model, self.optimizer, self.callback, last)
        if resume:  # what Trainer.fit(ckpt_path=...) does before the fit starts
            saved = torch.load(last, weights_only=True)
            self.callback.load_state_dict(saved["callbacks"]["fcb"])
            self.optimizer.param_groups[0]["lr"] = saved["lr"]
            self.trainer.global_step = saved["global_step"]
        self.callback.on_fit_start(self.trainer, self.model)
        self.lr_at = {}

    def check(self, step, value):
        trainer = self.trainer
        trainer.global_step = trainer.global_step + 1 if step is None else step
        trainer.callback_metrics = {"val_loss": torch.tensor(value, dtype=torch.float64)}
        self.callback.on_validation_end(trainer, self.model)
        return None

    def close(self):
        self.callback.on_exception(self.trainer, self.model, RuntimeError("interrupted"))


def _run(kind, root):
    run = kind(root)
    original = host_store.atomic_write_json

    def failing(path, value):
        raise fcb.CheckpointWriteError(f"could not write {path}: injected")

    for step, value, fails in FIRST:
        if fails:
            host_store.atomic_write_json = failing
            try:
                with pytest.raises(fcb.CheckpointWriteError, match="injected"):
                    run.check(step, value)
            finally:
                host_store.atomic_write_json = original
        else:
            run.check(step, value)
    run.close()
    run = kind(root, resume=True)
    for step, value, _ in SECOND:
        run.check(step, value)
    if isinstance(run, Lightning):
        run.callback.on_fit_end(run.trainer, run.model)
        return run, run.callback.adapter.summary
    return run, run.adapter.on_fit_end()


def _outcome(run, summary):
    manifest = fcb.torch.read_manifest(run.dirpath) if run.storage == "torch" else (
        fcb.orbax.read_manifest(run.dirpath)
    )

    def slots(table):
        return {n: (s["step"], s["value"], s.get("kind")) for n, s in table.items()}

    history = read_records(os.path.join(run.dirpath, "history.jsonl"), decode=False)
    return {
        "slots": slots(manifest["slots"]),
        "event_step": manifest["event_step"],
        "resume": (manifest["resume"]["step"], slots(manifest["resume"]["slots"])),
        "callbacks": manifest["callbacks"],
        "history": history,
        "summary": summary,
    }


def test_every_adapter_makes_the_same_decisions_and_records(tmp_path, monkeypatch):
    # the scripted trainer's checkpoints record the learning rate, as Lightning's do
    original = ScriptedTrainer.save_checkpoint

    def save_checkpoint(self, path):
        original(self, path)
        saved = torch.load(path, weights_only=True)
        saved["lr"] = self.optimizers[0].param_groups[0]["lr"]
        torch.save(saved, path)

    monkeypatch.setattr(ScriptedTrainer, "save_checkpoint", save_checkpoint)
    kinds = (Torch, Orbax, Lightning)
    outcomes = {kind.__name__: _outcome(*_run(kind, tmp_path)) for kind in kinds}
    reference = outcomes["Torch"]
    assert [r["step"] for r in reference["history"] if "metrics" in r] == [0, 1, 5, 6, 7, 8, 10]
    assert reference["slots"]["last"][0] == 10
    assert {r["step"]: r["lr"] for r in reference["history"] if "metrics" in r}[6] == [LR / 2]
    assert reference["resume"][0] == 10
    for name, outcome in outcomes.items():
        for key in ("slots", "event_step", "resume", "callbacks", "history", "summary"):
            assert outcome[key] == reference[key], f"{name}: {key}"
