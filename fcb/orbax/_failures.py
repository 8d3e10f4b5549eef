"""How orbax failures are reported (the first cause, without tensorstore's specs), and the
interpreter-exit hook that commits the last save."""

from __future__ import annotations

import atexit
import errno
import re
import threading
import weakref
from collections.abc import Callable


def reason(error: BaseException) -> str:
    """What went wrong first: orbax may raise a barrier timeout while handling the write
    error that caused it (the write error is then the timeout's context)."""
    first = error
    while first.__cause__ or first.__context__:
        first = first.__cause__ or first.__context__  # type: ignore[assignment]
    reason = brief(error)
    if first is error:
        return reason
    return f"{type(first).__name__}: {brief(first)} (then: {type(error).__name__}: {reason})"


def brief(error: BaseException) -> str:
    """An error's message on one line, without the tensorstore spec a write error carries
    (a kilobyte of JSON): the cause ("No space left on device") is before it."""
    text = _TENSORSTORE_SPEC.sub("", " ".join(str(error).split()))
    return text if len(text) <= 600 else text[:600] + "..."


_TENSORSTORE_SPEC = re.compile(r" ?\[tensorstore_spec='.*?'\]")


_DISK_FULL = ("No space left on device", "RESOURCE_EXHAUSTED", "Disk quota exceeded")


def disk_full_hint(error: BaseException) -> str:
    """What to do about a full disk, when that is what `error` (or its cause) says."""
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            word in str(seen) for word in _DISK_FULL
        ):
            return " (the disk is full: free space)"
        seen = seen.__cause__ or seen.__context__
    return ""


def register_exit_hook(method: weakref.WeakMethod[Callable[[], None]]) -> None:
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
