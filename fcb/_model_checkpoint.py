"""ModelCheckpoint: which steps to keep as the best, the top-k and the last checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from . import _monitor
from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike
from ._errors import ConfigError
from ._monitor import Mode
from ._slots import check_filename, count_check, eviction_index, insert_ranked
from ._smoothing import SmoothingState, check_smoothing, smooth, smoothing_init, where_tree
from ._validate import as_step, check_flag, check_key, check_mode, int_param, read_metric

LAST_SLOT = "last"

MAX_SAVE_TOP_K = 100
"""The largest `save_top_k` (beyond it, `save_top_k=-1` keeps every checkpoint).

`Actions.slots` holds one scalar per slot, so every rank is an output of the compiled check
and XLA compiles the first check in a time and memory linear in `save_top_k`: on a 2-core
CPU, 1.3 s and 0.4 GB at 100 ranks, 8 s and 1.6 GB at 1,000 (later checks take about 1 ms)."""


class ModelCheckpointState(eqx.Module):
    """State of [`fcb.ModelCheckpoint`][].

    Attributes:
        values: metric values of the kept checkpoints, best first (worst value when empty).
        steps: their steps (-1 when empty). `steps[0]` is the best step.
        last_step: the last scheduled step (-1 before the first).
        last_value: its metric value (NaN when the metric was missing).
        check_count: checks seen so far (for `every_n`).
        smoothing: the running average of a smoothed monitor (None when not smoothed).
        raw_values: with smoothing, the raw metric of each kept checkpoint (`values` holds
            the smoothed one, by which they rank); None otherwise.
        tie_values: with `tie_break`, the second metric of each kept checkpoint (NaN when it
            was missing); None otherwise.
    """

    values: Float[Array, " k"]
    steps: Int[Array, " k"]
    last_step: Int[Array, ""]
    last_value: Float[Array, ""]
    check_count: Int[Array, ""]
    smoothing: SmoothingState | None = None
    raw_values: Float[Array, " k"] | None = None
    tie_values: Float[Array, " k"] | None = None


class ModelCheckpoint(Callback):
    """Decide which checkpoints to keep: the best `save_top_k` by a metric, and the last.

    Slots (file stems the adapter writes, `.pt` for the Torch adapter):

    | slot | holds |
    |---|---|
    | `{filename}` | the best step (`best_model_path` points here) |
    | `{filename}-top2` ... `{filename}-top{k}` | rank 2 ... k (`save_top_k=k > 1`) |
    | `last` | the last scheduled step (`save_last=True`) |

    With `save_top_k=-1` every scheduled checkpoint with a finite value is archived
    (`actions.archive`) and `{filename}` points at the best one; with `save_top_k=0` only
    `last` is kept.

    Rules (Lightning's `ModelCheckpoint`, check for check on finite values): a value enters
    the top-k when it is finite and the table is not full, or it is strictly better than the
    worst kept value; a tie with the worst kept value does not enter. An entering value
    evicts the oldest of the kept checkpoints tied at the worst value (Lightning's
    `kth_best_model_path`; [`next_to_evict`][fcb.ModelCheckpoint.next_to_evict] tells which).
    Kept checkpoints of equal value rank in the order they entered, oldest first, so the
    best (`{filename}`) is the oldest of the tied best, as Lightning's `best_model_path`.
    NaN and ±inf never enter the top-k (Lightning keeps such a checkpoint, ranked as the
    worst value, while its table is not full). Only every `every_n`-th check is considered
    (the 2nd, 4th... for `every_n=2`); `last` follows the schedule too (Lightning moves `last`
    only when a top-k checkpoint is saved). A missing metric raises with `strict=True`; with
    `strict=False` the check still updates `last`.

    Tie-break: with `tie_break="val_acc"` (and `tie_break_mode`), checkpoints whose monitored
    values are equal rank by that second metric, strictly better first (a missing or NaN
    second value ranks last); only checks equal in both keep the order they entered. A check
    equal to the worst kept one enters when its second value is strictly better.

    Smoothing (`alpha=` or `window=`, as in [`fcb.EarlyStopping`][]): checkpoints rank by
    the smoothed monitor, and `slot_values` hold it; the raw value of each ranked slot is logged
    as `{slot}/raw_value` and kept in `state.raw_values`.

    >>> ckpt = fcb.ModelCheckpoint(monitor="val_loss", save_top_k=2)
    >>> state = ckpt.init()
    >>> for step, loss in enumerate([0.5, 0.3, 0.4, 0.35]):
    ...     state, actions = ckpt(state, {"val_loss": loss}, step=step)
    >>> {slot: int(s) for slot, s in actions.slots.items()}
    {'best_model': 1, 'best_model-top2': 3, 'last': 3}
    >>> bool(actions.save)
    True

    Two checks with the same loss, the second with a better accuracy:

    >>> ckpt = fcb.ModelCheckpoint("val_loss", tie_break="val_acc", tie_break_mode="max")
    >>> state = ckpt.init()
    >>> for step, (loss, acc) in enumerate([(0.3, 0.8), (0.3, 0.9), (0.3, 0.85)]):
    ...     state, actions = ckpt(state, {"val_loss": loss, "val_acc": acc}, step=step)
    >>> int(actions.slots["best_model"])
    1
    """

    identity_fields = ("monitor", "mode")

    monitor: str = eqx.field(static=True)
    mode: Mode = eqx.field(static=True)
    save_top_k: int = eqx.field(static=True)
    save_last: bool = eqx.field(static=True)
    filename: str = eqx.field(static=True)
    dirpath: str = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    tie_break: str | None = eqx.field(static=True)
    tie_break_mode: Mode = eqx.field(static=True)
    window: int = eqx.field(static=True)
    every_n: Int[Array, "*batch"]
    alpha: Float[Array, "*batch"] | None

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Mode = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        filename: str = "best_model",
        dirpath: str = "",
        *,
        every_n: Any = 1,
        strict: bool = True,
        tie_break: str | None = None,
        tie_break_mode: Mode = "min",
        alpha: Any = None,
        window: int | None = None,
    ):
        owner = "ModelCheckpoint"
        self.monitor = check_key(owner, "monitor", monitor)
        self.mode = check_mode(owner, mode)
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(
                f"{owner}: `save_top_k` must be an integer >= -1 (-1: keep all, 0: none, k: the "
                f"best k), got save_top_k = {save_top_k!r}."
            )
        if save_top_k > MAX_SAVE_TOP_K:
            raise ConfigError(
                f"{owner}: `save_top_k` must be at most {MAX_SAVE_TOP_K}, got save_top_k = "
                f"{save_top_k!r}. Every rank is a slot of its own (a named checkpoint, and an "
                f"output of the compiled check, so the first check compiles for a time that "
                f"grows with save_top_k). To keep more checkpoints, pass save_top_k=-1: every "
                f"checkpoint is archived and {filename!r} names the best."
            )
        self.save_top_k = save_top_k
        self.save_last = check_flag(owner, "save_last", save_last)
        self.filename = check_filename(owner, "filename", filename)
        if self.save_last and self.filename == LAST_SLOT:
            raise ConfigError(
                f"{owner}: `filename` must differ from {LAST_SLOT!r}, which names the last "
                f"checkpoint, got filename = {filename!r}."
            )
        if not isinstance(dirpath, str):
            raise ConfigError(f"{owner}: `dirpath` must be a str, got dirpath = {dirpath!r}.")
        self.dirpath = dirpath
        self.strict = check_flag(owner, "strict", strict)
        self.every_n = int_param(owner, "every_n", every_n, minimum=1)
        self.tie_break = None if tie_break is None else check_key(owner, "tie_break", tie_break)
        if self.tie_break == self.monitor:
            raise ConfigError(
                f"{owner}: `tie_break` must name another metric than `monitor`, got "
                f"tie_break = {tie_break!r}; it orders checks whose {monitor!r} values are equal."
            )
        self.tie_break_mode = check_mode(owner, tie_break_mode, "tie_break_mode")
        self.alpha, self.window = check_smoothing(owner, alpha, window)

    @property
    def table_size(self) -> int:
        return 1 if self.save_top_k == -1 else self.save_top_k

    def rank_slots(self) -> tuple[str, ...]:
        """Slot names by rank: `(filename, filename-top2, ...)`."""
        return tuple(
            self.filename if rank == 1 else f"{self.filename}-top{rank}"
            for rank in range(1, self.table_size + 1)
        )

    def next_to_evict(self, state: ModelCheckpointState) -> Int[Array, ""]:
        """The step the next entering value would evict, -1 when it would evict none.

        The oldest of the kept checkpoints tied at the worst kept value once the table is
        full (Lightning's `kth_best_model_path`); -1 while the table has room, and for
        `save_top_k=0` and `save_top_k=-1` (which never evict).

        >>> ckpt = fcb.ModelCheckpoint("val_loss", save_top_k=2)
        >>> state = ckpt.init()
        >>> for step, loss in enumerate([1.0, 1.0]):
        ...     state, _ = ckpt(state, {"val_loss": loss}, step=step)
        >>> int(ckpt.next_to_evict(state))
        0
        """
        if self.save_top_k <= 0:
            return jnp.full(jnp.shape(state.steps)[:-1], NO_STEP, jnp.int32)

        def one(values: Array, steps: Array, ties: Array) -> Array:
            evicted = steps[eviction_index(values, steps, None if self.tie_break is None else ties)]
            return jnp.where(steps[-1] >= 0, evicted, NO_STEP).astype(jnp.int32)

        flat_values = jnp.reshape(state.values, (-1, self.table_size))
        flat_steps = jnp.reshape(state.steps, (-1, self.table_size))
        ties = state.values if state.tie_values is None else state.tie_values
        flat_ties = jnp.reshape(ties, (-1, self.table_size))
        out = jax.vmap(one)(flat_values, flat_steps, flat_ties)
        return jnp.reshape(out, jnp.shape(state.steps)[:-1])

    @property
    def smoothed(self) -> bool:
        return self.alpha is not None or self.window > 0

    def action_names(self) -> ActionNames:
        ranks = self.rank_slots()
        last = (LAST_SLOT,) if self.save_last else ()
        return ActionNames(
            slots=ranks + last,
            log=tuple(f"{s}/raw_value" for s in ranks) if self.smoothed else (),
            events=(f"{self.filename}/improved", f"{self.filename}/metric_missing"),
            slot_kinds=tuple((s, "best" if i == 0 else "top_k") for i, s in enumerate(ranks))
            + tuple((s, "last") for s in last),
        )

    def init(self) -> ModelCheckpointState:
        return ModelCheckpointState(
            values=jnp.full((self.table_size,), _monitor.worst_value(self.mode), jnp.float32),
            steps=jnp.full((self.table_size,), NO_STEP, jnp.int32),
            last_step=jnp.asarray(NO_STEP, jnp.int32),
            last_value=jnp.asarray(jnp.nan, jnp.float32),
            check_count=jnp.asarray(0, jnp.int32),
            smoothing=smoothing_init(self.alpha, self.window),
            raw_values=jnp.full((self.table_size,), jnp.nan, jnp.float32)
            if self.smoothed
            else None,
            tie_values=jnp.full((self.table_size,), jnp.nan, jnp.float32)
            if self.tie_break is not None
            else None,
        )

    def __call__(
        self, state: ModelCheckpointState, metrics: Metrics, *, step: StepLike
    ) -> tuple[ModelCheckpointState, Actions]:
        value = read_metric("ModelCheckpoint", metrics, self.monitor, strict=self.strict)
        missing = value is None
        raw = jnp.asarray(jnp.nan, jnp.float32) if value is None else value
        step = as_step("ModelCheckpoint", step)
        check_count, scheduled = count_check(state.check_count, self.every_n)
        smoothing, value = state.smoothing, raw
        if not missing:
            smoothing, value = smooth(self.alpha, self.window, state.smoothing, raw)
            smoothing = where_tree(scheduled, smoothing, state.smoothing)
        tie_value = None
        if self.tie_break is not None:
            read = read_metric("ModelCheckpoint", metrics, self.tie_break, strict=self.strict)
            tie_value = jnp.asarray(jnp.nan, jnp.float32) if read is None else read
        carried = tuple(
            (column, entry) for column, entry in ((state.raw_values, raw),) if column is not None
        )
        if missing:
            values, steps, rank = state.values, state.steps, jnp.asarray(self.table_size)
            tie_values, moved = state.tie_values, tuple(c for c, _ in carried)
        else:
            tie = None
            if tie_value is not None and state.tie_values is not None:
                tie = (state.tie_values, tie_value, self.tie_break_mode)
            values, steps, rank, moved = insert_ranked(
                state.values, state.steps, value, step, self.mode, tie, carried
            )
            tie_values = None
            if tie is not None:
                tie_values, moved = moved[0], moved[1:]
        entered = scheduled & (rank < self.table_size)
        new_state = ModelCheckpointState(
            values=jnp.where(scheduled, values, state.values),
            steps=jnp.where(scheduled, steps, state.steps),
            last_step=jnp.where(scheduled, step, state.last_step),
            last_value=jnp.where(scheduled, value, state.last_value),
            check_count=check_count,
            smoothing=smoothing,
            raw_values=where_tree(scheduled, moved[0], state.raw_values) if moved else None,
            tie_values=where_tree(scheduled, tie_values, state.tie_values),
        )
        # Whole-table operations, then one split into per-slot scalars: a large save_top_k
        # costs one vector op per rule, not one op per rank and rule.
        rank_steps, rank_values = new_state.steps, new_state.values
        if self.save_last:
            rank_steps = jnp.append(rank_steps, new_state.last_step)
            rank_values = jnp.append(rank_values, new_state.last_value)
        rank_values = jnp.where(rank_steps >= 0, rank_values, jnp.nan)
        held = jnp.any(rank_steps == step) & (step >= 0)
        names = self.rank_slots() + ((LAST_SLOT,) if self.save_last else ())
        slots = dict(zip(names, _scalars(rank_steps), strict=True))
        slot_values = dict(zip(names, _scalars(rank_values), strict=True))
        log = {}
        if new_state.raw_values is not None:
            raw_values = jnp.where(new_state.steps >= 0, new_state.raw_values, jnp.nan)
            log = {
                f"{n}/raw_value": v
                for n, v in zip(self.rank_slots(), _scalars(raw_values), strict=True)
            }
        keep_all = self.save_top_k == -1
        archive = scheduled & jnp.isfinite(value) if keep_all else jnp.asarray(False)
        events = {
            f"{self.filename}/improved": entered & (rank == 0),
            f"{self.filename}/metric_missing": jnp.asarray(missing),
        }
        # Built directly rather than from `no_actions()`, whose per-slot placeholders would
        # all be replaced.
        return new_state, dataclasses.replace(
            Actions.no_actions(),
            save=held | archive,
            archive=archive,
            slots=slots,
            slot_values=slot_values,
            log=log,
            events=events,
        )


def _scalars(vector: Array) -> list[Array]:
    """The elements of a 1-d array as 0-d arrays, in one operation."""
    if vector.shape[0] == 0:
        return []
    return [jnp.reshape(x, ()) for x in jnp.split(vector, vector.shape[0])]
