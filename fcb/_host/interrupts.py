"""Preemption, time limits and resume schedules between checks: one copy for every adapter.

A signal (SIGTERM by default) only sets a flag. At the next hook the loop calls, the
processes agree on it (any-reduce), a resumable checkpoint of that step is committed and the
run stops with `StopReason.PREEMPTED`; the loop then ends normally. `fcb.TimeLimit` (its
limit, applied between checks with the callback's own rule) and the schedules
(`resume_every_steps`, `resume_every_seconds`: one rolling resume point, the `last` slot)
act at the same hooks.

A batch hook cannot know whether the loop makes a check at the same step after it: the state
of that step is therefore captured (a host copy) and committed at the *next* hook, unless
that hook is the step's check, which commits itself. Either way the resume point is the
state after the step *and* its check, so a resumed run misses nothing.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax

from .._core import StopReason
from .._errors import ConfigError

logger = logging.getLogger("fcb")

PREEMPTED = "preempted"
TIME_LIMIT = "time_limit"
SCHEDULED = "scheduled"

_STOPS = {PREEMPTED: StopReason.PREEMPTED, TIME_LIMIT: StopReason.TIME_LIMIT}


def check_signals(owner: str, value: Any) -> tuple[signal.Signals, ...]:
    """`preempt_on`: signal names or numbers (`()` or `None`: no handler)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (str, int)) else value
    found = []
    try:
        for item in items:
            found.append(
                signal.Signals[item] if isinstance(item, str) else signal.Signals(item)
            )
    except (KeyError, ValueError, TypeError):
        raise ConfigError(
            f"{owner}: `preempt_on` must name signals, e.g. ('SIGTERM',) or ('SIGTERM', "
            f"'SIGUSR1') for SLURM, or be () to install no handler; got preempt_on = "
            f"{value!r}."
        ) from None
    if signal.SIGKILL in found or signal.SIGSTOP in found:
        raise ConfigError(
            f"{owner}: `preempt_on` cannot catch SIGKILL or SIGSTOP (no process can); got "
            f"preempt_on = {value!r}."
        )
    return tuple(dict.fromkeys(found))


def check_every(owner: str, name: str, value: Any, *, integer: bool) -> float | None:
    if value is None:
        return None
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or (
        not integer and not math.isfinite(value)
    ):
        raise ConfigError(
            f"{owner}: `{name}` must be a {'whole number' if integer else 'number'} > 0 or "
            f"None, got {name} = {value!r}."
        )
    return float(value)


class Pending(NamedTuple):
    """A batch step's state, captured for a resume point committed at the next hook."""

    step: int
    reason: str
    write: Callable[[], None]


class Interrupts:
    """The flags and schedules of one adapter; the session asks `due` at every batch hook."""

    def __init__(
        self, owner: str, *, preempt_on: Any = ("SIGTERM",), resume_every_steps: Any = None,
        resume_every_seconds: Any = None, clock: Callable[[], float] | None = None,
    ):
        self.signals = check_signals(owner, preempt_on)
        self.every_steps = check_every(
            owner, "resume_every_steps", resume_every_steps, integer=True
        )
        self.every_seconds = check_every(
            owner, "resume_every_seconds", resume_every_seconds, integer=False
        )
        if clock is not None and not callable(clock):
            raise ConfigError(
                f"{owner}: `clock` must be a function returning seconds (e.g. time.monotonic), "
                f"got {type(clock).__name__}."
            )
        self.clock = time.monotonic if clock is None else clock
        self.received: str | None = None
        """The name of the first signal received while started."""
        self._previous: dict[signal.Signals, Any] = {}
        self.started_at = 0.0
        self.deadline = math.inf
        """The earliest `fcb.TimeLimit` of the chain, in seconds since the start."""
        self._next_step = math.inf
        self._next_time = math.inf
        self._wake = math.inf
        """The elapsed seconds at which a time limit or schedule is next due."""
        self.pending: Pending | None = None
        self.external: Callable[[int], bool] | None = None
        """Another preemption notice an engine reads at each hook (orbax multi-process:
        `CheckpointManager.reached_preemption`, JAX's preemption sync point)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, callbacks: Any, resumed_step: int | None) -> None:
        self.started_at = self.clock()
        limits = [
            node.deadline_seconds()
            for node in jax.tree_util.tree_leaves(
                callbacks, is_leaf=lambda x: hasattr(x, "deadline_seconds")
            )
            if hasattr(node, "deadline_seconds")
        ]
        self.deadline = min(limits, default=math.inf)
        first = -1 if resumed_step is None else resumed_step
        self._next_step = math.inf if self.every_steps is None else first + self.every_steps
        self._next_time = math.inf if self.every_seconds is None else self.every_seconds
        self._wake = min(self.deadline, self._next_time)
        self.received, self.pending = None, None
        self._install()

    def _install(self) -> None:
        self._closed, self._previous = False, {}
        if not self.signals or threading.current_thread() is not threading.main_thread():
            if self.signals:
                logger.info("fcb: not the main thread: no preemption handler is installed.")
            return
        for number in self.signals:
            self._previous[number] = signal.getsignal(number)
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        signum = signal.Signals(number)
        previous = self._previous.get(signum)
        if self._closed or (self.session is not None and self.session() is None):
            # closed, or left by an adapter that never closed: the signal does what it did
            # before this adapter (when the system called this handler itself)
            if callable(previous):
                previous(number, frame)
            elif signal.getsignal(signum) == self._handle:
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
                if previous in (None, signal.SIG_DFL):
                    signal.raise_signal(signum)
            return
        if self.received is None:
            self.received = signum.name
            logger.warning(
                "fcb: received %s; a resumable checkpoint is written at the next hook.",
                self.received,
            )
        if callable(previous):  # chain to the handler we replaced (SIG_DFL would kill us)
            previous(number, frame)

    _closed = False
    session: Callable[[], Any] | None = None
    """A weak reference to the session (set by it): a handler outliving it passes signals on."""

    def close(self) -> None:
        """Put back the handlers replaced at `start`; a handler another adapter installed
        since stays (it chains to ours, which from now on passes the signal on)."""
        self._closed = True
        if threading.current_thread() is not threading.main_thread():
            return
        for number, handler in self._previous.items():
            if signal.getsignal(number) == self._handle:
                signal.signal(number, signal.SIG_DFL if handler is None else handler)

    # -- at each hook ------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.clock() - self.started_at

    def due(self, step: int) -> bool:
        """Whether anything may be due at `step` (cheap: no collective, no I/O)."""
        return (
            self.received is not None
            or step >= self._next_step
            or (self._wake < math.inf and self.clock() - self.started_at >= self._wake)
        )

    def reasons(self, step: int) -> tuple[bool, bool, bool]:
        """(preempted, time limit reached, schedule due) on this process at `step`."""
        elapsed = self.elapsed()
        return (
            self.received is not None or (self.external is not None and self.external(step)),
            elapsed >= self.deadline,
            step >= self._next_step or elapsed >= self._next_time,
        )

    def scheduled(self, step: int) -> None:
        """A resume point was committed at `step`: the schedules count from here."""
        if self.every_steps is not None:
            self._next_step = step + self.every_steps
        if self.every_seconds is not None:
            self._next_time = self.elapsed() + self.every_seconds
            self._wake = min(self.deadline, self._next_time)


def reason_of(flags: Iterable[bool]) -> str | None:
    preempted, time_limit, scheduled = flags
    return PREEMPTED if preempted else TIME_LIMIT if time_limit else (
        SCHEDULED if scheduled else None
    )


def stop_message(reason: str, received: str | None, step: int, elapsed: float) -> str:
    if reason == PREEMPTED:
        return (
            f"the job received {received or 'a preemption signal'} (on this or another "
            f"process); a resumable checkpoint of step {step} was written"
        )
    return (
        f"the time limit was reached (TimeLimit): {elapsed:.1f} s elapsed at step {step}; a "
        f"resumable checkpoint of step {step} was written"
    )


def stop_reason(reason: str) -> StopReason | None:
    return _STOPS.get(reason)
