"""`fcb inspect`: a run's slots in a table, every checkpoint checked against the manifest
(size and CRC-32 for Torch runs, a full read back for orbax runs)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from .._errors import CheckpointCorruptError
from ._common import (
    CORRUPT_EXIT,
    UsageError,
    _fail,
    _find_manifest,
    _read_manifest,
    _size,
    _storage,
    _table,
    _value,
)


def _inspect(args: argparse.Namespace) -> int:
    directory = _find_manifest(args.run_dir)
    storage = _storage(directory)
    try:
        manifest = _read_manifest(directory, storage)
    except CheckpointCorruptError as error:
        _fail(args, str(error))
        return CORRUPT_EXIT
    check = _check_torch_file if storage == "torch" else _check_orbax_step
    problems: list[str] = []
    status: dict[str, tuple[str, int | None]] = {}
    size: int | None
    for relative, record in sorted(manifest["files"].items()):
        path = os.path.join(directory, relative)
        try:
            size = check(path, record)
            status[relative] = ("ok", size)
        except CheckpointCorruptError as error:
            status[relative] = ("CORRUPT", None)
            problems.append(str(error))
    notes = []
    rows = []
    for name, slot in sorted(manifest["slots"].items()):
        state, size = status.get(slot["file"], ("CORRUPT", None))
        link = slot.get("link")
        if link and state == "ok":
            link_path = os.path.join(directory, link)
            if not os.path.exists(link_path):
                notes.append(f"{link} is missing (the next run in this directory restores it)")
            elif not os.path.samefile(link_path, os.path.join(directory, slot["file"])):
                stale = _step_file_of(directory, link_path)
                if stale is not None:
                    # a commit interrupted after its manifest and before its links: the manifest
                    # and its files are intact, and the next open re-points the name
                    notes.append(
                        f"{link} still names {stale} (an interrupted commit); the slot's "
                        f"checkpoint is {slot['file']}, and the next run re-points the name"
                    )
                else:
                    try:
                        _check_torch_file(link_path, manifest["files"][slot["file"]])
                    except CheckpointCorruptError:
                        state = "CORRUPT"
                        problems.append(
                            f"{link_path} is not the checkpoint of step {slot['step']} that "
                            f"slot {name!r} holds ({slot['file']}): it was replaced or edited."
                        )
        rows.append([
            name, str(slot["step"]), _value(slot.get("value")), link or slot["file"],
            "-" if size is None else _size(size), state,
        ])
    print(f"run: {directory} (fcb.{storage}; last check at step {manifest.get('event_step')})")
    if rows:
        print(_table(["slot", "step", "metric", "file", "size", "check"], rows, {1, 2, 4}))
    else:
        print("no slot holds a checkpoint yet")
    resume = manifest.get("resume")
    if resume:
        line = f"resume point: step {resume['step']}"
        if resume.get("stop_message"):
            line += f" (the run stopped there: {resume['stop_message']})"
        print(line)
    for note in notes:
        print(f"note: {note}")
    total = sum(size or 0 for _, size in status.values())
    if problems:
        for problem in problems:
            _fail(args, problem)
        return CORRUPT_EXIT
    print(f"{len(status)} checkpoint{'s' if len(status) != 1 else ''} ({_size(total)}) match the "
          f"manifest.")
    return 0


def _step_file_of(directory: str, link_path: str) -> str | None:
    """The file under `steps/` that `link_path` is a hard link of, if any."""
    steps = os.path.join(directory, "steps")
    if not os.path.isdir(steps):
        return None
    for name in os.listdir(steps):
        candidate = os.path.join(steps, name)
        if os.path.isfile(candidate) and os.path.samefile(candidate, link_path):
            return f"steps/{name}"
    return None


def _check_torch_file(path: str, record: Mapping[str, Any]) -> int:
    from .._files import verify

    if "size" not in record or "crc32" not in record:
        raise CheckpointCorruptError(
            f"the manifest records no size and checksum for {path} (edited by hand?)."
        )
    verify(path, dict(record))
    return int(record["size"])


def _check_orbax_step(path: str, record: Mapping[str, Any]) -> int:
    try:
        import orbax.checkpoint as ocp

        from ..orbax._store import read_meta, read_step
    except ImportError as error:
        raise UsageError(
            f"this run was written by fcb.orbax; reading it needs orbax-checkpoint ({error}): "
            f"pip install -c constraints.txt 'fcb[jax]'."
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
