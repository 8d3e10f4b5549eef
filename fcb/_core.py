"""Callback, Actions and StopReason: the contract between pure callbacks and adapters."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, NamedTuple, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

Metrics: TypeAlias = Mapping[str, ArrayLike]
"""A mapping from metric name to a scalar (Python number, NumPy or JAX scalar)."""

StepLike: TypeAlias = int | Int[ArrayLike, ""]
"""A step counter: a Python int or an integer scalar array."""

NO_STEP = -1
"""The step recorded for a slot, or a stop, that has not happened."""


class StopReason(enum.IntEnum):
    """Why a callback asked training to stop. `Actions.stop_reason` holds one of these codes.

    Each member carries a human-readable message:

    >>> fcb.StopReason.PATIENCE.message
    'the monitored metric did not improve for patience consecutive checks'
    >>> fcb.StopReason(0).name
    'NONE'
    """

    NONE = 0
    NON_FINITE = 1
    STOPPING_THRESHOLD = 2
    DIVERGENCE_THRESHOLD = 3
    PATIENCE = 4
    TERMINATE_ON_NAN = 5
    PREEMPTED = 6
    TIME_LIMIT = 7

    @property
    def message(self) -> str:
        return _STOP_MESSAGES[self]


_STOP_MESSAGES = {
    StopReason.NONE: "training was not stopped",
    StopReason.NON_FINITE: "the monitored metric is NaN or infinite (check_finite=True)",
    StopReason.STOPPING_THRESHOLD: "the monitored metric reached stopping_threshold",
    StopReason.DIVERGENCE_THRESHOLD: "the monitored metric crossed divergence_threshold",
    StopReason.PATIENCE: "the monitored metric did not improve for patience consecutive checks",
    StopReason.TERMINATE_ON_NAN: "a watched value is NaN or infinite (TerminateOnNaN)",
    StopReason.PREEMPTED: "the job was asked to stop (a preemption signal); a resumable "
    "checkpoint was written",
    StopReason.TIME_LIMIT: "the time limit was reached (TimeLimit); a resumable checkpoint was "
    "written",
}


class ActionNames(NamedTuple):
    """The static names a callback emits: slots, log scalars, events and evaluation requests.

    `slot_models` maps a slot to the submodules it saves (slots not listed save everything).
    `host_inputs` pairs a metric key with the host figure an adapter feeds it, e.g.
    `("free_memory_bytes", "free_device_memory")` for `fcb.VRAMDrift`: adapters read what
    callbacks need from these declarations, never from a callback's type.
    `slot_kinds` pairs a slot with what it holds: `"best"`, `"top_k"` (a rank below the
    best), `"last"` or `"tolerance"`; adapters record it in the manifest.
    """

    slots: tuple[str, ...] = ()
    log: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    evaluate: tuple[str, ...] = ()
    slot_models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    host_inputs: tuple[tuple[str, str], ...] = ()
    slot_kinds: tuple[tuple[str, str], ...] = ()


class Actions(eqx.Module):
    """What a callback asks the outside world to do after one check.

    A pytree of arrays: it crosses `jax.jit`, `lax.scan` and `jax.vmap` (under `vmap` every
    field gains the leading configuration axis). Adapters read it and act on it.

    Attributes:
        stop: bool scalar. Training must stop at the next boundary.
        stop_reason: int32 scalar holding a [`fcb.StopReason`][] code (`NONE` when not stopping).
        save: bool scalar. The current step must be written, because at least one slot now
            holds it. A step held by several slots is written once.
        archive: bool scalar. The current step must be written and kept for good, outside any
            slot (`ModelCheckpoint(save_top_k=-1)` keeps every checkpoint).
        slots: slot name -> int32 step that slot must hold after this call (`-1`: empty).
            The adapter keeps exactly the steps named here and may delete any other.
        slot_values: slot name -> float32 metric value of the step the slot holds (NaN when
            empty), for manifests and summaries.
        lr_scale: float32 scalar. Multiply the learning rate by this now (1.0 = unchanged).
        min_lr: float32 scalar. The scaled learning rate is not taken below this (0.0 = no
            floor). Adapters apply both with [`fcb.scaled_lr`][].
        min_lr_change: float32 scalar. A change of the learning rate smaller than or equal to this
            is skipped (torch's `eps`; 0.0 = apply every change).
        log: name -> float32 scalar to log.
        events: name -> bool scalar, whether the named event happened at this check
            (for example a new best, a missing metric, or VRAM drift).
        evaluate: request name -> bool scalar. When true, the adapter evaluates the live model
            with the evaluation functions the user registered for that request and passes the
            results back through `Callback.evaluated(state, request, results, step=...)`
            (`BestCheckpoint` asks for this on each new best, for its nested callbacks).
        slot_models: static. Pairs `(slot, model_names)`: the slot saves only these submodules
            of a composite model. Slots not listed save the whole model.

    >>> a = fcb.Actions.no_actions(fcb.ActionNames(events=("improved",)))
    >>> bool(a.stop), float(a.lr_scale), sorted(a.events)
    (False, 1.0, ['improved'])
    """

    stop: Bool[Array, ""]
    stop_reason: Int[Array, ""]
    save: Bool[Array, ""]
    archive: Bool[Array, ""]
    slots: dict[str, Int[Array, ""]]
    slot_values: dict[str, Float[Array, ""]]
    lr_scale: Float[Array, ""]
    min_lr: Float[Array, ""]
    min_lr_change: Float[Array, ""]
    log: dict[str, Float[Array, ""]]
    events: dict[str, Bool[Array, ""]]
    evaluate: dict[str, Bool[Array, ""]]
    slot_models: tuple[tuple[str, tuple[str, ...]], ...] = eqx.field(static=True)

    def __getattribute__(self, name: str) -> Any:
        # Hosts read the fields at every check: a field is never a bound method, so it skips
        # equinox's check for one (methods still go through it).
        if name in _ACTION_FIELDS:
            return object.__getattribute__(self, name)
        return eqx.Module.__getattribute__(self, name)

    @classmethod
    def no_actions(cls, names: ActionNames = ActionNames()) -> Actions:
        """Actions that ask for nothing, with every name in `names` present and inactive."""
        return cls(
            stop=jnp.asarray(False),
            stop_reason=jnp.asarray(StopReason.NONE, jnp.int32),
            save=jnp.asarray(False),
            archive=jnp.asarray(False),
            slots={n: jnp.asarray(NO_STEP, jnp.int32) for n in names.slots},
            slot_values={n: jnp.asarray(jnp.nan, jnp.float32) for n in names.slots},
            lr_scale=jnp.asarray(1.0, jnp.float32),
            min_lr=jnp.asarray(0.0, jnp.float32),
            min_lr_change=jnp.asarray(0.0, jnp.float32),
            log={n: jnp.asarray(jnp.nan, jnp.float32) for n in names.log},
            events={n: jnp.asarray(False) for n in names.events},
            evaluate={n: jnp.asarray(False) for n in names.evaluate},
            slot_models=names.slot_models,
        )

    def stop_message(self) -> str:
        """The generic message of `stop_reason` (concrete, unbatched actions only).

        [`fcb.stop_message`][] gives the detailed one, naming the metric, the setting and
        the values.
        """
        return StopReason(int(self.stop_reason)).message


_ACTION_FIELDS = frozenset(Actions.__dataclass_fields__)


def stop_message(callback: Callback, state: Any, actions: Actions) -> str:
    """Why `callback` stopped, naming the metric, the setting and the values; "" when
    `actions` do not stop. Host side: `state` and `actions` are concrete and unbatched (the
    state after the check that returned `actions`).

    The callback that stopped first (in a chain's order) gives the message, through its
    `stop_details(state)`; a callback without details gives the generic message of
    `actions.stop_reason`.

    >>> es = fcb.EarlyStopping("val_loss", patience=1, min_delta=0.001)
    >>> state = es.init()
    >>> for step, loss in enumerate([0.5, 0.4461, 0.45]):
    ...     state, actions = es(state, {"val_loss": loss}, step=step)
    >>> fcb.stop_message(es, state, actions)
    'val_loss did not improve for 1 check (patience=1, min_delta=0.001); best 0.4461 at step 1'
    """
    if not bool(actions.stop):
        return ""
    details = callback.stop_details(state)
    return details if details is not None else actions.stop_message()


def merge_actions(actions: Iterable[Actions], prefixes: Iterable[str] | None = None) -> Actions:
    """Merge the actions of several callbacks, as `fcb.chain` does.

    Rules: `stop` is any; `stop_reason` is that of the first stopping callback in order;
    `save` and `archive` are any; `lr_scale` is the product; `min_lr` and `min_lr_change` the
    maximum; slots, log scalars, events, evaluation requests and slot models are unioned
    (chains check the names unique when built). With `prefixes`, log and event names of the
    i-th actions are prefixed with `prefixes[i] + "/"`; slot and request names never are.
    """
    actions = list(actions)
    prefix_list = [""] * len(actions) if prefixes is None else [p + "/" for p in prefixes]
    merged = Actions.no_actions()
    stop, stop_reason, save, archive = merged.stop, merged.stop_reason, merged.save, merged.archive
    lr_scale, min_lr, min_lr_change = merged.lr_scale, merged.min_lr, merged.min_lr_change
    slots: dict[str, Any] = {}
    slot_values: dict[str, Any] = {}
    log: dict[str, Any] = {}
    events: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    slot_models: dict[str, tuple[str, ...]] = {}
    for prefix, a in zip(prefix_list, actions, strict=True):
        stop_reason = jnp.where(stop, stop_reason, jnp.where(a.stop, a.stop_reason, stop_reason))
        stop = stop | a.stop
        save = save | a.save
        archive = archive | a.archive
        lr_scale = lr_scale * a.lr_scale
        min_lr = jnp.maximum(min_lr, a.min_lr)
        min_lr_change = jnp.maximum(min_lr_change, a.min_lr_change)
        slots.update(a.slots)
        slot_values.update(a.slot_values)
        log.update({prefix + k: v for k, v in a.log.items()})
        events.update({prefix + k: v for k, v in a.events.items()})
        evaluate.update(a.evaluate)
        slot_models.update(a.slot_models)
    return Actions(
        stop=stop,
        stop_reason=stop_reason,
        save=save,
        archive=archive,
        slots=slots,
        slot_values=slot_values,
        lr_scale=lr_scale,
        min_lr=min_lr,
        min_lr_change=min_lr_change,
        log=log,
        events=events,
        evaluate=evaluate,
        slot_models=tuple(sorted(slot_models.items())),
    )


def _lr_rule(xp: Any, lr: Any, scale: Any, min_lr: Any, min_change: Any) -> Any:
    """torch's `ReduceLROnPlateau` rule in the array namespace `xp` (jax.numpy or NumPy)."""
    new = xp.asarray(xp.maximum(lr * scale, xp.minimum(min_lr, lr)), dtype=xp.asarray(lr).dtype)
    return xp.where(xp.abs(lr - new) > min_change, new, lr)


def scaled_lr(lr: ArrayLike, actions: Actions) -> Array:
    """The learning rate after applying `actions`: torch's `ReduceLROnPlateau` rule.

    `new = max(lr * lr_scale, min(min_lr, lr))`, kept only when `|lr - new| > min_lr_change`;
    otherwise `lr` is returned unchanged. The floor never raises a learning rate that is
    already below it (as in torch). Works on Python floats, arrays and under `jit`.

    >>> a = fcb.Actions.no_actions()
    >>> float(fcb.scaled_lr(0.1, a))
    0.1...
    """
    lr = jnp.asarray(lr)
    return _lr_rule(jnp, lr, actions.lr_scale, actions.min_lr, actions.min_lr_change)


def scaled_lr_host(lr: float, actions: Actions) -> float:
    """`scaled_lr` of a Python float in float64, as torch computes it (host actions)."""
    return float(
        _lr_rule(
            np,
            float(lr),
            float(actions.lr_scale),
            float(actions.min_lr),
            float(actions.min_lr_change),
        )
    )


class Callback(eqx.Module):
    """Base class of every fcb callback: a pure `(state, metrics) -> (state, actions)` function.

    Subclasses override only what they need; the defaults do nothing:

    - `init()` returns the initial state (a pytree of arrays; default: empty tuple).
    - `__call__(state, metrics, *, step)` runs one check and returns `(state, actions)`.
    - `finalize(state)` runs once at the end of training and returns `(state, actions)`.
    - `evaluated(state, request, results, *, step)` receives the results of an evaluation the
      callback asked for through `Actions.evaluate` (see [`fcb.BestCheckpoint`][]).
    - `action_names()` declares the slot, log and event names the callback emits, so that
      chains can check them for clashes when built.

    Configuration lives on the callback (an `equinox.Module`); numeric hyperparameters are
    array leaves, so a stack of callbacks can be `jax.vmap`-ed. State is a separate pytree.

    >>> class CountChecks(fcb.Callback):
    ...     def init(self):
    ...         return jnp.asarray(0, jnp.int32)
    ...     def __call__(self, state, metrics, *, step):
    ...         return state + 1, self.no_actions()
    >>> cb = CountChecks()
    >>> state, actions = cb(cb.init(), {"loss": 1.0}, step=0)
    >>> int(state), bool(actions.stop)
    (1, False)
    """

    identity_fields: ClassVar[tuple[str, ...]] = ()
    """Options whose change makes a saved state meaningless (e.g. `monitor`, `mode`):
    `fcb.load_state_dict` refuses a state saved with other values."""

    def __check_init__(self) -> None:
        if type(self) is Callback:
            raise TypeError(
                "fcb.Callback is abstract: subclass it and override `init`, `__call__` or "
                "`finalize`, or use a concrete callback such as fcb.EarlyStopping."
            )

    def init(self) -> Any:
        """The initial state."""
        return ()

    def __call__(self, state: Any, metrics: Metrics, *, step: StepLike) -> tuple[Any, Actions]:
        """One check. Pure: returns the new state and the actions; changes nothing."""
        del metrics, step
        return state, self.no_actions()

    def finalize(self, state: Any) -> tuple[Any, Actions]:
        """Called once when training ends (for summaries)."""
        return state, self.no_actions()

    def evaluated(
        self, state: Any, request: str, results: Metrics, *, step: StepLike
    ) -> tuple[Any, Actions]:
        """Receive the results of an evaluation this callback requested in `Actions.evaluate`.

        The adapter calls it after evaluating the live model for `request`; callbacks that
        made no such request ignore it (the default).
        """
        del request, results, step
        return state, self.no_actions()

    def action_names(self) -> ActionNames:
        """The static names of the slots, log scalars and events this callback emits."""
        return ActionNames()

    def stop_details(self, state: Any) -> str | None:
        """Why this callback stopped, with the metric, the settings and the values (host side,
        a concrete unbatched state); None when it has not stopped or has no details.
        [`fcb.stop_message`][] calls it."""
        del state
        return None

    def unstopped(self, state: Any) -> Any:
        """`state` with its stop cleared, so that the next check asks the stop condition
        again ([`fcb.all_of`][] uses it for a member whose condition held alone). Callbacks
        that latch a stop override it; the default returns `state`."""
        return state

    def __repr__(self) -> str:
        # A concrete scalar setting prints as its value (`patience=3`), not `i32[]`: a
        # member of an `fcb.grid` says which configuration it is.
        def shown(leaf: Any) -> Any:
            if isinstance(leaf, (jnp.ndarray, np.ndarray)) and np.ndim(leaf) == 0:
                try:
                    value = np.asarray(leaf)
                except Exception:  # a tracer: no value to show
                    return leaf
                # float32's shortest digits (0.001, not 0.0010000000474974513)
                return float(str(value[()])) if value.dtype.kind == "f" else value.item()
            return leaf

        return eqx.tree_pformat(jax.tree_util.tree_map(shown, self))

    def no_actions(self) -> Actions:
        """Inactive actions carrying this callback's declared names."""
        return Actions.no_actions(self.action_names())
