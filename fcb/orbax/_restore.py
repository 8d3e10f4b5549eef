"""Read the checkpoints of an fcb orbax run: a slot's pytree, or an equinox model; a run
being written is read as one snapshot (`fcb._host.live`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import equinox as eqx

from .._errors import CheckpointError
from .._host.live import read_live
from ._payload import model_subset, submodule
from ._store import STORAGE, read_manifest, read_step, stored_tree

Model = TypeVar("Model")
T = TypeVar("T")


def _read_slot(
    directory: str | os.PathLike[str], slot: str, read: Callable[[str, dict[str, Any]], T]
) -> T:
    """`read(step_path, slot_record)` of the step a slot holds, as one snapshot of a run that
    may be being written: read again when a commit deleted the step while it was read."""
    directory = os.path.abspath(os.fspath(directory))

    def attempt(manifest: dict[str, Any]) -> tuple[dict[str, Any], T]:
        record = manifest["slots"].get(slot)
        if record is None:
            raise CheckpointError(
                f"{directory} has no checkpoint in slot {slot!r}; its slots are "
                f"{sorted(manifest['slots'])} (a slot that never held a step is not listed)."
            )
        return record, read(os.path.join(directory, record["file"]), record)

    def still_listed(result: tuple[dict[str, Any], T]) -> bool:
        # the writer deletes a step only after a manifest without it is committed: still
        # listed after the read, the step was whole while it was read
        record = result[0]
        try:
            listed = read_manifest(directory)["files"].get(record["file"])
        except CheckpointError:
            return False
        return listed is not None and listed.get("step") == record["step"]

    return read_live(directory, STORAGE, attempt, changed_ok=still_listed)[1]


def restore(
    directory: str | os.PathLike[str], slot: str = "best_model", *, like: Any = None
) -> Any:
    """The pytree a slot holds, restored like the template `like` (bit for bit).

    `like` gives the structure, dtypes and placement (JAX arrays restore as JAX arrays,
    NumPy arrays and `jax.ShapeDtypeStruct`s as NumPy arrays). It may be a part of the saved
    state, e.g. `{"model": eqx.filter(model, eqx.is_array)}` without the optimizer state;
    each of its leaves must be in the checkpoint. Without `like`, the state comes back as
    orbax stores it (nested dicts of NumPy arrays).

    A slot of `BestCheckpoint(model_names=...)` holds only those submodules: it restores
    as `{"model": {name: submodule, ...}}`, and `like` may be the full state's template.

    Slots: `best_model`, `best_model-top2`, ..., `last` (`ModelCheckpoint`);
    `best.<metric>`, `best.<metric>.tolerance=<t>` (`BestCheckpoint`); see
    `fcb.orbax.read_manifest(directory)["slots"]`.

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> callbacks = fcb.ModelCheckpoint("val_loss")
    >>> with fcb.orbax.OrbaxAdapter(callbacks, directory, async_save=False) as adapter:
    ...     for step, loss in enumerate([0.3, 0.5]):
    ...         state = {"w": jnp.full((2,), step)}
    ...         _ = adapter.on_validation_end({"val_loss": loss}, step=step, state=state)
    >>> fcb.orbax.restore(directory, "last", like={"w": jnp.zeros((2,), jnp.int32)})
    {'w': Array([1, 1], dtype=int32)}
    >>> {name: slot["step"] for name, slot in fcb.orbax.read_manifest(directory)["slots"].items()}
    {'best_model': 0, 'last': 1}
    """

    def read(path: str, record: dict[str, Any]) -> Any:
        template = like
        if template is not None and record.get("models"):
            template = model_subset(template, tuple(record["models"]))
        state, _ = read_step(path, template, partial=template is not None, with_meta=False)
        return state

    return _read_slot(directory, slot, read)


def restore_model(
    directory: str | os.PathLike[str], model: Model, slot: str = "best_model"
) -> Model:
    """`model` with the arrays a slot holds: `eqx.combine` of the restored arrays with the
    model's static part.

    The saved state is either the model's arrays themselves or a mapping with a `"model"`
    entry (`{"model": eqx.filter(model, eqx.is_array), "opt_state": ...}`). For a slot that
    holds only some submodules (`BestCheckpoint(model_names=...)`), only those are replaced.

    >>> import tempfile, equinox as eqx
    >>> directory = tempfile.mkdtemp()
    >>> model = eqx.nn.Linear(2, 1, key=jax.random.PRNGKey(0))
    >>> adapter = fcb.orbax.OrbaxAdapter(fcb.ModelCheckpoint(), directory, async_save=False)
    >>> for step, loss in enumerate([0.5, 0.7]):
    ...     trained = eqx.tree_at(lambda m: m.bias, model, jnp.full((1,), float(step)))
    ...     state = {"model": eqx.filter(trained, eqx.is_array)}
    ...     _ = adapter.on_validation_end({"val_loss": loss}, step=step, state=state)
    >>> _ = adapter.on_fit_end()
    >>> fcb.orbax.restore_model(directory, model).bias       # the best step: 0
    Array([0.], dtype=float32)
    >>> fcb.orbax.restore_model(directory, model, "last").bias
    Array([1.], dtype=float32)
    """
    params, static = eqx.partition(model, eqx.is_array)

    def read(path: str, record: dict[str, Any]) -> Model:
        models = record.get("models")
        if models:
            like = model_subset({"model": params}, tuple(models))
            restored = read_step(path, like, partial=True, with_meta=False)[0]["model"]
            names = tuple(models)
            replacements = [eqx.combine(restored[n], submodule(static, n)) for n in names]
            return eqx.tree_at(lambda m: [submodule(m, n) for n in names], model, replacements)
        stored = stored_tree(path)
        if isinstance(stored, Mapping) and "model" in stored:
            arrays = read_step(path, {"model": params}, partial=True, with_meta=False)[0]
            arrays = arrays["model"]
        else:
            arrays = read_step(path, params, partial=True, with_meta=False)[0]
        return eqx.combine(arrays, static)

    return _read_slot(directory, slot, read)


def slot_state(directory: str | os.PathLike[str], slot: str, like: Any) -> Any:
    """The state to evaluate a slot's checkpoint with: the slot restored like the live state
    `like`; a slot of some submodules (`model_names`) replaces only those in `like`."""

    def read(path: str, record: dict[str, Any]) -> Any:
        models = record.get("models")
        if not models:
            return read_step(path, like, partial=True, with_meta=False)[0]
        names = tuple(models)
        saved = read_step(path, model_subset(like, names), partial=True, with_meta=False)[0]
        model = eqx.tree_at(
            lambda m: [submodule(m, n) for n in names], like["model"],
            [saved["model"][n] for n in names],
        )
        return {**like, "model": model}

    return _read_slot(directory, slot, read)
