"""The random generators a Torch checkpoint records, captured exactly and cheaply.

`np.random.get_state()` copies MT19937's 624-word key one element at a time (most of a
save's RNG cost). NumPy's bit generators publish the address of their state struct
(`bit_generator.ctypes.state_address`; MT19937's is the key, then the position), so the key
is read in one copy. The legacy Gaussian cache (`has_gauss`, `gauss`) lives in the
`RandomState` itself; where it lives is found once per process on a scratch `RandomState`
(by setting values and seeing where they appear) and checked against `get_state()`; if
anything does not match exactly, every capture uses `get_state()`.

Python's `random` keeps its Mersenne Twister in the `random.Random` object too (a C int,
the position, then the 624-word key); where is found the same way, on a scratch generator,
and each generator's first read is checked against `getstate()`. The key is saved as one
int64 tensor, not as `getstate()`'s tuple of 625 ints: `torch.save` calls back into Python
for every object it pickles, which made the tuple cost a small checkpoint's save more than
its model did.
"""

from __future__ import annotations

import _random
import ctypes
import random
import struct
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_WORDS = 624
"""MT19937's key length; the struct holds the key, then the position (a C int)."""


def _gauss_offsets() -> tuple[int, int] | None:
    """Where a `RandomState` keeps its Gaussian cache (`has_gauss` as a C int, `gauss` as a
    double), as offsets into the object; `None` unless found unambiguously."""
    if sys.implementation.name != "cpython":  # id() is the address only in CPython
        return None
    scratch = np.random.RandomState(np.random.MT19937(0))
    size = type(scratch).__basicsize__
    key, pos, _, _ = _slow(scratch)

    def memory(has_gauss: int, gauss: float) -> bytes:
        scratch.set_state(("MT19937", key, pos, has_gauss, gauss))
        return ctypes.string_at(id(scratch), size)

    markers = (1.2345678912345e-200, -9.87654321e150)
    seen = [memory(1, marker) for marker in markers]
    cleared = memory(0, 0.0)
    gauss = [
        offset
        for offset in range(0, size - 7, 8)
        if all(raw[offset : offset + 8] == struct.pack("d", m) for raw, m in zip(seen, markers))
        and cleared[offset : offset + 8] == bytes(8)
    ]
    if len(gauss) != 1:
        return None
    flags = [
        offset
        for offset in range(0, size - 3, 4)
        if not gauss[0] - 4 < offset < gauss[0] + 8
        and all(struct.unpack_from("i", raw, offset)[0] == 1 for raw in seen)
        and struct.unpack_from("i", cleared, offset)[0] == 0
    ]
    return (flags[0], gauss[0]) if len(flags) == 1 else None


class _DirectRead:
    """Captures of a generator's state read straight from its memory, trusted only where
    exact: where the state lives is found once per process (`_locate`; `None`: not found),
    the first read of each generator is compared with the generator's own getter (`_slow`),
    and one difference makes every later capture use the getter."""

    def __init__(self) -> None:
        self.exact = True
        """False once a direct read was found to differ from the getter (never again)."""
        self._layout: Any = None
        self._calibrated = False
        self._source: tuple[Any, ...] = ()
        """The objects read (held, so the memory read stays theirs)."""
        self._views: Any = None

    def capture(self) -> Any:
        source = self._current()
        if not self.exact or source is None:
            return self._slow()
        if not self._calibrated:
            self._layout, self._calibrated = self._locate(), True
        if self._layout is None:
            return self._slow()
        checked = len(source) == len(self._source) and all(
            a is b for a, b in zip(source, self._source, strict=True)
        )
        if not checked:
            self._source, self._views = source, self._view(source, self._layout)
        read = self._read(source, self._views)
        if not checked:
            slow = self._slow()
            if not self._same(read, slow):
                self.exact = False
                return slow
        return read

    # what each generator supplies
    def _current(self) -> tuple[Any, ...] | None:
        """The objects holding the state (`None`: a generator not read directly)."""
        raise NotImplementedError

    def _locate(self) -> Any:
        raise NotImplementedError

    def _view(self, source: tuple[Any, ...], layout: Any) -> Any:
        raise NotImplementedError

    def _read(self, source: tuple[Any, ...], views: Any) -> Any:
        raise NotImplementedError

    def _slow(self) -> Any:
        raise NotImplementedError

    def _same(self, read: Any, slow: Any) -> bool:
        raise NotImplementedError


class NumpyState(_DirectRead):
    """Captures of NumPy's global generator equal to `np.random.get_state(legacy=True)`:
    `(key, pos, has_gauss, gauss)`."""

    def _current(self) -> tuple[Any, ...] | None:
        legacy = np.random.mtrand._rand
        generator = legacy._bit_generator
        return (legacy, generator) if type(generator) is np.random.MT19937 else None

    def _locate(self) -> tuple[int, int] | None:
        return _gauss_offsets()

    def _view(self, source: tuple[Any, ...], layout: tuple[int, int]) -> Any:
        legacy, generator = source
        memory = (ctypes.c_uint32 * (_WORDS + 1)).from_address(generator.ctypes.state_address)
        flag, gauss = layout
        return (  # the key and position, `has_gauss` and `gauss`
            np.ctypeslib.as_array(memory),
            ctypes.c_int.from_address(id(legacy) + flag),
            ctypes.c_double.from_address(id(legacy) + gauss),
        )

    def _read(self, source: tuple[Any, ...], views: Any) -> tuple[np.ndarray, int, int, float]:
        words, flag, gauss = views
        position = int(words[_WORDS:].view(np.int32)[0])
        return words[:_WORDS].copy(), position, flag.value, gauss.value

    def _slow(self) -> tuple[np.ndarray, int, int, float]:
        return _slow()

    def _same(self, read: Any, slow: Any) -> bool:
        return _same(read, slow)


def _slow(generator: Any = np.random) -> tuple[np.ndarray, int, int, float]:
    state = generator.get_state(legacy=True)
    assert isinstance(state, tuple)  # legacy=True: ('MT19937', keys, pos, has_gauss, g)
    _, keys, pos, has_gauss, cached = state
    return np.asarray(keys, np.uint32), int(pos), int(has_gauss), float(cached)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return bool(np.array_equal(a[0], b[0])) and tuple(a[1:]) == tuple(b[1:])


NUMPY = NumpyState()


def _random_offset() -> int | None:
    """Where a `random.Random` keeps its position (a C int) followed by its 624-word key, as
    an offset into the object; `None` unless found unambiguously."""
    if sys.implementation.name != "cpython":
        return None
    scratch = random.Random()
    size = _random.Random.__basicsize__
    words = tuple(range(0x9E3779B9, 0x9E3779B9 + _WORDS * 7919, 7919))
    key = struct.pack(f"{_WORDS}I", *words)
    found: set[int] | None = None
    for position in (_WORDS, 17):
        scratch.setstate((random.Random.VERSION, (*words, position), None))
        raw = ctypes.string_at(id(scratch), size)
        here = {
            offset - 4
            for offset in range(4, size - len(key) + 1, 4)
            if raw[offset : offset + len(key)] == key
            and struct.unpack_from("i", raw, offset - 4)[0] == position
        }
        found = here if found is None else found & here
    return next(iter(found)) if found is not None and len(found) == 1 else None


class PythonRandomState(_DirectRead):
    """Captures of the generator behind `random.getstate()`: `{"state": <int64 tensor of
    getstate()'s 625 ints>, "version", "gauss_next"}`."""

    def _current(self) -> tuple[Any, ...] | None:
        generator = getattr(random.getstate, "__self__", None)
        return (generator,) if isinstance(generator, random.Random) else None

    def _locate(self) -> int | None:
        return _random_offset()

    def _view(self, source: tuple[Any, ...], layout: int) -> np.ndarray:
        memory = (ctypes.c_uint32 * (_WORDS + 1)).from_address(id(source[0]) + layout)
        return np.ctypeslib.as_array(memory)  # the position, then the key

    def _read(self, source: tuple[Any, ...], views: np.ndarray) -> dict[str, Any]:
        (generator,) = source
        state = np.empty(_WORDS + 1, np.int64)
        state[:_WORDS] = views[1:]
        state[_WORDS] = views[:1].view(np.int32)[0]
        return {
            "state": torch.from_numpy(state),
            "version": generator.VERSION,
            "gauss_next": generator.gauss_next,
        }

    def _slow(self) -> dict[str, Any]:
        version, state, gauss_next = random.getstate()
        return {
            "state": torch.from_numpy(np.array(state, np.int64)),
            "version": version,
            "gauss_next": gauss_next,
        }

    def _same(self, read: Any, slow: Any) -> bool:
        return bool(torch.equal(read["state"], slow["state"])) and (
            read["version"],
            read["gauss_next"],
        ) == (slow["version"], slow["gauss_next"])


PYTHON_RANDOM = PythonRandomState()


def rng_state() -> dict[str, Any]:
    """The random generators a training step may draw from, in a form every weights-only
    load reads: torch's CPU generator, CUDA's (once CUDA is in use: a process that never
    initialised it has drawn nothing there), NumPy's global generator, Python's `random`."""
    keys, pos, has_gauss, cached = NUMPY.capture()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "random": PYTHON_RANDOM.capture(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `rng_state` saved (a checkpoint of an earlier fcb holds torch's only)."""
    if "torch" in state:
        torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)
    if "numpy" in state:
        saved = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                saved["keys"].numpy().astype(np.uint32),
                saved["pos"],
                saved["has_gauss"],
                saved["cached_gaussian"],
            )
        )
    if "random" in state:
        saved_random = state["random"]
        if isinstance(saved_random, Mapping):  # the key as a tensor
            saved_random = (
                saved_random["version"],
                tuple(saved_random["state"].tolist()),
                saved_random["gauss_next"],
            )
        random.setstate(saved_random)  # or the tuple of `random.getstate()` itself
