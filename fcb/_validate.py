"""Validation of callback configuration and of metric values (host-side, at trace time)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._errors import ConfigError, MetricShapeError, MetricTypeError, MissingMetricError
from ._monitor import MODES, THRESHOLD_MODES, Mode, ThresholdMode

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest finite float32 (about 3.4e38): metrics and real options are kept as float32."""

INT32_MAX = int(np.iinfo(np.int32).max)
"""2**31 - 1, the largest integer option or step: callbacks keep them as int32."""


_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
"""The smallest magnitude that rounds to infinity in float32 (FLOAT32_MAX + half an ulp)."""


def _overflows_float32(array: np.ndarray) -> np.ndarray:
    """Elementwise: finite, but infinite once converted to float32."""
    if array.dtype.kind != "f" or array.dtype.itemsize <= 4:
        return np.zeros(array.shape, bool)
    return np.isfinite(array) & (np.abs(array) >= _FLOAT32_OVERFLOW)


def concrete(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array, or None when it is traced (checked later, or not at all)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_choice(owner: str, field: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = " or ".join(repr(c) for c in choices)
        raise ConfigError(f"{owner}: `{field}` must be {allowed}, got {field} = {value!r}.")
    return value


def check_mode(owner: str, mode: Any, field: str = "mode") -> Mode:
    return cast(Mode, check_choice(owner, field, mode, MODES))


def check_threshold_mode(owner: str, value: Any, field: str = "threshold_mode") -> ThresholdMode:
    return cast(ThresholdMode, check_choice(owner, field, value, THRESHOLD_MODES))


def check_key(owner: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{owner}: `{field}` must be a non-empty metric name (str), got {field} = {value!r}."
        )
    return value


def check_flag(owner: str, field: str, value: Any) -> bool:
    """A yes/no option: a bool (a string such as 'False' would otherwise count as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{owner}: `{field}` must be True or False, got {field} = {value!r}.")
    return bool(value)


def _reject_non_numeric(owner: str, field: str, value: Any, kind: str) -> None:
    if value is None or isinstance(value, (str, bytes)):
        raise ConfigError(f"{owner}: `{field}` must be a number, got {field} = {value!r}.")
    if isinstance(value, (list, tuple)):
        # NumPy would read it as a batch of configurations: a callback whose every decision
        # is an array, which no adapter can apply. Batches are built on purpose, from arrays.
        raise ConfigError(
            f"{owner}: `{field}` must be {kind}, got {field} = {value!r}. To try several "
            f"values, build a batch of configurations with fcb.grid(fcb.{owner}, "
            f"{field}={list(value)!r}) and run it with fcb.replay."
        )


def _leaf(value: Any, dtype: Any) -> Array:
    """A checked parameter as a `dtype` array leaf. A host value (Python or NumPy) is
    converted by NumPy, so the device receives the final array: converting it there would
    first compile a conversion program for its shape (10-15 ms in a fresh process)."""
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        return jnp.asarray(value, dtype)
    return jax.device_put(np.asarray(value, dtype))


def int_param(owner: str, field: str, value: Any, *, minimum: int) -> Array:
    """An integer hyperparameter as an int32 array leaf (scalar, or batched for sweeps)."""
    _reject_non_numeric(owner, field, value, "an integer")
    if isinstance(value, bool):
        raise ConfigError(f"{owner}: `{field}` must be an integer, got {field} = {value!r}.")
    # A Python int is compared exactly (NumPy would make an object array beyond int64).
    array = np.asarray(0) if isinstance(value, int) else concrete(value)
    if array is not None:
        if array.dtype.kind not in "iuf" or (
            array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array)))
        ):
            raise ConfigError(f"{owner}: `{field}` must be an integer, got {field} = {value!r}.")
        exact = value if isinstance(value, int) else array
        if np.any(exact < minimum):
            raise ConfigError(
                f"{owner}: `{field}` must be an integer >= {minimum}, got {field} = {value!r}."
            )
        if np.any(exact > INT32_MAX):
            raise ConfigError(
                f"{owner}: `{field}` must be at most {INT32_MAX} (2**31 - 1: fcb keeps it as "
                f"int32), got {field} = {value!r}."
            )
    return _leaf(value, np.int32)


def as_step(owner: str, step: Any) -> Array:
    """A check's step as an int32 scalar array; a concrete step must be an integer int32
    holds (a traced one is the caller's to keep in range)."""
    if isinstance(step, jax.Array) and step.dtype in (jnp.int32, jnp.int16, jnp.int8):
        return jnp.asarray(step, jnp.int32)  # in range by its type (no transfer to check it)
    array = np.asarray(0) if isinstance(step, int) else concrete(step)
    if array is not None:
        exact = step if isinstance(step, int) else array
        if array.dtype.kind not in "biuf" or (
            array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array)))
        ):
            raise ConfigError(f"{owner}: `step` must be an integer, got step = {step!r}.")
        if np.any(exact > INT32_MAX) or np.any(exact < -INT32_MAX - 1):
            raise ConfigError(
                f"{owner}: `step` must be below 2**31 (callbacks keep steps as int32), got "
                f"step = {step!r}."
            )
    return jnp.asarray(step, jnp.int32)


def float_param(
    owner: str,
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    allow_inf: bool = False,
    hint: str = "",
) -> Array:
    """A real hyperparameter as a float32 array leaf, checked against its allowed range:
    `minimum <= value` (or `above < value`) and `value < below`."""
    _reject_non_numeric(owner, field, value, "a real number")
    array = concrete(value)
    if array is not None:
        if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
            raise ConfigError(f"{owner}: `{field}` must be a real number, got {field} = {value!r}.")
        bad = np.isnan(array) | (~np.isfinite(array) if not allow_inf else False)
        if minimum is not None:
            bad = bad | (array < minimum)
        if above is not None:
            bad = bad | (array <= above)
        if below is not None:
            bad = bad | (array >= below)
        if np.any(bad):
            kind = "a finite number" if not allow_inf else "a number (not NaN)"
            low = (
                f"[{minimum}"
                if minimum is not None
                else (f"({above}" if above is not None else None)
            )
            if low is not None and below is not None:
                allowed = f"{kind} in {low}, {below})"
            elif low is not None:
                allowed = f"{kind} {'>=' if minimum is not None else '>'} {low[1:]}"
            else:
                allowed = kind if below is None else f"{kind} < {below}"
            raise ConfigError(
                f"{owner}: `{field}` must be {allowed}, got {field} = {value!r}.{hint}"
            )
        if np.any(_overflows_float32(array)):
            instead = " Pass inf for an infinite value." if allow_inf else ""
            raise ConfigError(
                f"{owner}: `{field}` must be within float32's range (magnitude at most "
                f"{FLOAT32_MAX:.8g}: fcb keeps it as float32, where it would become infinite), "
                f"got {field} = {value!r}.{instead}"
            )
    return _leaf(value, np.float32)


def optional_float_param(owner: str, field: str, value: Any, *, disabled: float) -> Array:
    """A threshold that may be None; None becomes `disabled`, a value that never triggers."""
    if value is None:
        return _leaf(disabled, np.float32)
    return float_param(owner, field, value, allow_inf=True)


def describe_keys(metrics: Mapping[str, Any]) -> str:
    return "[" + ", ".join(repr(k) for k in sorted(map(str, metrics))) + "]"


def check_metrics_mapping(owner: str, metrics: Any) -> None:
    if not isinstance(metrics, Mapping):
        raise MetricTypeError(
            f"{owner}: metrics must be a mapping from name to scalar, got "
            f"{type(metrics).__name__}: {metrics!r}. Pass a dict such as {{'val_loss': 0.25}}."
        )


def read_metric(owner: str, metrics: Any, key: str, *, strict: bool) -> Array | None:
    """The metric `key` as a float32 scalar; None when absent and not `strict`."""
    check_metrics_mapping(owner, metrics)
    if key not in metrics:
        if not strict:
            return None
        raise MissingMetricError(
            f"{owner}: the monitored metric {key!r} is not in the metrics of this check; "
            f"available keys: {describe_keys(metrics)}. Log {key!r} before this check, fix the "
            f"monitored key, or pass strict=False to skip checks where it is absent."
        )
    return as_metric(owner, key, metrics[key])


def as_metric(owner: str, key: str, value: Any) -> Array:
    """A metric value as a float32 scalar array, with a clear error for anything else."""
    return jnp.reshape(jnp.asarray(checked_metric(owner, key, value), jnp.float32), ())


def host_metric(owner: str, key: str, value: Any) -> np.ndarray:
    """A metric value as a float32 NumPy scalar array (host side, for adapters)."""
    if type(value) is float and not _FLOAT32_OVERFLOW <= abs(value) < math.inf:
        return np.array(value, np.float32)  # the common case: what the line below gives
    return np.asarray(checked_metric(owner, key, value), np.float32).reshape(())


def checked_metric(owner: str, key: str, value: Any) -> Any:
    """`value` as a size-1 real array (NumPy or JAX), or a clear error naming `key`."""
    if value is None or isinstance(value, (str, bytes)):
        raise MetricTypeError(
            f"{owner}: metric {key!r} must be a real scalar, got {type(value).__name__}: "
            f"{value!r}. Log a number, e.g. float(loss)."
        )
    if type(value) is float:  # the common case, checked without NumPy
        if _FLOAT32_OVERFLOW <= abs(value) < math.inf:
            raise _beyond_float32(owner, key, value)
        return np.asarray(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        # Beyond int64 NumPy would make an object array; compare the exact integer.
        if abs(value) >= _FLOAT32_OVERFLOW:
            raise _beyond_float32(owner, key, value)
        value = float(value)
    if not isinstance(value, jax.Array):
        try:
            value = np.asarray(value)
        except Exception as error:  # e.g. a torch tensor that requires grad
            raise MetricTypeError(
                f"{owner}: metric {key!r} cannot be read as a number "
                f"({type(value).__name__}: {error}). Pass a float, e.g. loss.detach().item()."
            ) from None
    if value.dtype.kind not in "biuf":
        raise MetricTypeError(
            f"{owner}: metric {key!r} must be a real scalar, got dtype {value.dtype}: {value!r}."
        )
    if value.size != 1:
        raise MetricShapeError(
            f"{owner}: metric {key!r} must be a scalar, got shape {tuple(value.shape)}. "
            f"Reduce it first, e.g. x.mean()."
        )
    wide = value.dtype.kind == "f" and value.dtype.itemsize > 4  # narrower floats always fit
    if wide and not isinstance(value, jax.core.Tracer):
        host = np.asarray(value)
        if np.any(_overflows_float32(host)):
            raise _beyond_float32(owner, key, host.item())
    return value


def _beyond_float32(owner: str, key: str, value: Any) -> MetricTypeError:
    return MetricTypeError(
        f"{owner}: metric {key!r} must be a real scalar within float32's range (magnitude at "
        f"most {FLOAT32_MAX:.8g}), got {value!r}: fcb reads metrics as float32, where it "
        f"would become infinite and count as a NaN or infinite check. Log it in other units "
        f"or its logarithm."
    )
