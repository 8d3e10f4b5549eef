"""Checkpoints that can always be loaded: what `torch.load(weights_only=True)` accepts is
checked before a step is written, and a load that fails is named without unsafe advice.

fcb reads every checkpoint with `weights_only=True` (no code from the file runs while
loading), and so does Lightning's `Trainer.fit(ckpt_path=...)`. A state dict holding any
other object (a NumPy array, an `argparse.Namespace`, a `defaultdict`...) would give a file
that no run can resume from, at every step. So fcb refuses to write it, at the first check,
naming the entry. It does not convert such values into a loadable form: `load_state_dict`
must get back what `state_dict()` gave, and Lightning reads the files without fcb.

The check is the weights-only unpickler itself, run on the payload with every tensor
replaced by a stub, so it follows torch's rules exactly (types allowed with
`torch.serialization.add_safe_globals` included) and costs a pickle of the structure only.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import _weights_only_unpickler

from .._errors import CheckpointWriteError

_PICKLE_PROTOCOL = 2
"""The protocol `torch.save` pickles with."""


class _Skeleton(pickle.Pickler):
    """Pickles a payload's structure: a tensor becomes a call of its class, without data."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            kind = torch.Tensor if type(obj) is torch.nn.Parameter else type(obj)
            return (kind, ())  # a tensor subclass stays visible to the unpickler's rules
        return NotImplemented


def refusal(obj: Any) -> str | None:
    """Why `torch.load(weights_only=True)` would refuse `obj` (its tensors aside), or None."""
    buffer = io.BytesIO()
    try:
        _Skeleton(buffer, protocol=_PICKLE_PROTOCOL).dump(obj)
    except Exception as error:  # a lambda, a lock, an open file...
        return f"it cannot be pickled at all: {type(error).__name__}: {error}"
    buffer.seek(0)
    try:
        _weights_only_unpickler.Unpickler(buffer, encoding="utf-8").load()
    except Exception as error:
        return weights_only_reason(error)
    return None


def weights_only_reason(error: BaseException) -> str:
    """The part of torch's weights-only error that says what is refused (without its advice
    to load with `weights_only=False`, which runs code from the file)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    for advice in ("Please use `torch.serialization", "Check the documentation of torch.load"):
        text = text.split(advice, 1)[0]
    found = re.search(r"Unsupported global: GLOBAL (\S+) was not an allowed global", text)
    if found:
        return f"the weights-only unpickler does not allow {found.group(1)}"
    return " ".join(text.split()).rstrip(". ")[:300]


def _children(obj: Any) -> list[tuple[str, Any]]:
    """The entries of a container, keys and attributes included (any may be refused)."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            pairs.append((f" (the key {key!r})", key))
            pairs.append((f"[{key!r}]", value))
        # e.g. a module state dict's `_metadata`, pickled with the dict
        pairs += [(f" (its attribute {n!r})", v) for n, v in getattr(obj, "__dict__", {}).items()]
    elif isinstance(obj, (list, tuple)):
        pairs = [(f"[{index}]", value) for index, value in enumerate(obj)]
    elif isinstance(obj, (set, frozenset)):
        pairs = [(" (an element)", value) for value in obj]
    return pairs


_ATOMS = {
    str, bytes, int, float, bool, complex, type(None),
    torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device,
}
"""Types a weights-only load always reads (exactly these types, not their subclasses)."""

_CONTAINERS = {dict, OrderedDict, list, tuple, set}


def _plainly_loadable(obj: Any) -> bool:
    """Whether `obj` holds only `_ATOMS` in `_CONTAINERS` (keys and attributes included): a
    weights-only load reads it. The walk of every save, without building a path for each
    entry; anything else (False) is left to `find_unloadable`, which names it."""
    kind = type(obj)
    if kind in _ATOMS:
        return True
    if kind is dict or kind is OrderedDict:
        for key, value in obj.items():  # an atom is checked here, without a call
            if type(key) not in _ATOMS or (
                type(value) not in _ATOMS and not _plainly_loadable(value)
            ):
                return False
        attributes = getattr(obj, "__dict__", None)
        return not attributes or _plainly_loadable(dict(attributes))
    if kind is list or kind is tuple or kind is set:
        return all(type(value) in _ATOMS or _plainly_loadable(value) for value in obj)
    return False


def find_unloadable(obj: Any, path: str = "") -> tuple[str, Any, str] | None:
    """The deepest entry of `obj` a weights-only load refuses: `(path, value, reason)`.

    Plain containers and values are walked in Python; anything else is put to the
    weights-only unpickler itself (so a state dict of tensors costs no pickling)."""
    kind = type(obj)
    if kind in _ATOMS:
        return None
    if kind in _CONTAINERS:
        for suffix, child in _children(obj):
            found = find_unloadable(child, path + suffix)
            if found is not None:
                return found
        return None
    reason = refusal(obj)
    if reason is None:
        return None
    for suffix, child in _children(obj):  # inside a refused container: the deepest entry
        if refusal(child) is not None:
            return find_unloadable(child, path + suffix) or (path + suffix, child, reason)
    return path, obj, reason


def type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}"
    )


_FIX = (
    "Keep tensors, numbers, strings, lists, tuples and dicts in state dicts (e.g. "
    "torch.from_numpy(array) or array.tolist() for a NumPy array, vars(namespace) for an "
    "argparse.Namespace); fcb saves the torch, CUDA, NumPy and `random` RNG states itself. To "
    "keep the type, allow it in every process that saves or loads the checkpoints: "
    "torch.serialization.add_safe_globals([...]). The previous checkpoints are intact."
)


def check_loadable(
    owner: str, step: int, payload: Mapping[str, Any], describe: Callable[[str, str], str]
) -> None:
    """Raise `CheckpointWriteError` unless `torch.load(weights_only=True)` can read `payload`
    back; `describe(entry, path)` names where a refused value is (`path` inside the
    payload's `entry`), for the message."""
    for entry, part in payload.items():
        found = None if _plainly_loadable(part) else find_unloadable(part)
        if found is None:
            continue
        path, value, reason = found
        kind = type_name(value)
        why = "" if reason.endswith(f"does not allow {kind}") else f": {reason}"
        raise CheckpointWriteError(
            f"{owner}: the checkpoint of step {step} is not written: {describe(entry, path)} "
            f"holds a {kind}, which torch.load(weights_only=True) refuses{why}; no run could "
            f"load this checkpoint or resume from it. {_FIX}"
        )
