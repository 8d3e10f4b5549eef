"""Compile once per machine: JAX's persistent compilation cache in a per-user directory.

Every fresh process compiles fcb's programs (the chain's check, `fcb.replay`'s loop) again;
XLA:CPU takes 0.4-1 s for them. JAX can keep compiled programs on disk and load them in the
next process instead. `enable_compile_cache` turns that on; the `fcb` command calls it before
running a subcommand. Importing fcb changes no JAX setting.
"""

from __future__ import annotations

import os
import sys

import jax

from ._errors import ConfigError

ENVIRONMENT_VARIABLE = "FCB_COMPILE_CACHE"
"""`FCB_COMPILE_CACHE=0` turns the cache off (for the `fcb` command and
`fcb.enable_compile_cache`); `1`, or unset, leaves it on."""

_DIRECTORY_SETTING = "jax_compilation_cache_dir"
_OFF = ("0", "false", "off", "no")
_ON = ("", "1", "true", "on", "yes")


def default_cache_dir() -> str:
    """The per-user cache directory: `$XDG_CACHE_HOME/fcb/jax-compile` (default
    `~/.cache/fcb/jax-compile`; `~/Library/Caches/...` on macOS, `%LOCALAPPDATA%\\...` on
    Windows)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser(r"~\AppData\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "fcb", "jax-compile")


def _turned_off() -> bool:
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if value is None or value.strip().lower() in _ON:
        return False
    if value.strip().lower() in _OFF:
        return True
    raise ConfigError(
        f"fcb.enable_compile_cache: environment variable {ENVIRONMENT_VARIABLE}={value!r} is "
        f"not understood; set it to 0 to turn the compilation cache off, or 1 (or unset it) to "
        f"leave it on."
    )


def enable_compile_cache(path: str | os.PathLike[str] | None = None) -> str | None:
    """Keep compiled programs on disk, so that the next process loads them instead of
    compiling again; return the cache directory in use, or `None` when turned off.

    Call it once at the top of a training script, before the first compilation. It sets
    JAX's persistent compilation cache (`jax_compilation_cache_dir`) to `path`, by default a
    per-user directory (`~/.cache/fcb/jax-compile` on Linux), and caches every program
    whatever its compile time or size (`jax_persistent_cache_min_compile_time_secs = 0`,
    `jax_persistent_cache_min_entry_size_bytes = -1`): fcb's programs compile in well under
    JAX's default threshold of one second, which would keep them out of the cache.
    `fcb.replay` also keeps its loop's executable in `fcb-programs/` inside that directory,
    keyed before tracing (fcb's source, the versions, the settings, the callbacks' classes
    and values), so that a warm process traces nothing either; callbacks with classes or
    functions of the user's own are traced as usual.

    A cache directory configured already (`JAX_COMPILATION_CACHE_DIR` or
    `jax.config.update("jax_compilation_cache_dir", ...)`) is respected: when `path` is
    not given, that directory and its settings are kept as they are. The environment
    variable `FCB_COMPILE_CACHE=0` turns this call off (it then changes nothing and returns
    `None`). The `fcb` command calls it with no arguments; `import fcb` changes no JAX
    setting.

    >>> import os, tempfile
    >>> directory = os.path.join(tempfile.mkdtemp(), "jax-cache")
    >>> os.environ["FCB_COMPILE_CACHE"] = "0"
    >>> print(fcb.enable_compile_cache(directory))  # turned off: nothing changes
    None
    >>> del os.environ["FCB_COMPILE_CACHE"]
    """
    if _turned_off():
        return None
    configured = getattr(jax.config, _DIRECTORY_SETTING)
    if path is None and configured:
        return str(configured)
    directory = os.path.abspath(os.fspath(path) if path is not None else default_cache_dir())
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"fcb.enable_compile_cache: path = {directory!r} cannot be created ({error}); pass "
            f"a writable directory, or set {ENVIRONMENT_VARIABLE}=0 to turn the cache off."
        ) from None
    jax.config.update(_DIRECTORY_SETTING, directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
