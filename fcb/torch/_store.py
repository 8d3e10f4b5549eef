"""A crash-safe store of Torch checkpoints: one file per step, stable slot names, a manifest."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import IO, Any, cast

import torch

from .._errors import CheckpointCorruptError, CheckpointWriteError
from .._files import (
    DirectoryLock,
    atomic_write,
    atomic_write_json,
    atomic_write_path,
    fsync_dir,
    link_atomic,
    remove_temporaries,
    verify,
)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fcb.manifest"
MANIFEST_VERSION = 1
STEPS_DIR = "steps"
SUFFIX = ".pt"
RESUME_SLOT = "last"
_STEP_FILE = re.compile(r"^step-(\d+)(\.[A-Za-z0-9._+=-]+)?\.(pt|ckpt)$")


def json_value(value: float) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def empty_manifest() -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "event_step": -1,
        "slots": {},
        "files": {},
        "archive": [],
        "resume": None,
        "callbacks": None,
    }


def read_manifest(path: str) -> dict[str, Any]:
    """Load and check a manifest; [`fcb.CheckpointCorruptError`][] names what is wrong."""
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
    for key in ("slots", "files", "archive"):
        if key not in manifest:
            raise CheckpointCorruptError(f"{path} has no {key!r} table.")
    for name, slot in manifest["slots"].items():
        if slot.get("file") not in manifest["files"]:
            raise CheckpointCorruptError(
                f"{path}: slot {name!r} points at {slot.get('file')!r}, which the manifest's "
                f"file table does not list (edited by hand, or from another run?)."
            )
    return manifest


def step_file(step: int, models: tuple[str, ...] | None, suffix: str = SUFFIX) -> str:
    """The path, relative to the store, of the file holding `step` (optionally a subset)."""
    variant = "" if not models else "." + "+".join(models)
    return f"{STEPS_DIR}/step-{step:08d}{variant}{suffix}"


class CheckpointStore:
    """Files of one run: `steps/step-NNNNNNNN.pt` (each step written once), one hard link per
    slot (`best_model.pt`, `last.pt`, ...), and `manifest.json`, the authority.

    Order of every commit: new step files (atomic) -> manifest (atomic) -> slot links ->
    deletion of files the new manifest no longer lists. A kill at any point leaves a manifest
    whose every file is complete; stale links, orphans and temporaries are repaired by `open`.
    """

    def __init__(self, directory: str, *, suffix: str = SUFFIX):
        self.directory = os.path.abspath(directory)
        self.suffix = suffix
        self.manifest = empty_manifest()
        self._lock = DirectoryLock(self.directory)
        self._pending: dict[str, dict[str, Any]] = {}
        self.bytes_written = 0
        self.files_written = 0

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST_NAME)

    def path(self, relative: str) -> str:
        return os.path.join(self.directory, relative)

    def open(self) -> None:
        try:
            os.makedirs(os.path.join(self.directory, STEPS_DIR), exist_ok=True)
        except OSError as error:
            raise CheckpointWriteError(
                f"cannot create the checkpoint directory {self.directory}: "
                f"{error.strerror or error}. Pass a writable dirpath."
            ) from error
        if not os.access(self.directory, os.W_OK):
            raise CheckpointWriteError(
                f"the checkpoint directory {self.directory} is not writable. Pass a writable "
                f"dirpath."
            )
        self._lock.acquire()
        remove_temporaries(self.directory)
        if os.path.exists(self.manifest_path):
            self.manifest = read_manifest(self.manifest_path)
            self._repair()

    def close(self) -> None:
        self._lock.release()

    def step_file(self, step: int, models: tuple[str, ...] | None) -> str:
        return step_file(step, models, self.suffix)

    def has(self, relative: str) -> bool:
        return relative in self.manifest["files"] or relative in self._pending

    def write(self, relative: str, step: int, models: tuple[str, ...] | None, payload: Any) -> None:
        """Write one step file atomically; it joins the manifest at the next commit."""
        record = atomic_write(
            self.path(relative), lambda f: torch.save(payload, cast(IO[bytes], f))
        )
        self._record(relative, step, models, record)

    def write_with(
        self,
        relative: str,
        step: int,
        models: tuple[str, ...] | None,
        save: Callable[[str], object],
    ) -> None:
        """Write one step file with `save(path)` (e.g. a Lightning Trainer's save_checkpoint)."""
        self._record(relative, step, models, atomic_write_path(self.path(relative), save))

    def _record(
        self, relative: str, step: int, models: tuple[str, ...] | None, record: dict[str, int]
    ) -> None:
        self._pending[relative] = {"step": step, "models": models, **record}
        self.bytes_written += record["size"]
        self.files_written += 1

    def commit(
        self,
        *,
        event_step: int,
        slots: Mapping[str, tuple[int, float, tuple[str, ...] | None]],
        archive: list[str],
        callbacks: Any,
        resume: bool,
        stop_message: str = "",
    ) -> None:
        files = {**self.manifest["files"], **self._pending}
        new_slots: dict[str, Any] = {}
        for name, (step, value, models) in slots.items():
            if step < 0:
                continue
            relative = self.step_file(step, models)
            if relative not in files:
                raise CheckpointCorruptError(
                    f"slot {name!r} must hold step {step}, whose file {relative} was never "
                    f"written in {self.directory}."
                )
            new_slots[name] = {
                "step": step,
                "file": relative,
                "link": name + self.suffix,
                "value": json_value(value),
            }
        manifest = dict(self.manifest)
        manifest["event_step"] = event_step
        manifest["slots"] = new_slots
        manifest["archive"] = sorted(set(manifest["archive"]) | set(archive))
        manifest["callbacks"] = callbacks
        if resume and RESUME_SLOT in new_slots:
            manifest["resume"] = {
                "step": event_step,
                "file": new_slots[RESUME_SLOT]["file"],
                "slots": new_slots,
                "stop_message": stop_message,  # non-empty: the run had stopped at this step
            }
        self._install(manifest, files)

    def _install(self, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        referenced = self._referenced(manifest)
        manifest["files"] = {rel: files[rel] for rel in sorted(referenced)}
        old_links = {slot["link"] for slot in self.manifest["slots"].values()}
        atomic_write_json(self.manifest_path, manifest)
        self.manifest, self._pending = manifest, {}
        self._refresh_links(old_links)
        self._delete_unlisted(set(files) - referenced)

    @staticmethod
    def _referenced(manifest: Mapping[str, Any]) -> set[str]:
        referenced = {slot["file"] for slot in manifest["slots"].values()}
        if manifest.get("resume"):
            referenced |= {slot["file"] for slot in manifest["resume"]["slots"].values()}
        return referenced | set(manifest["archive"])

    def _refresh_links(self, old_links: set[str]) -> None:
        current = set()
        for slot in self.manifest["slots"].values():
            link_atomic(self.path(slot["file"]), self.path(slot["link"]))
            current.add(slot["link"])
        for link in old_links - current:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(link))
        fsync_dir(self.directory)

    def _delete_unlisted(self, candidates: set[str]) -> None:
        for relative in candidates:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(relative))

    def _repair(self) -> None:
        """After a crash: drop step files the manifest does not list, re-point slot links."""
        listed = set(self.manifest["files"])
        steps_dir = os.path.join(self.directory, STEPS_DIR)
        orphans = {
            f"{STEPS_DIR}/{name}"
            for name in os.listdir(steps_dir)
            if _STEP_FILE.match(name) and f"{STEPS_DIR}/{name}" not in listed
        }
        self._delete_unlisted(orphans)
        for relative in listed:
            if not os.path.exists(self.path(relative)):
                raise CheckpointCorruptError(
                    f"{self.path(relative)} is listed in {self.manifest_path} but missing."
                )
        self._refresh_links(set())

    def reset_to(self, slots: Mapping[str, Any], files: Mapping[str, Any], resume: Any) -> None:
        """Make the manifest hold exactly `slots` (after a resume); delete later files."""
        all_files = {**self.manifest["files"], **files}
        manifest = dict(self.manifest)
        manifest["slots"] = dict(slots)
        manifest["resume"] = resume
        manifest["event_step"] = resume["step"]
        manifest["archive"] = [a for a in manifest["archive"] if a in all_files]
        self._install(manifest, all_files)

    def verify_all(self) -> None:
        for relative, record in self.manifest["files"].items():
            verify(self.path(relative), record)
