"""The Torch adapter: applies fcb actions to a Torch trainer or a plain training loop.

Only what is Torch's lives here (the payload of a step, the learning-rate groups, the
evaluation on a module, the background writer); the check sequence is the shared session's
(`fcb._host.session`), the store's commit order `fcb._host.store`'s.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import IO, Any, Protocol, runtime_checkable

import torch

from .._core import Actions, Callback
from .._errors import (
    CheckpointWriteError,
    ConfigError,
    MetricTypeError,
)
from .._host.engine import (
    FREE_DEVICE_MEMORY,
    check_evaluate,
    check_flag,
    check_path,
    evaluation_function,
)
from .._host.existing import check_existing_run
from .._host.facade import SessionFacade
from .._host.interrupts import Interrupts
from .._host.processes import ProcessGroup
from .._host.session import Session
from .._host.store import ManifestStore
from .._model_checkpoint import ModelCheckpoint
from .._validate import check_metrics_mapping
from ._distributed import ranks
from ._load import load_checkpoint as load_checkpoint, loaded_weights
from ._lr import TorchLearningRates
from ._payload import check_parts, close_all, number
from ._sharded import ShardedStore
from ._sharded_payload import check_sharded_option, sharded_choice
from ._store import CheckpointStore
from ._writer import BackgroundWriter
from ._writes import TorchWrites


@runtime_checkable
class Trainer(Protocol):
    """What the adapter needs of a trainer (a Lightning `Trainer` qualifies)."""

    should_stop: bool
    default_root_dir: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


EvaluateFn = Callable[[torch.nn.Module], Mapping[str, Any]]


class TorchAdapter(TorchWrites, TorchLearningRates, SessionFacade):
    """Run an fcb callback chain in a Torch training loop and apply its actions.

    Give it a `trainer` (anything with `should_stop`, `default_root_dir`, `state_dict()` and
    `load_state_dict()`), or the `model` / `optimizer` / `scheduler` of a plain loop. Call the
    hooks at Lightning's moments; `on_validation_end` (or `on_train_epoch_end`, with
    `check_on="train_epoch_end"`) runs one check of the whole chain through one cached jitted
    dispatch and then:

    - sets `should_stop` (and `trainer.should_stop`) when a callback stops; never raises for it;
    - multiplies every optimizer param group's learning rate by `lr_scale` with
      [`fcb.scaled_lr`][] (floors and minimum changes included);
    - writes the current step once if any slot takes it (`steps/step-NNNNNNNN.pt`, atomic),
      points every slot's stable name at its step (`best_model.pt`, `last.pt`,
      `best.val_loss.tolerance=5.pt`... as hard links), records everything in
      `manifest.json`, then deletes the files no slot holds any more;
    - runs `evaluate` on the live model when a callback asks (a new best for
      `BestCheckpoint`'s nested callbacks) and feeds the results back.

    Checkpoints go to `dirpath`, else a `ModelCheckpoint`'s `dirpath`, else
    `{trainer.default_root_dir}/checkpoints`. With `background=True` the loop is blocked only
    while the state is copied to host memory; a write error is raised at the next event and
    at `on_fit_end`. A failed synchronous write leaves the callbacks' state as it was before
    the event and raises [`fcb.CheckpointWriteError`][]; the previous files are intact.

    Under `torch.distributed` metrics are reduced over ranks (`reduce="mean"`; `None` when
    already reduced), stops are agreed (any rank stops all), only rank 0 writes, and a write
    error is raised on every rank.

    A directory that already holds a run is resumed (`existing_run="resume"`, the
    default): the model, optimizer, scheduler, trainer, RNG and callback state are restored
    from the run's `last` checkpoint, `resumed_step` is its step, and later decisions are
    exactly those of an uninterrupted run; an empty directory starts a new run, so the same
    script serves the first launch and every relaunch. `existing_run="start_over"` replaces
    the run; `"error"` raises [`fcb.RunExistsError`][]. A run is never replaced implicitly:
    one that cannot be resumed (no `last` slot) raises `RunExistsError` too.
    `resume_from=RUN_DIR` resumes another directory's run into `dirpath`: it copies (links)
    what it needs and never deletes the old run's files. Train with
    `for epoch in adapter.epochs(max_epochs)`: it starts after the resumed step and ends at
    a stop, also one the resumed run had already made.

    With `history=True` every check appends one line to `{dirpath}/history.jsonl`: the step,
    the metrics, the learning rates, the events that fired and the stop message; the end of
    the fit appends the callbacks' summary. `fcb.replay` and `fcb plot` read it. A new run
    starts a new history; a resumed run keeps the lines up to its resume point.

    Sharded models (DTensor parameters: FSDP2 `fully_shard`, tensor parallel; FSDP1) are
    saved with `torch.distributed.checkpoint`: every rank writes its shards into the step's
    directory `steps/step-NNNNNNNN/`, and rank 0 commits the manifest once all are durable
    (`sharded=None`, the default, decides from the model and the run being resumed;
    `sharded=True` saves even an unsharded model so; `sharded=False` with a sharded model is a
    `ConfigError`). `fcb.torch.load_checkpoint` reads such a step whole in one process.

    Steps: `step=` names the check (and its checkpoint); each check's step must be larger
    than the last. Without it, a check is the previous step + 1 (the first is 0).
    """

    suffix = ".pt"
    owner = "TorchAdapter"

    def __init__(
        self,
        callbacks: Callback,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        trainer: Any = None,
        dirpath: str | os.PathLike[str] | None = None,
        evaluate: EvaluateFn | Mapping[str, EvaluateFn] | None = None,
        background: bool = False,
        check_on: str = "validation_end",
        resume_from: str | os.PathLike[str] | None = None,
        existing_run: str = "resume",
        log: Callable[[int, dict[str, float]], None] | None = None,
        reduce: str | None = "mean",
        history: bool = False,
        preempt_on: Any = ("SIGTERM",),
        resume_every_steps: int | None = None,
        resume_every_seconds: float | None = None,
        save_on_exception: bool = False,
        clock: Callable[[], float] | None = None,
        sharded: bool | None = None,
    ):
        owner = self.owner
        if check_on not in ("validation_end", "train_epoch_end"):
            raise ConfigError(
                f"{owner}: `check_on` must be 'validation_end' or 'train_epoch_end', got "
                f"check_on = {check_on!r}."
            )
        check_parts(owner, model, optimizer, scheduler, trainer)
        check_evaluate(owner, evaluate, "model")
        resume_from = check_path(owner, "resume_from", resume_from)
        self.existing_run = check_existing_run(owner, existing_run)
        dirpath = check_path(owner, "dirpath", dirpath)
        self.session = Session(
            owner, callbacks, self, storage="torch", reduce=reduce, log=log, history=history,
            interrupts=Interrupts(
                owner, preempt_on=preempt_on, resume_every_steps=resume_every_steps,
                resume_every_seconds=resume_every_seconds, clock=clock,
            ),
        )
        self.save_on_exception = check_flag(owner, "save_on_exception", save_on_exception)
        self.callbacks = callbacks
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.trainer = trainer
        self.evaluate = evaluate
        self.check_on = check_on
        self.background = check_flag(owner, "background", background)
        self.resume_from = resume_from
        self._dirpath = dirpath
        self.sharded = check_sharded_option(owner, sharded)
        self._sharded = bool(sharded)
        self._writer: BackgroundWriter | None = None
        self._stashed: dict[str, Any] = {}
        self._snapshot: dict[str, IO[bytes]] = {}
        """The files of the resume point being read (open: the old run may delete them)."""

    # -- what the session holds --------------------------------------------------------------

    @property
    def store(self) -> CheckpointStore | None:
        return self.session.store  # type: ignore[return-value]

    @property
    def group(self) -> ProcessGroup:
        return self.session.processes

    @property
    def dirpath(self) -> str:
        if self._dirpath:
            return self._dirpath
        for checkpoint in self.runner.find(ModelCheckpoint):  # ModelCheckpoint(dirpath=...)
            if checkpoint.dirpath:
                return str(checkpoint.dirpath)
        root = getattr(self.trainer, "default_root_dir", None)
        if root:
            return os.path.join(os.fspath(root), "checkpoints")
        raise ConfigError(
            f"{self.owner}: no checkpoint directory: pass dirpath=..., set a ModelCheckpoint's "
            f"dirpath, or give a trainer with default_root_dir."
        )

    # -- set-up ------------------------------------------------------------------------------

    def _submodule(self, name: str) -> torch.nn.Module:
        assert self.model is not None
        children = dict(self.model.named_children())
        if name not in children:
            raise ConfigError(
                f"{self.owner}: model_names asks for submodule {name!r}, but the model "
                f"({type(self.model).__name__}) has {sorted(children)}. Fix model_names."
            )
        return children[name]

    def _check_model_names(self) -> None:
        wanted = {n for _, models in self.runner.names.slot_models for n in models}
        if not wanted:
            return
        if self.model is None:
            raise ConfigError(
                f"{self.owner}: the callbacks save the submodules {sorted(wanted)} but no "
                f"model was given; pass model=..."
            )
        for name in sorted(wanted):
            self._submodule(name)

    def on_fit_start(self, trainer: Any = None, *_: Any) -> None:
        """Open the checkpoint directory (locking it), check the model, resume if asked."""
        if trainer is not None:
            self.trainer = trainer
        self._check_model_names()
        resuming = getattr(self.trainer, "ckpt_path", None)  # the trainer resumes itself
        self._sharded = sharded_choice(
            self.owner, self.sharded, self.model,
            [self.dirpath] * (self.existing_run == "resume") + [self.resume_from or ""],
        )
        try:
            self.session.start(
                self.dirpath, resume_from=self.resume_from, existing_run=self.existing_run,
                keep=bool(resuming),
            )
        finally:
            close_all(self._snapshot)
            self._snapshot = {}
        if (
            self.store is not None and self.background and self._writer is None
            and not self._sharded  # a sharded store saves asynchronously itself
        ):
            self._writer = BackgroundWriter()

    # -- events ------------------------------------------------------------------------------

    def on_train_epoch_end(
        self, metrics: Mapping[str, Any] | None = None, *, step: int | None = None,
        trainer: Any = None,
    ) -> Actions | None:
        """Record training metrics; run the check here when `check_on="train_epoch_end"`."""
        self._stash(metrics)
        return self._event(step, trainer) if self.check_on == "train_epoch_end" else None

    def on_validation_end(
        self, metrics: Mapping[str, Any] | None = None, *, step: int | None = None,
        trainer: Any = None,
    ) -> Actions | None:
        """Record validation metrics; run the check (default `check_on`)."""
        self._stash(metrics)
        return self._event(step, trainer) if self.check_on == "validation_end" else None

    def _stash(self, metrics: Mapping[str, Any] | None) -> None:
        if metrics is not None:
            check_metrics_mapping(self.owner, metrics)
            self._stashed.update(metrics)

    def _event(self, step: int | None, trainer: Any) -> Actions:
        if trainer is not None:
            self.trainer = trainer
        if not self.session.started:
            self.on_fit_start()
        if self.background and not self._sharded:  # rank 0's writer thread may have failed
            self.group.agree_on_error(self._writer_error())
        stashed, self._stashed = self._stashed, {}
        metrics = {k: number(self.owner, k, v) for k, v in stashed.items()}
        return self.session.check(metrics, step=step)

    # -- the engine: what is Torch's ---------------------------------------------------------

    def processes(self) -> ProcessGroup:
        return ranks()

    def open_store(self, processes: ProcessGroup) -> ManifestStore | None:
        if self._sharded:  # every rank writes its shards
            return ShardedStore(self.dirpath, processes=processes, background=self.background)
        # only rank 0 touches the directory; every rank learns whether that worked
        return CheckpointStore(self.dirpath, suffix=self.suffix) if processes.is_primary else None

    def host_input(self, kind: str) -> Callable[[], float | None] | None:
        if kind == FREE_DEVICE_MEMORY and torch.cuda.is_available():
            return lambda: float(torch.cuda.mem_get_info()[0])
        return None

    def run_evaluation(self, requests: Sequence[str], context: Any = None) -> Mapping[str, Any]:
        fn = evaluation_function(self.owner, self.evaluate, requests, "model")
        if self.model is None:
            raise ConfigError(
                f"{self.owner}: the callbacks ask to evaluate the model for {requests[-1]!r}, "
                f"but no model was given; pass model=..."
            )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                results = fn(self.model)
        finally:
            self.model.train(was_training)
        if not isinstance(results, Mapping):
            raise MetricTypeError(
                f"{self.owner}: the evaluate function for {requests[-1]!r} must return a "
                f"mapping from metric name to scalar, got {type(results).__name__}: "
                f"{results!r}."
            )
        return {k: number(self.owner, k, v) for k, v in results.items()}

    def evaluated_model(
        self, directory: str, slot: str, manifest: Mapping[str, Any], context: Any
    ) -> AbstractContextManager[Any]:
        """The slot's weights in the live model while the context lasts; the live weights
        are put back afterwards (a copy of them is held meanwhile)."""
        if self.model is None:
            raise ConfigError(
                f"{self.owner}: evaluating the checkpoint of slot {slot!r} loads it into the "
                f"model, but no model was given; pass model=..."
            )
        relative = manifest["slots"][slot]["file"]
        return loaded_weights(
            self, os.path.join(directory, relative), manifest["files"][relative], context
        )

    def submit(self, job: Callable[[], None]) -> None:
        if self._writer is None:
            job()
        else:
            self._writer.submit(job)

    def follow(self, actions: Actions, step: int) -> None:
        """What a rank other than 0 does while rank 0 writes: nothing, for plain Torch."""

    def settle(self) -> None:
        if self._writer is not None:
            self._writer.wait()

    def stopped(self) -> None:
        if self.trainer is not None:
            self.trainer.should_stop = True

    # -- end ---------------------------------------------------------------------------------

    def _writer_error(self) -> CheckpointWriteError | None:
        if self._writer is None or self._writer.error is None:
            return None
        error = CheckpointWriteError(f"a background checkpoint write failed: {self._writer.error}")
        error.__cause__ = self._writer.error
        return error

    def wait(self) -> None:
        """Block until every background write is done and committed; raise the first
        write error."""
        if self._writer is not None:
            self._writer.wait()
        self.group.agree_on_error(self._writer_error())
        if self.store is not None:  # a sharded async save in flight commits now
            self.store.finish()

    def on_fit_end(self, trainer: Any = None, *_: Any) -> dict[str, float]:
        """Wait for writes, finalize the callbacks (summary scalars), release the directory."""
        try:
            self.wait()
            return self.session.finalize()
        finally:
            self._close()

    def on_exception(self, exception: BaseException | None = None, *_: Any) -> None:
        """Let pending writes finish (they are complete checkpoints), commit a resume point
        with `save_on_exception=True`, and release the directory."""
        try:
            if self._writer is not None:
                self._writer.wait()
            if (  # one process: nothing else to wait for in a collective
                isinstance(self.store, ShardedStore) and self.store._in_flight()
                and not self.group.active
            ):
                with contextlib.suppress(Exception):  # a complete step is worth committing
                    self.store.finish()
            if self.save_on_exception:
                self.session.save_on_exception(exception, failed=bool(self._writer_error()))
        finally:
            self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        self.session.close()
