"""ReduceLROnPlateau: scale the learning rate down when a monitored metric stops improving."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import _monitor
from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike
from ._monitor import Mode, ThresholdMode
from ._smoothing import SmoothingState, check_smoothing, smooth, smoothing_init
from ._validate import (
    as_step,
    check_flag,
    check_key,
    check_mode,
    check_threshold_mode,
    float_param,
    int_param,
    read_metric,
)

_OWNER = "ReduceLROnPlateau"


class ReduceLROnPlateauState(eqx.Module):
    """State of [`fcb.ReduceLROnPlateau`][].

    Attributes:
        best: best value so far (+inf in `"min"` mode, -inf in `"max"` mode before the first
            finite check). torch: `best`.
        num_bad_checks: consecutive non-improving checks counted towards `patience` (reset by
            an improvement, by a reduction, and at every check during cooldown).
            torch: `num_bad_epochs`.
        cooldown_count: checks left in the cooldown that follows a reduction.
            torch: `cooldown_counter`.
        num_reductions: how many times the rule has asked for a reduction.
        last_reduced_step: step of the latest reduction (-1 before the first).
        smoothing: the running average of a smoothed monitor (None when not smoothed).
    """

    best: Float[Array, ""]
    num_bad_checks: Int[Array, ""]
    cooldown_count: Int[Array, ""]
    num_reductions: Int[Array, ""]
    last_reduced_step: Int[Array, ""]
    smoothing: SmoothingState | None = None


class ReduceLROnPlateau(Callback):
    """Reduce the learning rate when a monitored metric has stopped improving.

    The decisions are those of `torch.optim.lr_scheduler.ReduceLROnPlateau`, check for check
    (the test suite compares the two on random histories). Each call is one check:

    1. Improvement uses the shared rule [`fcb.monitor.improves`][]:
       `threshold_mode="rel"`: `current < best - threshold * |best|` (min) /
       `current > best + threshold * |best|` (max), which is torch's
       `best * (1 -/+ threshold)` for a best >= 0; `"abs"`: `current < best - threshold` /
       `current > best + threshold`. For a negative best fcb differs from torch on purpose:
       torch's bound `best * (1 - threshold)` lies above a negative best in min mode, so a
       slightly worse value counts as an improvement there. An improving check records the
       value as `best` and resets `num_bad_checks` to 0; any other check adds 1.
    2. During cooldown (`cooldown_count > 0`) the check uses up one cooldown check and
       `num_bad_checks` is reset to 0: bad checks in cooldown are ignored.
    3. The rule fires when `num_bad_checks > patience` (strictly: `patience=0` fires at the
       first non-improving check, `patience=2` at the third in a row). Firing resets
       `num_bad_checks` and starts a cooldown of `cooldown` checks.

    When the rule fires, the actions ask for `lr_scale = factor`, `min_lr = min_lr` and
    `min_lr_change = eps`, and the event `reduce_lr_on_plateau/reduced` is set. Adapters
    apply them with [`fcb.scaled_lr`][]: `new = max(lr * factor, min_lr)`, skipped when
    `lr - new <= eps` (torch's rule, so a learning rate at its floor stays there while the
    rule keeps firing; the event reports that the rule fired, as torch resets its counters).
    On other checks the actions leave the learning rate alone (`lr_scale = 1`).

    Non-finite values: NaN is a non-improving check (as in torch). ±inf also never becomes
    the best, which is where fcb differs from torch: torch takes `-inf` as the best in `"min"`
    mode (`+inf` in `"max"` mode), after which no value can improve on it. The
    bad-direction infinity (`+inf` in `"min"` mode) is a non-improving check in both.

    Precision: metrics are compared in float32 (torch compares Python floats). The decisions
    are identical whenever the bound `best * (1 ∓ threshold)` (or `best ∓ threshold`) is exact
    in float32; otherwise they can differ only for a value within a few float32 ulps of the
    bound (the default `threshold=1e-4` is not exact in float32). XLA on CPU flushes subnormal
    values (magnitude below about `1.2e-38`) to zero; torch does not.

    A missing metric raises [`fcb.MissingMetricError`][] listing the available keys when
    `strict=True`; with `strict=False` the check changes nothing and fires the
    `reduce_lr_on_plateau/metric_missing` event. The callback never stops training.

    Smoothing (`alpha=` / `window=`, as in [`fcb.EarlyStopping`][]): the rule follows the
    smoothed metric, and decides as it would on the smoothed series.

    Numeric options (`factor`, `patience`, `threshold`, `cooldown`, `min_lr`, `eps`, `alpha`)
    are array leaves: build the callback under `jax.vmap` to run many configurations at once.

    >>> plateau = fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=1)
    >>> state, lr = plateau.init(), 0.1
    >>> for step, loss in enumerate([1.0, 0.9, 0.95, 0.97, 0.99, 0.98]):
    ...     state, actions = plateau(state, {"val_loss": loss}, step=step)
    ...     lr = fcb.scaled_lr(lr, actions)
    ...     print(step, bool(actions.events["reduce_lr_on_plateau/reduced"]), f"{float(lr):.3f}")
    0 False 0.100
    1 False 0.100
    2 False 0.100
    3 True 0.050
    4 False 0.050
    5 True 0.025

    With optax, wrap the optimizer in `optax.inject_hyperparams` so that the learning rate
    lives in the optimizer state, and rescale it after each check:

    >>> import optax
    >>> optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    >>> params = {"w": jnp.ones(3)}
    >>> opt_state = optimizer.init(params)
    >>> plateau = fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=0, min_lr=0.03)
    >>> state = plateau.init()
    >>> for step, val_loss in enumerate([1.0, 1.2, 1.1, 1.3]):
    ...     state, actions = plateau(state, {"val_loss": val_loss}, step=step)
    ...     lr = opt_state.hyperparams["learning_rate"]
    ...     opt_state.hyperparams["learning_rate"] = fcb.scaled_lr(lr, actions)
    >>> round(float(opt_state.hyperparams["learning_rate"]), 6)
    0.03

    (`0.1 -> 0.05 -> 0.03`: the third reduction is held at `min_lr`, and the fourth is
    skipped because the learning rate is already at its floor.) See
    `examples/reduce_lr_on_plateau_optax.py` for a complete training loop.
    """

    identity_fields = ("monitor", "mode")

    monitor: str = eqx.field(static=True)
    mode: Mode = eqx.field(static=True)
    threshold_mode: ThresholdMode = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    window: int = eqx.field(static=True)
    factor: Float[Array, "*batch"]
    patience: Int[Array, "*batch"]
    threshold: Float[Array, "*batch"]
    cooldown: Int[Array, "*batch"]
    min_lr: Float[Array, "*batch"]
    eps: Float[Array, "*batch"]
    alpha: Float[Array, "*batch"] | None

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Mode = "min",
        factor: Any = 0.1,
        patience: Any = 10,
        threshold: Any = 1e-4,
        threshold_mode: ThresholdMode = "rel",
        cooldown: Any = 0,
        min_lr: Any = 0.0,
        eps: Any = 1e-8,
        *,
        strict: bool = True,
        alpha: Any = None,
        window: int | None = None,
    ):
        self.monitor = check_key(_OWNER, "monitor", monitor)
        self.mode = check_mode(_OWNER, mode)
        self.threshold_mode = check_threshold_mode(_OWNER, threshold_mode)
        self.strict = check_flag(_OWNER, "strict", strict)
        self.factor = float_param(  # 0 would zero the LR and 1 would never reduce it
            _OWNER,
            "factor",
            factor,
            above=0.0,
            below=1.0,
            hint=" The new learning rate is lr * factor, e.g. factor=0.1 divides it by 10.",
        )
        self.patience = int_param(_OWNER, "patience", patience, minimum=0)
        self.threshold = float_param(
            _OWNER,
            "threshold",
            threshold,
            minimum=0.0,
            hint=" The sign is set by `mode`; pass the absolute margin.",
        )
        self.cooldown = int_param(_OWNER, "cooldown", cooldown, minimum=0)
        self.min_lr = float_param(_OWNER, "min_lr", min_lr, minimum=0.0)
        self.eps = float_param(_OWNER, "eps", eps, minimum=0.0)
        self.alpha, self.window = check_smoothing(_OWNER, alpha, window)

    def action_names(self) -> ActionNames:
        return ActionNames(
            events=("reduce_lr_on_plateau/reduced", "reduce_lr_on_plateau/metric_missing")
        )

    def init(self) -> ReduceLROnPlateauState:
        shape = jnp.broadcast_shapes(
            *(
                jnp.shape(x)
                for x in (
                    self.factor,
                    self.patience,
                    self.threshold,
                    self.cooldown,
                    self.min_lr,
                    self.eps,
                )
            )
        )
        return ReduceLROnPlateauState(
            best=jnp.full(shape, _monitor.worst_value(self.mode), jnp.float32),
            num_bad_checks=jnp.zeros(shape, jnp.int32),
            cooldown_count=jnp.zeros(shape, jnp.int32),
            num_reductions=jnp.zeros(shape, jnp.int32),
            last_reduced_step=jnp.full(shape, NO_STEP, jnp.int32),
            smoothing=smoothing_init(self.alpha, self.window),
        )

    def __call__(
        self, state: ReduceLROnPlateauState, metrics: Metrics, *, step: StepLike
    ) -> tuple[ReduceLROnPlateauState, Actions]:
        actions = self.no_actions()
        value = read_metric(_OWNER, metrics, self.monitor, strict=self.strict)
        if value is None:
            return state, dataclasses.replace(
                actions,
                events={**actions.events, "reduce_lr_on_plateau/metric_missing": jnp.asarray(True)},
            )
        smoothing, value = smooth(self.alpha, self.window, state.smoothing, value)
        new_state, reduce = self.update(state, value, as_step(_OWNER, step))
        new_state = dataclasses.replace(new_state, smoothing=smoothing)
        return new_state, dataclasses.replace(
            actions,
            lr_scale=jnp.where(reduce, self.factor, actions.lr_scale),
            min_lr=jnp.where(reduce, self.min_lr, actions.min_lr),
            min_lr_change=jnp.where(reduce, self.eps, actions.min_lr_change),
            events={**actions.events, "reduce_lr_on_plateau/reduced": reduce},
        )

    def update(
        self, state: ReduceLROnPlateauState, value: Float[Array, ""], step: Int[Array, ""]
    ) -> tuple[ReduceLROnPlateauState, Bool[Array, ""]]:
        """The transition on a float32 `value` at `step`; returns the state and `reduce`."""
        improved = _monitor.improves(
            value, state.best, self.threshold, self.mode, self.threshold_mode
        )
        num_bad_checks = jnp.where(improved, 0, state.num_bad_checks + 1)
        # torch's order: the cooldown is consumed (and its bad checks forgotten) before the
        # patience test, so the check that ends a cooldown cannot itself trigger a reduction.
        in_cooldown = state.cooldown_count > 0
        cooldown_count = jnp.where(in_cooldown, state.cooldown_count - 1, state.cooldown_count)
        num_bad_checks = jnp.where(in_cooldown, 0, num_bad_checks)
        reduce = num_bad_checks > self.patience
        new_state = ReduceLROnPlateauState(
            best=jnp.where(improved, value, state.best),
            num_bad_checks=jnp.where(reduce, 0, num_bad_checks).astype(jnp.int32),
            cooldown_count=jnp.where(reduce, self.cooldown, cooldown_count).astype(jnp.int32),
            num_reductions=(state.num_reductions + reduce).astype(jnp.int32),
            last_reduced_step=jnp.where(reduce, step, state.last_reduced_step).astype(jnp.int32),
            smoothing=state.smoothing,
        )
        return new_state, reduce
