"""The check session: the per-check sequence every adapter runs, in one place.

An adapter (`fcb.torch.TorchAdapter`, `fcb.orbax.OrbaxAdapter`, the Lightning bridge) is an
[`Engine`][]: it says how a step's checkpoint is written, how a learning-rate change is
applied, which store and which collectives it uses. Everything else happens here, the same
for all of them:

1. metrics converted and validated, host inputs added (free device memory, for callbacks
   that declare it), then reduced over processes;
2. the step numbered: an unnumbered check is the previous step + 1 (the first is 0); a
   given step must be larger than the previous one, since a step names one checkpoint;
3. the chain runs (one jitted dispatch; evaluation requests answered on the live model);
4. the learning-rate change is applied, then the plan of the check is written and
   committed; if anything fails on any process, the callbacks' state and the learning
   rates go back to what they were and the error is raised on every process: the check
   did not happen;
5. events reported, the history line appended, the stop agreed over processes.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax

from .._core import Actions, Callback, stop_message
from .._errors import CheckpointCorruptError, ConfigError
from .._history import HistoryLog, check_record
from .._runner import Runner
from .._state_dict import state_dict as fcb_state_dict
from .._time_limit import ELAPSED_SECONDS
from .._validate import check_metrics_mapping
from .engine import _HOST_INPUTS, Check, Engine, check_flag, checked_step
from .existing import existing_run_source, resumed_state
from .interrupts import Interrupts, reason_of
from .manifest import json_metrics, plan_checkpoints, read_manifest
from .processes import ProcessGroup, check_reduction
from .resume_points import ResumePoints
from .rundir import find_history, find_run
from .store import ManifestStore

logger = logging.getLogger("fcb")

class Session(ResumePoints):
    """One run's host side: the store, the processes, the step numbering, the history, the
    resume points between checks."""

    def __init__(
        self,
        owner: str,
        callbacks: Callback,
        engine: Engine,
        *,
        storage: str,
        reduce: str | None = "mean",
        log: Callable[[int, dict[str, float]], None] | None = None,
        history: bool = False,
        step_names: str = "",
        interrupts: Interrupts | None = None,
    ):
        if isinstance(callbacks, (list, tuple)) and all(
            isinstance(c, Callback) for c in callbacks
        ):
            raise ConfigError(
                f"{owner}: `callbacks` must be one fcb.Callback, got a {type(callbacks).__name__}"
                f" of {len(callbacks)}; combine them with fcb.chain(*callbacks)."
            )
        if not isinstance(callbacks, Callback):
            raise ConfigError(
                f"{owner}: `callbacks` must be an fcb.Callback (or fcb.chain(...)), got "
                f"{type(callbacks).__name__}: {callbacks!r}."
            )
        if log is not None and not callable(log):
            raise ConfigError(
                f"{owner}: `log` must be a function (step, scalars) -> None, got "
                f"{type(log).__name__}: {log!r}."
            )
        self.owner, self.engine, self.storage = owner, engine, storage
        self.dirpath: str | None = None
        """The run directory of the last start."""
        self.step_names = step_names
        self.callbacks = callbacks
        self.runner = Runner(callbacks)
        self.reduce = check_reduction(owner, reduce)
        self.log = log
        self.record_history = check_flag(owner, "history", history)
        self.processes = ProcessGroup()
        self.store: ManifestStore | None = None
        self.history: HistoryLog | None = None
        self._resumed_line: dict[str, Any] | None = None
        self.started = False
        self.last_step = -1
        """The step of the last check that happened (-1: none yet)."""
        self._probes: list[tuple[str, Callable[[], float | None]]] = []
        self.should_stop = False
        self.stop_message = ""
        self.resumed_step: int | None = None
        self.summary: dict[str, float] = {}
        self.interrupts = Interrupts(owner, preempt_on=()) if interrupts is None else interrupts
        self._interrupted: str | None = None  # the last check's agreed interrupt, if any
        self.interrupts.session = weakref.ref(self)
        self._batch: tuple[int, Any] = (-1, None)
        """The step and context of the last batch hook (for a save on an exception)."""
        self._check_context: Any = None

    # -- start -------------------------------------------------------------------------------

    def start(
        self, dirpath: str, *, resume_from: str | None, existing_run: str = "resume",
        keep: bool = False,
    ) -> None:
        """Open (and lock) `dirpath` and decide what becomes of a run it holds (see
        `EXISTING_RUN`): resume from `resume_from` if given, else by `existing_run`; `keep`:
        the trainer resumes the run itself."""
        self._probes = []
        self._resumed_line = None
        self.dirpath = os.path.abspath(dirpath)
        for key, kind in sorted(set(self.runner.names.host_inputs)):
            probe = self.interrupts.elapsed if kind == ELAPSED_SECONDS else (
                self.engine.host_input(kind)
            )
            if probe is None:
                logger.info(
                    "fcb: this machine reports no memory statistics for %s; the callbacks "
                    "reading %r (%s) have no figure and do nothing.",
                    _HOST_INPUTS.get(kind, (kind, ""))[0],
                    key,
                    _HOST_INPUTS.get(kind, (kind, "a callback"))[1],
                )
            else:
                self._probes.append((key, probe))
        self.processes = self.engine.processes()
        store = None
        error = None
        try:  # a failure to open on one process reaches every process
            store = self.engine.open_store(self.processes)
            if store is not None:
                store.slot_kinds = dict(self.runner.names.slot_kinds)
                store.open()
        except BaseException as failure:
            error = failure
        before = self.runner.snapshot()
        try:
            self.processes.agree_on_error(error)
            if not keep and self.last_step < 0:  # not this session's own run, re-opened
                resume_from = existing_run_source(
                    self.owner, self.processes, store, dirpath, resume_from, existing_run
                )
            self.store = store
            resumed, stop_message, adopt = (
                (None, "", lambda: None) if resume_from is None else self._resume(resume_from)
            )
            # What may fail for a reason of its own comes first (reading the resume point,
            # loading it, the history); the directory changes only once they have worked.
            if self.record_history and self.processes.is_primary:
                self.history = HistoryLog(dirpath)
                source = None if resume_from is None else find_history(resume_from)
                self.history.start(resumed, source, self._resumed_line)
            adopt()
        except BaseException:  # nothing is kept of a failed start: not the lock either
            self.runner.restore(before)
            self.store = self.history = None
            if store is not None:
                store.close()
            raise
        if resumed is not None:
            self.last_step = self.resumed_step = resumed
        if stop_message:  # the run had already stopped: do not train on
            self._stop(stop_message)
        self._batch, self._check_context = (-1, None), None
        self.interrupts.start(self.callbacks, self.resumed_step)
        self.started = True
        self.processes.barrier("started")

    def _resume(self, run_dir: str) -> tuple[int, str, Callable[[], None]]:
        """Load the resume point of `run_dir` (the callbacks' state, then the engine's
        restore); return its step, its stop message and what makes the directory hold
        exactly that point (`start` runs it last, and restores the callbacks' state if
        anything fails)."""
        source = os.path.abspath(find_run(run_dir) or run_dir)
        store = self.store
        same = store is not None and source == store.directory
        manifest = store.manifest if store is not None and same else read_manifest(
            source, self.storage
        )
        record = manifest.get("resume")
        if not record:
            raise CheckpointCorruptError(
                f"{source} has no resumable checkpoint: resuming needs a `last` slot, e.g. "
                f"fcb.ModelCheckpoint(save_last=True) in the chain."
                if manifest["files"]
                else f"{source} has no resumable checkpoint: it holds no fcb checkpoint (nothing "
                f"was written there yet)."
            )
        callbacks_state, restore = self.engine.read_resume(source, record, manifest)
        self._resumed_line = record.get("history")
        self.runner.state, stopped = resumed_state(
            self.owner, self.callbacks, callbacks_state, source, int(record["step"])
        )
        restore()
        stop_message = str(record.get("stop_message") or "")
        if stopped is False and stop_message:  # the changed settings would not have stopped
            logger.warning("fcb: %s: the resumed run trains on (it had stopped: %s).",
                           self.owner, stop_message)
            stop_message = ""

        def adopt() -> None:
            if store is not None:  # the directory now holds exactly this point
                files = {} if same else self.engine.adopt(store, source, record, manifest)
                store.reset_to(record, files)

        return int(record["step"]), stop_message, adopt

    # -- checks ------------------------------------------------------------------------------

    def next_step(self, step: Any) -> int:
        """The step of the next check: given (larger than the last), or the last + 1."""
        if step is None:
            return self.last_step + 1
        value = checked_step(self.owner, step, self.step_names)
        if value <= self.last_step:
            raise ConfigError(
                f"{self.owner}: step {value} comes after step {self.last_step}: every check "
                f"needs a larger step than the last (a step names one checkpoint, and a "
                f"repeated step would keep another check's weights). Pass the global step, "
                f"or omit `step` to number checks one after the other."
            )
        return value

    def metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The check's metrics with the host inputs, reduced over processes."""
        check_metrics_mapping(self.owner, metrics)
        metrics = dict(metrics)
        for key, probe in self._probes:
            value = probe()
            if value is not None:
                metrics[key] = value
        return self.processes.reduce_metrics(self.owner, metrics, self.reduce)

    def check(self, metrics: Mapping[str, Any], *, step: Any, context: Any = None) -> Actions:
        """One check of the chain on `metrics` at `step` (`None`: the next), applied."""
        step = self.next_step(step)
        metrics = self.metrics(metrics)
        before = self.runner.snapshot()
        actions = self.runner.check(
            metrics,
            step=step,
            evaluate=lambda request: self.engine.run_evaluation((request,), context),
        )
        # the check commits its step itself: a batch capture it follows is not needed
        pending, self.interrupts.pending = self.interrupts.pending, None
        try:
            actions = self._apply(actions, step, metrics, context, before)
        except BaseException:
            self.interrupts.pending = pending
            raise
        self._check_context = context
        self._after_check(actions, step, context, pending)
        return actions

    def apply(
        self, actions: Actions, callbacks_state: Any, *, step: Any, context: Any = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Actions:
        """Apply actions the chain computed elsewhere (inside a compiled loop)."""
        actions, callbacks_state = jax.device_get((actions, callbacks_state))
        owner = f"{self.owner}.apply_actions"
        requested = sorted(name for name, asked in actions.evaluate.items() if bool(asked))
        if requested:
            raise ConfigError(
                f"{owner}: the actions of step {step} request evaluations {requested}; inside "
                f"a compiled loop, answer them there with callbacks.evaluated(state, request, "
                f"results, step=step)."
            )
        expected: Any = jax.tree_util.tree_structure(self.runner.state)
        if expected != jax.tree_util.tree_structure(callbacks_state):
            raise ConfigError(
                f"{owner}: `callbacks_state` must have the structure of callbacks.init() "
                f"({expected}), got {jax.tree_util.tree_structure(callbacks_state)}. Pass the "
                f"chain's state after the check of step {step}, unbatched."
            )
        step = self.next_step(step)
        before = self.runner.snapshot()
        self.runner.state = callbacks_state
        actions = self._apply(actions, step, dict(metrics or {}), context, before)
        self._check_context = context
        self._after_check(actions, step, context, None)  # between chunks: signals, limits
        return actions

    def _apply(
        self, actions: Actions, step: int, metrics: dict[str, Any], context: Any, before: Any
    ) -> Actions:
        rates = self.engine.learning_rates()
        error = None
        # the stop named with its metric, settings and values: the history, the manifest's
        # resume record and `stop_message` all say the same
        said = stop_message(self.runner.callback, self.runner.state, actions) if bool(
            actions.stop
        ) else ""
        try:
            # The learning rate changes before the save, so a checkpoint of this step holds
            # the rate the run continues with (resuming there must not undo the cut).
            self.engine.apply_lr(actions)
            if self.store is not None:
                self._write(actions, step, metrics, context, said)
            else:
                self.engine.follow(actions, step)
        except BaseException as failure:
            error = failure
        try:  # the stop and the interrupts (signal, time limit, schedule) in one collective
            any_stopped, *interrupted = self.processes.agree_on_error(
                error, bool(actions.stop), *self.interrupts.reasons(step)
            )
        except BaseException:
            self.runner.restore(before)  # the check did not happen, on every process
            self.engine.set_learning_rates(rates)
            if self.store is not None:
                self.engine.settle()
                self.store.abandon()
            raise
        self.last_step = step
        self._interrupted = reason_of(interrupted)  # for `_after_check`
        self._report(actions, step, metrics, context, said)
        stopped, message = self.processes.agreed_stop(any_stopped, bool(actions.stop), said)
        if stopped:
            self._stop(message)
        return actions

    def _write(
        self, actions: Actions, step: int, metrics: dict[str, Any], context: Any, said: str
    ):
        store = self.store
        assert store is not None
        current = {name: s["step"] for name, s in store.latest_manifest["slots"].items()}
        plan = plan_checkpoints(actions, step, self.runner.slot_models, current)
        if plan is None:
            return
        if plan.stop_message:
            plan = plan._replace(stop_message=said)
        if plan.resume and self.record_history:
            plan = plan._replace(history=self._history_line(actions, step, metrics, context, said))
        store.finish()  # the previous check's write is committed first
        callbacks_state = self.runner.encoded_state_dict()
        write = self.engine.write(
            store, Check(step, actions, metrics, plan, callbacks_state, context)
        )

        def job() -> None:
            write()
            store.commit_plan(plan, step, callbacks_state)

        self.engine.submit(job)

    def _report(
        self, actions: Actions, step: int, metrics: Mapping[str, Any], context: Any, said: str
    ) -> None:
        for name, fired in actions.events.items():
            if bool(fired):
                level = logging.WARNING if name.endswith("vram_drift/drift") else logging.DEBUG
                logger.log(level, "fcb: %s at step %d", name, step)
        if self.log is not None and actions.log:
            self.log(step, {k: float(v) for k, v in actions.log.items()})
        if self.history is not None:
            self.history.append(self._history_line(actions, step, metrics, context, said))

    def _history_line(
        self, actions: Actions, step: int, metrics: Mapping[str, Any], context: Any, said: str
    ) -> dict[str, Any]:
        return check_record(
            step,
            metrics,
            lr=self.engine.learning_rates_after(actions, context),
            events=[name for name, fired in actions.events.items() if bool(fired)],
            stop=said or None,
        )

    def _stop(self, message: str) -> None:
        self.should_stop = True
        self.stop_message = message
        self.engine.stopped()

    # -- end ---------------------------------------------------------------------------------

    def finalize(self) -> dict[str, float]:
        """The callbacks' end-of-run scalars: logged, recorded in the history, returned."""
        self.flush_resume_point()
        actions = self.runner.finalize()
        self.summary = {k: float(v) for k, v in actions.log.items()}
        if self.history is not None:
            self.history.append({"step": self.last_step, "summary": json_metrics(self.summary)})
        if self.log is not None and self.summary:
            self.log(self.last_step + 1, self.summary)
        return self.summary

    def close(self) -> None:
        self.started = False
        self.interrupts.close()
        if self.store is not None:
            store, self.store = self.store, None
            store.close()

    def state_dict(self) -> dict[str, Any]:
        """The callbacks' state dict (JSON-safe), as recorded in every checkpoint."""
        return fcb_state_dict(self.runner.state, self.callbacks)
