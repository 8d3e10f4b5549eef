"""What a callback reads from the metrics, and which metric it monitors.

Both are asked of the callbacks themselves: `monitored` reads the `monitor` / `metric_key`
and `mode` options of every callback in a chain, `read_keys` traces one check and records
the keys the callback looks up. [`fcb.replay`][] uses them (through [`fcb.Grid`][]) to load
only the history columns it needs and to say which metric `best_step` follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._core import Callback
from ._monitor import MODES, Mode
from ._program_cache import cached_value


def monitored(callback: Callback) -> list[tuple[str, Mode]]:
    """The distinct (metric, mode) pairs the monitoring callbacks in `callback` follow.

    Nested callbacks (a chain's members, a `BestCheckpoint`'s nested callbacks) count, in
    the order they appear; a callback that monitors nothing adds nothing.

    >>> from fcb._monitored import monitored
    >>> monitored(fcb.chain(fcb.EarlyStopping("val_loss"), fcb.TerminateOnNaN("loss"),
    ...                     fcb.BestCheckpoint("val_acc", mode="max")))
    [('val_loss', 'min'), ('val_acc', 'max')]
    """
    found: dict[tuple[str, Mode], None] = {}

    def visit(node: Any) -> None:
        if isinstance(node, Callback):
            key = getattr(node, "monitor", None) or getattr(node, "metric_key", None)
            mode = getattr(node, "mode", None)
            if isinstance(key, str) and mode in MODES:
                found[(key, mode)] = None
            for field in dataclasses.fields(node):
                visit(getattr(node, field.name))
        elif isinstance(node, (tuple, list)):
            for item in node:
                visit(item)

    visit(callback)
    return list(found)


class _KeyRecorder(Mapping[str, Any]):
    """Metrics that record which keys a callback reads (traced once, under `eval_shape`)."""

    def __init__(self, keys: Sequence[str]):
        self._keys = list(keys)
        self.read: dict[str, None] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        self.read[key] = None
        return jnp.zeros((), jnp.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_keys(callback: Callback, available: Sequence[str]) -> list[str]:
    """The metric keys `callback` reads at a check, given the keys a history offers.

    A strict callback whose key is not offered raises [`fcb.MissingMetricError`][] here,
    listing the history's keys.
    """
    def trace() -> list[str]:
        recorder = _KeyRecorder(available)
        jax.eval_shape(lambda: callback(callback.init(), recorder, step=jnp.int32(0)))
        return list(recorder.read)

    # kept on disk beside fcb.replay's programs (`fcb._program_cache`): a fresh process with
    # a compilation cache skips the trace
    return cached_value("fcb.read_keys", trace, callback, {"available": list(available)})
