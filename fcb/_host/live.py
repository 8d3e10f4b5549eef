"""Reading a run that may be being written: one consistent snapshot, or a clear "being written".

A writer commits a check in this order (`fcb._host.store`): the step's location is written,
the manifest is replaced atomically (a new file, so a new inode), then locations the new
manifest no longer lists are deleted. So a location listed by a manifest stays as it was
until a *later* manifest has replaced that one. A reader therefore

1. notes the manifest's identity (inode, size, times), reads the manifest, then reads what it
   needs of the files it lists;
2. when a read fails, or a result needs the manifest unchanged, compares the identity again:
   unchanged, nothing was committed meanwhile and the failure is the files' own (corrupt);
   changed, a commit raced the read, and it starts over on the new manifest.

A run whose manifest keeps changing faster than it can be read is reported as being written
([`fcb.DirectoryInUseError`][]), never as corrupt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, TypeVar

from .._errors import CheckpointCorruptError, DirectoryInUseError
from .._files import LOCK_NAME, crc32
from .manifest import MANIFEST_NAME, read_manifest

T = TypeVar("T")

ATTEMPTS = 60
"""Reads of a run before it is reported as being written (about 5 s of back-off in all)."""

Stamp = tuple[int, int, int, int] | None


def stamp(directory: str) -> Stamp:
    """The identity of the run's manifest (a replaced manifest is a new file); `None`: none."""
    try:
        st = os.stat(os.path.join(directory, MANIFEST_NAME))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def writer_pid(directory: str) -> int | None:
    """The process holding the run's directory lock, as the kernel lists it (Linux
    `/proc/locks`); `None` when no process holds it or the system does not say. Reading the
    list takes no lock, so a writer opening the directory meanwhile is never disturbed."""
    try:
        st = os.stat(os.path.join(directory, LOCK_NAME))
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue  # a waiting request, or another kind of lock
        if fields[5] == wanted:
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None


def being_written(directory: str, detail: str) -> str:
    pid = writer_pid(directory)
    holder = f" (process {pid} holds its lock)" if pid is not None else ""
    return f"{directory} is being written{holder}: {detail}"


def read_live(
    directory: str,
    storage: str | None,
    read: Callable[[dict[str, Any]], T],
    *,
    changed_ok: Callable[[T], bool] = lambda result: False,
    discard: Callable[[T], None] = lambda result: None,
    attempts: int = ATTEMPTS,
) -> T:
    """`read(manifest)` on one committed state of the run in `directory`.

    A failure of `read` (any exception) is raised only when the manifest did not change
    meanwhile; otherwise it is retried on the new manifest. A result is returned when the
    manifest did not change, or when `changed_ok(result)` says it holds all the same (e.g.
    checked against the manifest's checksums); else it is `discard`ed and read again.
    An `OSError` of a stable manifest (a file missing) is a `CheckpointCorruptError`.
    """
    directory = os.path.abspath(directory)
    failure: BaseException | None = None
    for attempt in range(attempts):
        before = stamp(directory)
        try:
            if before is None and writer_pid(directory) is not None:
                raise DirectoryInUseError(
                    being_written(directory, "it has committed no checkpoint yet.")
                )
            result = read(read_manifest(directory, storage))
        except DirectoryInUseError:
            raise
        except Exception as error:
            if stamp(directory) == before:
                if isinstance(error, OSError):
                    raise CheckpointCorruptError(
                        f"{getattr(error, 'filename', None) or directory} cannot be read "
                        f"({error.strerror or error}), and the manifest lists it."
                    ) from error
                raise
            failure = error
        else:
            if stamp(directory) == before or changed_ok(result):
                return result
            discard(result)
        time.sleep(min(0.002 * 2**attempt, 0.1))
    exhausted = DirectoryInUseError(
        being_written(
            directory,
            f"it committed a new checkpoint during each of {attempts} attempts to read it, so "
            f"no consistent checkpoint could be read. Read it again, or after the run; its "
            f"files are intact.",
        )
    )
    raise exhausted from failure


def open_listed(directory: str, manifest: Mapping[str, Any], relative: str) -> IO[bytes]:
    """Open a location the manifest lists (a snapshot of it: the open file outlives a
    deletion by the writer)."""
    path = os.path.join(directory, relative)
    if relative not in manifest["files"]:
        raise CheckpointCorruptError(
            f"{path} is not listed in {os.path.join(directory, MANIFEST_NAME)}."
        )
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing (the manifest records it).") from None


def verify_open(f: IO[bytes], path: str, expected: Mapping[str, Any], chunk: int = 1 << 22):
    """`fcb._files.verify` of an open file (the messages are the same); rewinds it."""
    size = os.fstat(f.fileno()).st_size
    if size != expected["size"]:
        raise CheckpointCorruptError(
            f"{path} has {size} bytes, the manifest records {expected['size']} (truncated or "
            f"replaced)."
        )
    f.seek(0)
    crc = 0
    while block := f.read(chunk):
        crc = crc32(block, crc)
    f.seek(0)
    if crc != expected["crc32"]:
        raise CheckpointCorruptError(
            f"{path} does not match its recorded CRC-32 checksum (its bytes changed)."
        )
