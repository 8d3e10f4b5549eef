"""The run manifest both adapters keep: slot -> step table, resume record, referenced steps.

Framework-agnostic rules, one copy each. An adapter stores each checkpointed step somewhere
(a Torch file, an orbax step directory) and names it by a *location*, a path relative to the
run directory. The manifest maps every slot to a step and its location, records the resume
point, and lists the locations it references with the adapter's own record for each. Anything
the manifest does not reference may be deleted, but only after the manifest is committed.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .._core import Actions
from .._errors import CheckpointCorruptError
from .._state_dict import json_number

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fcb.manifest"
MANIFEST_VERSION = 1
RESUME_SLOT = "last"
"""The slot whose step is the resume point: a run resumes where `last` was written."""

SLOT_KINDS = ("best", "top_k", "last", "tolerance")
"""What a slot holds (`fcb.ActionNames.slot_kinds`), recorded with each slot."""

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


def manifest_file(path: str | os.PathLike[str]) -> str:
    """The manifest of a run: `path` itself, or `path/manifest.json` for a run directory."""
    path = os.fspath(path)
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


def read_manifest(path: str | os.PathLike[str], storage: str | None = "torch") -> dict[str, Any]:
    """Load and check a manifest (its path, or the run directory holding it);
    [`fcb.CheckpointCorruptError`][] names what is wrong.

    `storage` is the adapter that must have written it (`"torch"` or `"orbax"`; `None`:
    either): the two store steps differently, so one cannot read the other's run directory.
    Every path the manifest holds must stay inside the run directory.
    """
    path = manifest_file(path)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} does not exist: not an fcb run directory (or no checkpoint was written)."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorruptError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointCorruptError(f"{path} is not an fcb manifest (format missing or wrong).")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointCorruptError(
            f"{path} has manifest version {manifest.get('version')!r}; this fcb reads "
            f"version {MANIFEST_VERSION}."
        )
    found = manifest.get("storage", "torch")
    if storage is not None and found != storage:
        raise CheckpointCorruptError(
            f"{path} belongs to a run written by fcb.{found}; open it with fcb.{found}, "
            f"not fcb.{storage}."
        )
    for key, kind in (("slots", dict), ("files", dict), ("archive", list)):
        if key not in manifest:
            raise CheckpointCorruptError(f"{path} has no {key!r} table.")
        if not isinstance(manifest[key], kind):
            raise CheckpointCorruptError(
                f"{path}: {key!r} must be a JSON {'object' if kind is dict else 'array'}, got "
                f"{type(manifest[key]).__name__}."
            )
    _check_structure(path, manifest)
    for name, slot in manifest["slots"].items():
        if slot.get("file") not in manifest["files"]:
            raise CheckpointCorruptError(
                f"{path}: slot {name!r} points at {slot.get('file')!r}, which the manifest's "
                f"file table does not list (edited by hand, or from another run?)."
            )
    return manifest


def _check_step(path: str, entry: str, value: Any, *, allow_empty: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (
        (-1 if allow_empty else 0) <= value < 2**31
    ):
        raise CheckpointCorruptError(
            f"{path}: {entry} must be a step number from 0 to 2**31 - 1, got {value!r}."
        )


def confined(path: str, entry: str, relative: Any, *, name_only: bool = False) -> str:
    """`relative` if it is a normalised relative path inside the run directory of the
    manifest `path` (symlinks resolved), else a `CheckpointCorruptError` naming `entry`."""
    directory = os.path.dirname(os.path.abspath(path))
    ok = (
        isinstance(relative, str)
        and relative
        and not os.path.isabs(relative)
        and "\\" not in relative
        and ".." not in relative.split("/")
        and posixpath.normpath(relative) == relative
        and not (name_only and "/" in relative)
    )
    if ok:
        root = os.path.realpath(directory)
        ok = os.path.realpath(os.path.join(directory, relative)).startswith(root + os.sep)
    if not ok:
        raise CheckpointCorruptError(
            f"{path}: {entry} is {relative!r}, which is not a "
            f"{'plain file name' if name_only else 'relative path'} inside the run directory "
            f"{directory}; fcb never reads, writes or deletes outside it (edited by hand?)."
        )
    return str(relative)


def _check_slots(path: str, where: str, slots: Any) -> None:
    if not isinstance(slots, dict):
        raise CheckpointCorruptError(f"{path}: {where} must be a JSON object, got {slots!r}.")
    for name, slot in slots.items():
        entry = f"{where}[{name!r}]"
        if not isinstance(slot, dict):
            raise CheckpointCorruptError(f"{path}: {entry} must be a JSON object, got {slot!r}.")
        for key in ("step", "file"):
            if key not in slot:
                raise CheckpointCorruptError(f"{path}: {entry} has no {key!r}.")
        _check_step(path, f"{entry}['step']", slot["step"])
        confined(path, f"{entry}['file']", slot["file"])
        if "link" in slot:
            confined(path, f"{entry}['link']", slot["link"], name_only=True)
        if slot.get("kind", "best") not in SLOT_KINDS:
            raise CheckpointCorruptError(
                f"{path}: {entry}['kind'] must be one of {SLOT_KINDS}, got {slot['kind']!r}."
            )


def _check_structure(path: str, manifest: dict[str, Any]) -> None:
    """Types, step ranges and path containment of every entry (a damaged or hostile
    manifest is refused before anything acts on it)."""
    _check_step(path, "'event_step'", manifest.get("event_step", -1), allow_empty=True)
    _check_slots(path, "slots", manifest["slots"])
    for relative, record in manifest["files"].items():
        entry = f"files[{relative!r}]"
        confined(path, "a key of 'files'", relative)
        if not isinstance(record, dict):
            raise CheckpointCorruptError(f"{path}: {entry} must be a JSON object, got {record!r}.")
        if "step" in record:
            _check_step(path, f"{entry}['step']", record["step"])
    for index, relative in enumerate(manifest["archive"]):
        confined(path, f"archive[{index}]", relative)
    resume = manifest.get("resume")
    if resume is not None:
        if not isinstance(resume, dict) or not {"step", "file", "slots"} <= set(resume):
            raise CheckpointCorruptError(
                f"{path}: 'resume' must be null or an object with 'step', 'file' and 'slots', "
                f"got {resume!r}."
            )
        _check_step(path, "resume['step']", resume["step"])
        confined(path, "resume['file']", resume["file"])
        _check_slots(path, "resume['slots']", resume["slots"])


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


def plan_checkpoints(
    actions: Actions,
    step: int,
    slot_models: Mapping[str, tuple[str, ...]],
    current: Mapping[str, int],
) -> Plan | None:
    """Read host actions; `None` when nothing is written and no slot changes.

    `current` is the slot -> step table the store holds now (empty slots omitted).
    """
    slots = {
        name: (int(s), float(actions.slot_values[name]), slot_models.get(name))
        for name, s in actions.slots.items()
    }
    wanted = {name: s for name, (s, _, _) in slots.items() if s >= 0}
    archive = bool(actions.archive)
    if not bool(actions.save) and not archive and wanted == dict(current):
        return None
    variants = {models for (s, _, models) in slots.values() if s == step}
    if archive:
        variants.add(None)
    return Plan(
        slots=slots,
        variants=variants,
        archive=archive,
        resume=RESUME_SLOT in slots and slots[RESUME_SLOT][0] == step,
        stop_message=actions.stop_message() if bool(actions.stop) else "",
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
    """Keep exactly the referenced records of `files`; return the manifest and the rest,
    which may be deleted once the manifest is committed."""
    keep = referenced(manifest)
    manifest["files"] = {location: files[location] for location in sorted(keep)}
    return manifest, set(files) - keep


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
