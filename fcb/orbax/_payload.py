"""What the orbax adapter saves: host copies of a state pytree, or a subset of its model."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from .._core import Actions
from .._errors import CheckpointCorruptError, ConfigError
from .._host.engine import Check
from .._host.manifest import Models
from ._store import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_step

_NOT_AN_ARRAY = """\
OrbaxAdapter: `state` leaf {path} is a {kind} ({value!r}); orbax saves arrays and numbers.
Save the arrays of a model and keep its static part in code:

    state = {{"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state}}
    ...
    model = fcb.orbax.restore_model(directory, model)   # eqx.combine with the static part
"""


def device_free_memory(device: Any = None) -> float | None:
    """Free memory of a JAX device in bytes: `bytes_limit - bytes_in_use` of its
    `memory_stats()`, or `None` where the device reports none (the CPU).

    >>> fcb.orbax.device_free_memory(jax.devices("cpu")[0]) is None
    True
    """
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    if not stats or "bytes_limit" not in stats or "bytes_in_use" not in stats:
        return None
    return float(stats["bytes_limit"] - stats["bytes_in_use"])


def submodule(model: Any, name: str) -> Any:
    """The submodule `name` of a model pytree: a field of an equinox Module, or a key."""
    if isinstance(model, Mapping):
        names = sorted(map(str, model))
        found = name in model
    else:
        names = (
            sorted(f.name for f in dataclasses.fields(model))
            if dataclasses.is_dataclass(model)
            else sorted(n for n in vars(model) if not n.startswith("_"))
            if hasattr(model, "__dict__")
            else []
        )
        found = name in names
    if not found:
        raise ConfigError(
            f"OrbaxAdapter: model_names asks for submodule {name!r}, but the model "
            f"({type(model).__name__}) has {names}. Fix model_names."
        )
    return model[name] if isinstance(model, Mapping) else getattr(model, name)


def model_subset(state: Any, models: tuple[str, ...]) -> dict[str, Any]:
    """`{"model": {name: submodule}}`: what a slot restricted to `models` saves."""
    if not isinstance(state, Mapping) or "model" not in state:
        raise ConfigError(
            f"OrbaxAdapter: the callbacks save only the submodules {list(models)} of the "
            f"model, so `state` must be a mapping with a 'model' entry, e.g. "
            f"{{'model': eqx.filter(model, eqx.is_array), ...}}; got "
            f"{type(state).__name__}"
            + (f" with keys {sorted(map(str, state))}." if isinstance(state, Mapping) else ".")
        )
    return {"model": {name: submodule(state["model"], name) for name in models}}


def host_copy(tree: Any) -> Any:
    """A copy of `tree` in host memory sharing nothing with the device buffers, so the
    training loop may donate or overwrite them while orbax writes in the background.

    An array spread over several processes stays a `jax.Array`: orbax writes each process's
    shards itself, and copies them to host memory before `save` returns."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in flat:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                raise ConfigError(
                    f"OrbaxAdapter: `state` leaf {jax.tree_util.keystr(path)} is a typed PRNG "
                    f"key; save its data instead: jax.random.key_data(key) (and "
                    f"jax.random.wrap_key_data after restoring)."
                )
            leaf.copy_to_host_async()  # start every transfer before waiting for any
        elif not isinstance(leaf, (np.ndarray, np.generic, bool, int, float)):
            kind = "function" if callable(leaf) else type(leaf).__name__
            raise ConfigError(
                _NOT_AN_ARRAY.format(
                    path=jax.tree_util.keystr(path) or "(the root)", kind=kind, value=leaf
                )
            )
    copied = [
        leaf
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        else np.array(leaf, copy=True)
        if isinstance(leaf, (jax.Array, np.ndarray))
        else leaf
        for _, leaf in flat
    ]
    return jax.tree_util.tree_unflatten(treedef, copied)


def is_function(state: Any) -> bool:
    """A function of the actions, as opposed to a pytree (an equinox Module may be callable,
    so only plain functions, methods and partials count)."""
    return isinstance(state, (types.FunctionType, types.MethodType, functools.partial))


def union(variants: set[Models]) -> Models:
    """One orbax step per step: everything if any slot wants everything, else every
    submodule any slot wants (in first-seen order)."""
    if None in variants:
        return None
    names: list[str] = []
    for models in sorted(v for v in variants if v is not None):
        names.extend(n for n in models if n not in names)
    return tuple(names)


class State(NamedTuple):
    """The state a check may save: a pytree, or a function of the actions (`after`)."""

    value: Any
    after: bool

    def before_actions(self) -> Any:
        return self.value(Actions.no_actions()) if self.after else self.value

    def after_actions(self, actions: Actions) -> Any:
        return self.value(actions) if self.after else self.value


def renamed(old: str, new: str) -> None:
    warnings.warn(
        f"OrbaxAdapter: `{old}` is deprecated; use `{new}` (the option's name in every fcb "
        f"adapter).",
        DeprecationWarning,
        stacklevel=3,
    )


def step_meta(check: Check, models: Models, metrics: dict[str, Any]) -> dict[str, Any]:
    """fcb's record saved beside the state of `check.step` (JSON)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": check.step,
        "models": None if models is None else list(models),
        "callbacks": check.callbacks,
        "slots": {name: s for name, (s, _, _) in check.plan.slots.items()},
        "metrics": metrics,
        "stop_message": check.plan.stop_message,
    }


def read_resume_point(source: str, record: Mapping[str, Any], like: Any) -> tuple[Any, Any]:
    """The state of a run's resume point (structured like `like`) and the callbacks' state
    dict it records."""
    path = os.path.join(source, record["file"])
    state, meta = read_step(path, like)
    assert meta is not None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("step") != record["step"]:
        raise CheckpointCorruptError(
            f"{path} is not the fcb checkpoint of step {record['step']} that the manifest "
            f"records (found {meta.get('format')!r} at step {meta.get('step')!r})."
        )
    return state, meta["callbacks"]
