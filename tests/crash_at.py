"""Run `tests/torch_training.py` and SIGKILL it just before its Nth file-system operation.

    CRASH_AT=N python tests/crash_at.py DIR [torch_training.py's options]

The operations counted are the ones that change what is on disk: opening a file for writing,
replace / rename / link / unlink / mkdir / rmdir / truncate, and fsync, in any thread. With
`CRASH_AT=0` nothing is killed and the number of operations is printed last, on stderr.
"""

from __future__ import annotations

import builtins
import io
import os
import signal
import sys
import threading

_CRASH_AT = int(os.environ.get("CRASH_AT", "0"))
_count = 0
_lock = threading.Lock()


def _operation() -> None:
    global _count
    with _lock:
        _count += 1
        if _count == _CRASH_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def _counted(function):
    def wrapper(*args, **kwargs):
        _operation()
        return function(*args, **kwargs)

    return wrapper


_open, _os_open = builtins.open, os.open
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _open_counted(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+"):
        _operation()
    return _open(file, mode, *args, **kwargs)


def _os_open_counted(path, flags, *args, **kwargs):
    if flags & _WRITES:
        _operation()
    return _os_open(path, flags, *args, **kwargs)


def install() -> None:
    """Count (and kill at) this process's disk operations from now on; only in the process
    this file runs as (importing it changes nothing)."""
    for name in ("replace", "rename", "link", "symlink", "unlink", "remove", "rmdir", "mkdir",
                 "fsync", "truncate", "ftruncate"):
        setattr(os, name, _counted(getattr(os, name)))
    builtins.open = io.open = _open_counted
    os.open = _os_open_counted


if __name__ == "__main__":
    install()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_training

    code = torch_training.main(sys.argv[1:])
    print(f"operations: {_count}", file=sys.stderr)
    sys.exit(code)
