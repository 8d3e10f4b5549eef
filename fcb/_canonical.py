"""Canonical JSON: the one spelling of a state dict that a checkpoint records and a
manifest's seal hashes, and state dicts that carry theirs (encoded once)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """The canonical JSON of a JSON-safe value: sorted keys, no spaces, ASCII, strict (no
    NaN). What a checkpoint records of the callbacks' state and what a manifest's seal hashes.

    The text of an `EncodedStateDict` (encoded once) is reused, also as the value of a dict's
    key: `canonical_json(v)` always equals `json.dumps(v, sort_keys=True, separators=(",",
    ":"), allow_nan=False)`."""
    if type(value) is EncodedStateDict:
        return value.json
    if (
        type(value) is dict
        and any(type(v) is EncodedStateDict for v in value.values())
        and all(type(k) is str for k in value)
    ):
        # the runs of other entries between encoded ones (in key order) are encoded at once
        parts: list[str] = []
        run: dict[str, Any] = {}
        for key in sorted(value):
            item = value[key]
            if type(item) is EncodedStateDict:
                if run:
                    parts.append(_CANONICAL.encode(run)[1:-1])
                    run = {}
                parts.append(f"{_CANONICAL.encode(key)}:{item.json}")
            else:
                run[key] = item
        if run:
            parts.append(_CANONICAL.encode(run)[1:-1])
        return "{" + ",".join(parts) + "}"
    return _CANONICAL.encode(value)


def canonical_object(texts: Mapping[str, str]) -> str:
    """The canonical JSON of an object whose values are given as canonical JSON texts."""
    return "{" + ",".join(f"{_CANONICAL.encode(k)}:{texts[k]}" for k in sorted(texts)) + "}"


class EncodedStateDict(dict[str, Any]):
    """A state dict (equal to `fcb.state_dict`'s) with its canonical JSON `json`, encoded
    once as it is built (`Runner.encoded_state_dict`): a checkpoint and the manifest of its
    commit reuse the text instead of encoding the dict again.

    Read-only, so the text stays what the dict holds: changing it raises `TypeError`, and a
    copy (`dict(d)`, `copy.deepcopy`, pickling) is a plain dict. Every key at every depth
    is a `str` (so the text is also that of the state dict read back from JSON)."""

    __slots__ = ("json",)

    def __init__(self, value: Mapping[str, Any], text: str):
        super().__init__(value)
        self.json = text

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an encoded state dict is read-only; change a copy: dict(state_dict)")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


MARK = "\0"
"""Where a value goes in a `template`: canonical JSON never holds a raw NUL (it escapes it)."""

_ELEMENT = re.compile(r"\[[-+.0-9eEtrufals,]*\]|[-+.0-9eEtrufals]+")
"""The JSON of a number, a boolean, or a flat list of those (no quote, brace or inner
bracket can match: a string, an object or a deeper list never does)."""


def template(text: str) -> tuple[str, ...]:
    """The fixed parts of a canonical JSON text built with `MARK` where each value goes
    (e.g. as a text given to `canonical_object`): encoded once, filled at every `fill`."""
    return tuple(text.split(MARK))


def fill(parts: Sequence[str], values: list[Any]) -> str | None:
    """The text of `template` `parts` with the canonical JSON of each of `values` in place
    (in order), all values encoded in one call; as `canonical_json`, a NaN or an infinity
    raises `ValueError`. The values must be numbers, booleans or flat lists of those (`None`
    otherwise)."""
    encoded = _CANONICAL.encode(values)[1:-1]
    elements = _ELEMENT.findall(encoded)
    if len(elements) != len(values) or ",".join(elements) != encoded:
        return None  # the elements are not exactly the values (or not all of the text)
    if len(parts) != len(values) + 1:
        return None
    out = [parts[0]]
    for element, part in zip(elements, parts[1:], strict=True):
        out += (element, part)
    return "".join(out)
