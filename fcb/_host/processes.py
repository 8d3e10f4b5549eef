"""The processes of a run: every multi-process rule, over two collectives an engine provides.

Every process runs the same pure callbacks on the same reduced metrics, so every process
makes the same decisions. An engine (`torch.distributed`, `jax.distributed`) supplies only
[`Collectives`][]: an all-gather of a vector of 32-bit words and a barrier. Everything else
lives here, once: how metrics reduce (float64, in process order, so every process computes
the same numbers), how a differing key set is reported, how a stop is agreed, how a failure
on one process reaches every other. No engine is imported here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .._errors import CheckpointWriteError, ConfigError

INLINE_BYTES = 252
"""Texts up to this many bytes (UTF-8) are gathered in one collective."""
INLINE_METRICS = 16
"""Up to this many metrics are reduced in one collective (with their key check)."""
_DONE, _FAILED = "+", "!"
"""How `gather_results` marks a process's result and a process's failure."""

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


def reduce_rows(rows: np.ndarray, reduction: str) -> np.ndarray:
    """Reduce a `[processes, metrics]` float64 array over processes, in process order. NaN
    and inf propagate through every reduction, so a process that sees NaN stops all."""
    if reduction == "mean":
        return rows.sum(axis=0) / rows.shape[0]
    if reduction == "sum":
        return rows.sum(axis=0)
    return rows.max(axis=0) if reduction == "max" else rows.min(axis=0)


class Collectives(Protocol):
    """What an engine provides; every process calls each method the same number of times."""

    count: int
    """The number of processes."""
    index: int
    """This process's index, 0 (the primary) to `count - 1`."""

    def all_gather_words(self, words: np.ndarray) -> np.ndarray:
        """Every process's `uint32` vector (the same length on every process), as a
        `[count, n]` array in process order."""
        ...

    def barrier(self, name: str) -> None:
        """Wait until every process has reached the barrier `name`."""
        ...


class SingleProcess:
    """The collectives of a run of one process."""

    count = 1
    index = 0

    def all_gather_words(self, words: np.ndarray) -> np.ndarray:
        return np.asarray(words, np.uint32).reshape(1, -1)

    def barrier(self, name: str) -> None:
        del name


class ProcessGroup:
    """The processes of a run, over an engine's collectives; with one process, a no-op.

    >>> group = ProcessGroup(SingleProcess())
    >>> group.reduce_metrics("demo", {"val_loss": 0.5}, "mean"), group.any(False)
    ({'val_loss': 0.5}, False)
    """

    def __init__(self, collectives: Collectives | None = None, *, kind: str = "process"):
        self.collectives: Collectives = SingleProcess() if collectives is None else collectives
        self.kind = kind  # how messages name a member: "rank" under torch.distributed
        self.plural = kind + ("es" if kind.endswith("s") else "s")
        self.count = self.collectives.count
        self.index = self.collectives.index
        self.active = self.count > 1

    @property
    def is_primary(self) -> bool:
        return self.index == 0

    def _gather(self, words: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = self.collectives.all_gather_words(np.ascontiguousarray(words, np.uint32))
        return np.asarray(rows, np.uint32).reshape(self.count, -1)

    def barrier(self, name: str) -> None:
        if self.active:
            self.collectives.barrier(f"fcb:{name}")

    def reduce_metrics(
        self, owner: str, metrics: Mapping[str, Any], reduction: str | None
    ) -> dict[str, Any]:
        """The metrics reduced over processes. A key set that differs between processes is
        a `ConfigError` on every process, never a hang or a silent mix-up."""
        if not self.active or reduction is None:
            return dict(metrics)
        keys = sorted(metrics)
        # float64 bits travel as uint32 words: JAX without x64 would round them to float32
        values = np.asarray([float(metrics[k]) for k in keys], np.float64).view(np.uint32)
        # the key set's fingerprint and, for up to INLINE_METRICS metrics, the values: one
        # collective (the vector has the same length on every process whatever its keys)
        first = np.zeros(2 + 2 * INLINE_METRICS, np.uint32)
        first[:2] = key_fingerprint(keys), len(keys)
        inline = len(keys) <= INLINE_METRICS
        if inline:
            first[2 : 2 + len(values)] = values
        rows = self._gather(first)
        if (rows[:, :2] != rows[0, :2]).any():
            raise ConfigError(
                f"{owner}: the {self.plural} passed different metric keys (this {self.kind}: "
                f"{keys}); every {self.kind} must log the same keys at each check."
            )
        if not keys:
            return {}
        rows = rows[:, 2 : 2 + len(values)] if inline else self._gather(values)
        reduced = reduce_rows(np.ascontiguousarray(rows).view(np.float64), reduction)
        return dict(zip(keys, reduced.tolist(), strict=True))

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on at least one (a collective)."""
        if not self.active:
            return flag
        return bool(self._gather([int(flag)]).any())

    def any_each(self, flags: Sequence[bool]) -> tuple[bool, ...]:
        """`any` of each flag, in one collective."""
        if not self.active:
            return tuple(flags)
        rows = self._gather([int(f) for f in flags])
        return tuple(bool(rows[:, i].any()) for i in range(rows.shape[1]))

    def gather_text(self, text: str | None) -> list[str | None]:
        """Every process's text (or None), in process order (a collective). Texts of up to
        `INLINE_BYTES` bytes travel in one all-gather, longer ones in a second."""
        if not self.active:
            return [text]
        data = b"" if text is None else text.encode()
        first = np.zeros(1 + INLINE_BYTES // 4, np.uint32)  # the length + 1 (0: None), text
        first[0] = len(data) + (text is not None)
        inline = data[:INLINE_BYTES]
        first[1:].view(np.uint8)[: len(inline)] = np.frombuffer(inline, np.uint8)
        rows = self._gather(first)
        lengths, rows = rows[:, 0], np.ascontiguousarray(rows[:, 1:]).view(np.uint8)
        if int(lengths.max()) - 1 > INLINE_BYTES:
            size = -(-int(lengths.max()) // 4) * 4
            padded = np.zeros(size, np.uint8)
            padded[: len(data)] = np.frombuffer(data, np.uint8)
            rows = self._gather(padded.view(np.uint32)).view(np.uint8)
        return [
            None if length == 0 else bytes(row[: length - 1]).decode(errors="replace")
            for row, length in zip(rows, lengths, strict=True)
        ]

    def gather_results(self, result: str | None, error: BaseException | None) -> list[str]:
        """Every process's `result` text, in one collective with the agreement on errors:
        when any process failed (`error`), every process raises as in `agree_on_error`."""
        if not self.active:
            if error is not None:
                raise error
            return [result or ""]
        if error is not None:
            texts = self.gather_text(_FAILED + f"{type(error).__name__}: {error}")
        else:
            texts = self.gather_text(_DONE + (result or ""))
        failures = [t[len(_FAILED) :] if t and t.startswith(_FAILED) else None for t in texts]
        if any(failures):
            self._raise_agreed(error, failures)
        return [(t or "")[len(_DONE) :] for t in texts]

    def on_primary(self, action: Callable[[], object]) -> None:
        """Run `action` on the primary process only; raise its failure on every process."""
        error: BaseException | None = None
        try:
            if self.is_primary:
                action()
        except BaseException as failure:
            error = failure
        self.agree_on_error(error)

    def agree_on_error(self, error: BaseException | None, *flags: bool) -> tuple[bool, ...]:
        """Raise on every process when any process failed: a failed process raises its own
        error (naming the other failures, for a write error), the others one naming every
        failure. Every process calls it, so no process waits for another that gave up.
        `flags` are agreed in the same collective: `any` of each is returned."""
        if not self.active:
            if error is not None:
                raise error
            return tuple(flags)
        rows = self._gather([int(error is not None), *(int(flag) for flag in flags)])
        if rows[:, 0].any():
            self._raise_agreed(
                error,
                self.gather_text(None if error is None else f"{type(error).__name__}: {error}"),
            )
        return tuple(bool(rows[:, i].any()) for i in range(1, rows.shape[1]))

    def _raise_agreed(self, error: BaseException | None, messages: list[str | None]) -> None:
        """Raise the agreed failure: this process's own `error`, naming the other
        processes' `messages` for a write error, or one naming every failure."""
        if error is None:
            failed = ", ".join(f"{self.kind} {i}: {m}" for i, m in enumerate(messages) if m)
            raise CheckpointWriteError(
                f"a checkpoint write failed on another {self.kind} ({failed})."
            )
        others = [f"{self.kind} {i}: {m}" for i, m in enumerate(messages) if m and i != self.index]
        if others and isinstance(error, CheckpointWriteError):
            raise CheckpointWriteError(
                f"{error} (failed on the other {self.plural} too: {'; '.join(others)})"
            ) from error
        raise error

    def agreed_stop(self, any_stopped: bool, stopped: bool, message: str) -> tuple[bool, str]:
        """Whether every process stops (`any_stopped`, agreed with `agree_on_error`) and
        its message: that of a process that did not stop itself says so."""
        if not any_stopped:
            return False, ""
        return True, message if stopped else f"another {self.kind} stopped"
