"""The manifest store protocol every checkpoint backend follows: one copy of the commit order.

A run directory holds one *location* per checkpointed step (a Torch file, an orbax step
directory, a DCP directory), `manifest.json` (the slot -> step table, the authority) and
`.fcb.lock`. The order of every commit, whatever the backend:

1. the step's location is written and durable (a backend's `write`; an asynchronous write is
   waited for in `finish` before anything refers to it);
2. the manifest is replaced atomically (the commit point);
3. names are re-pointed (Torch slot links) -- a failure here only warns;
4. locations the new manifest no longer lists are deleted.

A kill at any point leaves a manifest whose every location is complete; `open` deletes
what the manifest does not list and re-points the names. A failure before step 2 raises
[`fcb.CheckpointWriteError`][] and leaves the previous checkpoints as they were.

Before a backend writes a location and before every manifest, the store checks that the
directory is still its own (`check_owned`): the lock file it holds is still `.fcb.lock` and
the directory was not deleted or created again. An advisory lock is easily bypassed (delete
the lock file, or the directory, and a second writer locks a new one); a writer whose lock
was bypassed raises [`fcb.DirectoryInUseError`][] (or [`fcb.CheckpointWriteError`][] when the
directory is gone) and never writes or deletes anything there again.

A backend subclasses `ManifestStore` and implements how one location is checked at open
(`_check_listed`), found on disk (`_on_disk`), deleted (`_delete`), and optionally the names
it keeps beside the manifest (`_installed`) and writes in flight (`_wait_written`; a backend
that keeps a failed write to retry at the next `finish` says so with `_retrying`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from .._errors import CheckpointError, CheckpointWriteError
from .._files import DirectoryLock, atomic_write_json, remove_temporaries
from .manifest import (
    MANIFEST_NAME,
    Models,
    Plan,
    SlotRequest,
    empty_manifest,
    next_manifest,
    read_manifest,
    reset_manifest,
    slot_records,
    with_files,
)
from .processes import ProcessGroup

logger = logging.getLogger("fcb")

STEPS_DIR = "steps"


class ManifestStore:
    """The checkpoints and the manifest of one run directory, in commit order.

    In a multi-process run every process opens the store and makes the same calls; only the
    primary holds the lock and writes the manifest (a backend may write on every process).
    """

    storage: ClassVar[str] = "torch"
    """The backend's name, recorded in the manifest: one backend cannot read another's."""

    def __init__(self, directory: str, *, processes: ProcessGroup | None = None):
        self.directory = os.path.abspath(directory)
        self.processes = ProcessGroup() if processes is None else processes
        self.manifest = self._empty()
        self._lock = DirectoryLock(self.directory)
        self._written: dict[str, dict[str, Any]] = {}
        """Records of the locations written since the last commit."""
        self._pending: tuple[dict[str, Any], dict[str, Any]] | None = None
        """A committed check's manifest waiting for its write in flight (see `finish`)."""
        self.slot_kinds: dict[str, str] = {}
        """What each slot holds (`ActionNames.slot_kinds`), recorded with the slot."""

    # -- the directory -----------------------------------------------------------------------

    def _empty(self) -> dict[str, Any]:
        return empty_manifest(storage=self.storage)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST_NAME)

    def path(self, relative: str) -> str:
        return os.path.join(self.directory, relative)

    def location(self, step: int, models: Models) -> str:
        """Where `step` (optionally a subset of submodules) lives, relative to the run."""
        raise NotImplementedError

    def open(self) -> None:
        """Create and lock the directory, read its manifest, repair what a kill left."""
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

        def lock() -> None:
            self._lock.acquire()
            remove_temporaries(self.directory)

        self.processes.on_primary(lock)
        try:
            if os.path.exists(self.manifest_path):
                self.manifest = read_manifest(self.manifest_path, self.storage)
            # every process has read the manifest before the primary may replace it
            self.processes.barrier("opened")
            self._open_backend()
            self._repair()
        except BaseException:
            self.close()
            raise

    def _open_backend(self) -> None:
        """Backend set-up after the manifest is read (e.g. orbax's CheckpointManager)."""

    def _repair(self) -> None:
        """After a kill: check every listed location, delete what the manifest does not
        list, re-point the names. Nothing is deleted unless every listed location checks:
        a manifest that does not describe this directory must not make its steps orphans."""
        files = self.manifest["files"]
        for relative, record in files.items():
            self._check_listed(relative, record)
        self._delete(self._on_disk() - set(files), {})
        self._installed(self._empty())

    def close(self) -> None:
        try:
            self._close_backend()
        finally:
            self._lock.release()

    def _close_backend(self) -> None:
        """Backend clean-up (always followed by releasing the lock)."""

    def check_owned(self) -> None:
        """Raise unless the directory is still this store's: the lock it holds is still the
        directory's `.fcb.lock`, and the directory is the one it opened (on every process
        when any fails). Called before any location or manifest is written."""
        self.processes.on_primary(self._lock.check)

    def _owned(self) -> bool:
        """`check_owned` as a yes/no, the same on every process (before a deletion)."""
        try:
            self.check_owned()
        except CheckpointError:
            return False
        return True

    # -- backend operations ------------------------------------------------------------------

    def _check_listed(self, relative: str, record: Mapping[str, Any]) -> None:
        """Raise `CheckpointCorruptError` unless the listed location is complete."""
        raise NotImplementedError

    def _on_disk(self) -> set[str]:
        """The step locations present in the directory."""
        raise NotImplementedError

    def _delete(self, locations: set[str], files: Mapping[str, Any]) -> None:
        """Delete locations the committed manifest does not list (`files`: their records)."""
        raise NotImplementedError

    def _installed(self, old: Mapping[str, Any]) -> None:
        """After a manifest replaced `old`: re-point names kept beside it (warn on failure)."""

    def _seal(self) -> None:
        """On the primary process, before a manifest is written: give the locations
        written since the last commit their final names (a backend that writes under
        temporary ones)."""

    def _wait_written(self) -> None:
        """Block until the writes in flight are durable; raise `CheckpointWriteError`."""

    def _in_flight(self) -> bool:
        return False

    def _retrying(self) -> bool:
        """Whether a write whose commit failed is kept, with its check's manifest, to be
        written again at the next `finish` (the check it belongs to has happened)."""
        return False

    # -- checks ------------------------------------------------------------------------------

    def has(self, relative: str) -> bool:
        return relative in self.manifest["files"] or relative in self._written

    def record_write(self, relative: str, record: dict[str, Any]) -> None:
        """A location written (or being written) for the next commit."""
        self._written[relative] = record

    @property
    def latest_manifest(self) -> dict[str, Any]:
        """The manifest after the last check: pending (its step still being written) or
        committed."""
        return self.manifest if self._pending is None else self._pending[0]

    def _slot_extra(self, name: str, models: Models) -> dict[str, Any]:
        """What a backend records in a slot besides step, location, kind and value."""
        return {}

    def _extra(self, name: str, models: Models) -> dict[str, Any]:
        kind = self.slot_kinds.get(name)
        return {**self._slot_extra(name, models), **({"kind": kind} if kind else {})}

    def _check_records(
        self,
        records: Mapping[str, Any],
        files: Mapping[str, Any],
        slots: Mapping[str, SlotRequest],
    ) -> None:
        """A backend's check that every slot's location holds what the slot needs."""

    def commit(
        self,
        *,
        event_step: int,
        slots: Mapping[str, SlotRequest],
        archive: bool,
        callbacks: Any,
        resume: bool,
        stop_message: str = "",
        history: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the check of `event_step` (a `Plan`'s fields): the slot table, whether the
        step joins the archive, whether it is the resume point, and the callbacks' state.
        Waits as pending while the step's write is in flight."""
        files = {**self.manifest["files"], **self._written}
        records = slot_records(slots, self.location, files, self.directory, extra=self._extra)
        self._check_records(records, files, slots)
        manifest = next_manifest(
            self.manifest,
            event_step=event_step,
            slots=records,
            archive=[self.location(event_step, None)] if archive else [],
            callbacks=callbacks,
            resume=resume,
            stop_message=stop_message,
            history=history,
        )
        if self._in_flight():
            self._pending = (manifest, files)
        else:
            self._install(manifest, files)

    def commit_plan(self, plan: Plan, step: int, callbacks: Any) -> None:
        """`commit` of what one check's `Plan` asks."""
        self.commit(
            event_step=step,
            slots=plan.slots,
            archive=plan.archive,
            callbacks=callbacks,
            resume=plan.resume,
            stop_message=plan.stop_message,
            history=plan.history,
        )

    def finish(self) -> None:
        """Wait for the writes in flight; once durable, install the pending manifest."""
        if not self._in_flight():
            return
        try:
            self._wait_written()
        except BaseException:
            if not self._retrying():
                self._pending = None
            raise
        pending, self._pending = self._pending, None
        if pending is not None:
            self._install(*pending)

    def abandon(self) -> None:
        """Forget what a check that failed had written but not committed, and delete it: a
        retry of that step must write it again, never find the failed attempt's weights.

        A write kept to be retried belongs to an earlier check, which happened: it stays (no
        write of the failed check can have started, since `finish` comes first). Nothing is
        deleted in a directory that is no longer this store's."""
        if self._retrying():
            return
        if self._in_flight():
            try:
                self._wait_written()
            except CheckpointWriteError:
                pass  # the write failed anyway; what it left is deleted below
        self._pending = None
        written, self._written = set(self._written), {}
        if not written or not self._owned():
            return
        try:  # a failure after the manifest's rename may have committed them after all
            on_disk = set(read_manifest(self.manifest_path, self.storage)["files"])
        except Exception:
            return  # unknown: keep them (an orphan is deleted at the next open)
        self._delete(written - on_disk - set(self.manifest["files"]), {})

    def _install(self, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        manifest, unlisted = with_files(manifest, files)
        old = self.manifest

        def install() -> None:  # one agreement: the directory is still this store's, and
            self._lock.check()  # the locations are final (`_seal`) before the manifest
            self._seal()
            atomic_write_json(self.manifest_path, manifest)

        self.processes.on_primary(install)
        # Committed: the check has happened. Raising from here on would make the caller undo
        # a check the manifest records, so what follows only warns.
        self.manifest, self._written = manifest, {}
        self._installed(old)
        self._delete(unlisted, files)

    def start_over(self) -> None:
        """Begin a new run in a directory that holds another: the new run must not reuse a
        step of the old one (same step, other weights), and a kill must never leave the old
        manifest listing a location the new run rewrote. So an empty manifest is committed
        first, then the old run's steps are deleted."""
        old = self.manifest
        if not (old["files"] or old["resume"]):
            return
        logger.warning(
            "fcb: %s held a run (%d checkpoints); a new run replaces it "
            "(existing_run='start_over').",
            self.directory,
            len(old["files"]),
        )
        self._install(self._empty(), dict(old["files"]))

    def reset_to(self, record: Mapping[str, Any], files: Mapping[str, Any] | None = None) -> None:
        """Make the manifest hold exactly the resume record's slots (after a resume);
        delete later steps. `files` are records of locations brought from another run."""
        self.finish()
        self._install(*reset_manifest(self.manifest, record["slots"], files or {}, record))
