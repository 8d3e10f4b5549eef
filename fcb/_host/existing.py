"""What becomes of a run an adapter's directory holds, and the state it resumes from."""

from __future__ import annotations

import logging
import os
from typing import Any

from .._errors import ConfigError, RunExistsError
from .._history import read_records
from .._resume_change import resume_with_changes
from .processes import ProcessGroup
from .rundir import find_history, find_run
from .store import ManifestStore

logger = logging.getLogger("fcb")

EXISTING_RUN = ("resume", "start_over", "error")
"""What an adapter does with a run its directory already holds (`existing_run`):
`"resume"` (default) continues it from its resume point (a directory holding nothing
starts a new run), `"start_over"` replaces it, `"error"` raises `fcb.RunExistsError`. A
run that cannot be resumed is replaced only by `"start_over"`."""


def check_existing_run(owner: str, value: Any) -> str:
    if value not in EXISTING_RUN:
        raise ConfigError(
            f"{owner}: `existing_run` must be one of {list(EXISTING_RUN)}, got "
            f"existing_run = {value!r}. Use 'resume' to continue a run the directory holds, "
            f"'start_over' to replace it."
        )
    return str(value)


def existing_run_source(
    owner: str, processes: ProcessGroup, store: ManifestStore | None, dirpath: str,
    resume_from: str | None, existing_run: str,
) -> str | None:
    """What becomes of the run `dirpath` holds: the run to resume from (`None`: a new
    run), after replacing it when asked. Never replaced unless `existing_run` says so."""
    manifest = store.manifest if store is not None else None
    held = processes.any(bool(manifest and (manifest["files"] or manifest["resume"])))
    resumable = processes.any(bool(manifest and manifest["resume"]))
    last = -1 if not manifest or not manifest["resume"] else int(manifest["resume"]["step"])
    last = max(processes.reduce_metrics(owner, {"last": last}, "max")["last"], -1)
    directory = os.path.abspath(dirpath)
    into_other = resume_from is not None and os.path.abspath(
        find_run(resume_from) or resume_from
    ) != directory
    if not held or (resume_from is not None and not into_other):
        return resume_from
    if existing_run == "start_over":
        processes.on_primary(lambda: store.start_over() if store is not None else None)
        return resume_from
    what = (
        f"a run resumable at step {int(last)}" if resumable
        else "a run with no resumable checkpoint (no `last` slot)"
    )
    if resume_from is None and existing_run == "resume" and resumable:
        logger.info(
            "fcb: %s holds %s; resuming it (existing_run='resume'; pass "
            "existing_run='start_over' to replace it).", directory, what,
        )
        return directory
    if into_other:
        reason = f"resuming the run in {resume_from} into it would replace it."
    elif existing_run == "error":
        reason = "existing_run='error' refuses to use it."
    else:
        reason = "it cannot be resumed, and a run is never replaced implicitly."
    options = "existing_run='start_over' to replace it, or choose another dirpath."
    if existing_run == "error" and resumable:
        options = "existing_run='resume' to continue it, " + options
    raise RunExistsError(f"{owner}: {directory} holds {what}; {reason} Pass {options}")


def resumed_state(
    owner: str, callbacks: Any, saved: Any, source: str, step: int
) -> tuple[Any, bool | None]:
    """The callbacks' state a run resumes from, and whether it is stopped (`None`: as
    saved): the saved state,
    or, when a numeric setting changed since it was saved (a larger patience...), the state
    the current settings would have had over the run's recorded checks (its history up to
    `step`), which may un-stop the run. Each change and its effect is logged."""
    found = find_history(source)
    history = [] if found is None else [
        record for record in read_records(found)
        if "metrics" in record and record.get("step", -1) <= step
    ]
    state, report = resume_with_changes(callbacks, saved, history)
    for line in report.lines:
        logger.warning("fcb: %s resumes with changed settings: %s", owner, line)
    return state, report.stopped if report.rebuilt else None
