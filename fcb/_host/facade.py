"""What every adapter shows of its session: one copy of the public read-outs and hooks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from .._errors import ConfigError
from .evaluation import EvaluatedSlot
from .session import Session
from .store import ManifestStore


class SessionFacade:
    """The adapter's public view of its `Session` (`self.session`): run state, the context
    manager, the callbacks' state dict. Adapters subclass it; the session is composed."""

    session: Session

    @property
    def runner(self) -> Any:
        """The `fcb.Runner` that holds the callbacks' state."""
        return self.session.runner

    @runner.setter
    def runner(self, runner: Any) -> None:
        self.session.runner = runner

    @property
    def store(self) -> ManifestStore | None:
        """The open store of this process (`None` before the start and after the end)."""
        return self.session.store

    @property
    def should_stop(self) -> bool:
        """True once a callback stopped the run (on any process), or it was resumed stopped."""
        return self.session.should_stop

    @property
    def stop_message(self) -> str:
        return self.session.stop_message

    @property
    def resumed_step(self) -> int | None:
        """The step the run resumed from (`None` for a new run)."""
        return self.session.resumed_step

    @property
    def summary(self) -> dict[str, float]:
        """The callbacks' end-of-run scalars (after `on_fit_end`)."""
        return self.session.summary

    @property
    def slots(self) -> dict[str, int]:
        """The slot -> step table of the checkpoints kept (committed or being committed)."""
        store = self.session.store
        if store is None:
            return {}
        return {name: slot["step"] for name, slot in store.latest_manifest["slots"].items()}

    def epochs(self, max_epochs: int) -> Iterator[int]:
        """The epochs left to train, for `for epoch in adapter.epochs(max_epochs):`.

        Starts the adapter if it is not started (resuming a run its directory holds), then
        counts from the step after the resumed one (0 for a new run) to `max_epochs - 1`,
        and ends as soon as `should_stop` is set: after a stop, and at once when the resumed
        run had already stopped. Pass each epoch as the check's `step`.
        """
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 0:
            raise ConfigError(
                f"{type(self).__name__}.epochs: `max_epochs` must be an int >= 0, got "
                f"max_epochs = {max_epochs!r}."
            )
        if not self.session.started:
            self.on_fit_start()
        epoch = self.session.last_step + 1
        while epoch < max_epochs and not self.should_stop:
            yield epoch
            epoch = max(epoch + 1, self.session.last_step + 1)

    @property
    def elapsed_seconds(self) -> float:
        """Seconds since the adapter started in this process: the time `fcb.TimeLimit`
        reads (pass it into a compiled loop's metrics as `"elapsed_seconds"`)."""
        return self.session.interrupts.elapsed()

    def on_train_batch_end(self, *, step: int, state: Any = None) -> None:
        """A training step ended (`step`: the global step, the counter the checks are
        given). Nearly free when nothing is due; on a preemption signal, a time limit or a
        resume schedule (`preempt_on`, `fcb.TimeLimit`, `resume_every_steps` /
        `resume_every_seconds`) the step becomes a resume point, committed at the next hook
        (the step's check, if the loop makes one, comes first), and a signal or a time
        limit stops the run (`should_stop`). `state`: what the adapter saves of the step
        (orbax: the pytree or a function of the actions, as for a check)."""
        if not self.session.started:
            self.on_fit_start()
        self.session.batch_end(step, state)

    def on_fit_start(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def on_fit_end(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        raise NotImplementedError

    def on_exception(self, exception: BaseException | None = None, *args: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self.on_fit_start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.on_fit_end()
        else:
            self.on_exception(exc)

    def state_dict(self) -> dict[str, Any]:
        """The callbacks' state dict (JSON-safe), as recorded in every checkpoint."""
        return self.session.state_dict()

    def evaluate_checkpoints(self, slots: Any = None) -> dict[str, EvaluatedSlot | None]:
        """Evaluate the checkpoints that slots hold with the `evaluate` functions, and pass
        the results to the nested callbacks of the `BestCheckpoint` that owns each slot (the
        post-training pass).

        `slots`: `None` (default) for each `BestCheckpoint`'s overall best slot, `"all"` for
        its tolerance slots too, or a slot name (or list of them), any slot the callbacks
        keep. For each slot the function is `evaluate["loaded:<slot>"]` if given, else the
        one registered for the `BestCheckpoint`'s request in training (its `filename`), else
        `evaluate[slot]` (or the single `evaluate` function).

        The nested callbacks see the results with keys prefixed `best=<metric_key>/`,
        unconditionally; nothing is saved, the manifest is not touched, and the
        `BestCheckpoint`'s own best and tolerance state does not change (only its nested
        callbacks' state). The results are logged (`log`, with the nested callbacks'
        scalars), added to `summary` as `<slot>/<key>`, and recorded in the history
        (`history=True`) as `{"step": <the slot's step>, "evaluated": <slot>, "results":
        {...}, "log": {...}}`. Returns `{slot: fcb.EvaluatedSlot(step, results, log)}`, with
        `None` for a slot that holds no checkpoint (it is not evaluated).

        Call it after training (after `on_fit_end`, or in a new process that never
        trained: the run directory's committed checkpoints are read) or between checks
        (the writes in flight are committed first). Under several processes, every process
        calls it; results are reduced over them as metrics are (`reduce`).

        >>> import tempfile, torch, fcb.torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> child = fcb.EarlyStopping("best=val_loss/weight", "max")
        >>> callbacks = fcb.chain(fcb.BestCheckpoint("val_loss", callbacks=[child]),
        ...                       fcb.ModelCheckpoint(save_last=True))
        >>> weight = lambda m: {"weight": float(m.weight)}
        >>> directory = tempfile.mkdtemp()
        >>> with fcb.torch.TorchAdapter(callbacks, model=model, dirpath=directory,
        ...                             evaluate=weight) as adapter:
        ...     for step, loss in enumerate([0.5, 0.2, 0.4]):
        ...         _ = torch.nn.init.constant_(model.weight, float(step))
        ...         _ = adapter.on_validation_end({"val_loss": loss}, step=step)
        >>> adapter.evaluate_checkpoints(["best.val_loss", "last"])
        {'best.val_loss': EvaluatedSlot(step=1, results={'weight': 1.0}, log={}),
         'last': EvaluatedSlot(step=2, results={'weight': 2.0}, log={})}
        >>> model.weight.item()  # the live weights, put back
        2.0
        """
        return self._evaluate(slots, self.session._check_context)

    def _evaluate(self, slots: Any, context: Any) -> dict[str, EvaluatedSlot | None]:
        """The pass, with the evaluate functions' `context` (the last check's by default)."""
        from .evaluation import evaluate_slots

        directory = cast(Any, self).dirpath  # the adapter's run directory
        return evaluate_slots(self.session, directory, slots, context)
