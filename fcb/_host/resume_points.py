"""The session's resume points between checks: batch hooks, preemption, time limits, schedules
and saves on an exception (the rules are in `fcb._host.interrupts`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from .._core import Actions, StopReason
from .._errors import CheckpointError, ConfigError
from .._state_dict import decode_number
from .engine import Check, checked_step
from .interrupts import PREEMPTED, TIME_LIMIT, Pending, reason_of, stop_message, stop_reason
from .manifest import RESUME_SLOT, Plan

logger = logging.getLogger("fcb")


def resume_plan(manifest: dict[str, Any], step: int) -> Plan:
    """Keep every slot as it is (step, value, models), and make `step` the resume point
    (the `last` slot; no check measured it, so its value is NaN)."""
    slots = {
        name: (
            int(slot["step"]), float(decode_number(slot["value"])),
            None if slot.get("models") is None else tuple(slot["models"]),
        )
        for name, slot in manifest["slots"].items()
    }
    slots[RESUME_SLOT] = (step, math.nan, None)
    return Plan(slots=slots, variants={None}, archive=False, resume=True, stop_message="")


class ResumePoints:
    """Mixed into `Session`: what happens between checks (every adapter, one copy)."""

    def batch_end(self: Any, step: Any, context: Any = None) -> None:
        """A training step ended: act on a signal, the time limit or a schedule (nearly free
        when nothing is due on a single process: no dispatch, no I/O)."""
        interrupts = self.interrupts
        if type(step) is int and step > self.last_step:
            self._batch = (step, context)
            idle = interrupts.pending is None and not self.processes.active
            if idle and not interrupts.due(step):
                return
        step = checked_step(self.owner, step, self.step_names)
        if step <= self.last_step:
            raise ConfigError(
                f"{self.owner}.on_train_batch_end: step {step} comes after step "
                f"{self.last_step}; pass the global step, the counter the checks are given."
            )
        self._batch = (step, context)
        pending = interrupts.pending
        if pending is not None and pending.step < step:  # no check came at its step
            interrupts.pending = None
            self._commit_resume_point(pending.step, pending.write, pending.reason)
            if self.should_stop:
                return
        reason = self._agreed_reason(step)
        if reason is not None and interrupts.pending is None:
            interrupts.pending = Pending(step, reason, self._resume_job(step, context, True))

    def _agreed_reason(self: Any, step: int) -> str | None:
        flags = self.interrupts.reasons(step)
        if self.processes.active:
            flags = self.processes.any_each(flags)
        return reason_of(flags)

    def _resume_job(
        self: Any, step: int, context: Any, snapshot: bool
    ) -> Callable[[], None] | None:
        """The write and commit of a resume point at `step`, its state captured now (a host
        copy with `snapshot`: the loop trains on before it is committed)."""
        store = self.store
        if store is None:
            return None
        plan = resume_plan(store.latest_manifest, step)
        callbacks_state = self.runner.state_dict()
        check = Check(step, Actions.no_actions(), {}, plan, callbacks_state, context)
        write = (self.engine.snapshot if snapshot else self.engine.write)(store, check)

        def job() -> None:
            write()
            store.commit_plan(plan, step, callbacks_state)

        return job

    def _commit_resume_point(
        self: Any, step: int, job: Callable[[], None] | None, reason: str
    ) -> None:
        error = None
        try:
            if job is not None:
                self.store.finish()
                self.engine.submit(job)
        except BaseException as failure:
            error = failure
        try:
            self.processes.agree_on_error(error)
        except BaseException:
            if self.store is not None:
                self.engine.settle()
                self.store.abandon()
            raise
        self.last_step = max(self.last_step, step)
        self.interrupts.scheduled(step)
        if stop_reason(reason) is not None and not self.should_stop:
            self._stop(
                stop_message(reason, self.interrupts.received, step, self.interrupts.elapsed())
            )

    def _after_check(
        self: Any, actions: Actions, step: int, context: Any, pending: Pending | None
    ) -> None:
        """After a check's commit: a signal, the time limit or a schedule (or a batch capture
        this check superseded) makes this step a resume point if it is not one already."""
        # agreed with the check's errors (`Session._apply`), after its write
        reason = self._interrupted or (pending.reason if pending else None)
        if bool(actions.stop) and int(actions.stop_reason) == StopReason.TIME_LIMIT:
            reason = TIME_LIMIT
        if reason is None:
            return
        store = self.store
        resume = None if store is None else store.latest_manifest.get("resume")
        done = store is None or (resume is not None and resume["step"] == step)
        job = None if done else self._resume_job(step, context, False)
        if job is None and reason not in (PREEMPTED, TIME_LIMIT):
            self.interrupts.scheduled(step)
            return
        self._commit_resume_point(step, job, reason)

    def flush_resume_point(self: Any) -> None:
        """At the end of the fit: a captured batch step no check followed is committed."""
        pending = self.interrupts.pending
        if pending is not None:
            self.interrupts.pending = None
            self._commit_resume_point(pending.step, pending.write, pending.reason)

    def save_on_exception(
        self: Any, exception: BaseException | None, *, failed: bool = False
    ) -> None:
        """Commit a resumable checkpoint of the last hook's step (`save_on_exception=True`),
        never after a failed write (`failed`, or a checkpoint error being handled): the run's
        files then stay as the last commit left them. A failure here is logged, not raised
        over the exception being handled."""
        if failed or isinstance(exception, CheckpointError) or not self.started:
            return
        step, context = self._batch
        if step <= self.last_step:
            step, context = self.last_step, self._check_context
        resume = None if self.store is None else self.store.latest_manifest.get("resume")
        if step < 0 or (resume is not None and resume["step"] == step):
            return
        self.interrupts.pending = None
        try:
            self._commit_resume_point(step, self._resume_job(step, context, False), "exception")
            self.engine.settle()
            if self.store is not None:
                self.store.finish()
        except Exception as error:
            logger.warning("fcb: no checkpoint was saved on the exception: %s", error)
        else:
            logger.warning(
                "fcb: %s at step %d: a resumable checkpoint of step %d was written "
                "(save_on_exception=True).", type(exception).__name__, step, step,
            )
