"""chain / named_chain: compose callbacks into one, like `optax.chain`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx

from ._core import ActionNames, Actions, Callback, Metrics, StepLike, merge_actions
from ._errors import ConfigError

_SINGULAR = {"slots": "slot", "log": "log", "events": "event", "evaluate": "evaluation request"}
_CLASH_HINT = {
    "slots": "Give the checkpointing callbacks distinct filenames / slot names.",
    "log": "Use fcb.named_chain(name=callback, ...), which prefixes log names with each name.",
    "events": "Use fcb.named_chain(name=callback, ...), which prefixes event names.",
    "evaluate": "Give the checkpointing callbacks distinct filenames.",
}


def check_unique(owner: str, labels: Sequence[str], names: Sequence[ActionNames]) -> None:
    for kind in ("slots", "log", "events", "evaluate"):
        seen: dict[str, str] = {}
        for label, callback_names in zip(labels, names, strict=True):
            for name in getattr(callback_names, kind):
                if name in seen:
                    raise ConfigError(
                        f"{owner}: the {_SINGULAR[kind]} name {name!r} is emitted by both "
                        f"{seen[name]} and {label}; names must be unique. {_CLASH_HINT[kind]}"
                    )
                seen[name] = label


def check_callbacks(owner: str, labels: Sequence[str], callbacks: Sequence[Any]) -> None:
    for label, callback in zip(labels, callbacks, strict=True):
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"{owner}: {label} must be an fcb.Callback, got {type(callback).__name__}: "
                f"{callback!r}."
            )


def _prefixed(prefix: str, names: ActionNames) -> ActionNames:
    return names._replace(
        log=tuple(f"{prefix}/{n}" for n in names.log),
        events=tuple(f"{prefix}/{n}" for n in names.events),
    )


def union(names: Sequence[ActionNames]) -> ActionNames:
    return ActionNames(*(sum((getattr(n, k) for n in names), ()) for k in ActionNames._fields))


class Chain(Callback):
    """Callbacks run in order on the same metrics; built by [`fcb.chain`][]. State: a tuple."""

    callbacks: tuple[Callback, ...]

    def __init__(self, *callbacks: Callback):
        labels = [f"callback {i} ({type(c).__name__})" for i, c in enumerate(callbacks)]
        check_callbacks("fcb.chain", labels, callbacks)
        check_unique("fcb.chain", labels, [c.action_names() for c in callbacks])
        self.callbacks = tuple(callbacks)

    def action_names(self) -> ActionNames:
        return union([c.action_names() for c in self.callbacks])

    def init(self) -> tuple[Any, ...]:
        return tuple(c.init() for c in self.callbacks)

    def __call__(
        self, state: tuple[Any, ...], metrics: Metrics, *, step: StepLike
    ) -> tuple[tuple[Any, ...], Actions]:
        results = [c(s, metrics, step=step) for c, s in zip(self.callbacks, state, strict=True)]
        return tuple(s for s, _ in results), merge_actions(a for _, a in results)

    def finalize(self, state: tuple[Any, ...]) -> tuple[tuple[Any, ...], Actions]:
        results = [c.finalize(s) for c, s in zip(self.callbacks, state, strict=True)]
        return tuple(s for s, _ in results), merge_actions(a for _, a in results)

    def evaluated(
        self, state: tuple[Any, ...], request: str, results: Metrics, *, step: StepLike
    ) -> tuple[tuple[Any, ...], Actions]:
        out = [
            c.evaluated(s, request, results, step=step)
            for c, s in zip(self.callbacks, state, strict=True)
        ]
        return tuple(s for s, _ in out), merge_actions(a for _, a in out)

    def stop_details(self, state: tuple[Any, ...]) -> str | None:
        """The details of the first member, in order, that has stopped."""
        return first_details(zip(self.callbacks, state, strict=True))

    def unstopped(self, state: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(c.unstopped(s) for c, s in zip(self.callbacks, state, strict=True))


def first_details(members: Any) -> str | None:
    """The stop details of the first `(callback, state)` member that gives any."""
    for callback, member_state in members:
        details = callback.stop_details(member_state)
        if details is not None:
            return details
    return None


class NamedChain(Callback):
    """Named callbacks run in order; built by [`fcb.named_chain`][]. State: a dict by name.

    Log and event names are prefixed with `"<name>/"`; slot names are kept (they name files).
    """

    names: tuple[str, ...] = eqx.field(static=True)
    callbacks: tuple[Callback, ...]

    def __init__(self, **callbacks: Callback):
        labels = [f"{name!r} ({type(c).__name__})" for name, c in callbacks.items()]
        check_callbacks("fcb.named_chain", labels, list(callbacks.values()))
        for name in callbacks:
            if "/" in name:
                raise ConfigError(f"fcb.named_chain: name {name!r} must not contain '/'.")
        check_unique(
            "fcb.named_chain",
            labels,
            [_prefixed(n, c.action_names()) for n, c in callbacks.items()],
        )
        self.names = tuple(callbacks)
        self.callbacks = tuple(callbacks.values())

    def action_names(self) -> ActionNames:
        return union([_prefixed(n, c.action_names()) for n, c in zip(self.names, self.callbacks)])

    def init(self) -> dict[str, Any]:
        return {n: c.init() for n, c in zip(self.names, self.callbacks, strict=True)}

    def __call__(
        self, state: dict[str, Any], metrics: Metrics, *, step: StepLike
    ) -> tuple[dict[str, Any], Actions]:
        results = [c(state[n], metrics, step=step) for n, c in zip(self.names, self.callbacks)]
        return self._merge(results)

    def finalize(self, state: dict[str, Any]) -> tuple[dict[str, Any], Actions]:
        return self._merge([c.finalize(state[n]) for n, c in zip(self.names, self.callbacks)])

    def evaluated(
        self, state: dict[str, Any], request: str, results: Metrics, *, step: StepLike
    ) -> tuple[dict[str, Any], Actions]:
        return self._merge(
            [
                c.evaluated(state[n], request, results, step=step)
                for n, c in zip(self.names, self.callbacks)
            ]
        )

    def stop_details(self, state: dict[str, Any]) -> str | None:
        """The details of the first member, in order, that has stopped."""
        return first_details((c, state[n]) for n, c in zip(self.names, self.callbacks))

    def unstopped(self, state: dict[str, Any]) -> dict[str, Any]:
        return {n: c.unstopped(state[n]) for n, c in zip(self.names, self.callbacks)}

    def _merge(self, results: list[tuple[Any, Actions]]) -> tuple[dict[str, Any], Actions]:
        states = {n: s for n, (s, _) in zip(self.names, results, strict=True)}
        return states, merge_actions((a for _, a in results), prefixes=self.names)


def chain(*callbacks: Callback) -> Chain:
    """Compose callbacks into one that runs them in order on the same metrics.

    The state is a tuple of the callbacks' states. Actions merge as described in
    [`fcb.Actions`][]: stop is any, the stop reason is the first stopping callback's,
    `lr_scale` is the product; slot, log and event names must be unique (checked here).

    >>> cb = fcb.chain(fcb.EarlyStopping("val_loss", patience=1), fcb.EarlyStopping(
    ...     "train_loss", patience=10, strict=False))
    Traceback (most recent call last):
    ...
    fcb.ConfigError: fcb.chain: the event name 'early_stopping/improved' is emitted by both ...
    >>> cb = fcb.named_chain(val=fcb.EarlyStopping("val_loss", patience=1),
    ...                      train=fcb.EarlyStopping("train_loss", patience=10))
    >>> state = cb.init()
    >>> state, actions = cb(state, {"val_loss": 1.0, "train_loss": 2.0}, step=0)
    >>> sorted(state), bool(actions.events["val/early_stopping/improved"])
    (['train', 'val'], True)
    """
    return Chain(*callbacks)


def named_chain(**callbacks: Callback) -> NamedChain:
    """Compose named callbacks; the state is a dict by name; log and event names are prefixed.

    See [`fcb.chain`][] for the merge rules.
    """
    return NamedChain(**callbacks)
