"""A run directory of orbax checkpoints: one orbax step per checkpointed step, and a manifest.

Layout: `steps/<step>/` (an orbax `CheckpointManager` root; each step is a Composite of the
`state` pytree and the `fcb` JSON metadata), `manifest.json` (the slot -> step table, the
authority) and `.fcb.lock`.

Orbax commits each step atomically (temporary directory, then rename) and writes it in the
background; the manifest is written only once the step it references is committed, and a step
is deleted only once a committed manifest no longer references it. A kill at any point leaves
a manifest whose every step is complete; `open` deletes steps the manifest does not list.

A write that fails (a full disk, an I/O error: orbax reports them as `OSError` or as
tensorstore's `ValueError("RESOURCE_EXHAUSTED: ...")`) is a [`fcb.CheckpointWriteError`][],
and what it left is deleted. A synchronous failure fails its own check (the session undoes
it). A background failure is found later, when the check it belongs to has already happened
(its actions applied by the loop): so the step is kept, with its check's manifest, and written
again at the next check that saves (and at `on_fit_end`), until it commits; every later check
that would save raises meanwhile. Once the disk is back, the run goes on as if nothing had
failed. The host copy of a save in flight is kept only until orbax has finalized it.

In a multi-process JAX run every process opens the store and makes the same calls; orbax
saves and deletes with its own multi-host protocol, and only the primary process holds the
lock and writes the manifest (see `_processes.py`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import orbax.checkpoint as ocp

from .._errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError, ConfigError
from .._host.manifest import Models, SlotRequest, read_manifest as _read_manifest
from .._host.processes import ProcessGroup
from .._host.store import STEPS_DIR, ManifestStore
from ._failures import disk_full_hint, reason, register_exit_hook
from ._read import (
    CHECKPOINT_FORMAT as CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION as CHECKPOINT_VERSION,
    META_ITEM,
    STATE_ITEM,
    read_meta as read_meta,
    read_step as read_step,
    stored_tree as stored_tree,
)

logger = logging.getLogger("fcb")

STORAGE = "orbax"
DEFAULT_TIMEOUT = 600.0
"""Seconds a process waits for the others inside an orbax save (orbax's own default)."""


def check_timeout(owner: str, timeout: Any) -> None:
    """`timeout` must be a finite number of seconds > 0 (a `ConfigError` names it)."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout < float("inf")
    ):
        raise ConfigError(
            f"{owner}: `timeout` must be a finite number of seconds > 0, got "
            f"timeout = {timeout!r}."
        )


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of an orbax run directory (a dict; see the adapter's docs).

    Raises [`fcb.CheckpointCorruptError`][] when the directory has no manifest, when it is
    not valid, or when a Torch run wrote it.
    """
    return _read_manifest(directory, storage=STORAGE)


def location(step: int, models: Models = None) -> str:
    """Where `step` lives, relative to the run directory. One orbax step per step: a subset
    of submodules is kept in the same step, never beside it."""
    del models
    return f"{STEPS_DIR}/{step}"


def models_cover(stored: Models, wanted: Models) -> bool:
    """Whether a step stored with `stored` submodules holds what a slot of `wanted` needs."""
    if stored is None:
        return True
    return wanted is not None and set(wanted) <= set(stored)


class _Save(NamedTuple):
    """One orbax save: the step, the host copy of the state, the metadata, the submodules."""

    step: int
    state: Any
    meta: dict[str, Any]
    models: Models


class OrbaxStore(ManifestStore):
    """The orbax steps and the manifest of one run, in commit order (see `fcb._host.store`).

    `save` starts an (asynchronous) orbax save; `commit` records the manifest that follows
    from a check; when the save is still in flight, the manifest waits as *pending* until
    `finish` has seen the step committed. `finish` runs at the start of the next check that
    changes anything, and at the end.
    """

    storage = STORAGE

    def __init__(
        self,
        directory: str,
        *,
        async_save: bool = True,
        processes: ProcessGroup | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        super().__init__(directory, processes=processes)
        self.async_save = async_save
        self.timeout = timeout
        self.manager: ocp.CheckpointManager | None = None
        self._saving: int | None = None
        self._closed = False
        self._unsaved: _Save | None = None
        """The background save in flight, until orbax has finalized it (to write it again)."""
        self._retry: _Save | None = None
        """A background save that failed, written again at the next `finish`."""
        self._lost: dict[int, str] = {}
        """Steps whose background save failed after orbax had let go of their state: a
        slot that still asks for one cannot be recorded (why, for the message)."""

    def location(self, step: int, models: Models = None) -> str:
        return location(step, models)

    def _open_backend(self) -> None:
        finalized = None
        if self.async_save:  # orbax accepts the callback only with its async checkpointer
            store = weakref.ref(self)

            def finalized() -> None:  # orbax's writer thread: the step's data is complete
                alive = store()
                if alive is not None:
                    alive._unsaved = None

        self.manager = ocp.CheckpointManager(
            os.path.join(self.directory, STEPS_DIR),
            options=ocp.CheckpointManagerOptions(
                # fcb decides what to keep: no max_to_keep, no best_fn (see the docs)
                cleanup_tmp_directories=True,
                enable_async_checkpointing=self.async_save,
                async_options=ocp.AsyncOptions(
                    timeout_secs=max(1, round(self.timeout)),
                    post_finalization_callback=finalized,
                ),
                create=True,
            ),
        )
        # A loop that ends without on_fit_end still gets its last save committed. At exit,
        # `threading` runs its hooks before `atexit` ones, and one of them stops the
        # executors orbax's background save needs: so wait in a `threading` hook, which
        # runs before that one (hooks run in reverse order of registration).
        register_exit_hook(weakref.WeakMethod(self._at_exit))

    def _at_exit(self) -> None:
        if self._closed:
            return
        try:
            self.finish()
        except Exception as error:
            logger.warning("fcb: the last checkpoint save failed at exit: %s", error)
        finally:
            self.close()

    # -- backend operations ------------------------------------------------------------------

    def _check_listed(self, relative: str, record: Mapping[str, Any]) -> None:
        if not ocp.utils.is_checkpoint_finalized(self.path(relative)):
            raise CheckpointCorruptError(
                f"{self.path(relative)} (step {record['step']}) is listed in "
                f"{self.manifest_path} but missing or not a committed orbax checkpoint."
            )

    def _on_disk(self) -> set[str]:
        assert self.manager is not None
        return {location(step) for step in self.manager.all_steps()}

    def _delete(self, locations: set[str], files: Mapping[str, Any]) -> None:
        assert self.manager is not None
        on_disk = set(self.manager.all_steps())
        for relative in sorted(locations):
            step = int(relative.rsplit("/", 1)[1])
            if step in on_disk:
                self.manager.delete(step)

    def _slot_extra(self, name: str, models: Models) -> dict[str, Any]:
        return {"models": None if models is None else list(models)}

    def _check_records(
        self,
        records: Mapping[str, Any],
        files: Mapping[str, Any],
        slots: Mapping[str, SlotRequest],
    ) -> None:
        for name, record in records.items():
            stored, wanted = files[record["file"]]["models"], slots[name][2]
            if not models_cover(None if stored is None else tuple(stored), wanted):
                raise CheckpointCorruptError(
                    f"slot {name!r} must hold step {record['step']} with "
                    f"{'every submodule' if wanted is None else list(wanted)}, but that step "
                    f"was saved with only {stored}."
                )

    def commit(self, *, event_step: int, slots: Mapping[str, SlotRequest], **plan: Any) -> None:
        lost = sorted(
            (step, name) for name, (step, _, _) in slots.items() if step in self._lost
        )
        if lost:
            step = lost[0][0]
            committed = self.manifest["resume"]
            fix = (
                f"Resume from the last committed checkpoint (resume_from=dirpath, step "
                f"{committed['step']}): it decides from there as this run would have."
                if committed
                else "Start the run again (keep a `last` slot, ModelCheckpoint(save_last=True), "
                "to resume after such a failure instead)."
            )
            raise CheckpointWriteError(
                f"slot {lost[0][1]!r} holds step {step}, whose background save failed "
                f"({self._lost[step]}) after orbax had let go of its state: this run cannot "
                f"record that slot any more. {fix}"
            )
        super().commit(event_step=event_step, slots=slots, **plan)

    # -- saves -------------------------------------------------------------------------------

    def stored_models(self, step: int) -> Models:
        record = self._written.get(location(step)) or self.manifest["files"][location(step)]
        return None if record["models"] is None else tuple(record["models"])

    def save(self, step: int, state: Any, meta: dict[str, Any], models: Models) -> None:
        """Start saving `state` (host arrays) and `meta` (JSON) as orbax step `step`."""
        assert self.manager is not None and self._saving is None and self._retry is None
        self.check_owned()
        self._start(_Save(step, state, meta, models))
        self.record_write(
            location(step), {"step": step, "models": None if models is None else list(models)}
        )
        if not self.async_save:
            self._wait_written()

    def _start(self, save: _Save, *, again: bool = False) -> None:
        assert self.manager is not None
        step = save.step
        if self.async_save:
            self._unsaved = save
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardSave(save.state),
                        META_ITEM: ocp.args.JsonSave(save.meta),
                    }
                ),
                force=True,  # every step fcb asks for, whatever orbax's save interval says
            )
        except Exception as error:  # OSError, or tensorstore's ValueError("RESOURCE_...")
            self._unsaved = None
            self._clean_up(step)
            raise CheckpointWriteError(
                f"could not write step {step} to {self.path(location(step))}: "
                f"{reason(error)}{disk_full_hint(error)}; the previous checkpoints are "
                f"intact"
                + (
                    f", and step {step} (its check has happened) is written again at the next "
                    f"check that saves."
                    if again
                    else "."
                )
            ) from error
        self._saving = step

    def _in_flight(self) -> bool:
        return self._saving is not None or self._retry is not None

    def _retrying(self) -> bool:
        return self._retry is not None

    def _wait_written(self) -> None:
        assert self.manager is not None
        if self._saving is None and self._retry is not None:
            self.check_owned()
            self._start(self._retry, again=True)  # raises, keeping it, while the disk refuses
            self._retry = None
        step, self._saving = self._saving, None
        if step is None:
            return
        path = self.path(location(step))
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
            committed = ocp.utils.is_checkpoint_finalized(path)
            error: BaseException | None = None
        except Exception as caught:  # orbax raises various types from its writer threads
            committed, error = False, caught
        save, self._unsaved = self._unsaved, None
        if committed:
            return
        try:  # a directory deleted mid-save: say so, and never write there again
            self.check_owned()
        except CheckpointError as lost:
            self._written.pop(location(step), None)
            raise lost from error
        # Written again later only if every process still holds its part of the state.
        if self.processes.any(save is None or save.step != step):
            save = None
        self._retry = save
        if save is None:
            self._written.pop(location(step), None)
            self._lost[step] = reason(error) if error is not None else "not committed"
        self._clean_up(step)
        failure = CheckpointWriteError(
            f"orbax could not commit step {step} to {path}"
            + (f": {reason(error)}{disk_full_hint(error)}" if error is not None else "")
            + "; the manifest still holds the previous checkpoints"
            + (
                f". The check of step {step} has happened: its step is written again at the "
                f"next check that saves (and at on_fit_end), and the run goes on once it commits."
                if save is not None
                else "."
            )
        )
        failure.__cause__ = error
        self.processes.agree_on_error(failure)

    def _clean_up(self, step: int) -> None:
        """Delete what a failed save of `step` left, in a directory that is still ours."""
        assert self.manager is not None
        if not self._lock.intact():
            return
        path = self.path(location(step))
        if not self.processes.active:  # a delete is collective: not on a failure path
            with contextlib.suppress(Exception):
                if step in self.manager.all_steps():
                    self.manager.delete(step)
        # orbax leaves the failed step's temporary directory until the next open
        if self.processes.is_primary:
            for leftover in glob.glob(glob.escape(path) + ".orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def settle(self) -> None:
        """Wait for the save in flight, without writing a failed save again (the run is
        ending on an exception: its step stays out of the manifest, which holds the
        previous checkpoints)."""
        if self._saving is None and self._retry is not None:
            self._retry = self._unsaved = None
            self._pending = None
            return
        self.finish()

    def _close_backend(self) -> None:
        self._closed = True
        self._unsaved = self._retry = None
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.close()
