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
from .._files import atomic_write, atomic_write_path, fsync_dir, link_atomic, verify_location
from .._host.manifest import (
    MANIFEST_NAME as MANIFEST_NAME,
    RESUME_SLOT as RESUME_SLOT,
    Models,
    read_manifest as _read_manifest,
)
from .._host.processes import ProcessGroup
from .._host.store import STEPS_DIR, ManifestStore

SUFFIX = ".pt"
_STEP_FILE = re.compile(r"^step-(\d+)(\.[A-Za-z0-9._+=-]+)?\.(pt|ckpt)$")

logger = logging.getLogger("fcb")


def _reason(error: BaseException) -> str:
    """The operating system's words for a failure (under fcb's wrapping error, if any)."""
    cause = error.__cause__ if isinstance(error, CheckpointWriteError) else error
    return str(getattr(cause, "strerror", None) or cause)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check the manifest of a Torch run (its path, or the run directory holding
    it); [`fcb.CheckpointCorruptError`][] names what is wrong."""
    return _read_manifest(path, storage="torch")


def step_file(step: int, models: Models, suffix: str = SUFFIX) -> str:
    """The path, relative to the store, of the file holding `step` (optionally a subset)."""
    variant = "" if not models else "." + "+".join(models)
    return f"{STEPS_DIR}/step-{step:08d}{variant}{suffix}"


class CheckpointStore(ManifestStore):
    """Files of one run: `steps/step-NNNNNNNN.pt` (each step written once), one hard link per
    slot (`best_model.pt`, `last.pt`, ...), and `manifest.json`, the authority.

    Commit order (see `fcb._host.store`): new step files (atomic) -> manifest (atomic) ->
    slot links -> deletion of files the new manifest no longer lists.

    A failure before the manifest's rename raises [`fcb.CheckpointWriteError`][]. After it the
    check has happened, so a failure to re-point a name or delete a file is logged (logger
    `fcb`, WARNING) instead: a name that cannot be re-pointed is removed rather than left
    serving another step, and every later commit and `open` retry what is left.
    """

    storage = "torch"
    sync_names = True
    """Whether re-pointed names are made durable at once (they are repaired at `open`)."""

    def __init__(
        self, directory: str, *, suffix: str = SUFFIX, processes: ProcessGroup | None = None
    ):
        super().__init__(directory, processes=processes)
        self.suffix = suffix
        self._leftover: set[str] = set()
        """Files and names to delete that a failed deletion left behind (retried)."""
        self.bytes_written = 0
        self.files_written = 0

    def location(self, step: int, models: Models) -> str:
        return step_file(step, models, self.suffix)

    step_file = location

    def write(self, relative: str, step: int, models: Models, payload: Any) -> None:
        """Write one step file atomically; it joins the manifest at the next commit."""
        self.check_owned()
        record = atomic_write(
            self.path(relative), lambda f: torch.save(payload, cast(IO[bytes], f))
        )
        self._record(relative, step, models, record)

    def write_with(
        self, relative: str, step: int, models: Models, save: Callable[[str], object]
    ) -> None:
        """Write one step file with `save(path)` (e.g. a Lightning Trainer's save_checkpoint)."""
        self.check_owned()
        self._record(relative, step, models, atomic_write_path(self.path(relative), save))

    def _record(self, relative: str, step: int, models: Models, record: dict[str, int]) -> None:
        self.record_write(relative, {"step": step, "models": models, **record})
        self.bytes_written += record["size"]
        self.files_written += 1

    def _slot_extra(self, name: str, models: Models) -> dict[str, Any]:
        return {"link": name + self.suffix}

    # -- backend operations ------------------------------------------------------------------

    def _check_listed(self, relative: str, record: Mapping[str, Any]) -> None:
        path = self.path(relative)
        if not os.path.exists(path):
            raise CheckpointCorruptError(f"{path} is listed in {self.manifest_path} but missing.")
        if os.path.getsize(path) != record.get("size"):
            raise CheckpointCorruptError(
                f"{path} has {os.path.getsize(path)} bytes, {self.manifest_path} records "
                f"{record.get('size')} (truncated, replaced, or the manifest is another "
                f"run's)."
            )

    def _on_disk(self) -> set[str]:
        steps_dir = os.path.join(self.directory, STEPS_DIR)
        return {f"{STEPS_DIR}/{name}" for name in os.listdir(steps_dir) if _STEP_FILE.match(name)}

    def _installed(self, old: Mapping[str, Any]) -> None:
        old_links = {slot["link"] for slot in old["slots"].values()}
        current = {slot["link"] for slot in self.manifest["slots"].values()}
        for slot in self.manifest["slots"].values():
            link = self.path(slot["link"])
            try:
                self._point(self.path(slot["file"]), link)
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
        self._delete(old_links - current, {})
        if not self.sync_names:
            return
        try:
            fsync_dir(self.directory)
        except OSError as error:
            logger.warning("fcb: could not sync the directory %s (%s).", self.directory, error)

    def _point(self, target: str, link: str) -> None:
        """Make the slot name `link` lead to the step location `target`."""
        link_atomic(target, link)

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

    def _delete(self, locations: set[str], files: Mapping[str, Any]) -> None:
        """Delete files and names the manifest does not use, and any a failed deletion left
        before; what cannot be deleted now is kept for the next commit."""
        links = {slot["link"] for slot in self.manifest["slots"].values()}
        keep = set(self.manifest["files"]) | links
        for relative in self._leftover | locations:
            if relative in keep or self._remove(relative):  # in use again, or deleted
                self._leftover.discard(relative)
            else:
                self._leftover.add(relative)

    def verify_all(self) -> None:
        for relative, record in self.manifest["files"].items():
            verify_location(self.path(relative), record)
