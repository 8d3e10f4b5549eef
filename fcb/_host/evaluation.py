"""The post-training pass: evaluate the checkpoints that slots hold, and hand the results to
the callbacks that own the slots (`BestCheckpoint`'s nested callbacks), saving nothing.

During training `BestCheckpoint` asks for an evaluation of the live model at each new best
(`Actions.evaluate`). After training, the same evaluation functions run on the weights a
slot holds: the engine loads the slot's checkpoint as the model to evaluate
(`Engine.evaluated_model`), the results go to `Callback.evaluated` under the request
`"loaded:<slot>"`, which changes only the nested callbacks' state
(`BestCheckpoint.evaluated_slot`), and the results are logged, added to the summary and
recorded in the history. No checkpoint is written and the manifest is not touched.

Every chosen slot is evaluated before any result is handed on, and the callbacks' state is
put back if one of them refuses the results: a pass that fails changes nothing, so it can be
run again once the cause is fixed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .._best_checkpoint import BestCheckpoint
from .._errors import ConfigError, MetricTypeError
from .._history import HistoryLog
from .._slots import loaded_request
from .manifest import json_metrics, read_manifest

logger = logging.getLogger("fcb")

ALL = "all"
"""`slots="all"`: every `BestCheckpoint`'s overall best and tolerance slots."""


class EvaluatedSlot(NamedTuple):
    """The post-training evaluation of one slot's checkpoint."""

    step: int
    """The step whose weights were evaluated."""
    results: dict[str, float]
    """What the evaluation function returned (reduced over processes)."""
    log: dict[str, float]
    """The scalars the nested callbacks logged for it (`best=<metric_key>/...`)."""


def chosen_slots(owner: str, runner: Any, slots: Any) -> list[tuple[str, tuple[str, ...]]]:
    """The slots to evaluate, each with the requests whose evaluation function serves it
    (`"loaded:<slot>"` first, then the request its `BestCheckpoint` makes in training)."""
    owners: dict[str, str] = {}
    overall: list[str] = []
    for callback in runner.find(BestCheckpoint):
        overall.append(callback.filename)
        for slot in (callback.filename, *callback.tolerance_slots()):
            owners[slot] = callback.filename
    known = [name for name, _ in runner.names.slot_kinds]
    if slots is None or slots == ALL:
        if not owners:
            raise ConfigError(
                f"{owner}: `slots` defaults to the best slot of each fcb.BestCheckpoint, but "
                f"the callbacks have none; pass slots=[...] naming the slots to evaluate "
                f"(the callbacks' slots: {known})."
            )
        names = overall if slots is None else list(owners)
    elif isinstance(slots, str):
        names = [slots]
    elif isinstance(slots, Sequence) and all(isinstance(s, str) for s in slots):
        names = list(dict.fromkeys(slots))
    else:
        raise ConfigError(
            f"{owner}: `slots` must be None (each BestCheckpoint's best slot), {ALL!r} (its "
            f"tolerance slots too), a slot name or a list of them, got {slots!r}."
        )
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"{owner}: `slots` names {unknown}, which the callbacks do not keep; their slots "
            f"are {known}."
        )
    return [(name, (loaded_request(name), owners.get(name, name))) for name in names]


def evaluate_slots(
    session: Any, directory: str, slots: Any, context: Any
) -> dict[str, EvaluatedSlot | None]:
    """Evaluate the checkpoint each chosen slot holds (see the module's docstring); a slot
    that holds no checkpoint is reported as `None`, not evaluated."""
    owner = f"{session.owner}.evaluate_checkpoints"
    chosen = chosen_slots(owner, session.runner, slots)
    engine = session.engine
    if session.store is not None:  # the checks' writes are committed first
        engine.settle()
        session.store.finish()
    processes = session.processes if session.started else engine.processes()
    directory = os.path.abspath(directory)
    manifest = read_manifest(directory, session.storage)
    history = session.history
    if history is None and session.record_history and processes.is_primary:
        history = HistoryLog(directory)  # appended to, as it is
    after = max(session.last_step, int(manifest.get("event_step", -1))) + 1
    # every slot is evaluated first, then the results are handed on: a slot that fails (no
    # evaluation function, a bad result) leaves the callbacks, summary and history as they
    # were, so the pass can be run again once fixed
    found: dict[str, tuple[int, dict[str, Any]] | None] = {}
    for slot, requests in chosen:
        record = manifest["slots"].get(slot)
        if record is None:
            logger.info("fcb: slot %s holds no checkpoint: it is not evaluated.", slot)
            found[slot] = None
            continue
        with engine.evaluated_model(directory, slot, manifest, context) as loaded:
            results = engine.run_evaluation(requests, loaded)
        if not isinstance(results, Mapping):
            raise MetricTypeError(
                f"{owner}: the evaluate function for slot {slot!r} must return a mapping from "
                f"metric name to scalar, got {type(results).__name__}: {results!r}."
            )
        checked = session.runner.host_metrics(results)  # scalars, before any collective
        found[slot] = int(record["step"]), processes.reduce_metrics(
            owner, checked, session.reduce
        )
    evaluated: dict[str, EvaluatedSlot | None] = {}
    before = session.runner.snapshot()
    try:  # a nested callback that refuses the results leaves every callback as it was
        for slot, requests in chosen:
            entry = found[slot]
            if entry is None:
                evaluated[slot] = None
                continue
            step, results = entry
            actions = session.runner.evaluated(requests[0], results, step=step)
            evaluated[slot] = EvaluatedSlot(
                step, {k: float(v) for k, v in results.items()},
                {k: float(v) for k, v in actions.log.items()},
            )
    except BaseException:
        session.runner.restore(before)
        raise
    for slot, result in evaluated.items():
        if result is None:
            continue
        scalars = {f"{slot}/{key}": value for key, value in result.results.items()}
        session.summary.update(scalars)
        if session.log is not None:
            session.log(after, {**scalars, **result.log})
        if history is not None:
            history.append({
                "step": result.step, "evaluated": slot, "results": json_metrics(result.results),
                "log": json_metrics(result.log),
            })
    return evaluated
