"""A run directory of orbax checkpoints: one orbax step per checkpointed step, and a manifest.

Layout: `steps/<step>/` (an orbax `CheckpointManager` root; each step is a Composite of the
`state` pytree and the `fcb` JSON metadata), `manifest.json` (the slot -> step table, the
authority) and `.fcb.lock`.

Orbax commits each step atomically (temporary directory, then rename) and writes it in the
background; the manifest is written only once the step it references is committed, and a step
is deleted only once a committed manifest no longer references it. A kill at any point leaves
a manifest whose every step is complete; `open` deletes steps the manifest does not list.

In a multi-process JAX run every process opens the store and makes the same calls; orbax
saves and deletes with its own multi-host protocol, and only the primary process holds the
lock and writes the manifest (see `_processes.py`).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from .._errors import CheckpointCorruptError, CheckpointWriteError, ConfigError
from .._files import DirectoryLock, atomic_write_json, remove_temporaries
from .._manifest import (
    MANIFEST_NAME,
    Models,
    SlotRequest,
    empty_manifest,
    next_manifest,
    read_manifest as _read_manifest,
    reset_manifest,
    slot_records,
    with_files,
)
from ._processes import Processes

logger = logging.getLogger("fcb")

STORAGE = "orbax"
STEPS_DIR = "steps"
STATE_ITEM = "state"
META_ITEM = "fcb"
CHECKPOINT_FORMAT = "fcb.checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_TIMEOUT = 600.0
"""Seconds a process waits for the others inside an orbax save (orbax's own default)."""


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of an orbax run directory (a dict; see the adapter's docs).

    Raises [`fcb.CheckpointCorruptError`][] when the directory has no manifest, when it is
    not valid, or when a Torch run wrote it.
    """
    return _read_manifest(os.path.join(os.fspath(directory), MANIFEST_NAME), storage=STORAGE)


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


def reader() -> ocp.Checkpointer:
    """A checkpointer that reads fcb orbax steps: the state with `PyTreeRestore` (strict or
    partial), the metadata as JSON, and the state's metadata tree."""
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            **{STATE_ITEM: ocp.PyTreeCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
        )
    )


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def leaf_paths(tree: Any) -> set[tuple[str, ...]]:
    """Leaf paths by name, the same for a dict, a dataclass (an equinox Module) or a tuple."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(entry) for entry in path) for path, _ in flat}


def stored_tree(step_path: str) -> Any:
    """The metadata tree of a step's state (nested dicts; leaves describe the arrays)."""
    checkpointer = reader()
    try:
        stored = checkpointer.metadata(step_path).item_metadata[STATE_ITEM]
    finally:
        checkpointer.close()
    return getattr(stored, "tree", stored)


def read_step(
    step_path: str, like: Any = None, *, partial: bool = False, with_meta: bool = True
) -> tuple[Any, dict[str, Any] | None]:
    """Restore the `state` item of one step (like the template `like`) and its metadata.

    With `partial`, `like` may hold a part of the stored tree (e.g. `{"model": ...}`); each
    of its leaves must be stored (orbax would otherwise hand back the template's value).
    Without `like` the state comes back as orbax stores it (nested dicts of arrays).
    """
    if like is None:
        state_args = ocp.args.PyTreeRestore()
    else:
        if partial:
            missing = sorted(leaf_paths(like) - leaf_paths(stored_tree(step_path)))
            if missing:
                shown = ", ".join("/".join(p) for p in missing[:5])
                raise ConfigError(
                    f"the template `like` has {len(missing)} leaves the checkpoint {step_path} "
                    f"does not store (first: {shown}). Pass a template of the saved state, or "
                    f"of a part of it (e.g. {{'model': eqx.filter(model, eqx.is_array)}})."
                )
        restore_args = ocp.checkpoint_utils.construct_restore_args(like)
        state_args = ocp.args.PyTreeRestore(
            item=like, restore_args=restore_args, partial_restore=partial
        )
    items: dict[str, Any] = {STATE_ITEM: state_args}
    if with_meta:
        items[META_ITEM] = ocp.args.JsonRestore()
    checkpointer = reader()
    try:
        restored = checkpointer.restore(step_path, args=ocp.args.Composite(**items))
    except ValueError as error:
        if like is None:
            raise
        reason = " ".join(str(error).split())[:400]
        raise ConfigError(
            f"the template `like` does not match the state saved in {step_path} ({reason}). "
            f"Pass a template with the structure, shapes and dtypes of the `state` given to "
            f"on_validation_end, e.g. {{'model': eqx.filter(model, eqx.is_array), "
            f"'opt_state': optimizer.init(...)}}."
        ) from None
    finally:
        checkpointer.close()
    return restored[STATE_ITEM], (restored[META_ITEM] if with_meta else None)


def read_meta(step_path: str) -> dict[str, Any]:
    checkpointer = reader()
    try:
        restored = checkpointer.restore(
            step_path, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
        )
    finally:
        checkpointer.close()
    meta = restored[META_ITEM]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointCorruptError(f"{step_path} is not an fcb orbax checkpoint.")
    return meta


def _reason(error: BaseException) -> str:
    """What went wrong first: orbax may raise a barrier timeout while handling the write
    error that caused it (the write error is then the timeout's context)."""
    first = error
    while first.__cause__ or first.__context__:
        first = first.__cause__ or first.__context__  # type: ignore[assignment]
    reason = " ".join(str(error).split())[:300]
    if first is error:
        return reason
    return f"{type(first).__name__}: {first} (then: {type(error).__name__}: {reason})"


def _register_exit_hook(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    """Call `method` at exit unless its object is gone (a hook must not keep it alive)."""

    def hook() -> None:
        bound = method()
        if bound is not None:
            bound()

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading exit hooks")
        register(hook)
    except RuntimeError:  # already shutting down, or another Python
        atexit.register(hook)


class OrbaxStore:
    """The orbax steps and the manifest of one run, in commit order.

    `save` starts an (asynchronous) orbax save; `commit` records the manifest that follows
    from a check; when the save is still in flight, the manifest waits as *pending* until
    `finish` has seen the step committed. `finish` runs at the start of the next check that
    changes anything, and at the end.
    """

    def __init__(
        self,
        directory: str,
        *,
        async_save: bool = True,
        processes: Processes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.directory = os.path.abspath(directory)
        self.async_save = async_save
        self.processes = Processes() if processes is None else processes
        self.timeout = timeout
        self.manifest = empty_manifest(storage=STORAGE)
        self.manager: ocp.CheckpointManager | None = None
        self._lock = DirectoryLock(self.directory)
        self._written: dict[str, dict[str, Any]] = {}
        self._in_flight: int | None = None
        self._closed = False
        self._pending: tuple[dict[str, Any], dict[str, Any]] | None = None

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
                f"cannot create the run directory {self.directory}: {error.strerror or error}. "
                f"Pass a writable directory."
            ) from error
        if not os.access(self.directory, os.W_OK):
            raise CheckpointWriteError(
                f"the run directory {self.directory} is not writable. Pass a writable directory."
            )
        processes = self.processes

        def lock() -> None:
            self._lock.acquire()
            remove_temporaries(self.directory)

        processes.on_primary(lock)
        try:
            if os.path.exists(self.manifest_path):
                self.manifest = read_manifest(self.directory)
            # every process has read the manifest before the primary may replace it
            processes.barrier("opened")
            self.manager = ocp.CheckpointManager(
                os.path.join(self.directory, STEPS_DIR),
                options=ocp.CheckpointManagerOptions(
                    # fcb decides what to keep: no max_to_keep, no best_fn (see the docs)
                    cleanup_tmp_directories=True,
                    enable_async_checkpointing=self.async_save,
                    async_options=ocp.AsyncOptions(timeout_secs=max(1, round(self.timeout))),
                    create=True,
                ),
            )
            self._repair()
        except BaseException:
            self.close()
            raise
        # A loop that ends without on_fit_end still gets its last save committed. At exit,
        # `threading` runs its hooks before `atexit` ones, and one of them stops the
        # executors orbax's background save needs: so wait in a `threading` hook, which
        # runs before that one (hooks run in reverse order of registration).
        _register_exit_hook(weakref.WeakMethod(self._at_exit))

    def _at_exit(self) -> None:
        if self._closed:
            return
        try:
            self.finish()
        except Exception as error:
            logger.warning("fcb: the last checkpoint save failed at exit: %s", error)
        finally:
            self.close()

    def _repair(self) -> None:
        """After a kill: delete steps the manifest does not list; check the listed ones."""
        assert self.manager is not None
        listed = {record["step"] for record in self.manifest["files"].values()}
        for step in sorted(set(self.manager.all_steps()) - listed):
            self.manager.delete(step)
        for relative, record in self.manifest["files"].items():
            if not ocp.utils.is_checkpoint_finalized(self.path(relative)):
                raise CheckpointCorruptError(
                    f"{self.path(relative)} (step {record['step']}) is listed in "
                    f"{self.manifest_path} but missing or not a committed orbax checkpoint."
                )

    def start_over(self) -> None:
        """Begin a new run in a directory that holds another (as the Torch store does): an
        empty manifest is committed first, then the old run's steps are deleted, so a kill
        never leaves the old manifest listing a step the new run rewrote."""
        old = self.manifest
        if not (old["files"] or old["resume"]):
            return
        logger.warning(
            "fcb: %s held a run (%d checkpoints); a new run starts there and replaces it. "
            "Pass resume=True to continue the run instead.",
            self.directory,
            len(old["files"]),
        )
        self._install(empty_manifest(storage=STORAGE), dict(old["files"]))

    @property
    def latest_manifest(self) -> dict[str, Any]:
        """The manifest after the last check: pending (its step still being written) or
        committed."""
        return self.manifest if self._pending is None else self._pending[0]

    def has(self, step: int) -> bool:
        relative = location(step)
        return relative in self.manifest["files"] or relative in self._written

    def stored_models(self, step: int) -> Models:
        record = self._written.get(location(step)) or self.manifest["files"][location(step)]
        return None if record["models"] is None else tuple(record["models"])

    def save(self, step: int, state: Any, meta: dict[str, Any], models: Models) -> None:
        """Start saving `state` (host arrays) and `meta` (JSON) as orbax step `step`."""
        assert self.manager is not None and self._in_flight is None
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardSave(state),
                        META_ITEM: ocp.args.JsonSave(meta),
                    }
                ),
                force=True,  # every step fcb asks for, whatever orbax's save interval says
            )
        except OSError as error:
            raise CheckpointWriteError(
                f"could not write step {step} to {self.path(location(step))}: "
                f"{error.strerror or error}; the previous checkpoints are intact."
            ) from error
        self._written[location(step)] = {
            "step": step,
            "models": None if models is None else list(models),
        }
        if self.async_save:
            self._in_flight = step
        else:
            self._check_committed(step)

    def commit(
        self,
        *,
        event_step: int,
        slots: Mapping[str, SlotRequest],
        archive: bool,
        callbacks: Any,
        resume: bool,
        stop_message: str = "",
    ) -> None:
        files = {**self.manifest["files"], **self._written}
        records = slot_records(
            slots,
            location,
            files,
            self.directory,
            extra=lambda name, models: {"models": None if models is None else list(models)},
        )
        for name, record in records.items():
            stored, wanted = files[record["file"]]["models"], slots[name][2]
            if not models_cover(None if stored is None else tuple(stored), wanted):
                raise CheckpointCorruptError(
                    f"slot {name!r} must hold step {record['step']} with "
                    f"{'every submodule' if wanted is None else list(wanted)}, but that step "
                    f"was saved with only {stored}."
                )
        manifest = next_manifest(
            self.manifest,
            event_step=event_step,
            slots=records,
            archive=[location(event_step)] if archive else [],
            callbacks=callbacks,
            resume=resume,
            stop_message=stop_message,
        )
        if self._in_flight is not None:
            self._pending = (manifest, files)
        else:
            self._install(manifest, files)

    def finish(self) -> None:
        """Wait for the save in flight; once it is committed, install the pending manifest."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        pending, self._pending = self._pending, None
        self._check_committed(step)
        if pending is not None:
            self._install(*pending)

    def _check_committed(self, step: int) -> None:
        assert self.manager is not None
        path = self.path(location(step))
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
            committed = ocp.utils.is_checkpoint_finalized(path)
            error: BaseException | None = None
        except Exception as caught:  # orbax raises various types from its writer threads
            committed, error = False, caught
        if not committed:
            failure = CheckpointWriteError(
                f"orbax could not commit step {step} to {path}"
                + (f": {_reason(error)}" if error is not None else "")
                + "; the manifest still holds the previous checkpoints."
            )
            self._written.pop(location(step), None)
            if not self.processes.active:  # a delete is collective: not on a failure path
                with contextlib.suppress(Exception):
                    if step in self.manager.all_steps():
                        self.manager.delete(step)
            # orbax leaves the failed step's temporary directory until the next open
            if self.processes.is_primary:
                for leftover in glob.glob(glob.escape(path) + ".orbax-checkpoint-tmp*"):
                    shutil.rmtree(leftover, ignore_errors=True)
            failure.__cause__ = error
            self.processes.agree_on_error(failure)

    def _install(self, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        assert self.manager is not None
        manifest, unlisted = with_files(manifest, files)
        self.processes.on_primary(lambda: atomic_write_json(self.manifest_path, manifest))
        self.manifest, self._written = manifest, {}
        on_disk = set(self.manager.all_steps())
        for relative in sorted(unlisted):
            step = files[relative]["step"]
            if step in on_disk:
                self.manager.delete(step)

    def reset_to(self, record: Mapping[str, Any]) -> None:
        """Make the manifest hold exactly the resume record's slots; delete later steps."""
        self.finish()
        self._install(*reset_manifest(self.manifest, record["slots"], {}, record))

    def close(self) -> None:
        self._closed = True
        try:
            if self.manager is not None:
                self.manager.close()
        finally:
            self.manager = None
            self._lock.release()
