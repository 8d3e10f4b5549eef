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
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, cast

import torch
import torch.distributed as dist

from .._errors import CheckpointCorruptError, CheckpointWriteError
from .._files import TMP_PREFIX, ChecksumWriter, crc32, file_checksum, fsync_dir, temp_path
from .._host.manifest import Models
from .._host.processes import ProcessGroup
from .._host.store import STEPS_DIR
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
        self._known: dict[str, dict[str, int]] = {}

    sync_names = False  # a lost re-pointing is repaired at `open`: no fsync per commit

    def location(self, step: int, models: Models) -> str:
        return step_dir(step, models)

    step_file = location

    def _slot_extra(self, name: str, models: Models) -> dict[str, Any]:
        return {"link": name}

    # -- writes ------------------------------------------------------------------------------

    def _partial(self, relative: str) -> str:
        steps, name = os.path.split(self.path(relative))
        return os.path.join(steps, f"{TMP_PREFIX}{name}")

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

            writer = dcp.FileSystemWriter(partial, sync_files=True)
            writer.fs = _checksumming_file_system(self._known)  # no read-back to checksum
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
        future of an asynchronous save), and this rank's own `files` into the directory."""
        final, partial = self.path(relative), self._partial(relative)
        self._known = {}

        def prepare() -> None:
            self._lock.check()  # the directory is still this store's (`check_owned`)
            for leftover in (partial, final):  # a killed attempt's files, an unlisted step's
                if os.path.lexists(leftover):
                    _remove_tree(leftover)
            if files:
                os.makedirs(partial)

        def save_all() -> Any:
            # DCP's save agrees on its own failures (every rank raises); this rank's files
            # come after it, inside the directory that becomes the step in one rename
            future = save(partial)
            for name, obj in (files or {}).items():
                with open(os.path.join(partial, name), "wb") as raw:
                    f = ChecksumWriter(raw)
                    torch.save(obj, cast(IO[bytes], f))  # synced with the rest at `_seal`
                self._known[name] = {"size": f.size, "crc32": f.crc32}
            return future

        # on_primary agrees (a collective): no rank writes before the directory is ready
        self.processes.on_primary(lambda: self._agreed_locally(prepare, relative))
        record: dict[str, Any] = {"step": step, "models": models}
        try:
            future = self._agreed(save_all, relative)
            if future is not None:
                self._flight = (future, relative, record, self._known)
            else:
                self._seal(relative, record, self._known)
        except BaseException:
            self._discard(partial)
            raise
        self.record_write(relative, record)
        self.files_written += 1

    def _agreed_locally(self, action: Callable[[], Any], relative: str) -> Any:
        """`action()`, its disk failure as a `CheckpointWriteError` (no collective)."""
        try:
            return action()
        except BaseException as failure:
            error = _write_error(failure, self.path(relative))
            if error is None or error is failure:
                raise
            raise error from failure

    def _agreed(self, action: Callable[[], Any], relative: str) -> Any:
        """`action()` on this rank; a failure on any rank raises on every rank."""
        result, error = None, None
        try:
            result = action()
        except BaseException as failure:
            error = _write_error(failure, self.path(relative))
        self.processes.agree_on_error(error)
        return result

    def _seal(
        self, relative: str, record: dict[str, Any], known: Mapping[str, dict[str, int]]
    ) -> None:
        """After every rank's shards are written: each rank checksums the files it wrote
        (DCP's `__R_*`, its `rng-R.pt`; rank 0 the rest), in parallel; rank 0 records them,
        makes the directory durable and gives it its step's name."""
        final, partial = self.path(relative), self._partial(relative)
        rank = self.processes.index

        def writer(name: str) -> int:
            match = _RANK_FILE.match(name)
            return int(match.group(1) or match.group(2)) if match else 0

        def mine() -> dict[str, dict[str, int]]:
            # durable before anything refers to them: the files this rank wrote besides
            # DCP's shards (DCP syncs those), and a Lightning strategy's meta.pt
            for name in sorted(os.listdir(partial)):
                if writer(name) == rank and not name.startswith("__"):
                    with open(os.path.join(partial, name), "rb") as f:
                        os.fsync(f.fileno())
            sums = {}
            for name in sorted(os.listdir(partial)):
                if writer(name) == rank:
                    path = os.path.join(partial, name)
                    record = known.get(name)  # computed as it was written
                    if record is None or record["size"] != os.path.getsize(path):
                        record = file_checksum(path)
                    sums[name] = record
            return sums

        local = self._agreed(mine, relative)
        gathered = self.processes.gather_text(json.dumps(local))

        def seal() -> None:
            shards: dict[str, Any] = {}
            for text in gathered:
                shards.update(json.loads(text or "{}"))
            missing = sorted(set(os.listdir(partial)) - set(shards))
            shards.update({name: file_checksum(os.path.join(partial, name)) for name in missing})
            fsync_dir(partial)
            os.replace(partial, final)
            fsync_dir(os.path.dirname(final))
            record["shards"] = dict(sorted(shards.items()))
            self.bytes_written += sum(s["size"] for s in shards.values())

        self.processes.on_primary(lambda: self._agreed_locally(seal, relative))

    def _discard(self, partial: str) -> None:
        """Delete what a failed write left (a kill leaves it to the next open)."""
        if self.processes.is_primary and os.path.lexists(partial):
            with contextlib.suppress(OSError):
                _remove_tree(partial)

    def _in_flight(self) -> bool:
        return self._flight is not None

    def _wait_written(self) -> None:
        if self._flight is None:
            return
        (future, relative, record, known), self._flight = self._flight, None
        try:
            self._agreed(future.result, relative)
            self._seal(relative, record, known)
        except BaseException:
            self._discard(self._partial(relative))
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
        if self._group is not None:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self._group)
            self._group = None

    def _repair(self) -> None:
        super()._repair()
        if self.processes.is_primary:  # the directories of writes a kill interrupted
            steps = os.path.join(self.directory, STEPS_DIR)
            for name in os.listdir(steps):
                if name.startswith(TMP_PREFIX) and os.path.isdir(os.path.join(steps, name)):
                    _remove_tree(os.path.join(steps, name))

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
        path = self.path(relative)
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                _remove_tree(path)
            except OSError:
                return super()._remove(relative)  # warns, and is retried
            return True
        partial = self._partial(relative)
        if os.path.isdir(partial):
            with contextlib.suppress(OSError):
                _remove_tree(partial)
        return super()._remove(relative)


class _Checksummed:
    """A stream DCP writes one file through: its size and CRC-32 are computed on the way
    (a file written anywhere but at its end is read back instead)."""

    def __init__(self, raw: Any):
        self.raw, self.size, self.crc32, self.sequential = raw, 0, 0, True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self.raw.write(view)
        done = len(view) if written is None else written
        self.crc32 = crc32(view[:done], self.crc32)
        self.size += done
        return done

    def seek(self, *args: Any) -> int:
        self.sequential = False
        return int(self.raw.seek(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _checksumming_file_system(known: dict[str, dict[str, int]]) -> Any:
    """DCP's local file system, recording each written file's size and CRC-32 in `known`
    (by file name, following DCP's rename of its `.metadata`)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class ChecksummingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                tracked = _Checksummed(stream)
                yield tracked
            if tracked.sequential:
                known[os.path.basename(path)] = {"size": tracked.size, "crc32": tracked.crc32}

        def rename(self, path: Any, new_path: Any) -> None:
            super().rename(path, new_path)
            record = known.pop(os.path.basename(path), None)
            if record is not None:
                known[os.path.basename(new_path)] = record

    return ChecksummingFileSystem()


def _one_process() -> bool:
    """No process group: DCP saves and loads in this process alone (and says nothing)."""
    return not (dist.is_available() and dist.is_initialized())


def _remove_tree(path: str) -> None:
    """Delete a step directory: renamed first, so a kill mid-deletion leaves a temporary
    name (removed at the next open), never a step directory with files missing."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    doomed = temp_path(path)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def symlink_atomic(target: str, link: str) -> None:
    """Make the name `link` a relative symbolic link to the directory `target`, replaced in
    one rename (a reader sees the old step or the new one)."""
    relative = os.path.relpath(target, os.path.dirname(link))
    if os.path.islink(link) and os.readlink(link) == relative:
        return
    tmp = temp_path(link)
    try:
        os.symlink(relative, tmp)
        os.replace(tmp, link)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CheckpointWriteError(
            f"could not point {link} at {target}: {error.strerror or error}; the manifest is "
            f"authoritative and the next run repairs the name."
        ) from error
