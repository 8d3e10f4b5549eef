"""The collectives of a multi-process JAX run (`jax.distributed`) for fcb's process rules.

Every rule over the processes (metric reduction, stop agreement, error agreement) lives in
`fcb._host.processes`; this module only moves words between processes. Orbax writes the
checkpoints with its own multi-host protocol; while it writes, its processes wait for one
another at orbax's barriers, so a write that fails on one process fails on the others when
those barriers time out (the adapter's `timeout`); the shared error agreement then gives
every process every process's reason.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from .._host.processes import ProcessGroup


class JaxCollectives:
    """All-gather and barrier over the processes of a JAX run."""

    def __init__(self) -> None:
        self.count = jax.process_count()
        self.index = jax.process_index()

    def all_gather_words(self, words: np.ndarray) -> np.ndarray:
        gathered = multihost_utils.process_allgather(np.ascontiguousarray(words, np.uint32))
        return np.asarray(gathered, np.uint32).reshape(self.count, -1)

    def barrier(self, name: str) -> None:
        multihost_utils.sync_global_devices(name)


def processes() -> ProcessGroup:
    """The processes of the JAX run (call after `jax.distributed.initialize`)."""
    return ProcessGroup(JaxCollectives())
