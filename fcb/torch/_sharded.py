"""A crash-safe store of sharded Torch checkpoints: one `torch.distributed.checkpoint` (DCP)
directory per step, written by every rank, committed by rank 0 once all shards are durable.

A step's directory `steps/step-NNNNNNNN/` holds DCP's files (`.metadata`, one `__R_0.distcp`
per rank), `fcb.pt` (fcb's record of the step, the scheduler's and the trainer's state, rank
0's random generators) and `rng-R.pt` (the random generators of each other rank). It is
written under a temporary name and renamed by rank 0 after DCP's own collective has
confirmed every rank's shards; only then does the manifest (which records every file's size
and CRC-32) list it. Slot names (`best_model`, `last`, ...) are symbolic links to the step
directories. The commit order is the shared one (`fcb._host.store`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import IO, Any, cast

import torch
import torch.distributed as dist

from .._errors import CheckpointCorruptError, CheckpointWriteError
from .._files import TMP_PREFIX, ChecksumWriter, file_checksum, fsync_dir, symlink_atomic
from .._host.manifest import Models
from .._host.processes import ProcessGroup
from .._host.store import STEPS_DIR
from ._dcp_io import StagingBuffers, Trash, remove_tree, staging_writer
from ._store import _STEP_FILE, CheckpointStore

RECORD_FILE = "fcb.pt"
"""Rank 0's file of a sharded step: fcb's record, the scheduler's and trainer's state, rank
0's random generators."""

_RANK_FILE = re.compile(r"^(?:__(\d+)_.*|rng-(\d+)\.pt)$")
"""The files of a sharded step one rank writes (DCP's shards, its generators)."""
_STEP_DIR = re.compile(r"^step-(\d+)(\.[A-Za-z0-9._+=-]+)?$")


def rng_file(rank: int) -> str:
    """The file of a sharded step holding the random generators of rank `rank` > 0."""
    return f"rng-{rank}.pt"


def step_dir(step: int, models: Models) -> str:
    """The directory, relative to the store, of sharded `step` (optionally a subset)."""
    variant = "" if not models else "." + "+".join(models)
    return f"{STEPS_DIR}/step-{step:08d}{variant}"


def is_sharded(record: Mapping[str, Any]) -> bool:
    """Whether a manifest's file record is a sharded step (a directory of shards)."""
    return "shards" in record


def _write_error(error: BaseException | None, what: str) -> BaseException | None:
    """An `OSError` (or DCP's wrapping of one) as a `CheckpointWriteError` naming `what`."""
    if error is None or isinstance(error, CheckpointWriteError):
        return error
    if isinstance(error, (OSError, RuntimeError, ValueError)) or type(error).__name__ == (
        "CheckpointException"
    ):
        wrapped = CheckpointWriteError(
            f"could not write the sharded checkpoint {what}: {_reason(error)}; the previous "
            f"checkpoints are intact."
        )
        wrapped.__cause__ = error
        return wrapped
    return error


def _reason(error: BaseException) -> str:
    """The first operating-system reason inside `error` (DCP gathers each rank's failure)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, Mapping) and failures:
        rank, failure = sorted(failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_reason(inner) if isinstance(inner, BaseException) else inner}"
    text = getattr(error, "strerror", None)
    if text and getattr(error, "errno", None):
        return f"{text} (errno {errno.errorcode.get(error.errno, error.errno)})"  # type: ignore
    return str(error)


class ShardedStore(CheckpointStore):
    """Sharded steps of one run (see the module docstring); every rank opens it.

    `background=True` saves with DCP's `async_save` over a process group of its own: the
    loop waits only while the state is staged in host memory, and the step is committed at
    the next check (or `finish`), after its shards are durable.
    """

    def __init__(
        self, directory: str, *, processes: ProcessGroup | None = None, background: bool = False
    ):
        super().__init__(directory, suffix="", processes=processes)
        self.background = background
        self._group: Any = None
        self._flight: tuple[Any, str, dict[str, Any], dict[str, Any]] | None = None
        """The async save in flight: its future, its location, its record, the checksums
        of the files written so far."""
        self._known: dict[str, dict[str, int]] = {}  # the checksums of the write under way
        self._writes = 0  # counted alike on every rank: each write has its own directory
        self._partials: dict[str, str] = {}
        """The temporary directory of each location written and not yet renamed (a failed
        write's is removed with its entry; the others are renamed at the commit)."""
        self._staging = StagingBuffers()
        self._trash = Trash()

    sync_names = False  # a lost re-pointing is repaired at `open`: no fsync per commit

    def location(self, step: int, models: Models) -> str:
        return step_dir(step, models)

    step_file = location

    def _slot_extra(self, name: str, models: Models) -> dict[str, Any]:
        return {"link": name}

    # -- writes ------------------------------------------------------------------------------

    def _partial(self, relative: str) -> str:
        """A temporary directory (in `steps/`) for `relative`, new at each call."""
        steps, name = os.path.split(self.path(relative))
        return os.path.join(steps, f"{TMP_PREFIX}{name}-{self._writes}")

    def write_sharded(
        self,
        relative: str,
        step: int,
        models: Models,
        state: dict[str, Any],
        files: Mapping[str, Any],
    ) -> None:
        """Write one sharded step (a collective: every rank calls it): `state` through DCP
        (asynchronously with `background=True`), and this rank's own `files` (name ->
        object, `torch.save`d) beside it."""

        def save(partial: str) -> Any:
            import torch.distributed.checkpoint as dcp  # imported when a sharded step is saved

            writer = staging_writer(partial, self._known, self._staging)
            if self.background:
                return dcp.async_save(state, storage_writer=writer, process_group=self._group,
                                      no_dist=_one_process())
            dcp.save(state, storage_writer=writer, no_dist=_one_process())
            return None

        self.write_with_save(relative, step, models, save, files)

    def write_with_save(
        self,
        relative: str,
        step: int,
        models: Models,
        save: Callable[[str], Any],
        files: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one sharded step with `save(directory)`, called on every rank (e.g. a
        Lightning Trainer's `save_checkpoint` under a sharded strategy; it may return the
        future of an asynchronous save), and this rank's own `files` into the directory.

        No rank waits for another before writing: each write has a directory of its own
        (a killed attempt's is removed at the next open, a failed one's at once), and the
        ranks agree once, when every rank's files are durable and checksummed. Rank 0
        renames the directory at the commit, after checking the run directory is still
        this store's."""
        self._writes += 1
        partial = self._partials[relative] = self._partial(relative)
        known: dict[str, dict[str, int]] = {}
        self._known = known

        def write() -> Any:
            # DCP's save agrees on its own failures (every rank raises); this rank's files
            # come after it, inside the directory that becomes the step in one rename
            future = save(partial)
            if files:
                os.makedirs(partial, exist_ok=True)
            for name, obj in (files or {}).items():
                with open(os.path.join(partial, name), "wb") as raw:
                    f = ChecksumWriter(raw)
                    torch.save(obj, cast(IO[bytes], f))  # synced with the rest, after DCP
                known[name] = {"size": f.size, "crc32": f.crc32}
            return future

        record: dict[str, Any] = {"step": step, "models": models}
        try:
            if self.background:  # one agreement: every rank's save has started
                self._flight = (self._agreed(write, relative), relative, record, known)
            else:
                self._gather_shards(relative, record, known, self._attempt(write, relative)[1])
        except BaseException:
            self._discard(relative)
            raise
        self.record_write(relative, record)
        self.files_written += 1

    def _attempt(
        self, action: Callable[[], Any], relative: str
    ) -> tuple[Any, BaseException | None]:
        """`action()`'s result, or its failure (a disk failure as a `CheckpointWriteError`
        naming the location)."""
        try:
            return action(), None
        except BaseException as failure:
            return None, _write_error(failure, self.path(relative))

    def _agreed(self, action: Callable[[], Any], relative: str) -> Any:
        """`action()` on this rank; a failure on any rank raises on every rank."""
        result, error = self._attempt(action, relative)
        self.processes.agree_on_error(error)
        return result

    def _gather_shards(
        self,
        relative: str,
        record: dict[str, Any],
        known: Mapping[str, dict[str, int]],
        error: BaseException | None,
    ) -> None:
        """After this rank's files are written (or its `error`): each rank makes the files
        it wrote durable and checksums them, in parallel (DCP's `__R_*` and `rng-R.pt` are
        rank R's, the rest rank 0's); one collective agrees on failures and brings every
        checksum to rank 0, which records them in `record`."""
        partial = self._partials[relative]
        rank, count = self.processes.index, self.processes.count

        def writer(name: str) -> int:
            match = _RANK_FILE.match(name)
            index = int(match.group(1) or match.group(2)) if match else 0
            return index if index < count else 0

        def mine() -> str:
            names = sorted(n for n in os.listdir(partial) if writer(n) == rank)
            for name in names:  # DCP syncs its shards; this rank's other files (and a
                if not name.startswith("__"):  # Lightning strategy's meta.pt) are synced here
                    with open(os.path.join(partial, name), "rb") as f:
                        os.fsync(f.fileno())
            sums = {}
            for name in names:
                path = os.path.join(partial, name)
                checksum = known.get(name)  # computed as it was written
                if checksum is None or checksum["size"] != os.path.getsize(path):
                    checksum = file_checksum(path)
                sums[name] = checksum
            return json.dumps(sums)

        local = None
        if error is None:
            local, error = self._attempt(mine, relative)
        gathered = self.processes.gather_results(local, error)
        if self.processes.is_primary:
            shards: dict[str, Any] = {}
            for text in gathered:
                shards.update(json.loads(text))
            record["shards"] = dict(sorted(shards.items()))
            self.bytes_written += sum(s["size"] for s in shards.values())

    def _seal(self) -> None:
        written = set(self._partials) & set(self._written)  # durable, checksummed
        for relative in sorted(written):
            final, partial = self.path(relative), self._partials.pop(relative)
            fsync_dir(partial)
            if os.path.lexists(final):  # an unlisted step, left by a commit that failed
                remove_tree(final)
            os.replace(partial, final)
        if written:
            fsync_dir(os.path.join(self.directory, STEPS_DIR))

    def _discard(self, relative: str) -> None:
        """Delete what a failed write left (a kill leaves it to the next open)."""
        partial = self._partials.pop(relative, None)
        if self.processes.is_primary and partial and os.path.lexists(partial):
            with contextlib.suppress(OSError):
                remove_tree(partial)

    def _in_flight(self) -> bool:
        return self._flight is not None

    def _wait_written(self) -> None:
        if self._flight is None:
            return
        (future, relative, record, known), self._flight = self._flight, None
        try:
            self._gather_shards(relative, record, known, self._attempt(future.result, relative)[1])
        except BaseException:
            self._discard(relative)
            raise

    # -- backend operations ------------------------------------------------------------------

    def _open_backend(self) -> None:
        if self.background and dist.is_available() and dist.is_initialized():
            # async saves run their collectives in a thread: on a group of their own, never
            # interleaved with the loop's (metric reduction, stop agreement)
            self._group = dist.new_group(backend="gloo")
        for relative, record in self.manifest["files"].items():
            if not is_sharded(record):
                raise CheckpointCorruptError(
                    f"{self.directory} holds a run of single-file checkpoints ({relative}); a "
                    f"sharded model cannot resume it. Resume it with the model unsharded "
                    f"(sharded=False), or start a new run (existing_run='start_over' or "
                    f"another dirpath)."
                )

    def _close_backend(self) -> None:
        if self._flight is not None:
            with contextlib.suppress(Exception):
                self._flight[0].result()
            self._flight = None
        self._trash.empty()
        self._staging.release()
        if self._group is not None:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self._group)
            self._group = None

    def _repair(self) -> None:
        super()._repair()
        self._trash.empty()  # the unlisted steps just deleted: their temporary names too
        if self.processes.is_primary:  # the directories of writes a kill interrupted
            steps = os.path.join(self.directory, STEPS_DIR)
            for name in os.listdir(steps):
                if name.startswith(TMP_PREFIX) and os.path.isdir(os.path.join(steps, name)):
                    remove_tree(os.path.join(steps, name))

    def _check_listed(self, relative: str, record: Mapping[str, Any]) -> None:
        path = self.path(relative)
        if not os.path.isdir(path):
            raise CheckpointCorruptError(f"{path} is listed in {self.manifest_path} but missing.")
        for name, shard in record.get("shards", {}).items():
            super()._check_listed(f"{relative}/{name}", shard)

    def _on_disk(self) -> set[str]:
        steps = os.path.join(self.directory, STEPS_DIR)
        return {
            f"{STEPS_DIR}/{name}"
            for name in os.listdir(steps)
            if (_STEP_DIR.match(name) and os.path.isdir(os.path.join(steps, name)))
            or _STEP_FILE.match(name)
        }

    def _installed(self, old: Mapping[str, Any]) -> None:
        if self.processes.is_primary:
            super()._installed(old)

    def _delete(self, locations: set[str], files: Mapping[str, Any]) -> None:
        if self.processes.is_primary:
            super()._delete(locations, files)

    def _point(self, target: str, link: str) -> None:
        symlink_atomic(target, link)

    def _remove(self, relative: str) -> bool:
        partial = self._partials.pop(relative, None)  # a write whose commit failed
        if partial and os.path.isdir(partial):
            with contextlib.suppress(OSError):
                remove_tree(partial)
        path = self.path(relative)
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                self._trash.remove(path)  # renamed now, its files deleted in the background
            except OSError:
                return super()._remove(relative)  # warns, and is retried
            return True
        return super()._remove(relative)


def _one_process() -> bool:
    """No process group: DCP saves and loads in this process alone (and says nothing)."""
    return not (dist.is_available() and dist.is_initialized())


