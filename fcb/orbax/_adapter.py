"""The JAX adapter: applies fcb actions to JAX pytrees and equinox models through orbax.

Only what is orbax's lives here (the payload of a step, the restore of a resume point); the
check sequence is the shared session's (`fcb._host.session`), the store's commit order
`fcb._host.store`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import jax

from .._core import Actions, Callback
from .._errors import CheckpointWriteError, ConfigError
from .._host.engine import (
    FREE_DEVICE_MEMORY,
    check_evaluate,
    check_flag,
    check_path,
    evaluation_function,
)
from .._host.evaluation import EvaluatedSlot
from .._host.existing import check_existing_run
from .._host.facade import SessionFacade
from .._host.interrupts import Interrupts
from .._host.processes import ProcessGroup
from .._host.session import Session
from .._host.store import ManifestStore
from ._payload import (
    State,
    device_free_memory as device_free_memory,
    is_function,
    model_subset,
    read_resume_point,
    renamed,
)
from ._processes import processes
from ._restore import slot_state
from ._store import (
    DEFAULT_TIMEOUT,
    OrbaxStore,
    check_timeout,
)
from ._write import OrbaxWrites

logger = logging.getLogger("fcb")

EvaluateFn = Callable[[Any], Mapping[str, Any]]
"""Evaluates the live state (the pytree given to `on_validation_end`); returns metrics."""

_UNSET: Any = object()


class OrbaxAdapter(OrbaxWrites, SessionFacade):
    """Run an fcb callback chain in a JAX training loop; keep checkpoints with orbax.

    Each `on_validation_end(metrics, step=..., state=...)` runs one check of the whole chain
    through one cached jitted dispatch, then applies the actions, with the same decisions as
    [`fcb.torch.TorchAdapter`][]:

    - `should_stop` / `stop_message` are set when a callback stops (never raises for it);
    - if a slot takes the current step, `state` (a pytree of arrays, e.g.
      `{"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state}`, or a function of
      the actions returning it) is copied to host memory and saved **once** as orbax step
      `steps/<step>` (a Composite of the state and the
      fcb metadata: the callbacks' state dict, the slot table, the JSON-safe metrics),
      however many slots hold it; the save runs in the background with `background=True`;
    - `manifest.json` records slot -> step, metric value and the resume point once orbax
      has committed the step; steps no slot (nor the resume point, nor the archive) holds any
      more are then deleted with `CheckpointManager.delete`;
    - `evaluate` runs on `state` when a callback asks (a new best for `BestCheckpoint`'s
      nested callbacks) and the results go back to the chain.

    The learning rate is the loop's: apply the returned actions with
    [`fcb.scaled_lr`][] (it is part of the saved state when it lives in the optimizer state,
    e.g. `optax.inject_hyperparams`).

    Resume with `resume_from=dirpath`: `on_fit_start(like=template)` restores the `last` checkpoint
    into `restored_state` (structured like `template`), the callbacks' state, and
    `resumed_step`; the next check is `resumed_step + 1` and decides exactly as an
    uninterrupted run would.

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> callbacks = fcb.chain(fcb.EarlyStopping("val_loss", patience=1), fcb.ModelCheckpoint())
    >>> adapter = fcb.orbax.OrbaxAdapter(callbacks, directory, background=False)
    >>> adapter.on_fit_start()
    >>> for step, loss in enumerate([0.5, 0.4, 0.6]):
    ...     state = {"w": jnp.full((2,), float(step))}
    ...     actions = adapter.on_validation_end({"val_loss": loss}, step=step, state=state)
    >>> adapter.should_stop, adapter.slots
    (True, {'best_model': 1, 'last': 2})
    >>> _ = adapter.on_fit_end()
    >>> fcb.orbax.restore(directory, "best_model", like={"w": jnp.zeros(2)})["w"]
    Array([1., 1.], dtype=float32)

    Args:
        callbacks: an fcb callback or chain.
        dirpath: the run directory (created; locked while the adapter is open).
        evaluate: `fn(state) -> metrics`, or a mapping from request name to such a function.
        resume_from: continue the run in `dirpath` (the same directory) from its `last`
            checkpoint; a run that is not there is an error.
        existing_run: what becomes of a run `dirpath` already holds: `"resume"` (default)
            continues it from its `last` checkpoint (pass `on_fit_start(like=template)`;
            an empty directory starts a new run), `"start_over"` replaces it, `"error"`
            raises [`fcb.RunExistsError`][]. A run is never replaced implicitly.
        background: let orbax write in the background; every save is waited for before the
            manifest references it, before any deletion, and at `on_fit_end`.
        log: `fn(step, scalars)` called with the callbacks' log scalars at each check and the
            summary at the end.
        reduce: in a multi-process run, how each process's metrics are reduced over the
            processes: `"mean"` (default), `"sum"`, `"max"`, `"min"`, or `None` when they
            are already equal on every process. Ignored with one process.
        timeout: in a multi-process run, the seconds a process waits for the others inside
            an orbax save (orbax's `AsyncOptions.timeout_secs`).
        history: append one line per check to `{dirpath}/history.jsonl` (as
            `fcb.torch.TorchAdapter` does; `fcb plot` and `fcb replay` read it).
        learning_rate: for the history, a function of the state after the check's actions
            returning the learning rate(s) training continues with, e.g.
            `lambda s: s["opt_state"].hyperparams["learning_rate"]`.
        directory: the former name of `dirpath` (deprecated; it warns).
        resume: the former `resume_from=dirpath` (deprecated; it warns).
        async_save: the former name of `background` (deprecated; it warns).

    Multi-process runs (`jax.distributed.initialize()`): every process constructs the same
    adapter and makes the same calls; the decisions agree on every process, orbax writes
    with its own multi-host protocol, and only the primary process writes the manifest
    (see the adapter's docs).

    Steps: each check's step must be larger than the last; without `step=`, a check is the
    previous step + 1 (the first is 0).
    """

    owner = "OrbaxAdapter"

    def __init__(
        self,
        callbacks: Callback,
        dirpath: str | os.PathLike[str] = _UNSET,
        *,
        evaluate: EvaluateFn | Mapping[str, EvaluateFn] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        existing_run: str = "resume",
        background: bool = True,
        log: Callable[[int, dict[str, float]], None] | None = None,
        reduce: str | None = "mean",
        timeout: float = DEFAULT_TIMEOUT,
        history: bool = False,
        learning_rate: Callable[[Any], Any] | None = None,
        preempt_on: Any = ("SIGTERM",),
        resume_every_steps: int | None = None,
        resume_every_seconds: float | None = None,
        save_on_exception: bool = False,
        clock: Callable[[], float] | None = None,
        directory: str | os.PathLike[str] = _UNSET,
        resume: bool = _UNSET,
        async_save: bool = _UNSET,
    ):
        owner = self.owner
        if directory is not _UNSET:
            renamed("directory", "dirpath")
            dirpath = directory
        if resume is not _UNSET:
            renamed("resume", "resume_from=dirpath")
            check_flag(owner, "resume", resume)
        if async_save is not _UNSET:
            renamed("async_save", "background")
            background = check_flag(owner, "async_save", async_save)
        self.session = Session(  # the callbacks first: they are the first argument
            owner, callbacks, self, storage="orbax", reduce=reduce, log=log, history=history,
            step_names="orbax step", interrupts=Interrupts(
                owner, preempt_on=preempt_on, resume_every_steps=resume_every_steps,
                resume_every_seconds=resume_every_seconds, clock=clock,
            ),
        )
        self.save_on_exception = check_flag(owner, "save_on_exception", save_on_exception)
        path = check_path(owner, "dirpath", None if dirpath is _UNSET else dirpath, optional=False)
        self.dirpath = os.path.abspath(str(path))
        resume_from = self.dirpath if resume is True else check_path(
            owner, "resume_from", resume_from
        )
        check_evaluate(owner, evaluate, "state")
        check_timeout(owner, timeout)
        self.existing_run = check_existing_run(owner, existing_run)
        if resume_from is not None and os.path.abspath(resume_from) != self.dirpath:
            raise ConfigError(
                f"{owner}: resume_from = {resume_from!r} is another directory than "
                f"dirpath = {self.dirpath!r}; an orbax run resumes in its own directory. Copy "
                f"the run there first (cp -r), or pass resume_from=dirpath."
            )
        self.callbacks = callbacks
        self.evaluate = evaluate
        self.resume_from = None if resume_from is None else self.dirpath
        self.background = check_flag(owner, "background", background)
        self.timeout = float(timeout)
        if learning_rate is not None and not callable(learning_rate):
            raise ConfigError(
                f"{owner}: `learning_rate` must be a function of the state returning the "
                f"learning rate(s), got {type(learning_rate).__name__}."
            )
        self.learning_rate = learning_rate
        self._like: Any = None
        self._warned_lr = False
        self.restored_state: Any = None

    # -- what the session holds --------------------------------------------------------------

    @property
    def store(self) -> OrbaxStore | None:
        return self.session.store  # type: ignore[return-value]

    @property
    def manager(self) -> Any:
        """The orbax `CheckpointManager` of `dirpath/steps` (while the adapter is open)."""
        return None if self.store is None else self.store.manager

    # -- set-up ------------------------------------------------------------------------------

    def on_fit_start(self, *, like: Any = None) -> None:
        """Open (and lock) the run directory; with `resume_from`, restore the `last`
        checkpoint into `restored_state`, structured like the template `like`.

        A directory that holds a run is resumed the same way (`existing_run="resume"`);
        with `existing_run="start_over"` the old run's manifest is replaced (with a
        warning), then its checkpoints are deleted, so the two runs' steps never mix.
        """
        if self.session.started:
            return
        if like is not None and self.resume_from is None:
            for models in {m for _, m in self.runner.names.slot_models}:
                model_subset(like, models)
        self._like = like
        self.session.start(
            self.dirpath, resume_from=self.resume_from, existing_run=self.existing_run
        )
        if self.session.processes.active and self.manager is not None:  # JAX's notice
            self.session.interrupts.external = self.manager.reached_preemption

    # -- events ------------------------------------------------------------------------------

    def on_validation_end(
        self, metrics: Mapping[str, Any], *, step: int | None = None, state: Any = None
    ) -> Actions:
        """Run one check on `metrics` at `step`; save `state` if a slot takes this step.

        `state` is the pytree to save, or a function `actions -> pytree` giving the state
        *after* this check's actions. Pass a function when the actions change the state, e.g.
        a learning rate in the optimizer state that `ReduceLROnPlateau` lowers: the checkpoint
        must hold the lowered rate, or a run resumed from it trains on at the old rate.
        The function is called only when the step is saved; evaluation requests see
        `state(fcb.Actions.no_actions())`.

        `step` defaults to the previous step + 1 (0 for the first check). Returns the host
        actions (NumPy values).
        """
        if not self.session.started:
            self.on_fit_start()
        context = State(state, is_function(state))
        return self.session.check(metrics, step=step, context=context)

    def evaluate_checkpoints(
        self, slots: Any = None, *, like: Any = None
    ) -> dict[str, EvaluatedSlot | None]:
        """[`TorchAdapter.evaluate_checkpoints`][fcb.torch.TorchAdapter.evaluate_checkpoints]:
        each slot is restored like `like` (default: the state of the last check, as the
        evaluate functions took it) and the functions evaluate that copy."""
        context = self.session._check_context if like is None else State(like, False)
        return self._evaluate(slots, context)

    def apply_actions(
        self,
        actions: Actions,
        *,
        step: int,
        callbacks_state: Any,
        state: Any = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Actions:
        """Apply actions the callbacks computed elsewhere: inside a compiled loop.

        A loop that runs the chain itself (in `lax.scan` or `lax.while_loop`) returns, for
        each check, the actions, the callbacks' state after the check and the training state
        training continues from; between compiled chunks, pass them here in step order. The
        checkpoints, manifest, resume record and stop flag are exactly those
        `on_validation_end` would produce for the same checks. `callbacks_state` must have
        the structure of `callbacks.init()`; evaluation requests must have been answered in
        the loop. Returns the host actions.
        """
        if not self.session.started:
            self.on_fit_start()
        return self.session.apply(
            actions, callbacks_state, step=step, context=State(state, False), metrics=metrics
        )

    # -- the engine: what is orbax's ---------------------------------------------------------

    def processes(self) -> ProcessGroup:
        return processes()

    def open_store(self, processes: ProcessGroup) -> ManifestStore | None:
        return OrbaxStore(
            self.dirpath, async_save=self.background, processes=processes, timeout=self.timeout
        )

    def host_input(self, kind: str) -> Callable[[], float | None] | None:
        if kind == FREE_DEVICE_MEMORY and device_free_memory() is not None:
            return device_free_memory
        return None

    def run_evaluation(self, requests: Sequence[str], context: Any = None) -> Mapping[str, Any]:
        fn = evaluation_function(self.owner, self.evaluate, requests, "state")
        return fn(context.before_actions())

    def evaluated_model(
        self, directory: str, slot: str, manifest: Mapping[str, Any], context: Any
    ) -> AbstractContextManager[Any]:
        """The slot restored like the last check's state (or `like`): a copy to evaluate;
        the loop's own state is not touched."""
        like = None if context is None or context.value is None else context.before_actions()
        if like is None:
            raise ConfigError(
                f"{self.owner}: evaluating the checkpoint of slot {slot!r} restores it like "
                f"the state the checks were given, but no check gave one; pass "
                f"evaluate_checkpoints(like=template) (the pytree the evaluate functions take)."
            )
        return contextlib.nullcontext(State(slot_state(directory, slot, like), False))

    def learning_rates(self) -> list[float] | None:
        return None  # the loop's: it applies the actions with fcb.scaled_lr

    def learning_rates_after(self, actions: Actions, context: Any) -> list[float] | None:
        if self.learning_rate is None or context is None or context.value is None:
            return None
        rates = self.learning_rate(context.after_actions(actions))
        return [float(r) for r in jax.device_get(jax.tree_util.tree_leaves(rates))]

    def set_learning_rates(self, rates: list[float] | None) -> None:
        """The loop's rates: nothing to put back."""

    def apply_lr(self, actions: Actions) -> None:
        """The loop applies the change (`fcb.scaled_lr`)."""

    def submit(self, job: Callable[[], None]) -> None:
        job()  # orbax itself writes in the background

    def follow(self, actions: Actions, step: int) -> None:
        del actions, step  # every process holds the store

    def settle(self) -> None:
        """Nothing queued: orbax's own background save is waited for by the store."""

    def read_resume(
        self, source: str, record: Mapping[str, Any], manifest: Mapping[str, Any]
    ) -> tuple[Any, Callable[[], None]]:
        if self._like is None and self.resume_from is None:
            raise ConfigError(
                f"{self.owner}: {source} holds a run resumable at step {record['step']} "
                f"(existing_run='resume'), but on_fit_start was given no template to restore "
                f"it into. Pass on_fit_start(like=template) to resume it, or "
                f"existing_run='start_over' to replace it."
            )
        state, callbacks_state = read_resume_point(source, record, self._like)

        def restore() -> None:
            self.restored_state = state

        return callbacks_state, restore

    def adopt(
        self, store: ManifestStore, source: str, record: Mapping[str, Any],
        manifest: Mapping[str, Any],
    ) -> dict[str, Any]:
        raise ConfigError(f"{self.owner}: an orbax run resumes in its own directory only.")

    def stopped(self) -> None:
        """Nothing to flip: the loop reads `should_stop`."""

    # -- end ---------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the save in flight is committed and its manifest written."""
        if self.store is not None:
            self.store.finish()

    def on_fit_end(self) -> dict[str, float]:
        """Wait for saves, finalize the callbacks (summary scalars), release the directory."""
        try:
            self.wait()
            return self.session.finalize()
        finally:
            self.session.close()

    def on_exception(self, exception: BaseException | None = None) -> None:
        """Let the save in flight finish (it is a complete checkpoint); release the directory.
        A save that fails now is logged, not raised over the exception being handled."""
        failed = False
        try:
            if self.store is not None:
                self.store.settle()
        except CheckpointWriteError as error:
            failed = True
            logger.warning("fcb: the last save was not committed: %s", error)
        try:
            if self.save_on_exception:
                self.session.save_on_exception(exception, failed=failed)
        finally:
            self.session.close()
