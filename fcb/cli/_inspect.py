"""`fcb inspect`: a run's slots in a table, every checkpoint checked against the manifest
(size and CRC-32 for Torch runs, a full read back for orbax runs). A run being written is
checked as one snapshot (`fcb._host.live`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from .._errors import CheckpointCorruptError, CheckpointError
from .._host.live import read_live, writer_pid
from .._host.manifest import read_manifest
from ._common import (
    CORRUPT_EXIT,
    UsageError,
    _fail,
    _find_manifest,
    _install_hint,
    _size,
    _storage,
    _table,
    _value,
)


class _Report(NamedTuple):
    manifest: dict[str, Any]
    rows: list[list[str]]
    status: dict[str, tuple[str, int | None]]
    problems: list[str]
    notes: list[str]
    failed: list[str]
    """The locations whose check failed ("" for a slot's name)."""


def _inspect(args: argparse.Namespace) -> int:
    directory = _find_manifest(args.run_dir)
    storage = _storage(directory)
    live = writer_pid(directory)
    try:
        # a run being written is read as one snapshot: a problem is reported only when no
        # commit happened while the files were checked; otherwise they are checked again
        report = read_live(
            directory, storage, lambda manifest: _check(directory, storage, manifest, live),
            changed_ok=lambda report: _settled(directory, storage, report),
        )
    except CheckpointError as error:
        _fail(args, str(error))
        return CORRUPT_EXIT
    manifest = report.manifest
    writing = "" if live is None else f"; being written by process {live}"
    print(
        f"run: {directory} (fcb.{storage}; last check at step {manifest.get('event_step')}"
        f"{writing})"
    )
    if report.rows:
        print(_table(["slot", "step", "metric", "file", "size", "check"], report.rows, {1, 2, 4}))
    else:
        print("no slot holds a checkpoint yet")
    resume = manifest.get("resume")
    if resume:
        line = f"resume point: step {resume['step']}"
        if resume.get("stop_message"):
            line += f" (the run stopped there: {resume['stop_message']})"
        print(line)
    evaluated = _evaluated(directory, manifest)
    if evaluated:
        print("evaluated after training (history.jsonl; the nested callbacks' scalars after |):")
        print(_table(["slot", "step", "results"], evaluated, {1}))
    for note in report.notes:
        print(f"note: {note}")
    total = sum(size or 0 for _, size in report.status.values())
    if report.problems:
        for problem in report.problems:
            _fail(args, problem)
        return CORRUPT_EXIT
    count = len(report.status)
    print(f"{count} checkpoint{'s' if count != 1 else ''} ({_size(total)}) match the manifest.")
    return 0


def _evaluated(directory: str, manifest: Mapping[str, Any]) -> list[list[str]]:
    """The slots evaluated after training, as the history records them (the latest
    evaluation of each slot): slot, step (marked when the slot holds another step now),
    results."""
    from .._history import read_records
    from .._host.rundir import find_history

    path = find_history(directory)
    if path is None:
        return []
    latest: dict[str, list[str]] = {}
    for record in read_records(path, decode=False):
        slot = record.get("evaluated")
        if not isinstance(slot, str) or not isinstance(record.get("results"), dict):
            continue
        scalars = [f"{k} {_value(v)}" for k, v in sorted(record["results"].items())]
        logged = [f"{k} {_value(v)}" for k, v in sorted((record.get("log") or {}).items())]
        held = manifest["slots"].get(slot, {}).get("step")
        step = str(record.get("step")) + (
            "" if held == record.get("step") else f" (the slot holds {held} now)"
        )
        latest[slot] = [
            slot, step, ", ".join(scalars) + (" | " if logged else "")
            + ", ".join(logged),
        ]
    return list(latest.values())


def _settled(directory: str, storage: str, report: _Report) -> bool:
    """Whether a report holds although a commit happened meanwhile: every location that
    failed is still listed as it was (a writer deletes a location only after a manifest
    without it is committed, so its failure was not the writer's doing)."""
    if not report.failed:
        return True
    if "" in report.failed:
        return False  # a slot's name: the writer may have been re-pointing it
    try:
        current = read_manifest(directory, storage)
    except CheckpointError:
        return False
    return all(current["files"].get(r) == report.manifest["files"][r] for r in report.failed)


def _check(
    directory: str, storage: str, manifest: dict[str, Any], live: int | None
) -> _Report:
    """Every file of `manifest` checked; a file that cannot be read is a problem."""
    check = _check_torch_file if storage == "torch" else _check_orbax_step
    problems: list[str] = []
    failed: list[str] = []
    status: dict[str, tuple[str, int | None]] = {}
    size: int | None
    for relative, record in sorted(manifest["files"].items()):
        path = os.path.join(directory, relative)
        try:
            size = check(path, record)
            status[relative] = ("ok", size)
        except (CheckpointCorruptError, OSError) as error:
            status[relative] = ("CORRUPT", None)
            problems.append(_problem(path, error))
            failed.append(relative)
    notes = []
    rows = []
    for name, slot in sorted(manifest["slots"].items()):
        state, size = status.get(slot["file"], ("CORRUPT", None))
        link = slot.get("link")
        if link and state == "ok":
            try:
                note = _check_link(directory, name, slot, manifest, live)
            except (CheckpointCorruptError, OSError) as error:
                state = "CORRUPT"
                problems.append(_problem(os.path.join(directory, link), error))
                failed.append("")
            else:
                if note:
                    notes.append(note)
        rows.append([
            name, str(slot["step"]), _value(slot.get("value")), link or slot["file"],
            "-" if size is None else _size(size), state,
        ])
    return _Report(manifest, rows, status, problems, notes, failed)


def _problem(path: str, error: BaseException) -> str:
    if isinstance(error, OSError):
        return f"{path} cannot be read ({error.strerror or error})."
    return str(error)


def _check_link(
    directory: str, name: str, slot: dict[str, Any], manifest: dict[str, Any], live: int | None
) -> str | None:
    """A note about a slot's name, or a `CheckpointCorruptError` when it names other bytes."""
    link = slot["link"]
    link_path = os.path.join(directory, link)
    if not os.path.exists(link_path):
        return f"{link} is missing (the next run in this directory restores it)"
    if os.path.samefile(link_path, os.path.join(directory, slot["file"])):
        return None
    stale = _step_file_of(directory, link_path)
    if stale is not None:
        # a commit interrupted (or, in a run being written, in progress) after its manifest
        # and before its links: the manifest and its files are intact
        if live is not None:
            return (
                f"{link} still names {stale}: the writer re-points it right after the commit "
                f"it is in; the slot's checkpoint is {slot['file']}"
            )
        return (
            f"{link} still names {stale} (an interrupted commit); the slot's checkpoint is "
            f"{slot['file']}, and the next run re-points the name"
        )
    try:
        _check_torch_file(link_path, manifest["files"][slot["file"]])
    except CheckpointCorruptError:
        raise CheckpointCorruptError(
            f"{link_path} is not the checkpoint of step {slot['step']} that slot {name!r} "
            f"holds ({slot['file']}): it was replaced or edited."
        ) from None
    return None


def _step_file_of(directory: str, link_path: str) -> str | None:
    """The file under `steps/` that `link_path` is a hard link of, if any."""
    steps = os.path.join(directory, "steps")
    if not os.path.isdir(steps):
        return None
    for name in os.listdir(steps):
        candidate = os.path.join(steps, name)
        try:
            if os.path.isfile(candidate) and os.path.samefile(candidate, link_path):
                return f"steps/{name}"
        except FileNotFoundError:
            continue  # deleted by the writer meanwhile
    return None


def _check_torch_file(path: str, record: Mapping[str, Any]) -> int:
    from .._files import verify_location

    if "shards" not in record and ("size" not in record or "crc32" not in record):
        raise CheckpointCorruptError(
            f"the manifest records no size and checksum for {path} (edited by hand?)."
        )
    return verify_location(path, record)


def _check_orbax_step(path: str, record: Mapping[str, Any]) -> int:
    try:
        import orbax.checkpoint as ocp

        from ..orbax._store import read_meta, read_step
    except ImportError as error:
        raise UsageError(
            f"this run was written by fcb.orbax; reading it needs orbax-checkpoint ({error}): "
            f"{_install_hint('jax')}."
        ) from None
    if not os.path.isdir(path):
        raise CheckpointCorruptError(f"{path} is missing (the manifest records it).")
    absolute = os.path.abspath(path)  # orbax reads absolute paths only
    if not ocp.utils.is_checkpoint_finalized(absolute):
        raise CheckpointCorruptError(f"{path} is not a committed orbax checkpoint.")
    try:
        meta = read_meta(absolute)
        if meta.get("step") not in (None, record.get("step")):
            raise CheckpointCorruptError(
                f"{path} holds step {meta.get('step')}, the manifest records {record.get('step')}."
            )
        read_step(absolute, None, with_meta=False)  # every array must decode
    except CheckpointCorruptError:
        raise
    except Exception as error:  # orbax / tensorstore raise many types for damaged files
        raise CheckpointCorruptError(
            f"{path} cannot be read back ({type(error).__name__}: {str(error)[:200]})."
        ) from None
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )
