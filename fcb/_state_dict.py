"""state_dict / load_state_dict: versioned, JSON-safe snapshots of callback state."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._core import Callback
from ._errors import ConfigChangedWarning, StateDictError

FORMAT = "fcb.state_dict"
VERSION = 1

NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
"""The one JSON spelling of non-finite numbers (state dicts, manifests, histories)."""


def json_number(x: Any) -> Any:
    """A Python scalar with non-finite floats spelled as strings, so strict JSON holds them."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def is_check(record: Mapping[str, Any]) -> bool:
    """Whether a `history.jsonl` record is a check (or a flat row of metrics): not the end
    of a run's summary, nor a slot evaluated after training."""
    return "metrics" in record or not ("summary" in record or "evaluated" in record)


def decode_number(value: Any) -> Any:
    """The inverse of `json_number`: `"nan"`, `"inf"`, `"-inf"` back to floats."""
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    return value


def _encode_values(array: np.ndarray) -> Any:
    values = array.tolist()
    if array.ndim == 0:
        return json_number(values)
    return jax.tree_util.tree_map(json_number, values)


def _decode_values(values: Any) -> Any:
    if isinstance(values, list):
        return [_decode_values(v) for v in values]
    if isinstance(values, str):
        if values not in NON_FINITE:
            raise ValueError(f"unexpected string {values!r}")
        return NON_FINITE[values]
    return values


def _flat(values: Any) -> list[Any]:
    if isinstance(values, list):
        return [x for v in values for x in _flat(v)]
    return [values]


def _value_problem(values: Any, dtype: np.dtype) -> str | None:
    """Why the decoded JSON `values` cannot be stored exactly as `dtype` (None when they can).

    NumPy would convert silently: None to NaN, 1.7 to 1, 1e39 to inf, True to 1.
    """
    for x in _flat(values):
        if dtype == np.bool_:
            if not isinstance(x, bool):
                return f"{x!r} is not a bool"
        elif jnp.issubdtype(dtype, jnp.integer):
            if isinstance(x, float) and math.isfinite(x) and x == int(x):
                x = int(x)
            if isinstance(x, bool) or not isinstance(x, int):
                return f"{x!r} is not an integer"
            info = jnp.iinfo(dtype)
            if not info.min <= x <= info.max:
                return f"{x!r} is out of the range of {dtype} [{info.min}, {info.max}]"
        elif jnp.issubdtype(dtype, jnp.floating):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                return f"{x!r} is not a number"
            largest = float(jnp.finfo(dtype).max)
            if math.isfinite(x) and abs(x) > largest and not _rounds_into(x, dtype):
                return f"{x!r} is beyond the range of {dtype} (largest finite value {largest:.8g})"
    return None


def _rounds_into(x: float, dtype: np.dtype) -> bool:
    """Whether finite `x` stays finite as `dtype` (values just above the largest round down)."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.asarray(x, dtype)))


def describe(tree: Any) -> str:
    """A readable structural type of a state pytree, e.g. `(EarlyStoppingState, ())`."""
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return "(" + ", ".join(describe(t) for t in tree) + ")"
    if isinstance(tree, list):
        return "[" + ", ".join(describe(t) for t in tree) + "]"
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in sorted(tree.items())) + "}"
    if tree is None:
        return "None"
    if dataclasses.is_dataclass(tree) or hasattr(tree, "_fields"):
        return type(tree).__name__
    return "array"


def _leaves(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def encode_config(callback: Callback) -> dict[str, Any]:
    """The callback's configuration as plain JSON-safe values, field by field."""
    config: dict[str, Any] = {}
    for field in dataclasses.fields(callback):
        if field.metadata.get("derived"):  # computed from the other fields (fcb.Packed's layout)
            continue
        config[field.name] = _encode_config_value(getattr(callback, field.name))
    return config


def _encode_config_value(value: Any) -> Any:
    if isinstance(value, Callback):
        return {"callback": type(value).__name__, "config": encode_config(value)}
    if isinstance(value, (tuple, list)):
        return [_encode_config_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode_config_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return json_number(value)
    try:
        return _encode_values(np.asarray(value))
    except Exception:
        return repr(value)


def state_dict(state: Any, callback: Callback | None = None) -> dict[str, Any]:
    """A JSON-safe snapshot of a callback state.

    The result holds plain Python values only (non-finite floats are spelled `"nan"`, `"inf"`,
    `"-inf"`), so it survives `json.dumps` / `json.loads` exactly. It records the format
    version, the state's structure, and every leaf's dtype, shape and value. Pass the
    `callback` to record its type and config too, so that loading can warn about changes.

    >>> es = fcb.EarlyStopping(monitor="val_loss", patience=2)
    >>> state, _ = es(es.init(), {"val_loss": 0.3}, step=0)
    >>> d = json.loads(json.dumps(fcb.state_dict(state, es)))
    >>> restored = fcb.load_state_dict(es, d)
    >>> float(restored.best), int(restored.best_step)
    (0.30000001192092896, 0)
    """
    if isinstance(state, Callback) or (callback is not None and not isinstance(callback, Callback)):
        raise StateDictError(_swap_message("state_dict", state, callback))
    leaves = {}
    for path, leaf in _leaves(state).items():
        array = np.asarray(leaf)
        leaves[path] = {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "value": _encode_values(array),
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "callback": None if callback is None else type(callback).__name__,
        "config": None if callback is None else encode_config(callback),
        "state": {"type": describe(state), "leaves": leaves},
    }


_SIGNATURES = {
    "state_dict": ("fcb.state_dict(state, callback)", "state", "callback"),
    "load_state_dict": ("fcb.load_state_dict(callback, state_dict)", "callback", "state_dict"),
}


def _kind(value: Any) -> str:
    if isinstance(value, Callback):
        return f"the callback {type(value).__name__}"
    if isinstance(value, Mapping) and value.get("format") == FORMAT:
        return "a state dict"
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"


def _swap_message(function: str, first: Any, second: Any) -> str:
    """The error for arguments given in the wrong order (or of the wrong kind)."""
    signature, first_name, second_name = _SIGNATURES[function]
    if function == "load_state_dict":
        swapped = isinstance(second, Callback) and not isinstance(first, Callback)
    else:
        swapped = isinstance(first, Callback) and second is not None
        swapped = swapped and not isinstance(second, Callback)
    got = f"got {_kind(first)} as {first_name} and {_kind(second)} as {second_name}"
    if swapped:
        return f"fcb.{function}: the arguments are swapped ({got}); the call is {signature}."
    hint = (
        " Pass the callback's state: what callback.init() or a check returned."
        if function == "state_dict" and isinstance(first, Callback)
        else ""
    )
    return f"fcb.{function}: {got}; the call is {signature}.{hint}"


def _flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(config, list) and any(isinstance(v, (Mapping, list)) for v in config):
        out = {}
        for i, value in enumerate(config):
            out.update(_flatten_config(value, f"{prefix}[{i}]"))
        return out
    return {prefix: config}


def _identity_changes(callback: Callback, saved: Any, path: str = "") -> list[str]:
    """Changes of `identity_fields`, here and in nested callbacks, as readable lines."""
    if not isinstance(saved, Mapping):
        return []
    changes = []
    for name in type(callback).identity_fields:
        before, now = saved.get(name), _encode_config_value(getattr(callback, name))
        if name in saved and before != now:
            changes.append(f"{path}{name} was {before!r}, is now {now!r}")
    for field in dataclasses.fields(callback):
        value, nested = getattr(callback, field.name), saved.get(field.name)
        children = value if isinstance(value, tuple) else (value,)
        nested_list = nested if isinstance(nested, list) else [nested]
        for i, (child, record) in enumerate(zip(children, nested_list)):
            if isinstance(child, Callback) and isinstance(record, Mapping):
                where = (
                    f"{path}{field.name}[{i}]."
                    if isinstance(value, tuple)
                    else f"{path}{field.name}."
                )
                changes += _identity_changes(child, record.get("config"), where)
    return changes


def _warn_config_changes(callback: Callback, saved: Any) -> None:
    current = _flatten_config(encode_config(callback))
    before = _flatten_config(saved)
    name = type(callback).__name__
    for key in sorted(set(current) | set(before)):
        if current.get(key, "<absent>") != before.get(key, "<absent>"):
            warnings.warn(
                f"{name}: the state dict was saved with {key} = {before.get(key, '<absent>')!r}, "
                f"the current config has {key} = {current.get(key, '<absent>')!r}; the current "
                f"config is used.",
                ConfigChangedWarning,
                stacklevel=3,
            )


def load_state_dict(callback: Callback, state_dict: Mapping[str, Any]) -> Any:
    """Rebuild a state of `callback` from [`fcb.state_dict`][]'s output.

    Checks the format version, the callback type, the state structure, and every leaf's shape
    and dtype, and raises [`fcb.StateDictError`][] listing every mismatch. When the saved config
    differs from `callback`'s, the current config wins and a [`fcb.ConfigChangedWarning`][]
    names each differing field.
    """
    if not isinstance(callback, Callback) or isinstance(state_dict, Callback):
        raise StateDictError(_swap_message("load_state_dict", callback, state_dict))
    name = type(callback).__name__
    if not isinstance(state_dict, Mapping) or state_dict.get("format") != FORMAT:
        raise StateDictError(
            f"{name}: expected a dict made by fcb.state_dict (with format {FORMAT!r}), got "
            f"{type(state_dict).__name__}"
            + (
                f" with format {state_dict.get('format')!r}"
                if isinstance(state_dict, Mapping)
                else ""
            )
            + "."
        )
    version = state_dict.get("version")
    if version != VERSION:
        raise StateDictError(
            f"{name}: the state dict has format version {version!r}; this fcb reads version "
            f"{VERSION}. Save it again with this fcb version, or load it with the fcb that "
            f"wrote it."
        )
    saved_callback = state_dict.get("callback")
    if saved_callback is not None and saved_callback != name:
        raise StateDictError(
            f"{name}: the state dict belongs to a {saved_callback} callback and cannot be loaded "
            f"into {name}. Load it into a {saved_callback}, or start {name} from init()."
        )
    template = callback.init()
    saved_state = state_dict.get("state")
    if not isinstance(saved_state, Mapping) or not isinstance(saved_state.get("leaves"), Mapping):
        raise StateDictError(f"{name}: the state dict has no 'state' with 'leaves'.")
    expected_type, saved_type = describe(template), saved_state.get("type")
    if saved_type != expected_type:
        raise StateDictError(
            f"{name}: the saved state has structure {saved_type!r}, this callback's state has "
            f"{expected_type!r}. Was it saved from a callback with other options?"
        )
    template_leaves = _leaves(template)
    saved_leaves = saved_state["leaves"]
    problems = [f"missing leaf {p}" for p in template_leaves if p not in saved_leaves]
    problems += [f"unexpected leaf {p}" for p in saved_leaves if p not in template_leaves]
    loaded = []
    for path, leaf in template_leaves.items():
        if path not in saved_leaves:
            continue
        saved = saved_leaves[path]
        expected = np.asarray(leaf)
        if not isinstance(saved, Mapping) or not {"dtype", "shape", "value"} <= set(saved):
            problems.append(f"{path}: expected a dict with dtype, shape and value, got {saved!r}")
            continue
        if saved["dtype"] != str(expected.dtype):
            problems.append(f"{path}: dtype {saved['dtype']}, expected {expected.dtype}")
        if list(saved["shape"]) != list(expected.shape):
            problems.append(f"{path}: shape {tuple(saved['shape'])}, expected {expected.shape}")
        try:
            decoded = _decode_values(saved["value"])
            problem = _value_problem(decoded, expected.dtype)
            if problem is not None:
                problems.append(f"{path}: value {problem} ({expected.dtype} expected)")
                continue
            value = np.asarray(decoded, dtype=expected.dtype)
        except (TypeError, ValueError, OverflowError) as error:
            problems.append(f"{path}: value {saved['value']!r} is not {expected.dtype} ({error})")
            continue
        if value.shape != expected.shape:
            problems.append(f"{path}: value has shape {value.shape}, expected {expected.shape}")
        loaded.append(jnp.asarray(value))
    if problems:
        raise StateDictError(
            f"{name}: the state dict does not fit this callback: " + "; ".join(problems) + "."
        )
    if state_dict.get("config") is not None:
        changes = _identity_changes(callback, state_dict["config"])
        if changes:
            raise StateDictError(
                f"{name}: the state dict was saved with other identity options ("
                + "; ".join(changes)
                + "): its best values and counters mean something else now. Start from init(), "
                "or load it into a callback with the saved options."
            )
        _warn_config_changes(callback, state_dict["config"])
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), loaded)
