"""The JAX adapter: applies fcb actions to JAX pytrees and equinox models through orbax."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from .._core import Actions, Callback
from .._errors import CheckpointCorruptError, ConfigError
from .._manifest import Models, json_metrics, plan_checkpoints
from .._ranks import check_reduction
from .._runner import Runner
from .._state_dict import state_dict as fcb_state_dict
from .._vram_drift import VRAMDrift
from ._processes import Processes
from ._store import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    DEFAULT_TIMEOUT,
    OrbaxStore,
    models_cover,
    read_step,
)

logger = logging.getLogger("fcb")

EvaluateFn = Callable[[Any], Mapping[str, Any]]
"""Evaluates the live state (the pytree given to `on_validation_end`); returns metrics."""

_NOT_AN_ARRAY = """\
OrbaxAdapter: `state` leaf {path} is a {kind} ({value!r}); orbax saves arrays and numbers.
Save the arrays of a model and keep its static part in code:

    state = {{"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state}}
    ...
    model = fcb.orbax.restore_model(directory, model)   # eqx.combine with the static part
"""


def device_free_memory(device: Any = None) -> float | None:
    """Free memory of a JAX device in bytes: `bytes_limit - bytes_in_use` of its
    `memory_stats()`, or `None` where the device reports none (the CPU).

    >>> fcb.orbax.device_free_memory(jax.devices("cpu")[0]) is None
    True
    """
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    if not stats or "bytes_limit" not in stats or "bytes_in_use" not in stats:
        return None
    return float(stats["bytes_limit"] - stats["bytes_in_use"])


def submodule(model: Any, name: str) -> Any:
    """The submodule `name` of a model pytree: a field of an equinox Module, or a key."""
    if isinstance(model, Mapping):
        names = sorted(map(str, model))
        found = name in model
    else:
        names = (
            sorted(f.name for f in dataclasses.fields(model))
            if dataclasses.is_dataclass(model)
            else sorted(n for n in vars(model) if not n.startswith("_"))
            if hasattr(model, "__dict__")
            else []
        )
        found = name in names
    if not found:
        raise ConfigError(
            f"OrbaxAdapter: model_names asks for submodule {name!r}, but the model "
            f"({type(model).__name__}) has {names}. Fix model_names."
        )
    return model[name] if isinstance(model, Mapping) else getattr(model, name)


def model_subset(state: Any, models: tuple[str, ...]) -> dict[str, Any]:
    """`{"model": {name: submodule}}`: what a slot restricted to `models` saves."""
    if not isinstance(state, Mapping) or "model" not in state:
        raise ConfigError(
            f"OrbaxAdapter: the callbacks save only the submodules {list(models)} of the "
            f"model, so `state` must be a mapping with a 'model' entry, e.g. "
            f"{{'model': eqx.filter(model, eqx.is_array), ...}}; got "
            f"{type(state).__name__}"
            + (f" with keys {sorted(map(str, state))}." if isinstance(state, Mapping) else ".")
        )
    return {"model": {name: submodule(state["model"], name) for name in models}}


def host_copy(tree: Any) -> Any:
    """A copy of `tree` in host memory sharing nothing with the device buffers, so the
    training loop may donate or overwrite them while orbax writes in the background.

    An array spread over several processes stays a `jax.Array`: orbax writes each process's
    shards itself, and copies them to host memory before `save` returns."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in flat:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                raise ConfigError(
                    f"OrbaxAdapter: `state` leaf {jax.tree_util.keystr(path)} is a typed PRNG "
                    f"key; save its data instead: jax.random.key_data(key) (and "
                    f"jax.random.wrap_key_data after restoring)."
                )
            leaf.copy_to_host_async()  # start every transfer before waiting for any
        elif not isinstance(leaf, (np.ndarray, np.generic, bool, int, float)):
            kind = "function" if callable(leaf) else type(leaf).__name__
            raise ConfigError(
                _NOT_AN_ARRAY.format(
                    path=jax.tree_util.keystr(path) or "(the root)", kind=kind, value=leaf
                )
            )
    copied = [
        leaf
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        else np.array(leaf, copy=True)
        if isinstance(leaf, (jax.Array, np.ndarray))
        else leaf
        for _, leaf in flat
    ]
    return jax.tree_util.tree_unflatten(treedef, copied)


class OrbaxAdapter:
    """Run an fcb callback chain in a JAX training loop; keep checkpoints with orbax.

    Each `on_validation_end(metrics, step=..., state=...)` runs one check of the whole chain
    through one cached jitted dispatch, then applies the actions, with the same decisions as
    [`fcb.torch.TorchAdapter`][]:

    - `should_stop` / `stop_message` are set when a callback stops (never raises for it);
    - if a slot takes the current step, `state` (a pytree of arrays, e.g.
      `{"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state}`, or a function of
      the actions returning it) is copied to host memory and saved **once** as orbax step
      `steps/<step>` (a Composite of the state and the
      fcb metadata: the callbacks' state dict, the slot table, the JSON-safe metrics),
      however many slots hold it; the save runs in the background with `async_save=True`;
    - `manifest.json` records slot -> step, metric value and the resume point once orbax
      has committed the step; steps no slot (nor the resume point, nor the archive) holds any
      more are then deleted with `CheckpointManager.delete`;
    - `evaluate` runs on `state` when a callback asks (a new best for `BestCheckpoint`'s
      nested callbacks) and the results go back to the chain.

    The learning rate is the loop's: apply the returned actions with
    [`fcb.scaled_lr`][] (it is part of the saved state when it lives in the optimizer state,
    e.g. `optax.inject_hyperparams`).

    Resume with `resume=True`: `on_fit_start(like=template)` restores the `last` checkpoint
    into `restored_state` (structured like `template`), the callbacks' state, and
    `resumed_step`; the next check is `resumed_step + 1` and decides exactly as an
    uninterrupted run would.

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> callbacks = fcb.chain(fcb.EarlyStopping("val_loss", patience=1), fcb.ModelCheckpoint())
    >>> adapter = fcb.orbax.OrbaxAdapter(callbacks, directory, async_save=False)
    >>> adapter.on_fit_start()
    >>> for step, loss in enumerate([0.5, 0.4, 0.6]):
    ...     state = {"w": jnp.full((2,), float(step))}
    ...     actions = adapter.on_validation_end({"val_loss": loss}, step=step, state=state)
    >>> adapter.should_stop, adapter.slots
    (True, {'best_model': 1, 'last': 2})
    >>> _ = adapter.on_fit_end()
    >>> fcb.orbax.restore(directory, "best_model", like={"w": jnp.zeros(2)})["w"]
    Array([1., 1.], dtype=float32)

    Args:
        callbacks: an fcb callback or chain.
        directory: the run directory (created; locked while the adapter is open).
        evaluate: `fn(state) -> metrics`, or a mapping from request name to such a function.
        resume: continue the run in `directory` from its `last` checkpoint.
        async_save: let orbax write in the background; every save is waited for before the
            manifest references it, before any deletion, and at `on_fit_end`.
        log: `fn(step, scalars)` called with the callbacks' log scalars at each check and the
            summary at the end.
        reduce: in a multi-process run, how each process's metrics are reduced over the
            processes: `"mean"` (default), `"sum"`, `"max"`, `"min"`, or `None` when they
            are already equal on every process. Ignored with one process.
        timeout: in a multi-process run, the seconds a process waits for the others inside
            an orbax save (orbax's `AsyncOptions.timeout_secs`).

    Multi-process runs (`jax.distributed.initialize()`): every process constructs the same
    adapter and makes the same calls; the decisions agree on every process, orbax writes
    with its own multi-host protocol, and only the primary process writes the manifest
    (see the adapter's docs).
    """

    def __init__(
        self,
        callbacks: Callback,
        directory: str | os.PathLike[str],
        *,
        evaluate: EvaluateFn | Mapping[str, EvaluateFn] | None = None,
        resume: bool = False,
        async_save: bool = True,
        log: Callable[[int, dict[str, float]], None] | None = None,
        reduce: str | None = "mean",
        timeout: float = DEFAULT_TIMEOUT,
    ):
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ConfigError(
                f"OrbaxAdapter: `directory` must be a non-empty path, got "
                f"directory = {directory!r}."
            )
        if evaluate is not None and not callable(evaluate) and not isinstance(evaluate, Mapping):
            raise ConfigError(
                f"OrbaxAdapter: `evaluate` must be a function of the state or a mapping from "
                f"request name to one, got {type(evaluate).__name__}."
            )
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < float("inf")
        ):
            raise ConfigError(
                f"OrbaxAdapter: `timeout` must be a finite number of seconds > 0, got "
                f"timeout = {timeout!r}."
            )
        self.reduce = check_reduction("OrbaxAdapter", reduce)
        self.timeout = float(timeout)
        self.processes = Processes(single=True)  # the run's processes, from on_fit_start
        self.runner = Runner(callbacks)
        self.callbacks = callbacks
        self.directory = os.path.abspath(os.fspath(directory))
        self.evaluate = evaluate
        self.resume = bool(resume)
        self.async_save = bool(async_save)
        self.log = log
        self.store: OrbaxStore | None = None
        self._checks = 0
        self._memory_keys: list[str] = []
        self._probe_memory = False
        self._state: Callable[[], Any] | None = None
        self._warned_lr = False
        self.should_stop = False
        self.stop_message = ""
        self.resumed_step: int | None = None
        self.restored_state: Any = None
        self.summary: dict[str, float] = {}

    # -- set-up ------------------------------------------------------------------------------

    def on_fit_start(self, *, like: Any = None) -> None:
        """Open (and lock) the run directory; with `resume=True`, restore the `last`
        checkpoint into `restored_state`, structured like the template `like`.

        Without `resume`, a directory that holds a run is taken over: the old run's manifest
        is replaced (with a warning), then its checkpoints are deleted, so the two runs' steps
        never mix.
        """
        if self.store is not None:
            return
        self._memory_keys = sorted({drift.key for drift in self.runner.find(VRAMDrift)})
        if self._memory_keys:
            self._probe_memory = device_free_memory() is not None
            if not self._probe_memory:
                logger.info(
                    "fcb: the JAX device reports no memory statistics (%s); VRAMDrift has no "
                    "memory figure and does nothing.",
                    jax.local_devices()[0].platform,
                )
        # jax.distributed may have been initialised since __init__
        self.processes = Processes()
        store = OrbaxStore(
            self.directory,
            async_save=self.async_save,
            processes=self.processes,
            timeout=self.timeout,
        )
        store.open()
        try:
            if self.resume:
                self._resume(store, like)
            else:
                if like is not None:
                    self._check_model_names(like)
                store.start_over()
        except BaseException:
            store.close()
            raise
        self.store = store

    def __enter__(self) -> OrbaxAdapter:
        self.on_fit_start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.on_fit_end()
        else:
            self.on_exception(exc)

    def _slot_models(self) -> dict[str, tuple[str, ...]]:
        return dict(self.callbacks.action_names().slot_models)

    def _check_model_names(self, state: Any) -> None:
        for models in set(self._slot_models().values()):
            model_subset(state, models)

    # -- events ------------------------------------------------------------------------------

    def on_validation_end(
        self, metrics: Mapping[str, Any], *, step: int | None = None, state: Any = None
    ) -> Actions:
        """Run one check on `metrics` at `step`; save `state` if a slot takes this step.

        `state` is the pytree to save, or a function `actions -> pytree` giving the state
        *after* this check's actions. Pass a function when the actions change the state, e.g.
        a learning rate in the optimizer state that `ReduceLROnPlateau` lowers: the checkpoint
        must hold the lowered rate, or a run resumed from it trains on at the old rate.
        The function is called only when the step is saved; evaluation requests see
        `state(fcb.Actions.no_actions())`.

        `step` defaults to the number of checks so far. Returns the host actions (NumPy
        values).
        """
        if self.store is None:
            self.on_fit_start()
        assert self.store is not None
        if step is None:
            step = self._checks
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ConfigError(
                f"OrbaxAdapter: `step` must be an integer >= 0 (it names the orbax step), got "
                f"step = {step!r}."
            )
        step = int(step)
        metrics = dict(metrics)
        if self._probe_memory:
            free = device_free_memory()
            if free is not None:
                metrics.update(dict.fromkeys(self._memory_keys, free))
        metrics = self.processes.reduce_metrics(metrics, self.reduce)
        self._checks = step + 1
        state_after = state if _is_function(state) else None
        self._state = (
            (lambda: state_after(Actions.no_actions())) if state_after else (lambda: state)
        )
        before = self.runner.state
        try:
            actions = self.runner.check(metrics, step=step, evaluate=self._run_evaluation)
        finally:
            self._state = None
        try:
            self._apply_checkpoints(
                actions,
                step,
                (lambda: state_after(actions)) if state_after else (lambda: state),
                metrics,
                state_is_after=state_after is not None,
            )
        except BaseException:
            self.runner.state = before
            raise
        self._report(actions, step)
        self._agree_on_stop(actions)
        return actions

    def apply_actions(
        self,
        actions: Actions,
        *,
        step: int,
        callbacks_state: Any,
        state: Any = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Actions:
        """Apply actions the callbacks computed elsewhere: inside a compiled loop.

        A loop that runs the chain itself (in `lax.scan` or `lax.while_loop`) returns, for
        each check, the actions, the callbacks' state after the check and the training state
        training continues from; between compiled chunks, pass them here in step order. The
        checkpoints, manifest, resume record and stop flag are exactly those
        `on_validation_end` would produce for the same checks. `callbacks_state` must have
        the structure of `callbacks.init()`; evaluation requests must have been answered in
        the loop. Returns the host actions.
        """
        if self.store is None:
            self.on_fit_start()
        actions, callbacks_state = jax.device_get((actions, callbacks_state))
        requested = sorted(name for name, asked in actions.evaluate.items() if bool(asked))
        if requested:
            raise ConfigError(
                f"OrbaxAdapter.apply_actions: the actions of step {step} request evaluations "
                f"{requested}; inside a compiled loop, answer them there with "
                f"callbacks.evaluated(state, request, results, step=step)."
            )
        expected: Any = jax.tree_util.tree_structure(self.runner.state)
        if expected != jax.tree_util.tree_structure(callbacks_state):
            raise ConfigError(
                f"OrbaxAdapter.apply_actions: `callbacks_state` must have the structure of "
                f"callbacks.init() ({expected}), got "
                f"{jax.tree_util.tree_structure(callbacks_state)}. Pass the chain's state "
                f"after the check of step {step}, unbatched."
            )
        step = int(step)
        before = self.runner.state
        self.runner.state = callbacks_state
        try:
            self._apply_checkpoints(
                actions, step, lambda: state, metrics or {}, state_is_after=True
            )
        except BaseException:
            self.runner.state = before
            raise
        self._checks = step + 1
        self._report(actions, step)
        self._agree_on_stop(actions)
        return actions

    def _agree_on_stop(self, actions: Actions) -> None:
        """Stop when a callback stops, on this process or any other."""
        if self.processes.any(bool(actions.stop)):
            self.should_stop = True
            self.stop_message = (
                actions.stop_message() if bool(actions.stop) else "another process stopped"
            )

    def _run_evaluation(self, request: str) -> Mapping[str, Any]:
        fn = self.evaluate.get(request) if isinstance(self.evaluate, Mapping) else self.evaluate
        if fn is None:
            raise ConfigError(
                f"OrbaxAdapter: the callbacks ask to evaluate the new best model for "
                f"{request!r}, but no evaluate function was given. Pass "
                f"evaluate={{'{request}': fn}} where fn(state) returns a dict of metrics."
            )
        assert self._state is not None
        return fn(self._state())

    def _report(self, actions: Actions, step: int) -> None:
        for name, fired in actions.events.items():
            if bool(fired):
                level = logging.WARNING if name.endswith("vram_drift/drift") else logging.DEBUG
                logger.log(level, "fcb: %s at step %d", name, step)
        if self.log is not None and actions.log:
            self.log(step, {k: float(v) for k, v in actions.log.items()})

    @property
    def slots(self) -> dict[str, int]:
        """The slot -> step table of the checkpoints kept (committed or being committed)."""
        if self.store is None:
            return {}
        return {name: slot["step"] for name, slot in self.store.latest_manifest["slots"].items()}

    # -- checkpoints -------------------------------------------------------------------------

    def _apply_checkpoints(
        self,
        actions: Actions,
        step: int,
        get_state: Callable[[], Any],
        metrics: Mapping[str, Any],
        *,
        state_is_after: bool,
    ) -> None:
        store = self.store
        assert store is not None
        plan = plan_checkpoints(actions, step, self._slot_models(), self.slots)
        if plan is None:
            return
        store.finish()  # the previous save is committed and its manifest written first
        callbacks_state = self.runner.state_dict()
        if plan.variants and not store.has(step):
            state = get_state()
            if state is None:
                raise ConfigError(
                    f"OrbaxAdapter: the callbacks keep step {step} (slots "
                    f"{sorted(n for n, (s, _, _) in plan.slots.items() if s == step)}) but no "
                    f"state was given; pass on_validation_end(..., state=pytree)."
                )
            if float(actions.lr_scale) != 1.0 and not state_is_after and not self._warned_lr:
                self._warned_lr = True
                logger.warning(
                    "fcb: step %d changes the learning rate, and the checkpoint holds the "
                    "state from before the change: a run resumed from it would train on at "
                    "the old rate. Pass state=lambda actions: {...} with the rate applied "
                    "(fcb.scaled_lr(lr, actions)).",
                    step,
                )
            models = _union(plan.variants)
            payload = host_copy(state if models is None else model_subset(state, models))
            meta = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": step,
                "models": None if models is None else list(models),
                "callbacks": callbacks_state,
                "slots": {name: s for name, (s, _, _) in plan.slots.items()},
                "metrics": json_metrics(self.runner.host_metrics(metrics)),
                "stop_message": plan.stop_message,
            }
            store.save(step, payload, meta, models)
        elif plan.variants and not all(
            models_cover(store.stored_models(step), m) for m in plan.variants
        ):
            raise CheckpointCorruptError(
                f"step {step} is already saved (with {store.stored_models(step)}) and a slot "
                f"now asks for more of the model; checks must not repeat a step."
            )
        store.commit(
            event_step=step,
            slots=plan.slots,
            archive=plan.archive,
            callbacks=callbacks_state,
            resume=plan.resume,
            stop_message=plan.stop_message,
        )

    # -- resume ------------------------------------------------------------------------------

    def _resume(self, store: OrbaxStore, like: Any) -> None:
        record = store.manifest.get("resume")
        if not record:
            raise CheckpointCorruptError(
                f"{self.directory} has no resumable checkpoint: resuming needs a `last` slot, "
                f"e.g. fcb.ModelCheckpoint(save_last=True) in the chain (or drop resume=True "
                f"to start a new run)."
            )
        path = store.path(record["file"])
        state, meta = read_step(path, like)
        assert meta is not None
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("step") != record["step"]:
            raise CheckpointCorruptError(
                f"{path} is not the fcb checkpoint of step {record['step']} that the manifest "
                f"records (found {meta.get('format')!r} at step {meta.get('step')!r})."
            )
        self.runner.load_state_dict(meta["callbacks"])
        store.reset_to(record)
        self.restored_state = state
        self.resumed_step = int(record["step"])
        self._checks = self.resumed_step + 1
        if record.get("stop_message"):  # the run had already stopped: do not train on
            self.should_stop = True
            self.stop_message = record["stop_message"]

    # -- end ---------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the save in flight is committed and its manifest written."""
        if self.store is not None:
            self.store.finish()

    def on_fit_end(self) -> dict[str, float]:
        """Wait for saves, finalize the callbacks (summary scalars), release the directory."""
        try:
            self.wait()
            actions = self.runner.finalize()
            self.summary = {k: float(v) for k, v in actions.log.items()}
            if self.log is not None and self.summary:
                self.log(self._checks, self.summary)
            return self.summary
        finally:
            self._close()

    def on_exception(self, exception: BaseException | None = None) -> None:
        """Let the save in flight finish (it is a complete checkpoint); release the directory."""
        del exception
        try:
            self.wait()
        finally:
            self._close()

    def _close(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            store.close()

    def state_dict(self) -> dict[str, Any]:
        """The callbacks' state dict (JSON-safe), as saved with every checkpoint."""
        return fcb_state_dict(self.runner.state, self.callbacks)

    @property
    def manager(self) -> Any:
        """The orbax `CheckpointManager` of `directory/steps` (while the adapter is open)."""
        return None if self.store is None else self.store.manager


def _is_function(state: Any) -> bool:
    """A function of the actions, as opposed to a pytree (an equinox Module may be callable,
    so only plain functions, methods and partials count)."""
    return isinstance(state, (types.FunctionType, types.MethodType, functools.partial))


def _union(variants: set[Models]) -> Models:
    """One orbax step per step: everything if any slot wants everything, else every
    submodule any slot wants (in first-seen order)."""
    if None in variants:
        return None
    names: list[str] = []
    for models in sorted(v for v in variants if v is not None):
        names.extend(n for n in models if n not in names)
    return tuple(names)
