"""fcb.optuna.PruningCallback: report a Lightning Trainer's validation metric to an Optuna
trial and stop every rank together when the trial is pruned."""

from __future__ import annotations

import optuna
import pytorch_lightning as pl

from .._errors import ConfigError, MissingMetricError
from .._host.processes import ProcessGroup, check_reduction
from .._validate import describe_keys
from ..lightning import FcbCallback
from ..torch._distributed import ranks

_OWNER = "fcb.optuna.PruningCallback"


class PruningCallback(pl.Callback):
    """Report `monitor` to an Optuna trial at each validation end; prune at the agreed step.

    At each validation end (sanity checks excepted), the metric is reduced over the ranks
    by the same rule as [`fcb.lightning.FcbCallback`][]'s (`reduce`, default the mean in
    rank order), the primary rank alone reports it (`trial.report(value, step)`) and asks
    `trial.should_prune()`, and every rank takes that one decision: a failure on the
    primary is raised on every rank and no rank waits for another. A pruned trial sets
    `trainer.should_stop` on every rank at the same step, so training ends through
    Lightning's normal path: the `FcbCallback`, a checkpoint callback that Lightning runs
    after the other callbacks of a hook wherever it is listed, checks and commits that step
    in the same validation end, then waits for its writes and finalizes in `on_fit_end`.
    Call [`check_pruned`][fcb.optuna.PruningCallback.check_pruned] after `trainer.fit` to
    raise `optuna.TrialPruned`, once everything is on disk.

    Steps are numbered as the `FcbCallback`'s are (`trainer.current_epoch`, or
    `trainer.global_step` with its `step="global_step"`); without one, by epoch.

    Args:
        trial: the trial, on the primary rank; other ranks may pass None.
        monitor: the validation metric to report, e.g. `"val_loss"`.
        reduce: how the metric is reduced over ranks (`"mean"`, `"sum"`, `"max"`, `"min"`,
            or None when it is already reduced, e.g. logged with `sync_dist=True`).

    ```python
    pruning = fcb.optuna.PruningCallback(trial, "val_loss")
    trainer = pl.Trainer(callbacks=[fcb.lightning.FcbCallback(callbacks), pruning])
    trainer.fit(model, data)
    pruning.check_pruned()  # raises optuna.TrialPruned after the run has committed
    ```
    """

    def __init__(
        self, trial: optuna.trial.BaseTrial | None, monitor: str, *, reduce: str | None = "mean"
    ):
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(
                f"{_OWNER}: `monitor` must name a logged metric such as 'val_loss', got "
                f"monitor = {monitor!r}."
            )
        self.trial = trial
        self.monitor = monitor
        self.reduce = check_reduction(_OWNER, reduce)
        self.pruned_step: int | None = None
        """The step at which the trial was pruned (None: it was not), on every rank."""
        self._group: ProcessGroup | None = None
        self._fcb: FcbCallback | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._group = ranks()
        self.pruned_step = None
        if self._group.is_primary and self.trial is None:
            raise ConfigError(f"{_OWNER}: the primary rank needs the trial; got trial = None.")
        found = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, FcbCallback)]
        self._fcb = found[0] if found else None

    def _step(self, trainer: pl.Trainer) -> int:
        if self._fcb is not None and self._fcb.step == "global_step":
            return int(trainer.global_step)
        return int(trainer.current_epoch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned_step is not None:
            return
        group = self._group
        assert group is not None, "on_fit_start runs first"
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise MissingMetricError(
                f"{_OWNER}: monitor = {self.monitor!r} is not among the metrics logged at "
                f"this validation; available: {describe_keys(metrics)}."
            )
        value = float(metrics[self.monitor])
        value = group.reduce_metrics(_OWNER, {self.monitor: value}, self.reduce)[self.monitor]
        step = self._step(trainer)
        decision: list[bool] = [False]

        def decide() -> None:
            assert self.trial is not None
            self.trial.report(value, step)
            decision[0] = bool(self.trial.should_prune())

        group.on_primary(decide)
        if group.any(decision[0]):  # only the primary's word counts
            self.pruned_step = step
            trainer.should_stop = True

    def check_pruned(self) -> None:
        """Raise `optuna.TrialPruned` when the trial was pruned (call it after `fit`)."""
        if self.pruned_step is not None:
            raise optuna.TrialPruned(f"pruned at step {self.pruned_step}")
