"""The host-side driver adapters share: one jitted dispatch per event for a whole chain."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ._core import Actions, Callback, StepLike, merge_actions
from ._errors import MetricTypeError
from ._state_dict import load_state_dict, state_dict
from ._validate import check_metrics_mapping, host_metric

Evaluate = Callable[[str], Mapping[str, Any]]
"""Runs the evaluation registered for a request name on the live model; returns metrics."""


class Runner:
    """Holds a callback's state and runs its events, each through one cached `jax.jit`.

    Metrics are converted to float32 NumPy scalars once, on the host, so the jitted function
    sees the same types at every event and never retraces (a new set of metric keys compiles
    once more, then is cached). Actions come back as NumPy values.

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
        self.state = callback.init()
        self._check = jax.jit(lambda state, metrics, step: callback(state, metrics, step=step))
        self._finalize = jax.jit(lambda state: callback.finalize(state))
        self._evaluated = jax.jit(
            lambda state, request, results, step: callback.evaluated(
                state, request, results, step=step
            ),
            static_argnums=1,
        )

    def host_metrics(self, metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
        check_metrics_mapping("Runner", metrics)
        return {str(k): host_metric("Runner", str(k), v) for k, v in metrics.items()}

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
        step_array = np.asarray(step, np.int32)
        state, actions = self._check(self.state, self.host_metrics(metrics), step_array)
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
            actions = merge_actions(merged)
        self.state = state
        return jax.device_get(actions)

    def finalize(self) -> Actions:
        self.state, actions = self._finalize(self.state)
        return jax.device_get(actions)

    def state_dict(self) -> dict[str, Any]:
        return state_dict(self.state, self.callback)

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.state = load_state_dict(self.callback, saved)

    def find(self, kind: type) -> list[Any]:
        """Every callback of type `kind` in the chain (nested chains included)."""
        found = []
        for node in jax.tree_util.tree_leaves(self.callback, is_leaf=lambda x: isinstance(x, kind)):
            if isinstance(node, kind):
                found.append(node)
        return found
