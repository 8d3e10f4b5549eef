"""Resuming with a changed numeric setting: rebuild the state from the run's recorded history.

[`fcb.load_state_dict`][] keeps the saved state and lets the current config win (warning
about each changed field). A saved state is the result of the old settings, though: an
`EarlyStopping` that stopped with `patience=3` stays stopped when resumed with `patience=10`.
[`fcb.resume_with_changes`][] instead runs the current callback over the recorded checks, so
the state is the one the new settings would have had, and a run they would not have stopped
continues. It is pure: a callback, a state dict and a history in; a state and a report out.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._chain import Chain, NamedChain
from ._combinators import AllOf
from ._core import Callback
from ._errors import MetricShapeError, MetricTypeError, MissingMetricError, StateDictError
from ._state_dict import (
    _flatten_config,
    _warn_config_changes,
    decode_number,
    encode_config,
    is_check,
    load_state_dict,
)


@dataclasses.dataclass(frozen=True)
class ResumeReport:
    """What [`fcb.resume_with_changes`][] did: one line per callback whose settings changed.

    Attributes:
        lines: one line per changed callback: the fields, their old and new values, and the
            effect (rebuilt from how many checks; stopped or running before and after).
        rebuilt: the state was rebuilt from the history (False: the saved state was loaded
            and the current config wins, as [`fcb.load_state_dict`][] does).
        was_stopped: the saved state had stopped.
        stopped: the returned state has stopped.
    """

    lines: tuple[str, ...]
    rebuilt: bool
    was_stopped: bool
    stopped: bool

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _records(history: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(step, metrics) per check, from history.jsonl records or flat per-check dicts."""
    checks = []
    for index, record in enumerate(history):
        if not isinstance(record, Mapping):
            raise StateDictError(
                f"fcb.resume_with_changes: check {index} of the history must be a mapping "
                f"(a history.jsonl record or a dict of metrics), got {type(record).__name__}."
            )
        if not is_check(record):
            continue  # the end-of-run line of history.jsonl, or an evaluated slot
        metrics = record.get("metrics", record)
        step = record.get("step", metrics.get("step", index))
        values = {
            str(k): jnp.asarray(float(decode_number(v)), jnp.float32)
            for k, v in metrics.items()
            if k != "step" and isinstance(decode_number(v), (int, float))
        }
        checks.append((int(step), values))
    return checks


@jax.jit
def _check(callback: Callback, state: Any, metrics: dict[str, Any], step: Any) -> Any:
    # One compiled check per callback structure and metric keys, shared by every replay.
    return callback(state, metrics, step=step)[0]


def _replay(callback: Callback, checks: list[tuple[int, dict[str, Any]]]) -> Any:
    state = callback.init()
    for step, metrics in checks:
        state = _check(callback, state, metrics, jnp.asarray(step, jnp.int32))
    return state


def _with_saved_leaves(callback: Callback, saved: Mapping[str, Any]) -> Callback | None:
    """`callback` with its array options set to the saved config's values (None when the
    saved config does not give every one of them with the same shape)."""
    paths: list[tuple[Any, ...]] = []
    values: list[Any] = []

    def visit(node: Any, config: Any, path: tuple[Any, ...]) -> bool:
        if not isinstance(config, Mapping):
            return False
        for field in dataclasses.fields(node):
            value, record = getattr(node, field.name), config.get(field.name)
            if isinstance(value, Callback):
                if not (
                    isinstance(record, Mapping)
                    and visit(value, record.get("config"), (*path, field.name))
                ):
                    return False
            elif isinstance(value, tuple) and value and isinstance(value[0], Callback):
                if not isinstance(record, list) or len(record) != len(value):
                    return False
                for i, (child, child_record) in enumerate(zip(value, record)):
                    if not (
                        isinstance(child_record, Mapping)
                        and visit(child, child_record.get("config"), (*path, field.name, i))
                    ):
                        return False
            elif eqx.is_array(value):
                try:
                    array = np.asarray(_decoded(record), dtype=np.asarray(value).dtype)
                except (TypeError, ValueError):
                    return False
                if array.shape != np.shape(value):
                    return False
                paths.append((*path, field.name))
                values.append(jnp.asarray(array))
        return True

    if not visit(callback, saved, ()):
        return None
    if not paths:
        return callback

    def where(c: Any) -> tuple[Any, ...]:
        return tuple(_follow(c, p) for p in paths)

    return eqx.tree_at(where, callback, tuple(values))


def _decoded(value: Any) -> Any:
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return decode_number(value)


def _follow(node: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    return node


def _members(callback: Callback, state: Any, path: str = ""):
    """(label, callback, state) of every callback that is not a composition, in order."""
    if isinstance(callback, (Chain, AllOf)):
        states = state if isinstance(callback, Chain) else state.members
        for i, (c, s) in enumerate(zip(callback.callbacks, states, strict=True)):
            yield from _members(c, s, f"{path}[{i}]")
    elif isinstance(callback, NamedChain):
        for name, c in zip(callback.names, callback.callbacks, strict=True):
            yield from _members(c, state[name], f"{path}[{name!r}]")
    else:
        yield type(callback).__name__ + (f" {path}" if path else ""), callback, state


def _changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} {before.get(key, '<absent>')!r} -> {now.get(key, '<absent>')!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key, "<absent>") != now.get(key, "<absent>")
    ]


def _status(callback: Callback, state: Any) -> str:
    details = callback.stop_details(state)
    return "running" if details is None else f"stopped ({details})"


def resume_with_changes(
    callback: Callback,
    state_dict: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
) -> tuple[Any, ResumeReport]:
    """The state `callback` resumes from when its numeric settings changed since `state_dict`
    was saved: rebuilt from the recorded `history`, with a report of one line per callback.

    `history` is the run's checks up to the saved one, in order: `history.jsonl` records
    (`{"step": 12, "metrics": {...}}`; summary lines are skipped) or per-check metric dicts
    (with an optional `"step"`, else the position). When only array options changed
    (`patience`, `min_delta`, thresholds, `alpha`...), the callback with the saved settings is
    run over `history` first: if that reproduces the saved state exactly, the history is the
    run's, and the state returned is the current callback run over it (a stop the new settings
    would not have made is undone). Otherwise (a changed static option, a history that does
    not reproduce the state), the saved state is loaded as [`fcb.load_state_dict`][] does: the
    current config wins and a [`fcb.ConfigChangedWarning`][] names each field.

    >>> history = [{"val_loss": v} for v in [0.5, 0.4, 0.45, 0.44]]
    >>> before = fcb.EarlyStopping("val_loss", patience=2)
    >>> state = before.init()
    >>> for step, metrics in enumerate(history):
    ...     state, actions = before(state, metrics, step=step)
    >>> bool(state.stopped)
    True
    >>> state, report = fcb.resume_with_changes(
    ...     fcb.EarlyStopping("val_loss", patience=5), fcb.state_dict(state, before), history)
    >>> bool(state.stopped), int(state.wait_count)
    (False, 2)
    >>> print(report)
    EarlyStopping: patience 2 -> 5; rebuilt from 4 recorded checks: was stopped (val_loss did
    not improve for 2 checks (patience=2, min_delta=0); best 0.4 at step 1), now running
    """
    saved_config = state_dict.get("config") if isinstance(state_dict, Mapping) else None
    if saved_config is None or not isinstance(callback, Callback):
        state = load_state_dict(callback, state_dict)  # raises the usual errors
        return state, ResumeReport((), False, False, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned below, only if the state is not rebuilt
        saved_state = load_state_dict(callback, state_dict)
    was_stopped = _stopped(callback, saved_state)
    before = _flatten_config(saved_config)
    if before == _flatten_config(encode_config(callback)):
        return saved_state, ResumeReport((), False, was_stopped, was_stopped)
    saved_callback = _with_saved_leaves(callback, saved_config)
    checks = _records(history)
    reason = None
    if saved_callback is None or _flatten_config(encode_config(saved_callback)) != before:
        reason = "a changed option is not a numeric setting"
    else:
        try:
            reproduced = _equal(_replay(saved_callback, checks), saved_state)
        except (MissingMetricError, MetricTypeError, MetricShapeError) as error:
            reproduced, reason = False, f"the history cannot be replayed: {error}"
        if not reproduced and reason is None:
            reason = f"the {len(checks)} recorded checks do not reproduce the saved state"
    if reason is not None:
        _warn_config_changes(callback, saved_config)
        line = (
            f"{type(callback).__name__}: not rebuilt ({reason}); the saved state is used "
            f"with the current config, as fcb.load_state_dict does"
        )
        return saved_state, ResumeReport((line,), False, was_stopped, was_stopped)
    assert saved_callback is not None  # reason is None
    rebuilt = _replay(callback, checks)
    lines = []
    pairs = zip(_members(saved_callback, saved_state), _members(callback, rebuilt), strict=True)
    for (label, old_cb, old_state), (_, new_cb, new_state) in pairs:
        old_config = _flatten_config(encode_config(old_cb))
        changed = _changes(old_config, _flatten_config(encode_config(new_cb)))
        if changed:
            lines.append(
                f"{label}: {'; '.join(changed)}; rebuilt from {len(checks)} recorded checks: "
                f"was {_status(old_cb, old_state)}, now {_status(new_cb, new_state)}"
            )
    return rebuilt, ResumeReport(tuple(lines), True, was_stopped, _stopped(callback, rebuilt))


def _equal(a: Any, b: Any) -> bool:
    try:
        chex.assert_trees_all_equal(a, b)
    except AssertionError:
        return False
    return True


def _stopped(callback: Callback, state: Any) -> bool:
    """Whether any member of `callback` has stopped in `state`."""
    return any(c.stop_details(s) is not None for _, c, s in _members(callback, state))
