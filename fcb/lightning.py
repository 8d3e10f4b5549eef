"""fcb.lightning: run an fcb callback chain inside a real Lightning `Trainer`.

Installed with `pip install fcb[lightning]`.

```python
import pytorch_lightning as pl
import fcb, fcb.lightning

callbacks = fcb.chain(
    fcb.EarlyStopping("val_loss", patience=5),
    fcb.ModelCheckpoint("val_loss", save_top_k=2),
    fcb.BestCheckpoint("val_loss", tolerances=[3, 10]),
)
trainer = pl.Trainer(callbacks=[fcb.lightning.FcbCallback(callbacks)], enable_checkpointing=False)
```
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from ._core import Actions, Callback
from .torch._adapter import EvaluateFn, TorchAdapter
from .torch._store import CheckpointStore


class _LightningAdapter(TorchAdapter):
    """A TorchAdapter whose full checkpoints are written by the Trainer's own checkpointing."""

    suffix = ".ckpt"

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return list(getattr(self.trainer, "optimizers", []) or [])

    def _follow_checkpoints(self, actions: Actions, step: int) -> None:
        # Trainer.save_checkpoint ends in a barrier on every rank, so the other ranks call it
        # as often as rank 0 does for a full checkpoint of this step; only rank 0 writes.
        slot_models = dict(actions.slot_models)
        full = bool(actions.archive) or any(
            int(held) == step and not slot_models.get(name) for name, held in actions.slots.items()
        )
        if full:
            self.trainer.save_checkpoint(os.path.join(self.dirpath, "not-written-on-this-rank"))

    def _step_writer(
        self, step: int, models: tuple[str, ...] | None, callbacks_state: Any, slots: Any
    ) -> Callable[[CheckpointStore], None]:
        if models:  # a subset of submodules: the Trainer cannot save that, torch.save does
            return super()._step_writer(step, models, callbacks_state, slots)
        trainer = self.trainer

        def write(store: CheckpointStore) -> None:
            store.write_with(store.step_file(step, None), step, None, trainer.save_checkpoint)

        return write


class FcbCallback(pl.Callback):
    """Wrap any fcb callback (or chain) as a Lightning `Callback`.

    At each validation end (sanity checks excepted) the chain sees `trainer.callback_metrics`
    at `step = trainer.current_epoch`; a stop sets `trainer.should_stop`; `lr_scale` applies
    to every param group of `trainer.optimizers`; checkpoints are written by
    `trainer.save_checkpoint` into `dirpath` (default `{default_root_dir}/checkpoints`) with
    the same one-file-per-step store, stable slot names (`best_model.ckpt`, `last.ckpt`, ...)
    and manifest as [`fcb.torch.TorchAdapter`][]. The chain's state travels in every Lightning
    checkpoint (`state_dict` / `load_state_dict`), so `Trainer.fit(ckpt_path=...)` resumes it.
    Pass `enable_checkpointing=False` to the Trainer to turn off Lightning's own checkpointing.
    """

    def __init__(
        self,
        callbacks: Callback,
        *,
        dirpath: str | os.PathLike[str] | None = None,
        evaluate: EvaluateFn | Mapping[str, EvaluateFn] | None = None,
    ):
        self.adapter = _LightningAdapter(callbacks, dirpath=dirpath, evaluate=evaluate)

    @property
    def state_key(self) -> str:
        return "fcb"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.trainer = trainer
        self.adapter.model = pl_module
        self.adapter.on_fit_start(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.adapter.on_validation_end(
            dict(trainer.callback_metrics), step=trainer.current_epoch, trainer=trainer
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.on_fit_end(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.adapter.on_exception(exception)

    def state_dict(self) -> dict[str, Any]:
        return {"callbacks": self.adapter.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adapter.runner.load_state_dict(state_dict["callbacks"])


__all__ = ["FcbCallback"]
