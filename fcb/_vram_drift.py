"""VRAMDrift: warn once when free device memory shrinks past a threshold during training."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import _monitor
from ._core import NO_STEP, ActionNames, Actions, Callback, Metrics, StepLike
from ._errors import ConfigError
from ._validate import as_step, check_flag, check_key, float_param, read_metric

FREE_DEVICE_MEMORY = "free_device_memory"
"""The host input VRAMDrift declares: free accelerator memory in bytes (see `ActionNames`)."""

_OWNER = "VRAMDrift"
MIB = 2.0**20
"""Bytes per MiB. A power of two, so converting float32 bytes to MiB is exact."""

_DRIFT = "vram_drift/drift"
_MISSING = "vram_drift/metric_missing"
_BASELINE_LOG = "vram_drift/baseline_bytes"
_FREE_LOG = "vram_drift/free_bytes"
_DRIFT_LOG = "vram_drift/drift_bytes"


class VRAMDriftState(eqx.Module):
    """State of [`fcb.VRAMDrift`][].

    Attributes:
        baseline_mib: free device memory at the first check with a finite figure, in MiB
            (float32; NaN before it).
        baseline_step: step of that check (-1 before it).
        warned_step: step of the one drift warning (-1 until it fires).
    """

    baseline_mib: Float[Array, ""]
    baseline_step: Int[Array, ""]
    warned_step: Int[Array, ""]

    @property
    def has_baseline(self) -> Bool[Array, ""]:
        return self.baseline_step >= 0

    @property
    def warned(self) -> Bool[Array, ""]:
        return self.warned_step >= 0


class VRAMDrift(Callback):
    """Warn once when free device memory has shrunk past a threshold since training started.

    Over a long run the free device memory can drift down: another process on a shared device,
    a leak of activations or caches. The first check with a memory figure records the
    baseline; each later check compares the free memory with it. When the drift
    `baseline - free` is strictly greater than `max_drift_bytes`, or than
    `max_drift_fraction * baseline`, the event `vram_drift/drift` fires, once per run. The
    callback only warns, it never stops training: stopping is the user's decision.

    The figure is the metric `key` (default `"free_memory_bytes"`): free device memory in bytes.
    The adapters supply it from their device probe at each check, at epoch boundaries, which
    avoids the transient allocations inside a step; the first check (at fit start) is the
    baseline. On a machine without a device memory probe (a CPU-only run), the adapters supply
    no figure and the callback does nothing: with the default `strict=False` a missing figure
    changes nothing and fires the `vram_drift/metric_missing` event; `strict=True` raises
    [`fcb.MissingMetricError`][] instead. A non-finite figure is ignored the same way (it is
    never the baseline and never compared).

    Every check with a figure logs `vram_drift/baseline_bytes`, `vram_drift/free_bytes` and
    `vram_drift/drift_bytes` (NaN before the baseline exists).

    Precision: metrics are float32, and so are the figures here, held in MiB. float32 keeps 24
    significant bits, so a figure is exact up to 16 MiB and otherwise within a relative 6e-8
    (at most 4 KiB at 80 GiB), far below any useful drift threshold. MiB is a power-of-two
    unit, so the conversion itself is exact, and the state dict reads in familiar numbers.
    Through `jax.jit`, pass the figure as a float (as the adapters do): a Python int above
    2**31 cannot cross `jit` while JAX's 64-bit mode is off.

    Both thresholds are array leaves (`jax.vmap` over a stack of them works); at least one must
    be given. A threshold left out never fires.

    >>> GiB = 2**30
    >>> drift = fcb.VRAMDrift(max_drift_bytes=2 * GiB)
    >>> state = drift.init()
    >>> for step, free in enumerate([20 * GiB, 19 * GiB, 17.5 * GiB, 16 * GiB]):
    ...     state, actions = drift(state, {"free_memory_bytes": free}, step=step)
    ...     lost = float(actions.log["vram_drift/drift_bytes"]) / GiB
    ...     print(step, lost, bool(actions.events["vram_drift/drift"]))
    0 0.0 False
    1 1.0 False
    2 2.5 True
    3 4.0 False
    >>> float(state.baseline_mib), int(state.warned_step)
    (20480.0, 2)
    """

    identity_fields = ("key",)

    key: str = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    max_drift_bytes: Float[Array, "*batch"]
    max_drift_fraction: Float[Array, "*batch"]

    def __init__(
        self,
        max_drift_bytes: Any = None,
        max_drift_fraction: Any = None,
        *,
        key: str = "free_memory_bytes",
        strict: bool = False,
    ):
        if max_drift_bytes is None and max_drift_fraction is None:
            raise ConfigError(
                f"{_OWNER}: give `max_drift_bytes` and/or `max_drift_fraction`, got neither. "
                f"For example max_drift_bytes=2 * 2**30 warns when 2 GiB of free memory are "
                f"lost; max_drift_fraction=0.1 when 10% of the baseline is."
            )
        self.key = check_key(_OWNER, "key", key)
        self.strict = check_flag(_OWNER, "strict", strict)
        self.max_drift_bytes = (
            jnp.asarray(jnp.inf, jnp.float32)
            if max_drift_bytes is None
            else float_param(_OWNER, "max_drift_bytes", max_drift_bytes, minimum=0.0)
        )
        self.max_drift_fraction = (
            jnp.asarray(jnp.inf, jnp.float32)
            if max_drift_fraction is None
            else float_param(
                _OWNER, "max_drift_fraction", max_drift_fraction, minimum=0.0, below=1.0,
                hint=" It is a fraction of the baseline free memory, e.g. 0.1 for 10%.",
            )
        )

    def action_names(self) -> ActionNames:
        return ActionNames(
            log=(_BASELINE_LOG, _FREE_LOG, _DRIFT_LOG),
            events=(_DRIFT, _MISSING),
            host_inputs=((self.key, FREE_DEVICE_MEMORY),),
        )

    def init(self) -> VRAMDriftState:
        shape = jnp.broadcast_shapes(
            jnp.shape(self.max_drift_bytes), jnp.shape(self.max_drift_fraction)
        )
        return VRAMDriftState(
            baseline_mib=jnp.full(shape, jnp.nan, jnp.float32),
            baseline_step=jnp.full(shape, NO_STEP, jnp.int32),
            warned_step=jnp.full(shape, NO_STEP, jnp.int32),
        )

    def __call__(
        self, state: VRAMDriftState, metrics: Metrics, *, step: StepLike
    ) -> tuple[VRAMDriftState, Actions]:
        actions = self.no_actions()
        value = read_metric(_OWNER, metrics, self.key, strict=self.strict)
        if value is None:
            return state, dataclasses.replace(
                actions, events={**actions.events, _MISSING: jnp.asarray(True)}
            )
        new_state, drift_mib, fired = self.update(state, value / MIB, as_step(_OWNER, step))
        return new_state, dataclasses.replace(
            actions,
            log={
                _BASELINE_LOG: new_state.baseline_mib * MIB,
                _FREE_LOG: value,
                _DRIFT_LOG: drift_mib * MIB,
            },
            events={**actions.events, _DRIFT: fired},
        )

    def update(
        self, state: VRAMDriftState, free_mib: Float[Array, ""], step: Int[Array, ""]
    ) -> tuple[VRAMDriftState, Float[Array, ""], Bool[Array, ""]]:
        """The transition on a float32 figure in MiB; returns the state, the drift and `fired`."""
        finite = jnp.isfinite(free_mib)
        sets_baseline = ~state.has_baseline & finite
        baseline_mib = jnp.where(sets_baseline, free_mib, state.baseline_mib)
        # NaN without a baseline or a finite figure: every comparison below is then False
        # (a -inf figure would otherwise be an infinite drift).
        drift_mib = jnp.where(finite, baseline_mib - free_mib, jnp.nan)
        # "min" mode: a smaller drift is better, so a threshold is exceeded by a larger one.
        too_much = _monitor.exceeded(drift_mib, self.max_drift_bytes / MIB, "min") | (
            _monitor.exceeded(drift_mib, self.max_drift_fraction * baseline_mib, "min")
        )
        fired = ~state.warned & too_much
        new_state = VRAMDriftState(
            baseline_mib=baseline_mib,
            baseline_step=jnp.where(sets_baseline, step, state.baseline_step),
            warned_step=jnp.where(fired, step, state.warned_step),
        )
        return new_state, drift_mib, fired
