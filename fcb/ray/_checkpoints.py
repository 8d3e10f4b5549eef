"""fcb.ray.Checkpoints: report a trial's metrics to Tune, with a checkpoint only when one of
fcb's slots takes the step."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import ray.tune

from .._core import Actions, Callback
from .._errors import ConfigError
from .._grid import Grid
from .._monitor import worst_value
from .._monitored import monitored
from .._runner import Runner

STATE_FILE = "fcb.json"
"""The file of a reported checkpoint that holds fcb's step, slot table and callback state."""


class Checkpoints:
    """Run a trial's fcb callbacks inside the trainable; report to Tune at every check, with
    a checkpoint exactly at the steps a slot takes (best, tolerance, top-k, last).

    Each reported checkpoint directory holds what `save(directory)` writes plus
    `fcb.json`: the step, the slot table after this check (slot -> step) and the callbacks'
    state, so [`resume`][fcb.ray.Checkpoints.resume] continues the trial exactly. The
    report's metrics gain `fcb/slots`, the slots that took the step (comma-separated), and
    `fcb/score`: the monitored value when the step enters a ranked slot (best, top-k),
    otherwise the worst value (inf in min mode), so that a later step of a tied value,
    which fcb does not take as a new best, never outranks the step fcb holds.

    Tune's checkpoint table then mirrors fcb's: for `fcb.ModelCheckpoint(monitor,
    mode=mode, save_top_k=k)` (with its `last` slot), pass
    `ray.tune.CheckpointConfig(num_to_keep=k, checkpoint_score_attribute="fcb/score",
    checkpoint_score_order=mode)`: Tune keeps the `k` best-scored reported steps and the
    latest, the steps fcb's slots hold. With tolerance slots (`fcb.BestCheckpoint`), which
    no single score orders, keep every reported checkpoint (`num_to_keep=None`) and read
    the live slots from the latest checkpoint's `fcb.json`.

    Args:
        callback: the trial's fcb callback or chain.
        save: writes the trial's payload (model, optimizer) into the directory it is given.

    ```python
    def train(config):
        slots = fcb.ray.Checkpoints(fcb.chain(fcb.EarlyStopping("val_loss", patience=5),
                                              fcb.ModelCheckpoint("val_loss")),
                                    save=lambda d: torch.save(model.state_dict(), f"{d}/model.pt"))
        start = slots.resume(lambda d: model.load_state_dict(torch.load(f"{d}/model.pt")))
        for epoch in range(start, 100):
            ...
            if slots.report({"val_loss": val_loss}, step=epoch).stop:
                break
    ```
    """

    def __init__(self, callback: Callback, *, save: Callable[[str], None]):
        if not isinstance(callback, Callback) or isinstance(callback, Grid):
            raise ConfigError(
                f"fcb.ray.Checkpoints: `callback` must be one fcb callback or chain, got "
                f"{type(callback).__name__}."
            )
        if not callable(save):
            raise ConfigError(
                f"fcb.ray.Checkpoints: `save` must be a function writing the payload into the "
                f"directory it is given, got save = {save!r}."
            )
        self.runner = Runner(callback)
        self.save = save
        modes = {mode for _, mode in monitored(callback)}
        self._mode = modes.pop() if len(modes) == 1 else None
        kinds = dict(callback.action_names().slot_kinds)
        self._ranked = {name for name, kind in kinds.items() if kind in ("best", "top_k")}
        self.slots: dict[str, int] = {}
        """The slot table after the last check: slot name -> step (-1: empty)."""

    def resume(
        self,
        load: Callable[[str], None] | None = None,
        checkpoint: ray.tune.Checkpoint | None = None,
    ) -> int:
        """Continue from `checkpoint` (default: `ray.tune.get_checkpoint()`, the one Tune
        restores the trial from): load the callbacks' state, call `load(directory)` for the
        payload, and return the step to continue at (0 with no checkpoint)."""
        checkpoint = ray.tune.get_checkpoint() if checkpoint is None else checkpoint
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as directory:
            path = os.path.join(directory, STATE_FILE)
            if not os.path.exists(path):
                raise ConfigError(
                    f"fcb.ray.Checkpoints: the checkpoint {directory} has no {STATE_FILE}; it "
                    f"was not reported by fcb.ray.Checkpoints.report."
                )
            with open(path) as file:
                saved = json.load(file)
            self.runner.load_state_dict(saved["state"])
            self.slots = {str(k): int(v) for k, v in saved["slots"].items()}
            if load is not None:
                load(directory)
        return int(saved["step"]) + 1

    def report(self, metrics: Mapping[str, Any], *, step: int) -> Actions:
        """Run the check and report it to Tune (`ray.tune.report`), with a checkpoint when a
        slot takes `step`; return the actions (stop when `actions.stop`)."""
        actions = self.runner.check(metrics, step=step)
        self.slots = {name: int(held) for name, held in actions.slots.items()}
        taken = [name for name, held in self.slots.items() if held == step]
        values = {str(k): float(v) for k, v in metrics.items()}
        if not taken:
            ray.tune.report(values)
            return actions
        with tempfile.TemporaryDirectory(prefix="fcb-") as directory:
            self.save(directory)
            record = {"step": int(step), "slots": self.slots, "state": self.runner.state_dict()}
            with open(os.path.join(directory, STATE_FILE), "w") as file:
                json.dump(record, file)
            extra: dict[str, Any] = {"fcb/slots": ",".join(taken)}
            if self._mode is not None:
                ranked = [float(actions.slot_values[n]) for n in taken if n in self._ranked]
                best = min if self._mode == "min" else max
                extra["fcb/score"] = best(ranked) if ranked else worst_value(self._mode)
            ray.tune.report(
                {**values, **extra},
                checkpoint=ray.tune.Checkpoint.from_directory(directory),
            )
        return actions
