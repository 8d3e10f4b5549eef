"""BestCheckpoint's argument checks: the mode, the tolerances, the submodule names."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._errors import ConfigError
from ._monitor import Mode
from ._validate import INT32_MAX, check_mode


def resolve_mode(owner: str, mode: Any, higher_is_better: Any) -> Mode:
    if higher_is_better is None:
        return check_mode(owner, "min" if mode is None else mode)
    if not isinstance(higher_is_better, bool):
        raise ConfigError(
            f"{owner}: `higher_is_better` must be True or False, got "
            f"higher_is_better = {higher_is_better!r}."
        )
    implied: Mode = "max" if higher_is_better else "min"
    if mode is not None and mode != implied:
        raise ConfigError(
            f"{owner}: mode = {mode!r} contradicts higher_is_better = {higher_is_better!r}; "
            f"pass only one of them."
        )
    return implied


def check_tolerances(owner: str, tolerances: Any) -> tuple[int, ...]:
    if isinstance(tolerances, (str, bytes)) or not isinstance(tolerances, Sequence):
        raise ConfigError(
            f"{owner}: `tolerances` must be a sequence of integers, got "
            f"tolerances = {tolerances!r}."
        )
    values = tuple(tolerances)
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ConfigError(
                f"{owner}: every tolerance must be an integer >= 0, got {t!r} in "
                f"tolerances = {values!r}."
            )
        if t > INT32_MAX:
            raise ConfigError(
                f"{owner}: every tolerance must be at most {INT32_MAX} (2**31 - 1: fcb keeps "
                f"it as int32), got {t!r} in tolerances = {values!r}."
            )
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ConfigError(
            f"{owner}: `tolerances` must be strictly increasing (sorted, no duplicates), got "
            f"tolerances = {values!r}; pass {tuple(sorted(set(values)))!r}."
        )
    return tuple(int(t) for t in values)


def check_model_names(owner: str, model_names: Any) -> tuple[str, ...] | None:
    if model_names is None:
        return None
    if isinstance(model_names, str):
        model_names = (model_names,)
    names = tuple(model_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"{owner}: `model_names` must be None or non-empty submodule names, got "
            f"model_names = {model_names!r}."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{owner}: `model_names` has duplicates: {names!r}.")
    return names
