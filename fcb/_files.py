"""Crash-safe file primitives for the adapters (never used by the pure core).

Every file is written to a temporary name in its final directory, flushed, fsynced and
`os.replace`d, and the directory is fsynced, so a reader sees the old file or the new one,
never a partial one, even after a kill.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from ._canonical import canonical_json
from ._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointWriteError,
    DirectoryInUseError,
)

try:  # ISA-L computes the same CRC-32 as zlib several times faster (`fcb[torch]` installs it)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32

TMP_PREFIX = ".fcb-tmp-"
LOCK_NAME = ".fcb.lock"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: str) -> str:
    directory, name = os.path.split(final)
    return os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")


class ChecksumWriter:
    """A binary file wrapper that counts bytes and computes CRC-32 while writing."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.size = 0
        self.crc32 = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc32 = crc32(view, self.crc32)
        self.size += len(view)
        try:
            return self.raw.write(view)
        except OSError as error:
            self.error = error  # a serializer may hide it behind its own error on clean-up
            raise

    def flush(self) -> None:
        self.raw.flush()


@contextlib.contextmanager
def _replacing(final: str) -> Iterator[str]:
    """Yield a temporary path beside `final`; on success move it over `final` atomically.

    On any failure the temporary file is removed, `final` is untouched, and an `OSError`
    becomes a [`fcb.CheckpointWriteError`][] naming the file and the cause.
    """
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(final) or ".")
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise CheckpointWriteError(
                f"could not write {final}: {error.strerror or error} (errno "
                f"{errno.errorcode.get(error.errno or 0, error.errno)}); the previous files are "
                f"intact."
            ) from error
        raise


def atomic_write(final: str, write: Callable[[ChecksumWriter], object]) -> dict[str, int]:
    """Write `final` atomically with `write(file)`; return its size and CRC-32."""
    with _replacing(final) as tmp, open(tmp, "wb") as raw:
        out = ChecksumWriter(raw)
        try:
            write(out)
        except Exception as error:
            # torch.save, for one, answers a failed write with "RuntimeError: unexpected
            # pos" from its zip writer; the disk error is the one to report
            if out.error is not None and error is not out.error:
                raise out.error from error
            raise
        raw.flush()
        os.fsync(raw.fileno())
    return {"size": out.size, "crc32": out.crc32}


def atomic_write_path(final: str, save: Callable[[str], object]) -> dict[str, int]:
    """Like `atomic_write` for writers that take a path: `save(tmp_path)` writes the file."""
    with _replacing(final) as tmp:
        save(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        record = file_checksum(tmp)
    return record


def atomic_write_json(final: str, value: Any) -> dict[str, int]:
    """Write `value` atomically as its canonical JSON (compact, sorted keys, ASCII, strict):
    the encoder in C, and an encoded state dict inside is not encoded again (an indented
    dump takes Python's encoder, 9x slower on a run's manifest)."""
    data = canonical_json(value).encode()
    return atomic_write(final, lambda f: f.write(data))


def file_checksum(path: str, chunk: int = 1 << 22) -> dict[str, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = crc32(block, crc)
            size += len(block)
    return {"size": size, "crc32": crc}


def verify(path: str, expected: dict[str, Any]) -> None:
    """Raise [`fcb.CheckpointCorruptError`][] unless `path` has the recorded size and CRC-32."""
    if not os.path.exists(path):
        raise CheckpointCorruptError(f"{path} is missing (the manifest records it).")
    actual_size = os.path.getsize(path)
    if actual_size != expected["size"]:
        raise CheckpointCorruptError(
            f"{path} has {actual_size} bytes, the manifest records {expected['size']} "
            f"(truncated or replaced)."
        )
    if file_checksum(path)["crc32"] != expected["crc32"]:
        raise CheckpointCorruptError(
            f"{path} does not match its recorded CRC-32 checksum (its bytes changed)."
        )


def shard_checksums(directory: str) -> dict[str, dict[str, int]]:
    """The size and CRC-32 of every file of a sharded checkpoint's directory (flat)."""
    return {
        name: file_checksum(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
    }


def verify_location(path: str, expected: Mapping[str, Any]) -> int:
    """`verify` of one location the manifest lists: a file, or a sharded checkpoint's
    directory (every shard file it records); returns its size in bytes."""
    shards = expected.get("shards")
    if shards is None:
        verify(path, dict(expected))
        return int(expected["size"])
    if not os.path.isdir(path):
        raise CheckpointCorruptError(f"{path} is missing (the manifest records it).")
    for name, record in sorted(shards.items()):
        verify(os.path.join(path, name), record)
    return sum(int(record["size"]) for record in shards.values())


def link_atomic(target: str, link: str) -> None:
    """Make `link` name the same file as `target` (hard link; copy where links fail)."""
    if os.path.exists(link) and os.path.samefile(target, link):
        return

    def make(tmp: str) -> None:
        try:
            os.link(target, tmp)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                raise
            with open(target, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
                dst.flush()
                os.fsync(dst.fileno())

    _name_atomic(target, link, make)


def symlink_atomic(target: str, link: str) -> None:
    """Make the name `link` a relative symbolic link to the directory `target`, replaced in
    one rename (a reader sees the old step or the new one)."""
    relative = os.path.relpath(target, os.path.dirname(link))
    if os.path.islink(link) and os.readlink(link) == relative:
        return
    _name_atomic(target, link, lambda tmp: os.symlink(relative, tmp))


def _name_atomic(target: str, link: str, make: Callable[[str], None]) -> None:
    """`make` a temporary name beside `link`, then rename it to `link`; a failure is a
    `CheckpointWriteError` (the manifest, not the name, says which step a slot holds)."""
    tmp = temp_path(link)
    try:
        make(tmp)
        os.replace(tmp, link)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CheckpointWriteError(
            f"could not point {link} at {target}: {error.strerror or error}; the manifest is "
            f"authoritative and the next run repairs the name."
        ) from error


def remove_temporaries(directory: str) -> list[str]:
    """Delete temporary files a killed writer left behind; return their names."""
    removed = []
    for root, _, files in os.walk(directory):
        for name in files:
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


class DirectoryLock:
    """An exclusive advisory lock on a checkpoint directory, released when the process dies.

    An advisory lock guards a *file*: deleting `.fcb.lock`, or the whole directory, lets a
    second writer lock a new file and write beside (or over) the first. So the holder checks,
    before it writes, that the name still leads to the file it locked and the directory is
    still the one it opened (`check`): a writer whose lock was bypassed stops, it never
    mixes its checkpoints with another run's.
    """

    ATTEMPTS = 3
    """Opens of the lock file before a name re-pointed under us counts as taken."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        """(device, inode) of the locked file and of the directory at `acquire`."""
        self._directory_identity: tuple[int, int] | None = None

    def acquire(self) -> None:
        for _ in range(self.ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The name may have been re-pointed between the open and the lock (the file we
            # opened deleted, another writer's created): then we locked an orphan.
            if _identity(os.fstat(fd)) == _path_identity(self.path):
                break
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        else:
            raise self._in_use(_read_holder(self.path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        self._identity = _identity(os.fstat(fd))
        self._directory_identity = _path_identity(self.directory)

    def _in_use(self, holder: str) -> DirectoryInUseError:
        return DirectoryInUseError(
            f"{self.directory} is being written by another fcb adapter (process {holder}). "
            f"Give this run its own directory (dirpath=...), or close the other adapter first."
        )

    def intact(self) -> bool:
        """Whether the lock still guards the directory (`check` without the error)."""
        try:
            self.check()
        except CheckpointError:
            return False
        return True

    def check(self) -> None:
        """Raise unless `.fcb.lock` is still the file this lock holds, in the directory it
        opened: [`fcb.CheckpointWriteError`][] when the directory was deleted (or deleted and
        created again), [`fcb.DirectoryInUseError`][] when the lock file was deleted or
        replaced or another adapter now holds the directory. Does nothing when not held."""
        if self._fd is None:
            return
        directory = _path_identity(self.directory)
        lock = _path_identity(self.path)
        if directory == self._directory_identity and lock == self._identity:
            return
        holder = _read_holder(self.path) if lock is not None else None
        other = f" Another fcb adapter (process {holder}) has opened it since." if holder else ""
        stop = " This adapter writes nothing more there, so the two runs never mix."
        if directory is None or directory != self._directory_identity:
            gone = "deleted" if directory is None else "deleted and created again"
            message = (
                f"the run directory {self.directory} was {gone} while this adapter was "
                f"writing to it (No such file or directory): the checkpoints this run "
                f"committed are gone.{other}{stop} Start the run again, in a directory no "
                f"clean-up job and no other run deletes while it writes (dirpath=...)."
            )
            raise (DirectoryInUseError if holder else CheckpointWriteError)(message)
        what = "deleted" if lock is None else "replaced"
        kept = (
            "the other run may have replaced the checkpoints this one committed"
            if holder
            else "the checkpoints this run committed are intact: resume from them with "
            f"resume_from={self.directory!r}"
        )
        raise DirectoryInUseError(
            f"{self.path} was {what} while this adapter held it, so another adapter could open "
            f"the directory and two writers would overwrite each other's checkpoints and slot "
            f"table.{other}{stop} Give every run its own directory (dirpath=...) and leave "
            f".fcb.lock alone while a run writes there; {kept}."
        )

    def release(self) -> None:
        if self._fd is not None:
            # The file goes while still locked (only if it is still ours): an adapter that
            # opened the name meanwhile locks an orphan, sees it and takes a new file.
            if _path_identity(self.path) == self._identity:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._identity = self._directory_identity = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _path_identity(path: str) -> tuple[int, int] | None:
    try:
        return _identity(os.stat(path))
    except FileNotFoundError:
        return None


def _holder(fd: int) -> str:
    """The process id a lock file records (its holder writes it)."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


def _read_holder(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "unknown"
    try:
        return _holder(fd)
    finally:
        os.close(fd)
