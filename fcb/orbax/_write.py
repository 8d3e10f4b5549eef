"""What one orbax step writes: the union of what its slots need, copied to host at once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .._errors import CheckpointCorruptError, ConfigError
from .._host.engine import Check
from .._host.manifest import json_metrics
from .._host.store import ManifestStore
from ._payload import State, host_copy, is_function, model_subset, step_meta, union
from ._store import OrbaxStore, location, models_cover

logger = logging.getLogger("fcb")


class OrbaxWrites:
    """Mixed into the orbax adapter: its engine's `write` (and `snapshot`, the same)."""

    owner: str
    runner: Any
    _warned_lr: bool

    def write(self, store: ManifestStore, check: Check) -> Callable[[], None]:
        """One orbax step per step: the union of what its slots need, copied to host now."""
        assert isinstance(store, OrbaxStore)
        step, plan = check.step, check.plan
        if not plan.variants:
            return lambda: None
        if store.has(location(step)):
            if not all(models_cover(store.stored_models(step), m) for m in plan.variants):
                raise CheckpointCorruptError(
                    f"step {step} is already saved (with {store.stored_models(step)}) and a "
                    f"slot now asks for more of the model; checks must not repeat a step."
                )
            return lambda: None
        context = check.context  # a batch hook's raw state, or a check's State
        if not isinstance(context, State):
            context = State(context, is_function(context))
        state = context.after_actions(check.actions)
        if state is None:
            raise ConfigError(
                f"{self.owner}: the callbacks keep step {step} (slots "
                f"{sorted(n for n, (s, _, _) in plan.slots.items() if s == step)}) but no "
                f"state was given; pass on_validation_end(..., state=pytree)."
            )
        if float(check.actions.lr_scale) != 1.0 and not context.after and not self._warned_lr:
            self._warned_lr = True
            logger.warning(
                "fcb: step %d changes the learning rate, and the checkpoint holds the state "
                "from before the change: a run resumed from it would train on at the old "
                "rate. Pass state=lambda actions: {...} with the rate applied "
                "(fcb.scaled_lr(lr, actions)).",
                step,
            )
        models = union(plan.variants)
        payload = host_copy(state if models is None else model_subset(state, models))
        meta = step_meta(check, models, json_metrics(self.runner.host_metrics(check.metrics)))
        return lambda: store.save(step, payload, meta, models)

    snapshot = write  # the state is copied to host memory at once either way
