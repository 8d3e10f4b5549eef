"""What Lightning reads of the best checkpoint (`best_model_path`, for `ckpt_path="best"`),
and the post-training pass on the LightningModule, for `fcb.lightning.FcbCallback`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from ._best_checkpoint import BestCheckpoint
from ._errors import ConfigError
from ._host.evaluation import EvaluatedSlot
from ._host.manifest import MANIFEST_NAME, read_manifest
from ._state_dict import decode_number


class BestSlots:
    """`FcbCallback`'s best checkpoint as Lightning reads it, and its post-training pass."""

    adapter: Any
    evaluate_at_test_end: bool | str | Sequence[str] = False
    evaluated: dict[str, EvaluatedSlot | None]
    _assigned_best = ""

    # -- the best checkpoint, as Lightning reads it ------------------------------------------

    def best_slot(self) -> str | None:
        """The slot `ckpt_path="best"` names: the first `BestCheckpoint`'s overall best,
        else the first `ModelCheckpoint`'s best (`None` when the callbacks keep neither)."""
        runner = self.adapter.runner
        found = runner.find(BestCheckpoint)
        if found:
            return str(found[0].filename)
        return next((slot for slot, kind in runner.names.slot_kinds if kind == "best"), None)

    @property
    def best_model_path(self) -> str:
        """The checkpoint of the best slot (its stable name, e.g. `best.val_loss.ckpt`), as
        committed in the run directory; `""` while it holds none. Lightning loads it for
        `trainer.test(ckpt_path="best")` (and `validate`, `predict`). A slot that holds only
        some submodules (`model_names`) is not a Lightning checkpoint: reading its path is a
        `ConfigError`. Without `dirpath=`, the directory is known once a Trainer ran a hook."""
        slot = self.best_slot()
        adapter = self.adapter
        if slot is None or (adapter._dirpath is None and adapter.trainer is None):
            return self._assigned_best
        directory = os.path.abspath(adapter.dirpath)
        if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
            return self._assigned_best
        record = read_manifest(directory, "torch")["slots"].get(slot)
        if record is None:
            return ""
        if record.get("models"):
            raise ConfigError(
                f"FcbCallback: the best slot {slot!r} holds only the submodules "
                f"{record['models']} (model_names), which Lightning cannot load as a "
                f"checkpoint of the LightningModule. Load it with fcb.torch.load_checkpoint, "
                f"or evaluate it with FcbCallback.evaluate_checkpoints()."
            )
        return os.path.join(directory, record.get("link") or record["file"])

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        # Lightning's spawn launchers copy the worker's path into the main process's callback
        self._assigned_best = str(path)

    @property
    def best_model_score(self) -> torch.Tensor | None:
        """The best slot's metric value (`None` while it holds no checkpoint)."""
        slot = self.best_slot()
        if slot is None or not self.best_model_path:
            return None
        record = read_manifest(os.path.abspath(self.adapter.dirpath), "torch")["slots"][slot]
        value = record.get("value")
        return None if value is None else torch.tensor(decode_number(value))

    # -- the post-training pass --------------------------------------------------------------

    def evaluate_checkpoints(self, slots: Any = None) -> dict[str, EvaluatedSlot | None]:
        """[`TorchAdapter.evaluate_checkpoints`][fcb.torch.TorchAdapter.evaluate_checkpoints]
        on the LightningModule: each slot's weights are loaded into it for its `evaluate`
        function (`fn(pl_module)`), then its own weights are put back; under a sharded
        strategy, each slot's shards on every rank."""
        self.evaluated = self.adapter.evaluate_checkpoints(slots)
        return self.evaluated

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.adapter.trainer = trainer
        self.adapter.model = pl_module

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_at_test_end is not False:
            self.evaluate_checkpoints(slots_asked(self.evaluate_at_test_end))



def slots_asked(asked: bool | str | Sequence[str]) -> Any:
    """`evaluate_at_test_end`: True for the default slots, else the slots named."""
    return None if asked is True else asked
