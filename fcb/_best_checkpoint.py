"""BestCheckpoint: the best checkpoint overall and per early-stopping tolerance."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from . import _monitor
from ._best_checkpoint_checks import check_model_names, check_tolerances, resolve_mode
from ._chain import Chain
from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike, merge_actions
from ._early_stopping import EarlyStopping, EarlyStoppingState
from ._errors import ConfigError
from ._monitor import Mode, ThresholdMode
from ._slots import (
    MAX_FILENAME,
    check_filename,
    count_check,
    holds,
    key_as_name,
    loaded_slot,
    tie_key,
)
from ._smoothing import SmoothingState, check_smoothing, smooth, smoothing_init, where_tree
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


class BestCheckpointState(eqx.Module):
    """State of [`fcb.BestCheckpoint`][].

    Attributes:
        best: the best value overall (the worst value before the first finite check).
        best_step: its step (-1 before).
        tolerances: one [`fcb.EarlyStoppingState`][] per tolerance, stacked on a leading axis:
            exactly the state of `EarlyStopping(patience=t)` on the same checks.
        check_count: checks seen so far (for `every_n`).
        children: the state of the nested callbacks (a tuple, as in [`fcb.chain`][]).
        smoothing: the running average of a smoothed monitor (None when not smoothed).
        best_raw: with smoothing, the raw metric of the best check (`best` is the smoothed
            one); None otherwise.
        best_tie: with `tie_break`, the second metric of the best check; None otherwise.
    """

    best: Float[Array, ""]
    best_step: Int[Array, ""]
    tolerances: EarlyStoppingState
    check_count: Int[Array, ""]
    children: tuple[Any, ...]
    smoothing: SmoothingState | None = None
    best_raw: Float[Array, ""] | None = None
    best_tie: Float[Array, ""] | None = None


class BestCheckpoint(Callback):
    """Keep the best checkpoint by a metric, plus one best checkpoint per tolerance.

    For each tolerance `t` the slot `{filename}.tolerance={t}` holds exactly the best step that
    `fcb.EarlyStopping(metric_key, mode, patience=t, min_delta=min_delta,
    check_finite=check_finite)` would have kept when it stopped: it follows the best until `t`
    consecutive scheduled checks pass without improvement, then freezes. One training run thus
    evaluates several early-stopping configurations. The slot `{filename}` holds the best step
    overall (tolerance infinite; the earliest of tied values).

    Nested `callbacks` see the model at each new overall best: the check requests an
    evaluation (`actions.evaluate[filename]`); the adapter evaluates the live model and calls
    `evaluated(state, filename, results, step=step)`, which passes the results to the nested
    callbacks with keys prefixed `best=<metric_key>/` (slashes in `metric_key` become dots);
    their log and event names are prefixed the same way. A tolerance freezing never triggers
    them. `init` and `finalize` reach them unconditionally.

    `model_names` restricts every slot of this callback to those submodules of a composite
    model (recorded in `actions.slot_models`). `finalize` logs the best value and step overall
    and per tolerance: `{filename}/best_value`, `{filename}/best_step`,
    `{filename}.tolerance={t}/best_value`, `.../best_step`, `.../stopped_step`.

    `threshold_mode="rel"` makes `min_delta` a fraction of `|best|`, as in
    [`fcb.EarlyStopping`][]. Smoothing (`alpha=` / `window=`): every slot follows the smoothed
    metric, `slot_values` hold it, and the raw value of the overall best is logged as
    `{filename}/raw_value`. Tie-break (`tie_break=` / `tie_break_mode=`): a check whose value
    equals the overall best and whose second metric is strictly better becomes the best
    (the tolerance slots follow `EarlyStopping`'s rule, where a tie is not an improvement).

    >>> cb = fcb.BestCheckpoint("val_loss", tolerances=(1, 3))
    >>> state = cb.init()
    >>> for step, loss in enumerate([0.5, 0.4, 0.45, 0.3, 0.35, 0.36, 0.2]):
    ...     state, actions = cb(state, {"val_loss": loss}, step=step)
    >>> {slot: int(s) for slot, s in actions.slots.items()}
    {'best.val_loss': 6, 'best.val_loss.tolerance=1': 1, 'best.val_loss.tolerance=3': 6}
    """

    identity_fields = ("metric_key", "mode")

    metric_key: str = eqx.field(static=True)
    mode: Mode = eqx.field(static=True)
    tolerances: tuple[int, ...] = eqx.field(static=True)
    model_names: tuple[str, ...] | None = eqx.field(static=True)
    filename: str = eqx.field(static=True)
    check_finite: bool = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    tie_break: str | None = eqx.field(static=True)
    tie_break_mode: Mode = eqx.field(static=True)
    window: int = eqx.field(static=True)
    every_n: Int[Array, "*batch"]
    tolerance_stopping: EarlyStopping
    children: Chain
    alpha: Float[Array, "*batch"] | None

    def __init__(
        self,
        metric_key: str = "val_loss",
        mode: Mode | None = None,
        tolerances: Sequence[int] = (),
        *,
        higher_is_better: bool | None = None,
        model_names: Sequence[str] | None = None,
        callbacks: Sequence[Callback] = (),
        filename: str | None = None,
        every_n: Any = 1,
        min_delta: Any = 0.0,
        check_finite: bool = True,
        strict: bool = True,
        threshold_mode: ThresholdMode = "abs",
        tie_break: str | None = None,
        tie_break_mode: Mode = "min",
        alpha: Any = None,
        window: int | None = None,
    ):
        owner = "BestCheckpoint"
        self.metric_key = check_key(owner, "metric_key", metric_key)
        self.mode = resolve_mode(owner, mode, higher_is_better)
        self.tolerances = check_tolerances(owner, tolerances)
        self.model_names = check_model_names(owner, model_names)
        if filename is None:  # the default names the metric: a bad name is the metric's
            try:
                filename = check_filename(owner, "filename", f"best.{key_as_name(metric_key)}")
            except ConfigError:
                raise ConfigError(
                    f"{owner}: `metric_key` = {metric_key!r} cannot name the default slot "
                    f"'best.<metric_key>' (letters, digits and '._=+-/' only, at most "
                    f"{MAX_FILENAME - 5} characters); pass filename=... to name the slot."
                ) from None
        self.filename = check_filename(owner, "filename", filename)
        self.check_finite = check_flag(owner, "check_finite", check_finite)
        self.strict = check_flag(owner, "strict", strict)
        self.every_n = int_param(owner, "every_n", every_n, minimum=1)
        worst = np.full(len(self.tolerances), _monitor.worst_value(self.mode), np.float32)
        self.tolerance_stopping = EarlyStopping(
            self.metric_key,
            self.mode,
            patience=np.asarray(self.tolerances, np.int32),
            min_delta=float_param(owner, "min_delta", min_delta, minimum=0.0),
            check_finite=self.check_finite,
            baseline=worst,
            threshold_mode=check_threshold_mode(owner, threshold_mode),
        )
        self.children = Chain(*callbacks)
        self.tie_break = None if tie_break is None else check_key(owner, "tie_break", tie_break)
        if self.tie_break == self.metric_key:
            raise ConfigError(
                f"{owner}: `tie_break` must name another metric than `metric_key`, got "
                f"tie_break = {tie_break!r}; it orders checks whose {metric_key!r} values are "
                f"equal."
            )
        self.tie_break_mode = check_mode(owner, tie_break_mode, "tie_break_mode")
        self.alpha, self.window = check_smoothing(owner, alpha, window)

    @property
    def min_delta(self) -> Float[Array, "*batch"]:
        return self.tolerance_stopping.min_delta

    @property
    def threshold_mode(self) -> ThresholdMode:
        return self.tolerance_stopping.threshold_mode

    @property
    def smoothed(self) -> bool:
        return self.alpha is not None or self.window > 0

    @property
    def child_prefix(self) -> str:
        """The prefix of the metric keys the nested callbacks see: `best=<metric_key>`."""
        return f"best={key_as_name(self.metric_key)}"

    def tolerance_slots(self) -> tuple[str, ...]:
        return tuple(f"{self.filename}.tolerance={t}" for t in self.tolerances)

    def action_names(self) -> ActionNames:
        slots = (self.filename, *self.tolerance_slots())
        return ActionNames(
            slots=slots,
            log=(f"{self.filename}/raw_value",) if self.smoothed else (),
            events=tuple(
                f"{self.filename}/{e}" for e in ("improved", "tolerance_exceeded", "metric_missing")
            ),
            evaluate=(self.filename,) if self.children.callbacks else (),
            slot_models=tuple((s, self.model_names) for s in slots) if self.model_names else (),
            slot_kinds=(
                (self.filename, "best"),
                *((s, "tolerance") for s in self.tolerance_slots()),
            ),
        )

    def init(self) -> BestCheckpointState:
        return BestCheckpointState(
            best=jnp.asarray(_monitor.worst_value(self.mode), jnp.float32),
            best_step=jnp.asarray(NO_STEP, jnp.int32),
            tolerances=self.tolerance_stopping.init(),
            check_count=jnp.asarray(0, jnp.int32),
            children=self.children.init(),
            smoothing=smoothing_init(self.alpha, self.window),
            best_raw=jnp.asarray(jnp.nan, jnp.float32) if self.smoothed else None,
            best_tie=None if self.tie_break is None else jnp.asarray(jnp.nan, jnp.float32),
        )

    def __call__(
        self, state: BestCheckpointState, metrics: Metrics, *, step: StepLike
    ) -> tuple[BestCheckpointState, Actions]:
        actions = self.no_actions()
        value = read_metric("BestCheckpoint", metrics, self.metric_key, strict=self.strict)
        step = as_step("BestCheckpoint", step)
        if value is None:
            new_state = state
            improved = exceeded = jnp.asarray(False)
        else:
            check_count, scheduled = count_check(state.check_count, self.every_n)
            raw = value
            smoothing, value = smooth(self.alpha, self.window, state.smoothing, raw)
            better = _monitor.improves(
                value, state.best, self.min_delta, self.mode, self.threshold_mode
            )
            tie = None
            if self.tie_break is not None and state.best_tie is not None:
                read = read_metric("BestCheckpoint", metrics, self.tie_break, strict=self.strict)
                tie = jnp.asarray(jnp.nan, jnp.float32) if read is None else read
                wins = _monitor.is_better(
                    tie_key(tie, self.tie_break_mode),
                    tie_key(state.best_tie, self.tie_break_mode),
                    self.tie_break_mode,
                )
                better = better | ((value == state.best) & (state.best_step >= 0) & wins)
            improved = scheduled & better
            tolerances, _ = self.tolerance_stopping.update(state.tolerances, value, step)
            tolerances = jax.tree_util.tree_map(
                lambda new, old: jnp.where(scheduled, new, old), tolerances, state.tolerances
            )
            exceeded = jnp.any(tolerances.stopped & ~state.tolerances.stopped)
            new_state = dataclasses.replace(
                state,
                best=jnp.where(improved, value, state.best),
                best_step=jnp.where(improved, step, state.best_step),
                tolerances=tolerances,
                check_count=check_count,
                smoothing=where_tree(scheduled, smoothing, state.smoothing),
                best_raw=None
                if state.best_raw is None
                else jnp.where(improved, raw, state.best_raw),
                best_tie=None
                if tie is None or state.best_tie is None
                else jnp.where(improved, tie, state.best_tie),
            )
        slots = {self.filename: new_state.best_step}
        slot_values = {self.filename: new_state.best}
        for i, slot in enumerate(self.tolerance_slots()):
            slots[slot] = new_state.tolerances.best_step[i]
            slot_values[slot] = new_state.tolerances.best[i]
        slot_values = {
            name: jnp.where(slots[name] >= 0, v, jnp.nan) for name, v in slot_values.items()
        }
        events = {
            f"{self.filename}/improved": improved,
            f"{self.filename}/tolerance_exceeded": exceeded,
            f"{self.filename}/metric_missing": jnp.asarray(value is None),
        }
        evaluate = {name: improved for name in actions.evaluate}
        if new_state.best_raw is not None:
            actions = dataclasses.replace(
                actions, log={f"{self.filename}/raw_value": new_state.best_raw}
            )
        return new_state, dataclasses.replace(
            actions,
            save=holds(slots, step),
            slots=slots,
            slot_values=slot_values,
            events=events,
            evaluate=evaluate,
        )

    def evaluated(
        self, state: BestCheckpointState, request: str, results: Metrics, *, step: StepLike
    ) -> tuple[BestCheckpointState, Actions]:
        """Pass the evaluation of a new best model to the nested callbacks (prefixed keys).

        A request `"loaded:<slot>"` is the post-training pass's evaluation of one of this
        callback's slots: `evaluated_slot` answers it."""
        slot = loaded_slot(request)
        if slot is not None:
            if slot in (self.filename, *self.tolerance_slots()):
                return self.evaluated_slot(state, slot, results, step=step)
            return state, self.no_actions()
        if request != self.filename or not self.children.callbacks:
            return state, self.no_actions()
        prefixed = {f"{self.child_prefix}/{k}": v for k, v in results.items()}
        children, child_actions = self.children(state.children, prefixed, step=step)
        return dataclasses.replace(state, children=children), self._with_children(child_actions)

    def evaluated_slot(
        self, state: BestCheckpointState, slot: str, results: Metrics, *, step: StepLike
    ) -> tuple[BestCheckpointState, Actions]:
        """Pass the evaluation of a loaded slot (after training) to the nested callbacks.

        The nested callbacks see `results` with keys prefixed `best=<metric_key>/`,
        unconditionally; only their state changes (not the best and tolerance bookkeeping),
        and the actions ask for no save (`save`, `archive`, `slots`, `evaluate` empty; `log`,
        `events`, `stop` are the children's, prefixed). Jittable (`slot` is static).

        >>> child = fcb.EarlyStopping("best=val_loss/acc", "max")
        >>> cb = fcb.BestCheckpoint("val_loss", callbacks=[child])
        >>> state, _ = cb(cb.init(), {"val_loss": 0.5}, step=0)
        >>> state, actions = cb.evaluated_slot(state, "best.val_loss", {"acc": 0.5}, step=0)
        >>> float(state.children[0].best), bool(actions.save), int(state.best_step)
        (0.5, False, 0)
        """
        slots = (self.filename, *self.tolerance_slots())
        if slot not in slots:
            raise ConfigError(
                f"BestCheckpoint: `slot` must be one of this callback's slots {list(slots)}, "
                f"got slot = {slot!r}; pass one of them."
            )
        if not self.children.callbacks:
            return state, self.no_actions()
        prefixed = {f"{self.child_prefix}/{k}": v for k, v in results.items()}
        children, child_actions = self.children(state.children, prefixed, step=step)
        actions = self._with_children(child_actions)
        actions = dataclasses.replace(
            actions,
            save=jnp.asarray(False),
            archive=jnp.asarray(False),
            slots={},
            slot_values={},
            evaluate={},
        )
        return dataclasses.replace(state, children=children), actions

    def finalize(self, state: BestCheckpointState) -> tuple[BestCheckpointState, Actions]:
        children, child_actions = self.children.finalize(state.children)
        log = {
            f"{self.filename}/best_value": state.best,
            f"{self.filename}/best_step": state.best_step.astype(jnp.float32),
        }
        for i, slot in enumerate(self.tolerance_slots()):
            log[f"{slot}/best_value"] = state.tolerances.best[i]
            log[f"{slot}/best_step"] = state.tolerances.best_step[i].astype(jnp.float32)
            log[f"{slot}/stopped_step"] = state.tolerances.stopped_step[i].astype(jnp.float32)
        summary = dataclasses.replace(Actions.no_actions(), log=log)
        actions = merge_actions([summary, self._with_children(child_actions)])
        return dataclasses.replace(state, children=children), actions

    def _with_children(self, child_actions: Actions) -> Actions:
        return merge_actions([child_actions], prefixes=[self.child_prefix])
