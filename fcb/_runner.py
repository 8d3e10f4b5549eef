"""The host-side driver adapters share: one jitted dispatch per event for a whole chain."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._canonical import MARK, EncodedStateDict, canonical_json, canonical_object, fill, template
from ._core import ActionNames, Actions, Callback, StepLike, merge_actions
from ._errors import ConfigError, MetricTypeError
from ._packing import Packing, pack as _pack, unpack as _unpack
from ._state_dict import (
    FORMAT,
    VERSION,
    _encode_values,
    describe,
    encode_config,
    load_state_dict,
    state_dict as tree_state_dict,
)
from ._validate import check_metrics_mapping, host_metric

Evaluate = Callable[[str], Mapping[str, Any]]
"""Runs the evaluation registered for a request name on the live model; returns metrics."""

def _encode_leaf(value: np.ndarray) -> Any:
    """`_encode_values(value)`, without its per-element pass when no element needs one:
    only non-finite floats are spelled differently from `tolist()`."""
    if value.dtype.kind in "biu" or np.isfinite(value).all():  # bfloat16's kind is "V"
        return value.tolist()
    return _encode_values(value)


_MEMO_TRIES = 8
"""New outcomes in a row after which a `Runner` stops comparing each check's with the last."""
_MEMO_PAUSE = 256
"""How many checks it then reads without comparing, before it tries again."""


class _NotPackable(Exception):
    """Raised while tracing when a callback's state or actions cannot use packed buffers."""


def _step_array(step: StepLike) -> np.ndarray:
    """`step` as an int32 NumPy scalar, or a clear error."""
    try:
        step_array = np.asarray(step, np.int32)
    except (OverflowError, TypeError, ValueError):
        step_array = None
    if step_array is None or (type(step) is not int and step_array != np.asarray(step)):
        raise ConfigError(
            f"Runner: `step` must be an integer below 2**31 (callbacks keep steps as "
            f"int32), got step = {step!r}."
        )
    return step_array


class _StateLayout(NamedTuple):
    """What `state_dict` needs of a packed state besides the values (fixed per packing)."""

    description: str
    paths: tuple[str, ...]
    dtypes: tuple[str, ...]
    order: tuple[int, ...]
    """The leaves in key order (the order of the canonical JSON)."""
    text: tuple[str, ...]
    """The `template` of the state entry's canonical JSON, a value per leaf in key order."""


def _layout(packing: Packing) -> _StateLayout:
    """What `state_dict` needs of a packed state besides the values."""
    tree = packing.unpack_host(np.zeros(packing.size, np.int32))
    paths = tuple(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
    dtypes = tuple(str(spec.dtype) for spec in packing.leaves)
    leaves = {
        path: canonical_object(
            {"dtype": canonical_json(dtype), "shape": canonical_json(list(spec.shape)),
             "value": MARK}
        )
        for path, dtype, spec in zip(paths, dtypes, packing.leaves, strict=True)
    }
    text = canonical_object(
        {"leaves": canonical_object(leaves), "type": canonical_json(describe(tree))}
    )
    order = tuple(sorted(range(len(paths)), key=paths.__getitem__))
    return _StateLayout(describe(tree), paths, dtypes, order, template(text))


class Runner:
    """Holds a callback's state and runs its events, each through one cached `jax.jit`.

    Metrics are converted to float32 NumPy scalars once, on the host, so the jitted function
    sees the same types at every event and never retraces (a new set of metric keys compiles
    once more, then is cached). Actions come back as NumPy values; a check whose outcome is
    that of the check before may return the same `Actions` object (its leaves read-only).

    Between events the state stays on the device, packed with the metrics into a few flat
    buffers (see `Packing`), so an event costs one dispatch and one small transfer however
    many callbacks the chain holds. States that cannot be packed exactly (64-bit or weakly
    typed leaves, a structure that changes from one check to the next) take the plain path.

    >>> runner = fcb.Runner(fcb.EarlyStopping("val_loss", patience=1))
    >>> bool(runner.check({"val_loss": 0.5}, step=0).stop)
    False
    >>> bool(runner.check({"val_loss": 0.6}, step=1).stop)
    True
    """

    def __init__(self, callback: Callback):
        if not isinstance(callback, Callback):
            raise MetricTypeError(
                f"Runner: expected an fcb.Callback (or fcb.chain(...)), got "
                f"{type(callback).__name__}: {callback!r}."
            )
        self.callback = callback
        self.names: ActionNames = callback.action_names()
        self.slot_models: Mapping[str, tuple[str, ...]] = MappingProxyType(
            dict(self.names.slot_models)
        )
        """Slot -> the submodules it saves (slots that save the whole model not listed)."""
        # The state is held as a pytree, as a packed buffer, or both; see `state`.
        self._tree: Any = None
        self._buffer: jax.Array | None = None
        self._packing: Packing | None = None
        self._packed = True
        self.state = callback.init()
        self._action_packings: dict[tuple[Any, ...], Packing] = {}
        self._last_actions: tuple[Packing | None, bytes, Any] = (None, b"", None)
        self._memo_misses = self._memo_paused = 0
        self._layouts: dict[Packing, _StateLayout] = {}
        self._check = jax.jit(self._packed_check, static_argnums=(2, 3))
        self._check_tree = jax.jit(lambda state, metrics, step: callback(state, metrics, step=step))
        self._finalize = jax.jit(lambda state: callback.finalize(state))
        self._evaluated = jax.jit(
            lambda state, request, results, step: callback.evaluated(
                state, request, results, step=step
            ),
            static_argnums=1,
        )

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> Any:
        """The callbacks' state as a pytree (unpacked from the device buffer on first read)."""
        if self._tree is None:
            assert self._packing is not None and self._buffer is not None
            self._tree = _unpack(self._packing, self._buffer)
        return self._tree

    @state.setter
    def state(self, value: Any) -> None:
        self._tree, self._buffer, self._packing = value, None, None

    def snapshot(self) -> Any:
        """An opaque copy of the state, cheap to take at every event (see `restore`)."""
        return (self._tree, self._buffer, self._packing)

    def restore(self, snapshot: Any) -> None:
        """Go back to the state of `snapshot()` (an event that failed did not happen)."""
        self._tree, self._buffer, self._packing = snapshot

    def _packed_state(self) -> tuple[jax.Array, Packing] | None:
        if self._buffer is None:
            packing = Packing.of(self._tree)
            if packing is None:
                return None
            self._buffer, self._packing = _pack(packing, self._tree), packing
        assert self._packing is not None
        return self._buffer, self._packing

    # -- events ------------------------------------------------------------------------------

    def host_metrics(self, metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
        check_metrics_mapping("Runner", metrics)
        return {str(k): host_metric("Runner", str(k), v) for k, v in metrics.items()}

    def _packed_check(
        self, buffer: jax.Array, inputs: jax.Array, keys: tuple[str, ...], packing: Packing
    ) -> tuple[jax.Array, jax.Array]:
        state = packing.unpack(buffer)
        values = jax.lax.bitcast_convert_type(inputs[1:], jnp.float32)
        metrics = {key: values[i] for i, key in enumerate(keys)}
        state, actions = self.callback(state, metrics, step=inputs[0])
        action_packing = Packing.of(actions, allow_weak=True)  # the host reads NumPy values
        if Packing.of(state) != packing or action_packing is None:
            raise _NotPackable
        self._action_packings[keys, packing] = action_packing
        return packing.pack(state), action_packing.pack(actions)

    def check(
        self,
        metrics: Mapping[str, Any],
        *,
        step: StepLike,
        evaluate: Evaluate | None = None,
    ) -> Actions:
        """Run one check; answer evaluation requests with `evaluate`; return host actions.

        The new state is kept only when everything succeeded (an exception leaves the state
        as it was before the event).
        """
        host = self.host_metrics(metrics)
        step_array = _step_array(step)
        packed = self._packed_state() if self._packed else None
        if packed is not None:
            buffer, packing = packed
            # Sorted, as a dict crossing jit would be: the callbacks see the same order.
            keys = tuple(sorted(host))
            values = np.empty(len(keys) + 1, np.float32)
            for i, key in enumerate(keys, 1):
                values[i] = host[key]
            inputs = values.view(np.int32)  # the step, then the metrics' bits
            inputs[0] = step_array
            try:
                new_buffer, action_buffer = self._check(buffer, inputs, keys, packing)
            except _NotPackable:
                self._packed = False
            else:
                actions = self._host_actions(self._action_packings[keys, packing], action_buffer)
                if not self.names.evaluate or not any(actions.evaluate.values()):
                    self._tree, self._buffer = None, new_buffer
                    return actions
                state = _unpack(packing, new_buffer)
                return self._answer(state, actions, host, step_array, evaluate, on_host=True)
        state, actions = self._check_tree(self.state, host, step_array)
        return self._answer(state, actions, host, step_array, evaluate, on_host=False)

    def _host_actions(self, packing: Packing, buffer: jax.Array) -> Actions:
        """The actions packed in `buffer`, as NumPy values. A check with the outcome of the
        one before (nothing happened, again) gets the same `Actions` object, its leaves
        read-only, without building it. Chains whose every outcome is new (a `last` slot
        names each check's step) would only pay for the comparison: after
        `_MEMO_TRIES` new outcomes in a row the comparison pauses for `_MEMO_PAUSE` checks."""
        host = np.asarray(buffer)
        if self._memo_paused:
            self._memo_paused -= 1
            return packing.unpack_host(host)
        if host.flags.writeable:  # shared between checks: a frozen copy of our own
            host = host.copy()
            host.flags.writeable = False
        bits = host.tobytes()
        last_packing, last_bits, last_actions = self._last_actions
        if packing is last_packing and bits == last_bits:
            self._memo_misses = 0
            return last_actions
        actions = packing.unpack_host(host, read_only=True)
        self._last_actions = (packing, bits, actions)
        self._memo_misses += 1
        if self._memo_misses == _MEMO_TRIES:
            self._memo_misses, self._memo_paused = 0, _MEMO_PAUSE
            self._last_actions = (None, b"", None)
        return actions

    def _answer(
        self,
        state: Any,
        actions: Actions,
        host: dict[str, np.ndarray],
        step_array: np.ndarray,
        evaluate: Evaluate | None,
        *,
        on_host: bool,
    ) -> Actions:
        """Run the evaluations the actions request, then keep the state."""
        requests = [name for name, asked in actions.evaluate.items() if bool(asked)]
        if requests:
            if evaluate is None:
                raise RuntimeError(
                    f"the callbacks request an evaluation for {requests} but no evaluation "
                    f"function was given; pass evaluate=... (a mapping from request name to a "
                    f"function of the model returning metrics)."
                )
            merged = [actions]
            for request in requests:
                results = self.host_metrics(evaluate(request))
                state, extra = self._evaluated(state, request, results, step_array)
                merged.append(extra)
            # The evaluation pass adds what the nested callbacks report (log, events, stop);
            # which steps the slots hold was decided by the check itself: the pass's own
            # slot tables are its members' inactive defaults and must not replace it.
            actions = dataclasses.replace(
                merge_actions(merged),
                save=actions.save,
                archive=actions.archive,
                slots=actions.slots,
                slot_values=actions.slot_values,
            )
            on_host = False
        self.state = state
        return actions if on_host else jax.device_get(actions)

    def evaluated(self, request: str, results: Mapping[str, Any], *, step: int) -> Actions:
        """Hand the results of an evaluation made outside a check (`"loaded:<slot>"`, the
        post-training pass) to the callbacks; keep their new state; return host actions."""
        step_array = np.asarray(step, np.int32)
        self.state, actions = self._evaluated(
            self.state, request, self.host_metrics(results), step_array
        )
        return jax.device_get(actions)

    def finalize(self) -> Actions:
        self.state, actions = self._finalize(self.state)
        return jax.device_get(actions)

    # -- state dicts -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """`fcb.state_dict(self.state, self.callback)`, read from the packed state in one
        transfer when there is one; a fresh dict the caller may change."""
        parts = self._packed_state_dict()
        if parts is None:
            return tree_state_dict(self.state, self.callback)
        state, _ = parts
        return self._record(json.loads(self._config[0]), state)

    def encoded_state_dict(self) -> dict[str, Any]:
        """`state_dict()` with its canonical JSON (an `EncodedStateDict`, read-only), for
        the checkpoint of a check: the config, immutable, is encoded once per run, and only
        the state at each call (adapters call this at every checkpoint). A state without
        packed buffers gives a plain dict (its JSON is encoded where it is needed)."""
        parts = self._packed_state_dict()
        if parts is None:
            return tree_state_dict(self.state, self.callback)
        state, state_json = parts
        config, config_json, texts = self._config[1:]
        return EncodedStateDict(
            self._record(config, state),
            canonical_object({**texts, "config": config_json, "state": state_json}),
        )

    def _record(self, config: Any, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "callback": type(self.callback).__name__,
            "config": config,
            "state": state,
        }

    @functools.cached_property
    def _config(self) -> tuple[str, Any, str, dict[str, str]]:
        """The config's JSON, once per run (it is immutable): as `encode_config` gives it,
        read back (shared by every encoded state dict: they are read-only), its canonical
        text, and the canonical texts of the record's other fixed entries."""
        text = json.dumps(encode_config(self.callback))
        config = json.loads(text)
        fixed = {k: v for k, v in self._record(None, {}).items() if k not in ("config", "state")}
        texts = {k: canonical_json(v) for k, v in fixed.items()}
        return text, config, canonical_json(config), texts

    def _packed_state_dict(self) -> tuple[dict[str, Any], str] | None:
        """The state entry of the state dict, and its canonical JSON, read from the packed
        buffer (`None`: the state is not packed)."""
        if self._buffer is None or self._packing is None:
            return None
        layout = self._layouts.get(self._packing)
        if layout is None:
            layout = _layout(self._packing)
            self._layouts[self._packing] = layout
        buffer, packing = np.asarray(self._buffer), self._packing

        def entry(values: list[Any]) -> dict[str, Any]:
            leaves = {
                path: {"dtype": dtype, "shape": list(spec.shape), "value": value}
                for path, dtype, spec, value in zip(
                    layout.paths, layout.dtypes, packing.leaves, values, strict=True
                )
            }
            return {"type": layout.description, "leaves": leaves}

        # every value as `tolist()` gives it: the state dict's spelling, unless a float is
        # not finite (strict JSON refuses it: then each leaf is spelled as it must be)
        values = packing.host_values(buffer)
        state = entry(values)
        try:
            text = None if packing.nested else fill(layout.text, [values[i] for i in layout.order])
            return state, canonical_json(state) if text is None else text
        except ValueError:
            state = entry([_encode_leaf(v) for v in packing.host_leaves(buffer)])
            return state, canonical_json(state)

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.state = load_state_dict(self.callback, saved)

    def find(self, kind: type) -> list[Any]:
        """Every callback of type `kind` in the chain (nested chains included)."""
        found = []
        for node in jax.tree_util.tree_leaves(self.callback, is_leaf=lambda x: isinstance(x, kind)):
            if isinstance(node, kind):
                found.append(node)
        return found
