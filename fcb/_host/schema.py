"""The manifest on disk: its constants, its seal (checksum), and the validation of every entry.

`read_manifest` checks the schema of every entry first (so a hand edit is named precisely),
then the seal, so damage the schema cannot see (a flipped digit of a step or a value) is
refused too. Every path a manifest holds must stay inside its run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from .._canonical import EncodedStateDict, canonical_json
from .._errors import CheckpointCorruptError
from .._files import atomic_write_json
from .._model_checkpoint import LAST_SLOT
from .._state_dict import FORMAT as STATE_DICT_FORMAT

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fcb.manifest"
MANIFEST_VERSION = 1
RESUME_SLOT = LAST_SLOT
"""The slot whose step is the resume point: a run resumes where `last` was written."""

SLOT_KINDS = ("best", "top_k", "last", "tolerance")
"""What a slot holds (`fcb.ActionNames.slot_kinds`), recorded with each slot."""

CHECKSUM_FIELD = "checksum"
CHECKSUM_ALGORITHM = "sha256"
UNSEALED_FIELDS = frozenset(
    {"format", "version", "storage", "event_step", "slots", "files", "archive", "resume",
     "callbacks"}
)
"""Every entry of a manifest written before manifests were sealed: an unsealed manifest with
another entry is damaged (e.g. the name of its `checksum` field)."""

NON_FINITE = ("nan", "inf", "-inf")
"""How a manifest spells a non-finite metric value (strict JSON has no NaN)."""


def manifest_file(path: str | os.PathLike[str]) -> str:
    """The manifest of a run: `path` itself, or `path/manifest.json` for a run directory."""
    path = os.fspath(path)
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


class _NotStrict(ValueError):
    """A number or constant fcb never writes (non-finite, or too long to read)."""


def _constant(name: str) -> Any:
    raise _NotStrict(f"{name} is not strict JSON; fcb spells non-finite numbers {NON_FINITE}")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrict(f"the number {_shown(text)} is out of range")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # longer than Python reads (sys.int_info.default_max_str_digits)
        raise _NotStrict(f"an integer of {len(text)} digits") from None


def _parse(path: str, data: bytes) -> Any:
    try:
        return json.loads(
            data.decode("utf-8"), parse_constant=_constant, parse_float=_float, parse_int=_int
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CheckpointCorruptError(f"{path} is not valid JSON ({reason}).") from None


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """The seal of a manifest: `"sha256:<hex>"` of its canonical JSON (sorted keys, no
    spaces, ASCII) without the `checksum` field. Formatting the JSON ignores (indentation,
    key order, escapes) does not change it; any change of a value does."""
    body = {key: value for key, value in manifest.items() if key != CHECKSUM_FIELD}
    canonical = canonical_json(body)  # the callbacks' state dict: its text, encoded once
    return f"{CHECKSUM_ALGORITHM}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """Record `manifest`'s checksum in it (after its last change) and return it.

    The checksum is that of the manifest as it will read back: JSON turns tuples into lists
    and keys into strings (which may sort differently), and the reader sees only that."""
    read_back = manifest if _reads_back_the_same(manifest) else json.loads(
        json.dumps(manifest, allow_nan=False)
    )
    manifest[CHECKSUM_FIELD] = manifest_checksum(read_back)
    return manifest


def _reads_back_the_same(value: Any) -> bool:
    """Whether every key in `value` is a `str`: then its canonical JSON is that of the
    manifest read back (a tuple is written as the list it reads back as), and `seal` needs
    no JSON round trip (the manifest's fields are all such; any other key takes the trip)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if type(key) is not str:
                    return False
                # an encoded state dict has only str keys (its text is that of the read-back)
                if isinstance(child, (dict, list, tuple)) and type(child) is not EncodedStateDict:
                    pending.append(child)
        else:
            pending.extend(c for c in item if isinstance(c, (dict, list, tuple)))
    return True


def write_manifest(path: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Seal `manifest` and write it atomically to `path` (a manifest file, or the run
    directory holding it): how a deliberate edit of a run's manifest is saved, so that
    `read_manifest` checks the edited entries instead of refusing the file as damaged."""
    atomic_write_json(manifest_file(path), seal(dict(manifest)))


def read_manifest(path: str | os.PathLike[str], storage: str | None = "torch") -> dict[str, Any]:
    """Load and check a manifest (its path, or the run directory holding it);
    [`fcb.CheckpointCorruptError`][] names what is wrong.

    `storage` is the adapter that must have written it (`"torch"` or `"orbax"`; `None`:
    either): the two store steps differently, so one cannot read the other's run directory.
    Every entry must have its type and range, every path must stay inside the run
    directory, and the manifest must match its checksum (when it has one).
    """
    path = manifest_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} does not exist: not an fcb run directory (or no checkpoint was written)."
        ) from None
    manifest = _parse(path, data)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointCorruptError(f"{path} is not an fcb manifest (format missing or wrong).")
    version = manifest.get("version")
    if isinstance(version, bool) or version != MANIFEST_VERSION:
        raise CheckpointCorruptError(
            f"{path} has manifest version {_shown(version)}; this fcb reads "
            f"version {MANIFEST_VERSION}."
        )
    found = manifest.get("storage", "torch")
    if not isinstance(found, str):
        raise CheckpointCorruptError(
            f"{path}: 'storage' must be the name of the fcb adapter that wrote the run "
            f"('torch' or 'orbax'), got {_shown(found)}."
        )
    for key, kind in (("slots", dict), ("files", dict), ("archive", list)):
        if key not in manifest:
            raise CheckpointCorruptError(f"{path} has no {key!r} table.")
        if not isinstance(manifest[key], kind):
            raise CheckpointCorruptError(
                f"{path}: {key!r} must be a JSON {'object' if kind is dict else 'array'}, got "
                f"{type(manifest[key]).__name__}."
            )
    _check_structure(path, manifest, found)
    _check_listed(path, manifest)
    _check_checksum(path, manifest)
    if storage is not None and found != storage:
        raise CheckpointCorruptError(
            f"{path} belongs to a run written by fcb.{found}; open it with fcb.{found}, "
            f"not fcb.{storage}."
        )
    return manifest


def _shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, shortened: a damaged entry may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]} ...{text[-1]}"


def _check_listed(path: str, manifest: Mapping[str, Any]) -> None:
    """Every location the manifest keeps (its slots, the resume point's slots, the archive)
    is in its file table, with the adapter's record of it."""
    files = manifest["files"]
    resume = manifest.get("resume") or {}
    entries = [(f"slot {name!r}", slot) for name, slot in manifest["slots"].items()] + [
        (f"resume['slots'][{name!r}]", slot) for name, slot in resume.get("slots", {}).items()
    ]
    for entry, slot in entries:
        if slot["file"] not in files:
            raise CheckpointCorruptError(
                f"{path}: {entry} points at {slot['file']!r}, which the manifest's file table "
                f"does not list (edited by hand, or from another run?)."
            )
    for index, relative in enumerate(manifest["archive"]):
        if relative not in files:
            raise CheckpointCorruptError(
                f"{path}: archive[{index}] is {relative!r}, which the manifest's file table "
                f"does not list (edited by hand, or from another run?)."
            )


def _check_checksum(path: str, manifest: Mapping[str, Any]) -> None:
    if CHECKSUM_FIELD not in manifest:  # written before manifests were sealed
        unknown = sorted(set(manifest) - UNSEALED_FIELDS)
        if unknown:
            raise CheckpointCorruptError(
                f"{path} has no {CHECKSUM_FIELD!r} and an entry {_shown(unknown[0])} that "
                f"fcb never writes: it changed after fcb wrote it (damaged on disk, or "
                f"edited by hand). Restore the run directory from a copy."
            )
        return
    recorded = manifest[CHECKSUM_FIELD]
    try:
        matches = recorded == manifest_checksum(manifest)
    except RecursionError:  # nested deeper than fcb writes: cannot be what it wrote
        matches = False
    if not matches:
        raise CheckpointCorruptError(
            f"{path} changed after fcb wrote it: its content does not match its "
            f"{CHECKSUM_FIELD!r} {_shown(recorded)} (damaged on disk, or edited by hand). "
            f"Restore the run directory from a copy; after a deliberate edit, save the "
            f"manifest with fcb._host.manifest.write_manifest, which seals it again."
        )


def _check_int(path: str, entry: str, value: Any, low: int, high: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointCorruptError(f"{path}: {entry} must be {what}, got {_shown(value)}.")


def _check_step(path: str, entry: str, value: Any, *, allow_empty: bool = False) -> None:
    _check_int(
        path, entry, value, -1 if allow_empty else 0, 2**31 - 1,
        f"a step number from {-1 if allow_empty else 0} to 2**31 - 1",
    )


def _check_object(path: str, entry: str, value: Any, required: tuple[str, ...] = ()) -> None:
    if not isinstance(value, dict):
        raise CheckpointCorruptError(
            f"{path}: {entry} must be a JSON object, got {_shown(value)}."
        )
    for key in required:
        if key not in value:
            raise CheckpointCorruptError(f"{path}: {entry} has no {key!r}.")


def _check_models(path: str, entry: str, value: Any) -> None:
    if value is not None and not (
        isinstance(value, list) and all(isinstance(name, str) and name for name in value)
    ):
        raise CheckpointCorruptError(
            f"{path}: {entry} must be null (every submodule) or a list of submodule names, "
            f"got {_shown(value)}."
        )


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _check_value(path: str, entry: str, value: Any) -> None:
    if not _finite(value) and value not in NON_FINITE:
        raise CheckpointCorruptError(
            f"{path}: {entry} must be a metric value (a finite number, or one of "
            f"{NON_FINITE}), got {_shown(value)}."
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


SLOT_FIELDS = {"torch": ("step", "file", "link", "value")}
"""What a slot records besides its kind, per storage (others: step, file and value)."""
FILE_FIELDS = {"torch": ("size", "crc32"), "orbax": ("step", "models")}
"""What a storage records for each location it lists (a Torch file's step is checked against
the file's own record when present)."""


def _check_shards(path: str, entry: str, shards: Any) -> None:
    if not isinstance(shards, dict) or not shards:
        raise CheckpointCorruptError(
            f"{path}: {entry}['shards'] must be a non-empty JSON object (file name -> size and "
            f"CRC-32), got {_shown(shards)}."
        )
    for name, record in shards.items():
        where = f"{entry}['shards'][{name!r}]"
        confined(path, f"a key of {entry}['shards']", name, name_only=True)
        _check_object(path, where, record, ("size", "crc32"))
        _check_int(path, f"{where}['size']", record["size"], 0, 2**63 - 1,
                   "a size in bytes from 0 to 2**63 - 1")
        _check_int(path, f"{where}['crc32']", record["crc32"], 0, 2**32 - 1,
                   "a CRC-32 from 0 to 2**32 - 1")


def _check_slots(path: str, where: str, slots: Any, storage: str) -> None:
    if not isinstance(slots, dict):
        raise CheckpointCorruptError(
            f"{path}: {where} must be a JSON object, got {_shown(slots)}."
        )
    for name, slot in slots.items():
        entry = f"{where}[{name!r}]"
        _check_object(path, entry, slot, SLOT_FIELDS.get(storage, ("step", "file", "value")))
        _check_step(path, f"{entry}['step']", slot["step"])
        confined(path, f"{entry}['file']", slot["file"])
        if "link" in slot:
            confined(path, f"{entry}['link']", slot["link"], name_only=True)
        _check_value(path, f"{entry}['value']", slot["value"])
        kind = slot.get("kind", "best")
        if not isinstance(kind, str) or kind not in SLOT_KINDS:
            raise CheckpointCorruptError(
                f"{path}: {entry}['kind'] must be one of {SLOT_KINDS}, got {_shown(kind)}."
            )
        if "models" in slot:
            _check_models(path, f"{entry}['models']", slot["models"])


def _check_structure(path: str, manifest: dict[str, Any], storage: str) -> None:
    """Types, ranges and path containment of every entry, by the schema of the `storage`
    that wrote it (a damaged or hostile manifest is refused before anything acts on it)."""
    _check_step(path, "'event_step'", manifest.get("event_step", -1), allow_empty=True)
    _check_slots(path, "slots", manifest["slots"], storage)
    for relative, record in manifest["files"].items():
        entry = f"files[{relative!r}]"
        confined(path, "a key of 'files'", relative)
        shards = record.get("shards") if isinstance(record, dict) else None
        # a sharded step (a directory) records each of its files instead of one size and CRC
        _check_object(path, entry, record, ("shards",) if shards is not None and storage ==
                      "torch" else FILE_FIELDS.get(storage, ()))
        if shards is not None:
            _check_shards(path, entry, shards)
        if "step" in record:
            _check_step(path, f"{entry}['step']", record["step"])
        if "size" in record:
            _check_int(path, f"{entry}['size']", record["size"], 0, 2**63 - 1,
                       "a size in bytes from 0 to 2**63 - 1")
        if "crc32" in record:
            _check_int(path, f"{entry}['crc32']", record["crc32"], 0, 2**32 - 1,
                       "a CRC-32 from 0 to 2**32 - 1")
        if "models" in record:
            _check_models(path, f"{entry}['models']", record["models"])
    for index, relative in enumerate(manifest["archive"]):
        confined(path, f"archive[{index}]", relative)
    resume = manifest.get("resume")
    if resume is not None:
        if not isinstance(resume, dict) or not {"step", "file", "slots"} <= set(resume):
            raise CheckpointCorruptError(
                f"{path}: 'resume' must be null or an object with 'step', 'file' and 'slots', "
                f"got {_shown(resume)}."
            )
        _check_step(path, "resume['step']", resume["step"])
        confined(path, "resume['file']", resume["file"])
        _check_slots(path, "resume['slots']", resume["slots"], storage)
        if not isinstance(resume.get("stop_message", ""), str):
            raise CheckpointCorruptError(
                f"{path}: resume['stop_message'] must be a string (empty: the run had not "
                f"stopped), got {_shown(resume['stop_message'])}."
            )
    callbacks = manifest.get("callbacks")
    if callbacks is not None and not (
        isinstance(callbacks, dict) and callbacks.get("format") == STATE_DICT_FORMAT
    ):
        raise CheckpointCorruptError(
            f"{path}: 'callbacks' must be null or the callbacks' state dict (an object with "
            f"format {STATE_DICT_FORMAT!r}, made by fcb.state_dict), got {_shown(callbacks)}."
        )
