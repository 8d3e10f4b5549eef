"""Helpers shared by the checkpointing callbacks: schedules, slot names, ranked tables."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import _monitor
from ._errors import ConfigError
from ._monitor import Mode

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")
MAX_FILENAME = 120
"""The longest slot stem: with `-top100`, `.tolerance=<t>` and a suffix, a slot's file name
stays far below the 255 bytes every file system allows."""


def check_filename(owner: str, field: str, value: Any) -> str:
    """A slot / file stem: letters, digits and `._=+-`, so it is safe on every file system."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise ConfigError(
            f"{owner}: `{field}` must be a file name stem of letters, digits and '._=+-' "
            f"(no '/' and no leading '.'), got {field} = {value!r}."
        )
    if len(value) > MAX_FILENAME:
        raise ConfigError(
            f"{owner}: `{field}` must be at most {MAX_FILENAME} characters, got {len(value)} "
            f"({field} = {value[:40]!r}...)."
        )
    return value


def key_as_name(key: str) -> str:
    """A metric key usable inside a file name: slashes become dots."""
    return key.replace("/", ".")


def count_check(check_count: Int[Array, ""], every_n: Int[Array, ""]):
    """The new check count and whether this check is on the `every_n` schedule.

    Checks are counted from 1; check `i` is scheduled when `i % every_n == 0`, so with
    `every_n=2` the 2nd, 4th, ... checks count (Lightning's `every_n_epochs` convention).
    """
    count = check_count + 1
    return count, (count % every_n) == 0


def holds(slots: Mapping[str, Int[Array, ""]], step: Int[Array, ""]) -> Bool[Array, ""]:
    """Whether any slot holds `step` (so the current step must be written)."""
    held = jnp.asarray(False)
    for slot_step in slots.values():
        held = held | (slot_step == step)
    return held & (step >= 0)


def insert_ranked(
    values: Float[Array, " k"],
    steps: Int[Array, " k"],
    value: Float[Array, ""],
    step: Int[Array, ""],
    mode: Mode,
    tie: tuple[Float[Array, " k"], Float[Array, ""], Mode] | None = None,
    carried: tuple[tuple[Array, Array], ...] = (),
) -> tuple[Float[Array, " k"], Int[Array, " k"], Int[Array, ""], tuple[Array, ...]]:
    """Insert `(value, step)` into a best-first table of `k` entries (empty: step -1).

    Returns the new table, the rank the value took (`k` when it did not enter) and the
    `carried` columns moved the same way (each a `(column, new entry)` pair). Lightning's
    `ModelCheckpoint` rule: a value enters when it is finite and the table is not full, or it
    is strictly better than the worst entry; it then takes the place of the entry at
    `eviction_index` (the oldest of the entries tied at the worst value, Lightning's
    `kth_best_model_path`). Entries of equal value stay in the order they
    entered, oldest first, so the best is the oldest of the tied best. O(k), no loop.

    With `tie = (tie_values, tie_value, tie_mode)` entries of equal value are ordered by a
    second metric (strictly better first; a NaN second value counts as the worst), and only
    entries equal in both keep the order they entered; the moved tie column comes first in
    the returned columns.
    """
    k = values.shape[-1]
    occupied = steps >= 0
    if tie is None:
        at_least_as_good = occupied & ~_monitor.improves(value, values, 0.0, mode)
    else:
        tie_values, tie_value, tie_mode = tie
        tie_values, tie_value = tie_key(tie_values, tie_mode), tie_key(tie_value, tie_mode)
        tie_at_least = ~_monitor.is_better(tie_value, tie_values, tie_mode)
        at_least_as_good = occupied & (
            _monitor.is_better(values, value, mode) | ((values == value) & tie_at_least)
        )
        carried = ((tie[0], tie[1]), *carried)
    rank = jnp.where(jnp.isfinite(value), jnp.sum(at_least_as_good), k).astype(jnp.int32)
    # The entered value goes to `rank`; the entries from there down to the freed place move
    # one rank down. The freed place is `evicted` (rank <= evicted: every entry at least as
    # good as the value is strictly better than the worst one, so it sits above `evicted`).
    evicted = eviction_index(values, steps, None if tie is None else tie[0])
    index = jnp.arange(k)
    shifted = (index > rank) & (index <= evicted)

    def moved(column: Array, entry: Array) -> Array:
        previous = jnp.concatenate([column[:1], column[:-1]])
        return jnp.where(index == rank, entry, jnp.where(shifted, previous, column)).astype(
            column.dtype
        )

    new_carried = tuple(moved(column, entry) for column, entry in carried)
    return moved(values, value), moved(steps, step), rank, new_carried


def tie_key(values: Array, mode: Mode) -> Array:
    """A tie-break value as it ranks: NaN (missing or not finite) is the worst."""
    return jnp.where(jnp.isnan(values), _monitor.worst_value(mode), values)


def eviction_index(
    values: Float[Array, " k"], steps: Int[Array, " k"], tie_values: Array | None = None
) -> Int[Array, ""]:
    """Where the next entry goes in a best-first table: the first empty place, or, when the
    table is full, the first (oldest) of the entries tied with the worst value (and, with a
    tie-break column, with its tie value)."""
    if values.shape[-1] == 0:
        return jnp.asarray(0, jnp.int32)
    occupied = steps >= 0
    tied_worst = occupied & (values == values[-1])
    if tie_values is not None:
        same = (tie_values == tie_values[-1]) | (jnp.isnan(tie_values) & jnp.isnan(tie_values[-1]))
        tied_worst = tied_worst & same
    return jnp.where(occupied[-1], jnp.argmax(tied_worst), jnp.sum(occupied)).astype(jnp.int32)


LOADED = "loaded:"
"""The prefix of a request that evaluates a loaded slot after training."""


def loaded_request(slot: str) -> str:
    """The request name under which the post-training pass evaluates `slot`."""
    return LOADED + slot


def loaded_slot(request: str) -> str | None:
    """The slot a post-training request names (None for a request made during training)."""
    return request[len(LOADED):] if request.startswith(LOADED) else None
