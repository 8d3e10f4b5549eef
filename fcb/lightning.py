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
trainer = pl.Trainer(callbacks=[fcb.lightning.FcbCallback(callbacks)])
trainer.fit(model)
trainer.test(model, ckpt_path="best")  # the weights of fcb's best slot
```
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from ._core import Actions, Callback
from ._errors import CheckpointWriteError, ConfigError, RunExistsError
from ._host.engine import Check
from ._host.evaluation import EvaluatedSlot, chosen_slots
from ._host.manifest import MANIFEST_NAME, read_manifest
from ._lightning_best import BestSlots, slots_asked
from ._lightning_checks import describe, sharded_strategy
from .torch._adapter import EvaluateFn, TorchAdapter
from .torch._loadable import check_loadable
from .torch._payload import rng_state, set_rng_state
from .torch._sharded import ShardedStore, is_sharded
from .torch._sharded_payload import loaded_fsdp1, loaded_modules, sharded_choice
from .torch._store import CheckpointStore


class _LightningAdapter(TorchAdapter):
    """A TorchAdapter whose full checkpoints are written by the Trainer's own checkpointing."""

    suffix = ".ckpt"
    owner = "FcbCallback"

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return list(getattr(self.trainer, "optimizers", []) or [])

    def on_fit_start(self, trainer: Any = None, *_: Any) -> None:
        """Under a sharded strategy every rank writes its shards of each step (a sharded
        store on every rank), whatever the LightningModule's parameters look like (FSDP1
        keeps them in its flat parameters, outside the module)."""
        if trainer is not None:
            self.trainer = trainer
        strategy = sharded_strategy(self.owner, self.trainer)
        if strategy is not None:
            wanted = sorted({n for _, models in self.runner.names.slot_models for n in models})
            if wanted:
                raise ConfigError(
                    f"{self.owner}: the callbacks save the submodules {wanted} (model_names) "
                    f"on their own, but under {strategy} the Trainer saves only the whole "
                    f"sharded model. Drop model_names (save the whole model: "
                    f"fcb.torch.load_checkpoint reads it whole in one process, submodules "
                    f"included), or train with an unsharded strategy (e.g. 'ddp')."
                )
        elif sharded_choice(
            self.owner, self.sharded, self.model,
            [self.dirpath] * (self.existing_run == "resume") + [self.resume_from or ""],
        ):
            strategy_name = type(getattr(self.trainer, "strategy", None)).__name__
            raise ConfigError(
                f"{self.owner}: the LightningModule holds sharded parameters (DTensor or "
                f"FSDP), or the run in {self.dirpath} was saved sharded, but the Trainer's "
                f"strategy ({strategy_name}) writes single-file checkpoints, which cannot "
                f"hold a sharded model whole. Train with pl.strategies.ModelParallelStrategy "
                f"or FSDPStrategy(state_dict_type='sharded'), or start a new run "
                f"(existing_run='start_over' or another dirpath)."
            )
        saved = self.sharded
        self.sharded = True if strategy is not None else saved
        try:
            super().on_fit_start(trainer)
        finally:
            self.sharded = saved

    def follow(self, actions: Actions, step: int) -> None:
        # Trainer.save_checkpoint ends in a barrier on every rank, so the other ranks call it
        # as often as rank 0 does for a full checkpoint of this step; only rank 0 writes.
        # (A sharded store is open on every rank: there, every rank writes and never follows.)
        if self._sharded:
            return
        slot_models = dict(actions.slot_models)
        full = bool(actions.archive) or any(
            int(held) == step and not slot_models.get(name) for name, held in actions.slots.items()
        )
        if full:
            self.trainer.save_checkpoint(
                os.path.join(self.dirpath, "not-written-on-this-rank"), weights_only=False
            )

    def _step_writer(
        self, store: CheckpointStore, check: Check, models: tuple[str, ...] | None
    ) -> Callable[[], None]:
        if models:  # a subset of submodules: the Trainer cannot save that, torch.save does
            return super()._step_writer(store, check, models)
        step = check.step
        relative = store.step_file(step, None)

        def write() -> None:
            self.saving_step = step  # FcbCallback.state_dict records it in the checkpoint
            try:
                if isinstance(store, ShardedStore):  # every rank saves its shards into it
                    store.write_with_save(
                        relative, step, None, lambda partial: self._save(partial, step)
                    )
                else:
                    store.write_with(relative, step, None, lambda path: self._save(path, step))
            finally:
                self.saving_step = None

        return write

    def _save(self, path: str, step: int) -> None:
        """`Trainer.save_checkpoint(path)`, refusing a checkpoint that no weights-only load
        (Lightning's own `Trainer.fit(ckpt_path=...)` included) could read back. Under a
        sharded strategy every rank calls it (the strategy's save is a collective: DCP's
        shards and rank 0's `meta.pt` in the directory `path`, which it creates)."""
        trainer = self.trainer
        connector = getattr(trainer, "_checkpoint_connector", None)
        if connector is None or trainer.model is None:
            trainer.save_checkpoint(path)  # another Trainer: nothing to check before writing
            return
        checkpoint = connector.dump_checkpoint(False)  # what save_checkpoint writes
        checked = checkpoint
        if self._sharded:  # the model's and optimizers' shards go through DCP, not pickle
            checked = {
                k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")
            }
        try:
            check_loadable(self.owner, step, checked, describe)
        except CheckpointWriteError as error:
            refused: CheckpointWriteError | None = error
        else:
            refused = None
        if self._sharded:  # every rank enters the collective save, or none does
            self.group.agree_on_error(refused)
        if refused is None:
            trainer.strategy.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("Trainer.save_checkpoint")  # every rank passes it, as before
        if refused is not None:
            raise refused

    def evaluated_model(
        self, directory: str, slot: str, manifest: Mapping[str, Any], context: Any
    ) -> Any:
        """Under a sharded strategy the slot is the strategy's own DCP save: its model entry
        (FSDPStrategy's `"model"`, ModelParallelStrategy's `"state_dict"`) is loaded into the
        strategy's module on every rank, then the live shards are put back."""
        relative = manifest["slots"][slot]["file"]
        location = manifest["files"][relative]
        if not is_sharded(location):
            return super().evaluated_model(directory, slot, manifest, context)
        strategy = getattr(self.trainer, "strategy", None)
        if sharded_strategy(self.owner, self.trainer) is None or strategy is None:
            raise ConfigError(
                f"{self.owner}: slot {slot!r} holds a sharded checkpoint, which a sharded "
                f"strategy's Trainer loads; evaluate it in the Trainer that trained it, or with "
                f"trainer.test(model, ckpt_path=...) under a sharded strategy."
            )
        path = os.path.join(directory, relative)
        if isinstance(strategy, pl.strategies.FSDPStrategy):
            return loaded_fsdp1(self.group, path, location, strategy.model)
        return loaded_modules(self.group, path, location, "state_dict", strategy.model)

    saving_step: int | None = None
    loaded: dict[str, Any] | None = None
    """The state Lightning restored from `ckpt_path` (`FcbCallback.load_state_dict`)."""

    def read_resume(
        self, source: str, record: Mapping[str, Any], manifest: Mapping[str, Any]
    ) -> tuple[Any, Callable[[], None]]:
        """Lightning restores the model, optimizer and loops itself; the session resets the
        directory to the checkpoint's resume point, which must be the one Lightning loaded."""
        if self.loaded is None:
            raise RunExistsError(
                f"FcbCallback: {source} holds a run resumable at step {record['step']}, but "
                f"Lightning loaded no checkpoint of it, and a run is never replaced "
                f"implicitly. Pass trainer.fit(..., ckpt_path=fcb.lightning.resume_path("
                f"{source!r})) to continue it (None on a first launch, so one line serves "
                f"every launch), or FcbCallback(existing_run='start_over') to replace it."
            )
        step = self.loaded.get("step")
        if step is not None and step != record["step"]:
            last = os.path.join(source, "last" + ("" if self._sharded else self.suffix))
            raise ConfigError(
                f"FcbCallback: Lightning resumed from the checkpoint of step {step}, but the "
                f"run's resume point in {source} is step {record['step']} (its `last` slot); "
                f"resuming from another slot would leave later checkpoints in the run. Pass "
                f"ckpt_path={last!r}."
            )
        return self.loaded["callbacks"], lambda: None


class FcbCallback(BestSlots, pl.callbacks.Checkpoint):
    """Wrap any fcb callback (or chain) as a Lightning `Callback`.

    At each validation end (sanity checks excepted) the chain sees `trainer.callback_metrics`
    at `step = trainer.current_epoch` (`step="epoch"`, the default) or at
    `step = trainer.global_step` (`step="global_step"`: use it when validation runs more
    than once per epoch, e.g. `val_check_interval=0.5`; with epoch numbering, a second
    validation in one epoch is refused, since its checkpoint would reuse the epoch's step);
    a stop sets `trainer.should_stop`; `lr_scale` applies
    to every param group of `trainer.optimizers`; checkpoints are written by
    `trainer.save_checkpoint` into `dirpath` (default `{default_root_dir}/checkpoints`) with
    the same one-file-per-step store, stable slot names (`best_model.ckpt`, `last.ckpt`, ...)
    and manifest as [`fcb.torch.TorchAdapter`][]. The chain's state travels in every Lightning
    checkpoint (`state_dict` / `load_state_dict`), so `Trainer.fit(ckpt_path=...)` resumes it.

    It is the Trainer's checkpoint callback (a `pl.callbacks.Checkpoint`): Lightning adds no
    `ModelCheckpoint` of its own beside it (and refuses `enable_checkpointing=False` with it),
    and `trainer.test(ckpt_path="best")` / `validate` / `predict` load fcb's best slot
    ([`best_model_path`][fcb.lightning.FcbCallback.best_model_path]). After training,
    [`evaluate_checkpoints`][fcb.lightning.FcbCallback.evaluate_checkpoints] evaluates the
    best (and tolerance) slots with the `evaluate` functions and hands the results to
    `BestCheckpoint`'s nested callbacks; `evaluate_at_test_end=True` (or slot names) runs it
    at the end of `trainer.test`.

    A directory that holds a run is never replaced implicitly: resume it with
    `trainer.fit(model, ckpt_path=fcb.lightning.resume_path(dirpath))` (its resume point, or
    `None` when there is none yet: the same line serves the first launch and every
    relaunch), or pass `existing_run="start_over"` to replace it; otherwise the fit raises
    [`fcb.RunExistsError`][] before anything is changed. Lightning restores the model, the
    optimizers, the loops and, through this callback's state, the chain and the random
    generators (torch, CUDA, NumPy, Python's `random`; put back at the start of the first
    epoch trained after the resume), so a run resumed from an epoch-end checkpoint trains
    exactly as the uninterrupted one.

    Under Lightning's sharded strategies (`ModelParallelStrategy`, FSDP2; `FSDPStrategy` with
    `state_dict_type="sharded"`) each checkpointed step is the strategy's own sharded save,
    written by every rank into the step's directory `steps/step-NNNNNNNN/` (slot names are
    links to it), as [`fcb.torch.TorchAdapter`][] saves a sharded model; the same
    `ckpt_path=fcb.lightning.resume_path(dirpath)` resumes it, and
    `fcb.torch.load_checkpoint` reads a slot whole in one process. A strategy set to gather
    the whole model for its checkpoints, and `model_names` (submodule variants), are refused
    there with a `ConfigError`.
    """

    def __init__(
        self,
        callbacks: Callback,
        *,
        dirpath: str | os.PathLike[str] | None = None,
        evaluate: EvaluateFn | Mapping[str, EvaluateFn] | None = None,
        step: str = "epoch",
        history: bool = False,
        log: Callable[[int, dict[str, float]], None] | None = None,
        reduce: str | None = "mean",
        existing_run: str = "resume",
        evaluate_at_test_end: bool | str | Sequence[str] = False,
    ):
        if step not in ("epoch", "global_step"):
            raise ConfigError(
                f"FcbCallback: `step` must be 'epoch' or 'global_step', got step = {step!r}."
            )
        self.step = step
        self.adapter = _LightningAdapter(
            callbacks, dirpath=dirpath, evaluate=evaluate, history=history, log=log,
            reduce=reduce, existing_run=existing_run,
            preempt_on=(),  # Lightning handles SIGTERM itself (SIGTERMException on every rank)
        )
        if evaluate_at_test_end is not False:
            if not isinstance(evaluate_at_test_end, (bool, str, Sequence)):
                raise ConfigError(
                    f"FcbCallback: `evaluate_at_test_end` must be True, False, a slot name or "
                    f"a list of them, got {evaluate_at_test_end!r}."
                )
            chosen_slots("FcbCallback", self.adapter.runner, slots_asked(evaluate_at_test_end))
        self.evaluate_at_test_end = evaluate_at_test_end
        self.evaluated: dict[str, EvaluatedSlot | None] = {}
        """The results of the last `evaluate_checkpoints` (at test end, or called)."""
        self._assigned_best = ""

    @property
    def state_key(self) -> str:
        return "fcb"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.trainer = trainer
        self.adapter.model = pl_module
        self._pending = True
        if getattr(getattr(trainer, "strategy", None), "restore_checkpoint_after_setup", False):
            # a sharded strategy (FSDP, ModelParallelStrategy) restores `ckpt_path`, this
            # callback's state included, after on_fit_start: the run opens once it has
            return
        self._start(trainer)

    _pending = False

    def _start(self, trainer: pl.Trainer) -> None:
        if not self._pending:
            return
        self._pending = False
        if self.adapter.loaded is not None:  # Trainer.fit(ckpt_path=...) of an fcb checkpoint
            self.adapter.resume_from = self.adapter.dirpath
        self.adapter.on_fit_start(trainer)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checks belong to fitting: trainer.validate(...) after (or without) a fit evaluates
        # a model and must not add a check to the run, nor write to its directory
        fn = getattr(getattr(trainer, "state", None), "fn", TrainerFn.FITTING)
        if trainer.sanity_checking or fn != TrainerFn.FITTING:
            return
        self._start(trainer)
        step = trainer.current_epoch if self.step == "epoch" else trainer.global_step
        self.adapter.on_validation_end(dict(trainer.callback_metrics), step=step, trainer=trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.on_fit_end(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.adapter.on_exception(exception)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The random generators go back to the checkpoint's at the start of the first epoch
        # trained after a resume: what Lightning draws before (a sanity check, dataloaders)
        # would otherwise shift every draw of the resumed run against the uninterrupted one.
        rng, self._rng = self._rng, None
        if rng is not None:
            set_rng_state(rng)

    _rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        adapter = self.adapter
        step = adapter.saving_step
        return {
            "callbacks": adapter.state_dict(),
            "step": adapter.session.last_step if step is None else step,
            "rng": rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")
        if self.adapter.session.started:  # a strategy that restores callbacks after the start
            self.adapter.runner.load_state_dict(state_dict["callbacks"])
        else:
            self.adapter.loaded = dict(state_dict)


def resume_path(dirpath: str | os.PathLike[str]) -> str | None:
    """The checkpoint to pass as `trainer.fit(ckpt_path=...)` to resume the run in
    `dirpath` (the `FcbCallback`'s checkpoint directory): its resume point, or `None` when
    the directory holds no resumable run (a first launch).

    >>> import tempfile
    >>> fcb.lightning.resume_path(tempfile.mkdtemp()) is None
    True
    """
    directory = os.path.abspath(os.fspath(dirpath))
    if not os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        return None
    manifest = read_manifest(directory, "torch")
    record = manifest.get("resume")
    return os.path.join(directory, record["file"]) if record else None


__all__ = ["FcbCallback", "resume_path"]
