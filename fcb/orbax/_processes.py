"""Process agreement for the orbax adapter in a multi-process JAX run.

With `jax.distributed.initialize()` called, every process constructs the same adapter and
makes the same calls. Metrics are gathered from every process and reduced on each in the
same order (float64, so every process computes the same numbers), stops are agreed with an
any-reduce, only the primary process (`jax.process_index() == 0`) writes the manifest and
holds the directory lock, and orbax writes the checkpoints with its own multi-host protocol.
A failure on one process reaches every process through one collective after each write.
While orbax writes, its processes wait for one another at orbax's barriers, so a write that
fails on one process fails on the others when those barriers time out (the adapter's
`timeout`); the collective then gives every process every process's reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from .._ranks import ProcessGroup, key_fingerprint, keys_differ, reduce_rows


class Processes(ProcessGroup):
    """The processes of a JAX run; with one process, every method is a no-op."""

    def __init__(self, *, single: bool = False) -> None:
        # `single` touches no JAX backend (jax.distributed.initialize must come first)
        self.count = 1 if single else jax.process_count()
        self.index = 0 if single else jax.process_index()
        self.active = self.count > 1

    def _gather(self, words: np.ndarray) -> np.ndarray:
        """`[processes, n]` uint32 rows: one per process, in process order."""
        gathered = multihost_utils.process_allgather(np.ascontiguousarray(words, np.uint32))
        return np.asarray(gathered, np.uint32).reshape(self.count, -1)

    def reduce_metrics(self, metrics: Mapping[str, Any], reduction: str | None) -> dict[str, Any]:
        """The metrics reduced over processes (one collective). A key set that differs
        between processes is an error on every process, never a hang or a mix-up."""
        if not self.active or reduction is None or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        values = np.asarray([float(metrics[k]) for k in keys], np.float64)
        # float64 bits travel as uint32 words: JAX without x64 would round them to float32
        words = np.concatenate(
            [np.asarray([key_fingerprint(keys), len(keys)], np.uint32), values.view(np.uint32)]
        )
        rows = self._gather(words)
        if (rows[:, :2] != rows[0, :2]).any():
            raise keys_differ("OrbaxAdapter", keys)
        reduced = reduce_rows(np.ascontiguousarray(rows[:, 2:]).view(np.float64), reduction)
        return dict(zip(keys, reduced.tolist(), strict=True))

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on at least one."""
        if not self.active:
            return flag
        return bool(self._gather(np.asarray([int(flag)], np.uint32)).any())

    def gather_text(self, text: str | None) -> list[str | None]:
        data = b"" if text is None else text.encode()
        lengths = self._gather(np.asarray([len(data) + (text is not None)], np.uint32))[:, 0]
        size = -(-int(lengths.max()) // 4) * 4
        padded = np.zeros(size, np.uint8)
        padded[: len(data)] = np.frombuffer(data, np.uint8)
        rows = self._gather(padded.view(np.uint32)).view(np.uint8)
        return [
            None if length == 0 else bytes(row[: length - 1]).decode(errors="replace")
            for row, length in zip(rows, lengths, strict=True)
        ]

    def barrier(self, name: str) -> None:
        if self.active:
            multihost_utils.sync_global_devices(f"fcb:{name}")
