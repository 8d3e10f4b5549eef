"""A crash-safe store of Torch checkpoints: one file per step, stable slot names, a manifest."""

from __future__ import annotations

import contextlib
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
from .._manifest import (
    MANIFEST_NAME as MANIFEST_NAME,
    RESUME_SLOT as RESUME_SLOT,
    SlotRequest,
    empty_manifest,
    next_manifest,
    read_manifest as _read_manifest,
    reset_manifest,
    slot_records,
    with_files,
)

STEPS_DIR = "steps"
SUFFIX = ".pt"
_STEP_FILE = re.compile(r"^step-(\d+)(\.[A-Za-z0-9._+=-]+)?\.(pt|ckpt)$")


def read_manifest(path: str) -> dict[str, Any]:
    """Load and check the manifest of a Torch run; [`fcb.CheckpointCorruptError`][] names
    what is wrong."""
    return _read_manifest(path, storage="torch")


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
        slots: Mapping[str, SlotRequest],
        archive: list[str],
        callbacks: Any,
        resume: bool,
        stop_message: str = "",
    ) -> None:
        files = {**self.manifest["files"], **self._pending}
        new_slots = slot_records(
            slots,
            self.step_file,
            files,
            self.directory,
            extra=lambda name, models: {"link": name + self.suffix},
        )
        manifest = next_manifest(
            self.manifest,
            event_step=event_step,
            slots=new_slots,
            archive=archive,
            callbacks=callbacks,
            resume=resume,
            stop_message=stop_message,
        )
        self._install(manifest, files)

    def _install(self, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        manifest, unlisted = with_files(manifest, files)
        old_links = {slot["link"] for slot in self.manifest["slots"].values()}
        atomic_write_json(self.manifest_path, manifest)
        self.manifest, self._pending = manifest, {}
        self._refresh_links(old_links)
        self._delete_unlisted(unlisted)

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
        self._install(*reset_manifest(self.manifest, slots, files, resume))

    def verify_all(self) -> None:
        for relative, record in self.manifest["files"].items():
            verify(self.path(relative), record)
