"""The learning rates of a Torch run: every param group of the optimizers (engine methods)."""

from __future__ import annotations

from typing import Any

import torch

from .._core import Actions, scaled_lr_host


class TorchLearningRates:
    """Mixed into the Torch adapter: how a check's learning-rate change reaches Torch."""

    optimizer: torch.optim.Optimizer | None

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.optimizer is None else [self.optimizer]

    def _param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self._optimizers() for group in optimizer.param_groups]

    def learning_rates(self) -> list[float] | None:
        return [float(group["lr"]) for group in self._param_groups()]

    def learning_rates_after(self, actions: Actions, context: Any) -> list[float] | None:
        return self.learning_rates()  # applied by the session before it asks

    def set_learning_rates(self, rates: list[float] | None) -> None:
        for group, rate in zip(self._param_groups(), rates or [], strict=True):
            group["lr"] = rate

    def apply_lr(self, actions: Actions) -> None:
        if float(actions.lr_scale) == 1.0:
            return
        for group in self._param_groups():
            group["lr"] = scaled_lr_host(float(group["lr"]), actions)
