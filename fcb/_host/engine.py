"""What an adapter supplies to the check session (`Engine`), and the checks of its options."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

from .._core import Actions
from .._errors import ConfigError
from .._vram_drift import FREE_DEVICE_MEMORY as FREE_DEVICE_MEMORY
from .manifest import Plan
from .processes import ProcessGroup
from .store import ManifestStore

_HOST_INPUTS = {FREE_DEVICE_MEMORY: ("free device memory", "VRAMDrift")}
"""How a host input is described, and which callback declares it, for messages."""


class Check(NamedTuple):
    """One check, as the engine's `write` sees it."""

    step: int
    actions: Actions
    metrics: Mapping[str, Any]
    """The reduced metrics the chain saw."""
    plan: Plan
    callbacks: Any
    """The callbacks' state dict after the check (recorded with the step)."""
    context: Any
    """What the adapter's hook was given besides the metrics (e.g. the orbax state)."""


class Engine(Protocol):
    """What an adapter supplies to its session: only what depends on the framework."""

    def processes(self) -> ProcessGroup:
        """The run's processes (read at `start`: a process group may be set up late)."""
        ...

    def open_store(self, processes: ProcessGroup) -> ManifestStore | None:
        """The store of this process, not yet opened (`None`: this process writes nothing)."""
        ...

    def host_input(self, kind: str) -> Callable[[], float | None] | None:
        """A probe of the host input `kind`, or `None` where this machine has none."""
        ...

    def run_evaluation(self, requests: Sequence[str], context: Any) -> Mapping[str, Any]:
        """Run the evaluation registered for the first of `requests` that has one (see
        `evaluation_function`) on the live model; return metrics."""
        ...

    def evaluated_model(
        self, directory: str, slot: str, manifest: Mapping[str, Any], context: Any
    ) -> AbstractContextManager[Any]:
        """Hold the checkpoint of `slot` (listed in `manifest`, of the run in `directory`)
        as the model to evaluate while the context lasts (`context`: the last check's);
        yields what `run_evaluation` takes as its context."""
        ...

    def learning_rates(self) -> list[float] | None:
        """The optimizer's learning rates (`None` when the loop owns them)."""
        ...

    def set_learning_rates(self, rates: list[float] | None) -> None: ...

    def learning_rates_after(self, actions: Actions, context: Any) -> list[float] | None:
        """The learning rates training continues with after a check (for the history)."""
        ...

    def apply_lr(self, actions: Actions) -> None:
        """Apply a check's learning-rate change (`fcb.scaled_lr`'s rule)."""
        ...

    def write(self, store: ManifestStore, check: Check) -> Callable[[], None]:
        """Capture what the check's plan writes now; return the job that writes it."""
        ...

    def snapshot(self, store: ManifestStore, check: Check) -> Callable[[], None]:
        """`write`, with the state copied to host memory now whatever the writer: the loop
        trains on before the job runs (a resume point captured at a batch hook)."""
        ...

    def submit(self, job: Callable[[], None]) -> None:
        """Run a write-and-commit job now, or queue it for a background writer."""
        ...

    def follow(self, actions: Actions, step: int) -> None:
        """What a process without a store does while the primary writes."""
        ...

    def settle(self) -> None:
        """Wait for the jobs `submit` queued (before a failed check is undone)."""
        ...

    def read_resume(self, source: str, record: Mapping[str, Any], manifest: Mapping[str, Any]):
        """Read the resume point of the run in `source`: returns `(callbacks state dict,
        restore)`, where `restore()` puts the model, optimizer... back."""
        ...

    def adopt(
        self, store: ManifestStore, source: str, record: Mapping[str, Any],
        manifest: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Bring the resume point's locations from another run directory into the store;
        return their file records."""
        ...

    def stopped(self) -> None:
        """The run stops (e.g. set the trainer's `should_stop`)."""
        ...


def checked_step(owner: str, step: Any, names: str = "") -> int:
    """A step as a Python int: an integer from 0 to 2**31 - 1 (NumPy / 0-d Torch ints too);
    `names` (if given) says what a step names, for the message."""
    try:
        value = operator.index(step)
    except TypeError:
        value = -1
    if isinstance(step, bool) or value < 0:
        raise ConfigError(
            f"{owner}: `step` must be an integer >= 0"
            + (f" (it names the {names})" if names else "")
            + f", got step = {step!r}."
        )
    if value >= 2**31:
        raise ConfigError(
            f"{owner}: `step` must be below 2**31 (the callbacks keep steps as int32), got "
            f"step = {step!r}."
        )
    return value


def check_flag(owner: str, name: str, value: Any) -> bool:
    """A yes/no option: a bool, never a string or a number that happens to be truthy."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}: `{name}` must be True or False, got {name} = {value!r}.")
    return value


def check_path(owner: str, name: str, value: Any, *, optional: bool = True) -> str | None:
    """A directory option: a non-empty `str` or `os.PathLike` (or `None` when optional)."""
    if value is None and optional:
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"{owner}: `{name}` must be a non-empty path" + (" or None" if optional else "")
            + f", got {name} = {value!r}."
        )
    return path


def check_evaluate(owner: str, evaluate: Any, of: str) -> None:
    """`evaluate`: `None`, a function of the `of` (model, state), or a mapping from request
    name to such functions."""
    functions = evaluate.items() if isinstance(evaluate, Mapping) else [(None, evaluate)]
    for request, fn in functions:
        if evaluate is None or callable(fn):
            continue
        where = "" if request is None else f"[{request!r}]"
        raise ConfigError(
            f"{owner}: `evaluate{where}` must be a function of the {of}"
            + (" or a mapping from request name to one" if request is None else "")
            + f", got {type(fn).__name__}: {fn!r}."
        )


def evaluation_function(
    owner: str, evaluate: Any, requests: Sequence[str], of: str
) -> Callable[[Any], Any]:
    """The evaluation function registered for the first of `requests` that has one (all of
    them name the same evaluation: a post-training request first, then the request made
    during training); a single function serves every request."""
    if evaluate is not None and not isinstance(evaluate, Mapping):
        return evaluate
    for request in requests:
        if evaluate is not None and request in evaluate:
            return evaluate[request]
    names = " or ".join(repr(r) for r in requests)
    given = "no evaluate function was given" if evaluate is None else (
        f"`evaluate` has functions only for {sorted(evaluate)}"
    )
    raise ConfigError(
        f"{owner}: the callbacks ask to evaluate the model for {names}, but {given}. Pass "
        f"evaluate={{{requests[-1]!r}: fn}} where fn({of}) returns a dict of metrics (or "
        f"one function for every request)."
    )


def check_state_dict_owner(owner: str, name: str, value: Any) -> None:
    """An object whose state a checkpoint holds (`scheduler`, `trainer`): it must have
    `state_dict()` and `load_state_dict()`."""
    if value is None:
        return
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(value, m, 0))]
    if missing:
        raise ConfigError(
            f"{owner}: `{name}` must have state_dict() and load_state_dict() (its state is "
            f"saved and restored with the model), got {type(value).__name__} without "
            f"{' and '.join(m + '()' for m in missing)}."
        )
