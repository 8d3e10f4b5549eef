"""The Torch adapter: applies fcb actions to a Torch trainer or a plain training loop."""

from __future__ import annotations

import json
import logging
import operator
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from copy import deepcopy
from typing import Any, Protocol, runtime_checkable

import torch

from .._core import Actions, Callback
from .._errors import (
    CheckpointCorruptError,
    CheckpointWriteError,
    ConfigError,
    MetricShapeError,
    MetricTypeError,
)
from .._files import link_atomic, verify
from .._history import HistoryLog, check_record, find_history
from .._manifest import Plan, json_metrics, plan_checkpoints
from .._model_checkpoint import ModelCheckpoint
from .._ranks import check_reduction
from .._runner import Runner
from .._state_dict import state_dict as fcb_state_dict
from .._validate import check_metrics_mapping
from .._vram_drift import VRAMDrift
from ._distributed import Group
from ._store import CheckpointStore, read_manifest

logger = logging.getLogger("fcb")

CHECKPOINT_FORMAT = "fcb.checkpoint"


@runtime_checkable
class Trainer(Protocol):
    """What the adapter needs of a trainer (a Lightning `Trainer` qualifies)."""

    should_stop: bool
    default_root_dir: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


EvaluateFn = Callable[[torch.nn.Module], Mapping[str, Any]]


def _number(key: str, value: Any) -> Any:
    """Torch tensors as Python numbers (detached); anything else unchanged for validation."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MetricShapeError(
                f"TorchAdapter: metric {key!r} must be a scalar, got a tensor of shape "
                f"{tuple(value.shape)}. Reduce it first, e.g. x.mean()."
            )
        return value.detach().item()
    return value


def _checked_step(step: Any) -> int:
    """A step as a Python int: an integer >= 0 (a NumPy or 0-d Torch integer is fine)."""
    try:
        value = operator.index(step)
    except TypeError:
        value = -1
    if isinstance(step, bool) or value < 0:
        raise ConfigError(f"TorchAdapter: `step` must be an integer >= 0, got step = {step!r}.")
    return value


def _host_copy(obj: Any, copy_tensor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of a state dict whose tensors live in host memory and share nothing.

    Mappings keep their type and a module state dict its `_metadata` (the module versions
    `load_state_dict` migrates by), so a background write saves what a direct one does.
    `copy_tensor` makes the tensors' copies (default: new host tensors).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True) if copy_tensor is None else copy_tensor(obj)
    if isinstance(obj, dict):
        kind = OrderedDict if isinstance(obj, OrderedDict) else dict
        copied = kind((k, _host_copy(v, copy_tensor)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            copied._metadata = deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v, copy_tensor) for v in obj)
    return obj


_REUSED_BYTES = 1 << 20
"""Host copies at least this large are reused from one background write to the next."""

_Lent = list[tuple[tuple[Any, ...], torch.Tensor]]


class _BackgroundWriter:
    """Runs store jobs in order on one thread; the first error is kept and re-raised.

    It also makes the host copies the jobs write. The memory of a large copy is reused once
    the job that wrote it is done: fresh memory for a large state costs page faults, often
    more than the copy itself, and the training loop waits for the copies.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], _Lent] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self._spare: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._spare_lock = threading.Lock()
        self._lent: _Lent = []  # copies made for the job about to be submitted
        self._thread = threading.Thread(target=self._run, name="fcb-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, lent = item
            try:
                if self.error is None:
                    job()
            except BaseException as error:  # surfaced at the next event and at fit end
                self.error = error
            finally:
                self._give_back(lent)
                self._jobs.task_done()
        self._jobs.task_done()

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` for the next submitted job, in reused memory if possible."""
        tensor = tensor.detach()
        if (
            type(tensor) is not torch.Tensor
            or tensor.layout != torch.strided
            or tensor.is_quantized
            or tensor.numel() * tensor.element_size() < _REUSED_BYTES
        ):
            return tensor.to("cpu", copy=True)
        key = (tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        with self._spare_lock:
            spares = self._spare.get(key)
            buffer = spares.pop() if spares else None
        if buffer is None:
            buffer = torch.empty_like(tensor, device="cpu")
        buffer.copy_(tensor)
        self._lent.append((key, buffer))
        return buffer

    def _give_back(self, lent: _Lent) -> None:
        with self._spare_lock:
            for key, buffer in lent:
                spares = self._spare.setdefault(key, [])
                if len(spares) < 4:  # at most as many as writes can be in flight
                    spares.append(buffer)

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`; the host copies made since the last submit are its to write."""
        lent, self._lent = self._lent, []
        self._jobs.put((job, lent))

    def wait(self) -> None:
        self._jobs.join()

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class TorchAdapter:
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

    Resume with `resume_from=RUN_DIR`: the model, optimizer, scheduler, trainer, RNG and
    callback state are restored from the run's `last` checkpoint, and later decisions are
    exactly those of an uninterrupted run. Resuming into another directory copies (links)
    what it needs and never deletes the old run's files.

    With `history=True` every check appends one line to `{dirpath}/history.jsonl`: the step,
    the metrics, the learning rates, the events that fired and the stop message; the end of
    the fit appends the callbacks' summary. `fcb.replay` and `fcb plot` read it. A new run
    starts a new history; a resumed run keeps the lines up to its resume point.
    """

    suffix = ".pt"

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
        log: Callable[[int, dict[str, float]], None] | None = None,
        reduce: str | None = "mean",
        history: bool = False,
    ):
        if check_on not in ("validation_end", "train_epoch_end"):
            raise ConfigError(
                f"TorchAdapter: `check_on` must be 'validation_end' or 'train_epoch_end', got "
                f"check_on = {check_on!r}."
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"TorchAdapter: `model` must be a torch.nn.Module, got {type(model).__name__}."
            )
        if not isinstance(callbacks, Callback):
            raise ConfigError(
                f"TorchAdapter: `callbacks` must be an fcb.Callback (or fcb.chain(...)), got "
                f"{type(callbacks).__name__}: {callbacks!r}."
            )
        self.runner = Runner(callbacks)
        self.callbacks = callbacks
        self.model, self.optimizer, self.scheduler, self.trainer = (
            model,
            optimizer,
            scheduler,
            trainer,
        )
        self.evaluate = evaluate
        self.check_on = check_on
        self.log = log
        self.record_history = bool(history)
        self.history: HistoryLog | None = None
        self.background = background
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self._dirpath = None if dirpath is None else os.fspath(dirpath)
        self.reduce = check_reduction("TorchAdapter", reduce)
        self.group = Group()
        self._started = False
        self.store: CheckpointStore | None = None
        self._writer: _BackgroundWriter | None = None
        self._stashed: dict[str, Any] = {}
        self._checks = 0
        self._probe_memory = False
        self._memory_keys: list[str] = []
        self.should_stop = False
        self.stop_message = ""
        self.resumed_step: int | None = None
        self.summary: dict[str, float] = {}

    # -- set-up ------------------------------------------------------------------------------

    @property
    def dirpath(self) -> str:
        if self._dirpath:
            return self._dirpath
        for checkpoint in self.runner.find(ModelCheckpoint):
            if checkpoint.dirpath:
                return checkpoint.dirpath
        root = getattr(self.trainer, "default_root_dir", None)
        if root:
            return os.path.join(os.fspath(root), "checkpoints")
        raise ConfigError(
            "TorchAdapter: no checkpoint directory: pass dirpath=..., set a ModelCheckpoint's "
            "dirpath, or give a trainer with default_root_dir."
        )

    def _slot_models(self) -> dict[str, tuple[str, ...]]:
        return dict(self.runner.names.slot_models)  # computed once: the chain is immutable

    def _check_model_names(self) -> None:
        wanted = {name for models in self._slot_models().values() for name in models}
        if not wanted:
            return
        if self.model is None:
            raise ConfigError(
                f"TorchAdapter: the callbacks save the submodules {sorted(wanted)} but no model "
                f"was given; pass model=..."
            )
        for name in sorted(wanted):
            self._submodule(name)

    def _submodule(self, name: str) -> torch.nn.Module:
        assert self.model is not None
        children = dict(self.model.named_children())
        if name not in children:
            raise ConfigError(
                f"TorchAdapter: model_names asks for submodule {name!r}, but the model "
                f"({type(self.model).__name__}) has {sorted(children)}. Fix model_names."
            )
        return children[name]

    def on_fit_start(self, trainer: Any = None, *_: Any) -> None:
        """Open the checkpoint directory (locking it), check the model, resume if asked."""
        if trainer is not None:
            self.trainer = trainer
        self._check_model_names()
        self._memory_keys = sorted({drift.key for drift in self.runner.find(VRAMDrift)})
        if self._memory_keys:
            self._probe_memory = torch.cuda.is_available()
            if not self._probe_memory:
                logger.info("fcb: no CUDA device; VRAMDrift has no memory figure and does nothing.")
        self.group = Group()  # torch.distributed may have been initialised since __init__
        error = None
        try:  # only rank 0 touches the directory; every rank learns whether that worked
            if self.group.is_primary and self.store is None:
                self.store = CheckpointStore(self.dirpath, suffix=self.suffix)
                self.store.open()
                # A new run (not a resume, nor a second start of this adapter's own run)
                # reuses nothing of a previous run in the directory.
                resuming = self.resume_from is not None or getattr(self.trainer, "ckpt_path", None)
                if not resuming and self._checks == 0:
                    self.store.start_over()
        except BaseException as failure:
            error = failure
        self.group.agree_on_error(error)
        if self.group.is_primary and self.background and self._writer is None:
            self._writer = _BackgroundWriter()
        self._started = True
        if self.resume_from is not None:
            self.resumed_step = self._resume(self.resume_from)
        if self.record_history and self.group.is_primary:
            self.history = HistoryLog(self.dirpath)
            source = None if self.resume_from is None else find_history(self.resume_from)
            self.history.start(self.resumed_step, source)
        self.group.barrier()

    def __enter__(self) -> TorchAdapter:
        self.on_fit_start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.on_fit_end()
        else:
            self.on_exception(exc)

    # -- events ------------------------------------------------------------------------------

    def on_train_epoch_end(
        self,
        metrics: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
        trainer: Any = None,
    ) -> Actions | None:
        """Record training metrics; run the check here when `check_on="train_epoch_end"`."""
        self._stash(metrics)
        if self.check_on == "train_epoch_end":
            return self._event(step, trainer)
        return None

    def on_validation_end(
        self,
        metrics: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
        trainer: Any = None,
    ) -> Actions | None:
        """Record validation metrics; run the check (default `check_on`)."""
        self._stash(metrics)
        if self.check_on == "validation_end":
            return self._event(step, trainer)
        return None

    def _stash(self, metrics: Mapping[str, Any] | None) -> None:
        if metrics is not None:
            check_metrics_mapping("TorchAdapter", metrics)
            self._stashed.update(metrics)

    def _event(self, step: int | None, trainer: Any) -> Actions:
        if trainer is not None:
            self.trainer = trainer
        if not self._started:
            self.on_fit_start()
        self.group.agree_on_error(self._writer_error())
        stashed, self._stashed = self._stashed, {}
        metrics = {k: _number(k, v) for k, v in stashed.items()}
        if self._probe_memory:
            free = float(torch.cuda.mem_get_info()[0])
            metrics.update(dict.fromkeys(self._memory_keys, free))
        metrics = self.group.reduce_metrics(metrics, self.reduce)
        step = self._checks if step is None else _checked_step(step)
        self._checks += 1
        before = self.runner.snapshot()
        actions = self.runner.check(metrics, step=step, evaluate=self._run_evaluation)
        # The learning rate changes before the save, so a checkpoint of this step holds the
        # rate the run continues with (resuming there must not undo the cut).
        rates = [float(g["lr"]) for o in self._optimizers() for g in o.param_groups]
        self._apply_lr(actions)
        error = None
        try:
            if self.group.is_primary:
                self._apply_checkpoints(actions, step)
            else:
                self._follow_checkpoints(actions, step)
        except BaseException as failure:
            error = failure
        try:
            self.group.agree_on_error(error)
        except BaseException:
            self.runner.restore(before)  # the event did not happen, on every rank
            groups = [g for o in self._optimizers() for g in o.param_groups]
            for group, rate in zip(groups, rates, strict=True):
                group["lr"] = rate
            raise
        self._report(actions, step)
        if self.history is not None:
            self.history.append(
                check_record(
                    step,
                    metrics,
                    lr=[float(g["lr"]) for o in self._optimizers() for g in o.param_groups],
                    events=[name for name, fired in actions.events.items() if bool(fired)],
                    stop=actions.stop_message() if bool(actions.stop) else None,
                )
            )
        if self.group.any(bool(actions.stop)):
            self.should_stop = True
            self.stop_message = (
                actions.stop_message() if bool(actions.stop) else "another rank stopped"
            )
            if self.trainer is not None:
                self.trainer.should_stop = True
        return actions

    def _run_evaluation(self, request: str) -> Mapping[str, Any]:
        fn = self.evaluate.get(request) if isinstance(self.evaluate, Mapping) else self.evaluate
        if fn is None or self.model is None:
            raise ConfigError(
                f"TorchAdapter: the callbacks ask to evaluate the new best model for "
                f"{request!r}, but no evaluate function (and model) was given. Pass "
                f"evaluate={{'{request}': fn}} where fn(model) returns a dict of metrics."
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
                f"TorchAdapter: the evaluate function for {request!r} must return a mapping "
                f"from metric name to scalar, got {type(results).__name__}: {results!r}."
            )
        return {k: _number(k, v) for k, v in results.items()}

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.optimizer is None else [self.optimizer]

    def _apply_lr(self, actions: Actions) -> None:
        scale = float(actions.lr_scale)
        if scale == 1.0:
            return
        floor, change = float(actions.min_lr), float(actions.min_lr_change)
        groups = [group for optimizer in self._optimizers() for group in optimizer.param_groups]
        for group in groups:
            old = float(group["lr"])
            # torch's ReduceLROnPlateau rule (as fcb.scaled_lr), in float64 like torch
            new = max(old * scale, min(floor, old))
            if abs(old - new) > change:
                group["lr"] = new

    def _report(self, actions: Actions, step: int) -> None:
        for name, fired in actions.events.items():
            if bool(fired):
                level = logging.WARNING if name.endswith("vram_drift/drift") else logging.DEBUG
                logger.log(level, "fcb: %s at step %d", name, step)
        if self.log is not None and actions.log:
            self.log(step, {k: float(v) for k, v in actions.log.items()})

    # -- checkpoints -------------------------------------------------------------------------

    def _apply_checkpoints(self, actions: Actions, step: int) -> None:
        assert self.store is not None
        current = {name: slot["step"] for name, slot in self.store.manifest["slots"].items()}
        plan = plan_checkpoints(actions, step, self._slot_models(), current)
        if plan is not None:
            self._save(plan, step)

    def _save(self, plan: Plan, step: int) -> None:
        """Write what `plan` asks (now, or queued for the background writer) and commit."""
        assert self.store is not None
        callbacks_state = self.runner.state_dict()
        store = self.store
        writes = [
            self._step_writer(step, models, callbacks_state, plan.slots)
            for models in plan.variants
            if not store.has(store.step_file(step, models))
        ]

        def job() -> None:
            for write in writes:
                write(store)
            store.commit(
                event_step=step,
                slots=plan.slots,
                archive=[store.step_file(step, None)] if plan.archive else [],
                callbacks=callbacks_state,
                resume=plan.resume,
                stop_message=plan.stop_message,
            )

        if self._writer is None:
            job()
        else:
            self._writer.submit(job)

    def _follow_checkpoints(self, actions: Actions, step: int) -> None:
        """What a rank other than 0 does while rank 0 writes: nothing, for plain Torch."""

    def _step_writer(
        self, step: int, models: tuple[str, ...] | None, callbacks_state: Any, slots: Any
    ) -> Callable[[CheckpointStore], None]:
        """What writes this step's file; the state is captured now (a host copy when the
        writer runs in the background)."""
        payload = self._payload(step, models, callbacks_state, slots)
        return lambda store: store.write(store.step_file(step, models), step, models, payload)

    def _payload(
        self, step: int, models: tuple[str, ...] | None, callbacks_state: Any, slots: Any
    ) -> dict[str, Any]:
        writer = self._writer
        copy = (lambda x: _host_copy(x, writer.host_copy)) if writer is not None else (lambda x: x)
        payload: dict[str, Any] = {
            "fcb": {
                "format": CHECKPOINT_FORMAT,
                "version": 1,
                "step": step,
                # compact JSON: a pickled nested dict would be several times larger
                "callbacks": json.dumps(callbacks_state, separators=(",", ":")),
                "slots": {name: s for name, (s, _, _) in slots.items()},
            }
        }
        if self.model is not None:
            if models:
                payload["model"] = {n: copy(self._submodule(n).state_dict()) for n in models}
                payload["models"] = list(models)
                return payload
            payload["model"] = copy(self.model.state_dict())
        if self.optimizer is not None:
            payload["optimizer"] = copy(self.optimizer.state_dict())
        if self.scheduler is not None:
            payload["scheduler"] = copy(self.scheduler.state_dict())
        if self.trainer is not None and hasattr(self.trainer, "state_dict"):
            payload["trainer"] = copy(self.trainer.state_dict())
        payload["rng"] = {"torch": torch.random.get_rng_state()}
        return payload

    # -- resume ------------------------------------------------------------------------------

    def _resume(self, run_dir: str) -> int:
        source = os.path.abspath(run_dir)
        if os.path.isdir(os.path.join(source, "checkpoints")) and not os.path.exists(
            os.path.join(source, "manifest.json")
        ):
            source = os.path.join(source, "checkpoints")
        same_directory = source == os.path.abspath(self.dirpath)
        manifest = (
            self.store.manifest
            if self.store is not None and same_directory
            else read_manifest(os.path.join(source, "manifest.json"))
        )
        record = manifest.get("resume")
        if not record:
            raise CheckpointCorruptError(
                f"{source} has no resumable checkpoint: resuming needs a `last` slot, e.g. "
                f"fcb.ModelCheckpoint(save_last=True) in the chain."
                if manifest["files"]
                else f"{source} holds no fcb checkpoint (nothing was written there yet)."
            )
        # Every file the resumed run keeps is checked before anything is restored: a damaged
        # best checkpoint is refused now, not found when it is loaded after training.
        for relative in sorted({record["file"]} | {s["file"] for s in record["slots"].values()}):
            if relative not in manifest["files"]:
                raise CheckpointCorruptError(
                    f"{os.path.join(source, 'manifest.json')}: the resume point needs "
                    f"{relative}, which its file table does not list (edited by hand?)."
                )
            verify(os.path.join(source, relative), manifest["files"][relative])
        path = os.path.join(source, record["file"])
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = payload.get("fcb", {})
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("step") != record["step"]:
            raise CheckpointCorruptError(
                f"{path} is not the fcb checkpoint of step {record['step']} that the manifest "
                f"records (found {meta.get('format')!r} at step {meta.get('step')!r})."
            )
        self.runner.load_state_dict(json.loads(meta["callbacks"]))
        if self.model is not None:
            self.model.load_state_dict(payload["model"])
        if self.optimizer is not None and "optimizer" in payload:
            self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and "scheduler" in payload:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.trainer is not None and "trainer" in payload:
            self.trainer.load_state_dict(payload["trainer"])
        if "rng" in payload:
            torch.random.set_rng_state(payload["rng"]["torch"])
        if self.store is not None:  # rank 0: the directory now holds exactly this point
            if not same_directory:  # whatever run it held before is replaced, not mixed in
                self.store.start_over()
            files = {}
            for slot in record["slots"].values():
                relative = slot["file"]
                if not same_directory:
                    link_atomic(os.path.join(source, relative), self.store.path(relative))
                files[relative] = manifest["files"][relative]
            self.store.reset_to(record["slots"], files, record)
        self._checks = record["step"] + 1
        if record.get("stop_message"):  # the run had already stopped: do not train on
            self.should_stop = True
            self.stop_message = record["stop_message"]
            if self.trainer is not None:
                self.trainer.should_stop = True
        return int(record["step"])

    # -- end ---------------------------------------------------------------------------------

    def _writer_error(self) -> CheckpointWriteError | None:
        if self._writer is None or self._writer.error is None:
            return None
        error = CheckpointWriteError(f"a background checkpoint write failed: {self._writer.error}")
        error.__cause__ = self._writer.error
        return error

    def wait(self) -> None:
        """Block until every background write is done; raise the first write error."""
        if self._writer is not None:
            self._writer.wait()
        self.group.agree_on_error(self._writer_error())

    def on_fit_end(self, trainer: Any = None, *_: Any) -> dict[str, float]:
        """Wait for writes, finalize the callbacks (summary scalars), release the directory."""
        try:
            self.wait()
            actions = self.runner.finalize()
            self.summary = {k: float(v) for k, v in actions.log.items()}
            if self.history is not None:
                self.history.append({"summary": json_metrics(self.summary)})
            if self.log is not None and self.summary:
                self.log(self._checks, self.summary)
            return self.summary
        finally:
            self._close()

    def on_exception(self, exception: BaseException | None = None, *_: Any) -> None:
        """Let pending writes finish (they are complete checkpoints) and release the directory."""
        try:
            if self._writer is not None:
                self._writer.wait()
        finally:
            self._close()

    def _close(self) -> None:
        self._started = False
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def state_dict(self) -> dict[str, Any]:
        """The callbacks' state dict (JSON-safe), as recorded in every checkpoint."""
        return fcb_state_dict(self.runner.state, self.callbacks)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one fcb Torch checkpoint file (tensors on the CPU) after checking the manifest."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    manifest_dir = (
        directory
        if os.path.exists(os.path.join(directory, "manifest.json"))
        else (os.path.dirname(directory))
    )
    manifest = read_manifest(os.path.join(manifest_dir, "manifest.json"))
    relative = os.path.relpath(os.path.abspath(path), manifest_dir)
    slot = manifest["slots"].get(os.path.splitext(os.path.basename(path))[0])
    record_key = slot["file"] if slot else relative
    if record_key not in manifest["files"]:
        raise CheckpointCorruptError(f"{path} is not listed in {manifest_dir}/manifest.json.")
    target = os.path.join(manifest_dir, record_key)
    record = manifest["files"][record_key]
    verify(target, record)
    payload = torch.load(target, map_location="cpu", weights_only=True)
    found = payload.get("fcb", {}).get("step") if isinstance(payload, dict) else None
    if found is not None and record.get("step") is not None and found != record["step"]:
        raise CheckpointCorruptError(
            f"{target} holds step {found}, the manifest records step {record['step']} (another "
            f"step's file copied over it, its record edited?)."
        )
    return payload
