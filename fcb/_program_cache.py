"""Compiled programs kept on disk, found before any tracing: `fcb.replay`'s loop in a fresh
process loads its executable instead of tracing, lowering and compiling it again.

JAX's persistent compilation cache (`fcb.enable_compile_cache`) skips the compile, but it
is keyed by the lowered program: every process still traces the callback and lowers the
loop first, which costs more than running it. This cache is keyed before tracing, by what
the program is made of:

- the source of fcb itself (every `.py` file of the package, hashed), the versions of
  Python, JAX, jaxlib, equinox and NumPy, the backend, its devices and the CPU's features,
  every JAX setting except the caches' own, and `XLA_FLAGS`;
- the callback's structure and every value it holds other than its arrays (its classes,
  static fields and other leaves), and the program's options;
- the shapes and dtypes of every array argument.

A key that missed a change would run a stale program: a silent wrong result. So it is only
used when every class in the callback is one of fcb's own and every value besides its
arrays is a plain one (None, a bool, a number, a string, an enum, a NumPy dtype, or tuples,
lists and string-keyed dicts of them); a user's class or function leaves the call to the
ordinary path (traced and compiled, JAX's own cache included). On a single device and a
single process only. The file repeats the full key and carries the SHA-256 of its payload;
a file that does not match, or does not load, is compiled again and replaced, and one that
loads but fails on its first run is deleted (that call takes the ordinary path). An
executable that JAX's own persistent cache served is never stored (see `_compile`). Files live in
`fcb-programs/` inside JAX's cache directory, and only while one is configured and
`FCB_COMPILE_CACHE` does not turn the cache off.
"""

from __future__ import annotations

import copyreg
import enum
import functools
import hashlib
import io
import json
import os
import pickle
import platform
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._compile_cache import _turned_off
from ._files import atomic_write

FORMAT = b"fcb-program 1\n"
SUBDIRECTORY = "fcb-programs"
PACKAGE = os.path.dirname(os.path.abspath(__file__))
HIT_EVENT = "/fcb/program_cache/hits"
"""A `jax.monitoring` event recorded each time a program or a value is loaded from disk."""
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_MEMORY_ENTRIES = 16
_loaded: OrderedDict[str, _Entry] = OrderedDict()  # key digest -> the program in memory


class _NotCacheable(Exception):
    """The program holds something its key could not describe exactly."""


def cached_call(
    name: str,
    program: Callable[..., Any],
    args: tuple[Any, ...],
    static: Any,
    options: Mapping[str, Any],
    fallback: Callable[[], Any],
) -> Any:
    """`program(*args)`, its executable loaded from disk when an earlier process compiled it.

    `program` is a function of the arrays `args` alone; everything else it uses is `static`
    (a pytree without arrays: the callback's non-array part) or `options` (plain values).
    When the cache is off or the program cannot be keyed exactly, `fallback()` runs instead.
    """
    directory = _directory()
    if directory is None:
        return fallback()
    try:
        key = _key(name, args, static, options)
    except _NotCacheable:
        return fallback()
    digest = hashlib.sha256(key).hexdigest()
    entry = _loaded.get(digest)
    if entry is None:
        path = os.path.join(directory, f"{digest}.program")
        compiled = _load(path, key, args)
        if compiled is not None:
            jax.monitoring.record_event(HIT_EVENT)
            entry = _Entry(compiled, path)
        else:
            try:
                compiled, whole = _compile(program, args, digest)
            except Exception:  # what `jax.jit` refuses (a state leaf that is not an array)
                return fallback()  # takes the ordinary path, which raises any real error
            if whole:
                _store(path, key, compiled)
            entry = _Entry(compiled, None)
        _loaded[digest] = entry
        while len(_loaded) > _MEMORY_ENTRIES:
            _loaded.popitem(last=False)
    if entry.unproven is None:
        return entry.compiled(*args)
    # A program read from disk runs to its end once before it is trusted: one that cannot
    # run is deleted and the call takes the ordinary path.
    try:
        out = jax.block_until_ready(entry.compiled(*args))
    except jax.errors.JaxRuntimeError:
        _loaded.pop(digest, None)
        _discard(entry.unproven)
        return fallback()
    entry.unproven = None
    return out


class _Entry:
    """A program in memory, and the file it was read from until its first run succeeds."""

    __slots__ = ("compiled", "unproven")

    def __init__(self, compiled: Any, unproven: str | None) -> None:
        self.compiled = compiled
        self.unproven = unproven


_jax_cache_hits = [0]


def _count_jax_cache_hit(event: str, **kwargs: Any) -> None:
    if event == _JAX_CACHE_HIT:
        _jax_cache_hits[0] += 1


@functools.lru_cache(maxsize=1)
def _listen_for_jax_cache_hits() -> None:
    jax.monitoring.register_event_listener(_count_jax_cache_hit)


def _compile(program: Callable[..., Any], args: tuple[Any, ...], digest: str) -> tuple[Any, bool]:
    """`program` compiled for `args`, and whether the executable is whole enough to store.

    An executable that JAX's own persistent cache served is not: on XLA:CPU, serialising it
    again drops kernels, and the file it makes loads but fails when run ("Function ... not
    found"). The program is named after its key, so JAX's entry for it (written as it
    compiles) is one that only this key reads; JAX serves it only when this key's file is
    gone, and then the executable is used in this process and not stored.
    """
    _listen_for_jax_cache_hits()

    def named(*arrays: Any) -> Any:
        return program(*arrays)

    named.__name__ = named.__qualname__ = f"{program.__name__}_{digest[:16]}"
    lowered = jax.jit(named).lower(*args)
    before = _jax_cache_hits[0]
    compiled = lowered.compile()
    return compiled, _jax_cache_hits[0] == before


def cached_value(
    name: str, compute: Callable[[], Any], callback: Any, options: Mapping[str, Any]
) -> Any:
    """`compute()`, a JSON value that depends only on `callback`'s structure, its values
    other than arrays, its arrays' shapes and dtypes and `options` (what tracing it tells,
    such as the metric keys it reads), kept on disk like the programs."""
    directory = _directory()
    if directory is None:
        return compute()
    dynamic, static = eqx.partition(callback, eqx.is_array)
    try:
        key = _key(name, (dynamic,), static, options)
    except _NotCacheable:
        return compute()
    path = os.path.join(directory, f"{hashlib.sha256(key).hexdigest()}.value")
    payload = _read(path, key)
    if payload is not None:
        jax.monitoring.record_event(HIT_EVENT)
        return json.loads(payload)
    value = compute()
    _write(path, key, json.dumps(value).encode())
    return value


def _directory() -> str | None:
    config: Any = jax.config  # its settings are attributes set at run time
    configured = config.jax_compilation_cache_dir
    if not configured or not config.jax_enable_compilation_cache or _turned_off():
        return None
    if jax.process_count() != 1 or jax.device_count() != 1:
        return None
    return os.path.join(str(configured), SUBDIRECTORY)


# -- the key --------------------------------------------------------------------------------


def _key(name: str, args: tuple[Any, ...], static: Any, options: Mapping[str, Any]) -> bytes:
    leaves, treedef = jax.tree_util.tree_flatten(static)
    arrays, arg_tree = jax.tree_util.tree_flatten(args)
    described = {
        "program": name,
        "machine": _machine(),
        "config": _config(),
        "static": [_tree(treedef), [_plain(leaf) for leaf in leaves]],
        "options": {str(k): _plain(v) for k, v in sorted(options.items())},
        "args": [_tree(arg_tree), [_array(leaf) for leaf in arrays]],
    }
    return json.dumps(described, sort_keys=True, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=1)
def _machine() -> dict[str, Any]:
    """What the process runs (read once: none of it changes while it runs)."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "fcb": source_digest(PACKAGE),
        "python": sys.version,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "equinox": eqx.__version__,
        "numpy": np.__version__,
        "platform": [platform.system(), platform.machine(), _cpu_features()],
        "backend": [device.platform, device.device_kind, device.client.platform_version],
    }


def source_digest(package: str) -> str:
    """The SHA-256 of every `.py` file under `package`: their paths and contents."""
    source = hashlib.sha256()
    paths = sorted(
        os.path.join(root, file)
        for root, _, files in os.walk(package)
        for file in files
        if file.endswith(".py")
    )
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        relative = os.path.relpath(path, package).encode()
        source.update(len(relative).to_bytes(8, "little") + relative)
        source.update(len(data).to_bytes(8, "little") + data)
    return source.hexdigest()


def _cpu_features() -> str:
    """The CPU's model and instruction-set flags (an executable compiled for one CPU may not
    run on another sharing the cache directory)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return platform.processor()
    first = text.split("\n\n", 1)[0]
    lines = [line for line in first.splitlines() if line.split(":")[0].strip() in
             ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _config() -> dict[str, str]:
    """Every JAX setting but the caches' own and logging's, and the XLA flags."""
    values = {
        name: repr(value)
        for name, value in jax.config.values.items()
        if "cache" not in name and "log" not in name
    }
    values["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return values


_CONTAINERS = (tuple, list, dict, type(None))


def _tree(treedef: Any) -> Any:
    """The structure: each node's class and its data, which must be plain; fcb's classes and
    the builtin containers only."""
    node = treedef.node_data()
    if node is None:
        return "*"
    kind, data = node
    if kind not in _CONTAINERS and not _is_fcb_class(kind):
        raise _NotCacheable(kind)
    children = [_tree(child) for child in treedef.children()]
    return [f"{kind.__module__}.{kind.__qualname__}", _plain(data), children]


def _is_fcb_class(kind: type) -> bool:
    module = getattr(kind, "__module__", "") or ""
    return (module == "fcb" or module.startswith("fcb.")) and "<locals>" not in kind.__qualname__


def _plain(value: Any) -> Any:
    """A JSON description that tells every distinct plain value apart (type included)."""
    if value is None or isinstance(value, (bool, str)):
        return [type(value).__name__, value]
    if isinstance(value, enum.Enum):
        if not _is_fcb_class(type(value)):
            raise _NotCacheable(value)
        return ["enum", f"{type(value).__module__}.{type(value).__qualname__}", value.name]
    if type(value) is int:
        return ["int", str(value)]
    if type(value) is float:
        return ["float", value.hex()]
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        return ["numpy", str(value.dtype), value.tobytes().hex()]
    if isinstance(value, np.dtype):
        return ["dtype", value.str]
    if isinstance(value, type) and issubclass(value, np.generic):
        return ["scalar type", np.dtype(value).str]
    if type(value) in (tuple, list):
        return [type(value).__name__, [_plain(v) for v in value]]
    if type(value) is dict and all(type(k) is str for k in value):
        return ["dict", [[k, _plain(v)] for k, v in value.items()]]  # in order: code may iterate it
    if type(value).__name__ == "_Missing" and type(value).__module__.startswith("equinox."):
        return ["missing"]  # equinox's marker for a module without wrapper fields
    raise _NotCacheable(value)


def _array(leaf: Any) -> Any:
    if not isinstance(leaf, (np.ndarray, jax.Array)) or isinstance(leaf, jax.core.Tracer):
        raise _NotCacheable(leaf)
    weak = bool(getattr(leaf, "weak_type", False))
    return [list(leaf.shape), str(leaf.dtype), weak]


# -- the file -------------------------------------------------------------------------------


def _missing() -> Any:
    from equinox._module._flatten import MISSING

    return MISSING


def _pickler(file: io.BytesIO) -> pickle.Pickler:
    """A pickler of the program's trees that keeps equinox's marker for a module without
    wrapper fields the one marker equinox tests for (`is`), as unpickling it must."""
    pickler = pickle.Pickler(file, protocol=pickle.HIGHEST_PROTOCOL)
    table = copyreg.dispatch_table.copy()
    table[type(_missing())] = lambda _: (_missing, ())
    pickler.dispatch_table = table
    return pickler


def _store(path: str, key: bytes, compiled: Any) -> None:
    """Write the executable beside its key; a program that cannot be serialised, or a
    directory that cannot be written, keeps it in this process only."""
    from jax.experimental.serialize_executable import serialize

    try:
        serialized, in_tree, out_tree = serialize(compiled)
        buffer = io.BytesIO()
        _pickler(buffer).dump((serialized, in_tree, out_tree))
    except Exception:  # an executable JAX cannot serialise is simply not kept
        return
    _write(path, key, buffer.getvalue())


def _load(path: str, key: bytes, args: tuple[Any, ...]) -> Any:
    """The executable stored at `path` for exactly `key`, or None (absent, another key, a
    damaged file, or trees that are not the arguments')."""
    from jax.experimental.serialize_executable import deserialize_and_load

    payload = _read(path, key)
    if payload is None:
        return None
    try:
        serialized, in_tree, out_tree = pickle.loads(payload)
        if in_tree != jax.tree_util.tree_structure((args, {})):
            return None
        return deserialize_and_load(serialized, in_tree, out_tree)
    except Exception:  # a file that does not load is compiled again
        return None


def _write(path: str, key: bytes, payload: bytes) -> None:
    """`path` holds the format line, a header (the key's size, the payload's SHA-256), the
    full key and the payload; written atomically. A directory that cannot be written is no
    error: the value is simply not kept."""
    header = json.dumps(
        {"key_size": len(key), "sha256": hashlib.sha256(payload).hexdigest()}
    ).encode()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: f.write(FORMAT + header + b"\n" + key + payload))
    except OSError:
        return


def _discard(path: str) -> None:
    """Remove a stored file that proved unusable (already gone, or not removable: no error)."""
    try:
        os.remove(path)
    except OSError:
        return


def _read(path: str, key: bytes) -> bytes | None:
    """The payload stored at `path` for exactly `key` and intact, or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        if not data.startswith(FORMAT):
            return None
        end = data.index(b"\n", len(FORMAT))
        header = json.loads(data[len(FORMAT) : end])
        start = end + 1
        stored_key = data[start : start + header["key_size"]]
        payload = data[start + header["key_size"] :]
    except (ValueError, KeyError, TypeError):
        return None
    if stored_key != key or hashlib.sha256(payload).hexdigest() != header["sha256"]:
        return None
    return payload
