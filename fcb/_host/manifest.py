"""The run manifest both adapters keep: slot -> step table, resume record, referenced steps.

Framework-agnostic rules, one copy each. An adapter stores each checkpointed step somewhere
(a Torch file, an orbax step directory) and names it by a *location*, a path relative to the
run directory. The manifest maps every slot to a step and its location, records the resume
point, and lists the locations it references with the adapter's own record for each. Anything
the manifest does not reference may be deleted, but only after the manifest is committed.

Every manifest is sealed as it is written (`with_files`, which every commit passes through);
its format, seal and validation live in `fcb._host.schema`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .._core import Actions, StopReason
from .._errors import CheckpointCorruptError
from .._state_dict import json_number
from .schema import (
    CHECKSUM_FIELD as CHECKSUM_FIELD,
    MANIFEST_FORMAT as MANIFEST_FORMAT,
    MANIFEST_NAME as MANIFEST_NAME,
    MANIFEST_VERSION as MANIFEST_VERSION,
    RESUME_SLOT as RESUME_SLOT,
    SLOT_KINDS as SLOT_KINDS,
    confined as confined,
    manifest_checksum as manifest_checksum,
    manifest_file as manifest_file,
    read_manifest as read_manifest,
    seal,
    write_manifest as write_manifest,
)

RESUMABLE_STOPS = (StopReason.PREEMPTED, StopReason.TIME_LIMIT)
"""Stops after which the run is resumable and a relaunch trains on."""

Models = tuple[str, ...] | None
"""The submodules a slot saves (`None`: everything)."""

SlotRequest = tuple[int, float, Models]
"""What a slot must hold after a check: `(step, metric value, models)`; step -1 is empty."""


def json_value(value: Any) -> float | str:
    """A Python float, with NaN and ±inf spelled `"nan"`, `"inf"`, `"-inf"` (strict JSON)."""
    return json_number(float(value))


def json_metrics(metrics: Mapping[str, Any]) -> dict[str, float | str]:
    """Metrics as JSON-safe Python values, keyed by `str(name)`."""
    return {str(name): json_value(value) for name, value in metrics.items()}


def empty_manifest(**extra: Any) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "event_step": -1,
        "slots": {},
        "files": {},
        "archive": [],
        "resume": None,
        "callbacks": None,
        **extra,
    }


class Plan(NamedTuple):
    """What one check asks of the store: the slot table, what to write, and the records."""

    slots: dict[str, SlotRequest]
    variants: set[Models]
    """The variants of the current step to write: `None` (everything) and/or submodule sets."""
    archive: bool
    resume: bool
    """The current step becomes the resume point (`last` holds it)."""
    stop_message: str
    """Non-empty when the check stopped the run (recorded with the resume point)."""
    history: dict[str, Any] | None = None
    """The check's history line, recorded with the resume point: a kill between the commit
    and the history's append must not leave a resumed history without it."""


def _holds(slots: Mapping[str, Any], current: Mapping[str, int]) -> bool:
    """Whether the slot table `slots` asks for exactly the steps `current` holds."""
    held = 0
    for name, step in slots.items():
        wanted = int(step)
        if wanted >= 0:
            if current.get(name) != wanted:
                return False
            held += 1
    return held == len(current)


def plan_checkpoints(
    actions: Actions,
    step: int,
    slot_models: Mapping[str, tuple[str, ...]],
    current: Mapping[str, int],
) -> Plan | None:
    """Read host actions; `None` when nothing is written and no slot changes.

    `current` is the slot -> step table the store holds now (empty slots omitted).
    """
    archive = bool(actions.archive)
    if not archive and not bool(actions.save) and _holds(actions.slots, current):
        return None
    values = actions.slot_values
    slots = {
        name: (int(s), float(values[name]), slot_models.get(name))
        for name, s in actions.slots.items()
    }
    variants = {models for (s, _, models) in slots.values() if s == step}
    if archive:
        variants.add(None)
    return Plan(
        slots=slots,
        variants=variants,
        archive=archive,
        resume=RESUME_SLOT in slots and slots[RESUME_SLOT][0] == step,
        # a stop that a relaunch trains on from (a time limit) is not recorded as the end
        stop_message=actions.stop_message()
        if bool(actions.stop) and int(actions.stop_reason) not in RESUMABLE_STOPS
        else "",
    )


def slot_records(
    slots: Mapping[str, SlotRequest],
    location: Callable[[int, Models], str],
    files: Mapping[str, Any],
    directory: str,
    extra: Callable[[str, Models], dict[str, Any]] = lambda name, models: {},
) -> dict[str, dict[str, Any]]:
    """The manifest's slot table: each non-empty slot's step, location and value.

    Every location must be among `files` (written before or at this check); a slot asking
    for a step that was never written is an error, not a dangling record.
    """
    records: dict[str, dict[str, Any]] = {}
    for name, (step, value, models) in slots.items():
        if step < 0:
            continue
        relative = location(step, models)
        if relative not in files:
            raise CheckpointCorruptError(
                f"slot {name!r} must hold step {step}, whose checkpoint {relative} was never "
                f"written in {directory}."
            )
        records[name] = {
            "step": step,
            "file": relative,
            **extra(name, models),
            "value": json_value(value),
        }
    return records


def next_manifest(
    manifest: Mapping[str, Any],
    *,
    event_step: int,
    slots: dict[str, dict[str, Any]],
    archive: list[str],
    callbacks: Any,
    resume: bool,
    stop_message: str = "",
    history: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest after a check (its file table is trimmed by `with_files`)."""
    new = dict(manifest)
    new["event_step"] = event_step
    new["slots"] = slots
    new["archive"] = sorted(set(new["archive"]) | set(archive))
    new["callbacks"] = callbacks
    if resume and RESUME_SLOT in slots:
        new["resume"] = {
            "step": event_step,
            "file": slots[RESUME_SLOT]["file"],
            "slots": slots,
            "stop_message": stop_message,  # non-empty: the run had stopped at this step
            **({"history": dict(history)} if history is not None else {}),
        }
    return new


def referenced(manifest: Mapping[str, Any]) -> set[str]:
    """Every location the manifest needs: slots, the resume record's slots, the archive."""
    locations = {slot["file"] for slot in manifest["slots"].values()}
    if manifest.get("resume"):
        locations |= {slot["file"] for slot in manifest["resume"]["slots"].values()}
    return locations | set(manifest["archive"])


def with_files(
    manifest: dict[str, Any], files: Mapping[str, Any]
) -> tuple[dict[str, Any], set[str]]:
    """Keep exactly the referenced records of `files`; return the manifest, sealed (every
    manifest written passes here, last), and the rest, which may be deleted once the manifest
    is committed."""
    keep = referenced(manifest)
    unlisted = sorted(keep - set(files))
    if unlisted:  # read_manifest refuses such a manifest; never write one
        raise CheckpointCorruptError(
            f"the manifest references {unlisted[0]}, of which no record is known (written "
            f"in no check, and listed by no manifest read)."
        )
    manifest["files"] = {location: files[location] for location in sorted(keep)}
    return seal(manifest), set(files) - keep


def reset_manifest(
    manifest: Mapping[str, Any],
    slots: Mapping[str, Any],
    files: Mapping[str, Any],
    resume: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest of a run resumed from `resume`: exactly its slots; later steps unlisted.

    Returns the manifest and every known file record (pass both to `with_files`).
    """
    all_files = {**manifest["files"], **files}
    new = dict(manifest)
    new["slots"] = dict(slots)
    new["resume"] = dict(resume)
    new["event_step"] = resume["step"]
    new["archive"] = [a for a in new["archive"] if a in all_files]
    return new, all_files
