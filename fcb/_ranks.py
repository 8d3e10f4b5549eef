"""Rules shared by the adapters' process groups (Torch ranks, JAX processes).

Every process runs the same pure callbacks on the same reduced metrics, so every process
makes the same decisions. The rules here are the ones both engines follow: which reductions
exist, how gathered rows reduce, how a differing key set and a failure elsewhere are reported.
No engine is imported here.
"""

from __future__ import annotations

import abc
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._errors import CheckpointWriteError, ConfigError

REDUCTIONS = ("mean", "sum", "max", "min")
"""How metrics are reduced over processes; `None` means the user already reduced them."""


def check_reduction(owner: str, value: Any) -> str | None:
    """`value` if it names a reduction (or is None), else a `ConfigError`."""
    if value is not None and value not in REDUCTIONS:
        raise ConfigError(
            f"{owner}: `reduce` must be one of {REDUCTIONS} or None (metrics already "
            f"reduced), got reduce = {value!r}."
        )
    return value


def key_fingerprint(keys: Sequence[str]) -> int:
    """A 32-bit fingerprint of a sorted key list, compared across processes."""
    return zlib.crc32("\0".join(keys).encode())


def keys_differ(owner: str, keys: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"{owner}: the processes passed different metric keys (this process: {list(keys)}); "
        f"every process must log the same keys at each check."
    )


def reduce_rows(rows: np.ndarray, reduction: str) -> np.ndarray:
    """Reduce a `[processes, metrics]` float64 array over processes. NaN and inf propagate
    through every reduction, so a process that sees NaN stops all."""
    if reduction == "mean":
        return rows.sum(axis=0) / rows.shape[0]
    if reduction == "sum":
        return rows.sum(axis=0)
    # np.max / np.min propagate NaN, as torch's MAX / MIN all-reduce does
    return rows.max(axis=0) if reduction == "max" else rows.min(axis=0)


def failed_elsewhere(kind: str, messages: Sequence[str | None]) -> CheckpointWriteError:
    """The error raised on processes that did not fail, naming each one that did."""
    failed = ", ".join(f"{kind} {index}: {m}" for index, m in enumerate(messages) if m is not None)
    return CheckpointWriteError(f"a checkpoint write failed on another {kind} ({failed}).")


class ProcessGroup(abc.ABC):
    """The processes of a run, as one engine sees them; with one process, a no-op."""

    kind = "process"  # how errors name a member: "rank" for torch.distributed
    active: bool
    index: int

    @abc.abstractmethod
    def any(self, flag: bool) -> bool:
        """True on every process when it is true on at least one (a collective)."""

    @abc.abstractmethod
    def gather_text(self, text: str | None) -> list[str | None]:
        """Every process's text, in process order (a collective)."""

    @property
    def is_primary(self) -> bool:
        return self.index == 0

    def on_primary(self, action: Callable[[], object]) -> None:
        """Run `action` on the primary process only; raise its failure on every process."""
        error: BaseException | None = None
        try:
            if self.is_primary:
                action()
        except BaseException as failure:
            error = failure
        self.agree_on_error(error)

    def agree_on_error(self, error: BaseException | None) -> None:
        """Raise on every process when any process failed: a failed process raises its own
        error (naming the other failures, for a write error), the others one naming every
        failure. Every process calls it, so no process waits for another that gave up."""
        if not self.active:
            if error is not None:
                raise error
            return
        if not self.any(error is not None):
            return
        messages = self.gather_text(None if error is None else f"{type(error).__name__}: {error}")
        if error is None:
            raise failed_elsewhere(self.kind, messages)
        others = [f"{self.kind} {i}: {m}" for i, m in enumerate(messages) if m and i != self.index]
        if others and isinstance(error, CheckpointWriteError):
            raise CheckpointWriteError(
                f"{error} (failed on the other {self.kind}s too: {'; '.join(others)})"
            ) from error
        raise error
