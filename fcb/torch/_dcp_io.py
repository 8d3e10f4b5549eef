"""The file operations of sharded steps: DCP's file system with checksums computed as it
writes, host buffers that asynchronous saves stage into and reuse, step directories deleted
by name at once and by content in the background, and atomic symbolic links."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .._files import crc32, temp_path


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


def checksumming_file_system(known: dict[str, dict[str, int]]) -> Any:
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


class StagingBuffers:
    """The host copy an asynchronous save writes from, kept from one save to the next.

    DCP's default stager allocates a new copy of the whole state at every save (most of the
    time the loop is blocked); the layout of a training state does not change between
    checks, so the copy is made into the same buffers, reallocated only when a tensor's
    shape, dtype or the tree's structure changes. One save at a time uses them: the store
    waits for a save in flight before staging the next. They hold one copy of this rank's
    state in host memory for the life of the store.
    """

    def __init__(self) -> None:
        self._layout: tuple[Any, ...] | None = None
        self._buffers: Any = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        layout = tuple(_layout(state))
        if layout != self._layout:
            self._buffers = _create_cpu_state_dict(state, pin_memory=torch.cuda.is_available())
            self._layout = layout
        return _copy_state_dict(state, self._buffers)

    def release(self) -> None:
        self._layout = self._buffers = None


def _layout(tree: Any, path: str = "") -> Iterator[Any]:
    """The structure of a state dict, with every tensor's type, dtype and local shape."""
    if isinstance(tree, torch.Tensor):
        local = getattr(tree, "_local_tensor", tree)
        yield path, type(tree).__name__, tree.dtype, tuple(local.shape), tuple(tree.shape)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _layout(value, f"{path}/{key}")
    elif isinstance(tree, (list, tuple)):
        yield path, type(tree).__name__, len(tree)
        for i, value in enumerate(tree):
            yield from _layout(value, f"{path}/{i}")
    else:
        yield path, type(tree).__name__


def staging_writer(path: str, known: dict[str, dict[str, int]], buffers: StagingBuffers) -> Any:
    """DCP's `FileSystemWriter` into `path`: files synced, checksums recorded in `known`,
    an asynchronous save staged into `buffers`."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def stage(self, state_dict: Any) -> Any:
            return buffers.stage(state_dict)

    writer = Writer(path, sync_files=True)
    writer.fs = checksumming_file_system(known)  # no read-back to checksum
    return writer


class Trash:
    """Deletes step directories: each is renamed to a temporary name at once (a kill
    mid-deletion never leaves a step directory with files missing, and the next open
    removes the temporary name), and its files are deleted by a background thread, so the
    loop does not wait for the file system to free them."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def remove(self, path: str) -> None:
        doomed = _doom(path)
        if doomed is not None:
            thread = threading.Thread(
                target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True}, daemon=True
            )
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def empty(self) -> None:
        """Wait until every deletion started has finished."""
        for thread in self._threads:
            thread.join()
        self._threads = []


def remove_tree(path: str) -> None:
    """Delete a step directory, renamed first (see `Trash`), in this thread."""
    doomed = _doom(path)
    if doomed is not None:
        shutil.rmtree(doomed)


def _doom(path: str) -> str | None:
    """Unlink a file or link; rename a directory to a temporary name and return it."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return None
    doomed = temp_path(path)
    os.replace(path, doomed)
    return doomed
