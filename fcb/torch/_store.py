"""A crash-safe store of Torch checkpoints: one file per step, stable slot names, a manifest."""

from __future__ import annotations

import errno
import logging
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

logger = logging.getLogger("fcb")


def _reason(error: BaseException) -> str:
    """The operating system's words for a failure (under fcb's wrapping error, if any)."""
    cause = error.__cause__ if isinstance(error, CheckpointWriteError) else error
    return str(getattr(cause, "strerror", None) or cause)


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

    A failure before the manifest's rename raises [`fcb.CheckpointWriteError`][]. After it the
    check has happened, so a failure to re-point a name or delete a file is logged (logger
    `fcb`, WARNING) instead: a name that cannot be re-pointed is removed rather than left
    serving another step, and every later commit and `open` retry what is left.
    """

    def __init__(self, directory: str, *, suffix: str = SUFFIX):
        self.directory = os.path.abspath(directory)
        self.suffix = suffix
        self.manifest = empty_manifest()
        self._lock = DirectoryLock(self.directory)
        self._pending: dict[str, dict[str, Any]] = {}
        self._leftover: set[str] = set()
        """Files and names to delete that a failed deletion left behind (retried)."""
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

    def start_over(self) -> None:
        """Begin a new run in a directory that holds another: the new run must not reuse a
        step file of the old one (same step, other weights), and a kill must never leave the
        old manifest listing a file the new run rewrote. So an empty manifest is committed
        first, then the old run's step files and slot names are deleted."""
        old = self.manifest
        if not (old["files"] or old["resume"]):
            return
        logger.warning(
            "fcb: %s held a run (%d checkpoints); a new run starts there and replaces it. "
            "Pass resume_from=... to continue a run instead.",
            self.directory,
            len(old["files"]),
        )
        self._install(empty_manifest(), dict(old["files"]))

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
        # Committed: the check has happened. Raising from here on would make the caller undo
        # a check the manifest records, so what follows only warns.
        self.manifest, self._pending = manifest, {}
        self._refresh_links(old_links)
        self._delete_unlisted(unlisted)

    def _refresh_links(self, old_links: set[str]) -> None:
        current = {slot["link"] for slot in self.manifest["slots"].values()}
        for slot in self.manifest["slots"].values():
            link = self.path(slot["link"])
            try:
                link_atomic(self.path(slot["file"]), link)
            except (CheckpointWriteError, OSError) as error:
                # A name must never serve another step's checkpoint: drop it until repaired
                # (load_checkpoint finds the slot's file through the manifest meanwhile).
                if not self._remove(slot["link"]):
                    self._leftover.add(slot["link"])
                logger.warning(
                    "fcb: could not point %s at %s (%s); load the slot with "
                    "fcb.torch.load_checkpoint, which reads the manifest. The next commit or "
                    "the next open of the directory restores the name.",
                    link,
                    self.path(slot["file"]),
                    _reason(error),
                )
        self._delete_unlisted(old_links - current)
        try:
            fsync_dir(self.directory)
        except OSError as error:
            logger.warning("fcb: could not sync the directory %s (%s).", self.directory, error)

    def _remove(self, relative: str) -> bool:
        """Delete one file or name; False (and a warning) when the disk refuses."""
        try:
            os.unlink(self.path(relative))
        except OSError as error:
            if error.errno != errno.ENOENT:
                logger.warning(
                    "fcb: could not delete %s (%s); the manifest does not list it, so it is "
                    "never loaded, and the next commit deletes it.",
                    self.path(relative),
                    _reason(error),
                )
                return False
        return True

    def _delete_unlisted(self, candidates: set[str]) -> None:
        """Delete files and names the manifest does not use, and any a failed deletion left
        before; what cannot be deleted now is kept for the next commit."""
        links = {slot["link"] for slot in self.manifest["slots"].values()}
        keep = set(self.manifest["files"]) | links
        for relative in self._leftover | candidates:
            if relative in keep or self._remove(relative):  # in use again, or deleted
                self._leftover.discard(relative)
            else:
                self._leftover.add(relative)

    def _repair(self) -> None:
        """After a crash: drop step files the manifest does not list, re-point slot links.

        Nothing is deleted unless every listed file is there with its recorded size: a
        manifest that does not describe this directory (edited, or copied from another run)
        must not make its step files look like orphans.
        """
        listed = set(self.manifest["files"])
        for relative, record in self.manifest["files"].items():
            path = self.path(relative)
            if not os.path.exists(path):
                raise CheckpointCorruptError(
                    f"{path} is listed in {self.manifest_path} but missing."
                )
            if os.path.getsize(path) != record.get("size"):
                raise CheckpointCorruptError(
                    f"{path} has {os.path.getsize(path)} bytes, {self.manifest_path} records "
                    f"{record.get('size')} (truncated, replaced, or the manifest is another "
                    f"run's)."
                )
        steps_dir = os.path.join(self.directory, STEPS_DIR)
        orphans = {
            f"{STEPS_DIR}/{name}"
            for name in os.listdir(steps_dir)
            if _STEP_FILE.match(name) and f"{STEPS_DIR}/{name}" not in listed
        }
        self._delete_unlisted(orphans)
        self._refresh_links(set())

    def reset_to(self, slots: Mapping[str, Any], files: Mapping[str, Any], resume: Any) -> None:
        """Make the manifest hold exactly `slots` (after a resume); delete later files."""
        self._install(*reset_manifest(self.manifest, slots, files, resume))

    def verify_all(self) -> None:
        for relative, record in self.manifest["files"].items():
            verify(self.path(relative), record)
