"""Reading fcb orbax steps: the state item (strict or partial restore) and fcb's metadata."""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from .._errors import CheckpointCorruptError, ConfigError

STATE_ITEM = "state"
META_ITEM = "fcb"
CHECKPOINT_FORMAT = "fcb.checkpoint"
CHECKPOINT_VERSION = 1


def reader() -> ocp.Checkpointer:
    """A checkpointer that reads fcb orbax steps: the state with `PyTreeRestore` (strict or
    partial), the metadata as JSON, and the state's metadata tree."""
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            **{STATE_ITEM: ocp.PyTreeCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
        )
    )


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def leaf_paths(tree: Any) -> set[tuple[str, ...]]:
    """Leaf paths by name, the same for a dict, a dataclass (an equinox Module) or a tuple."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(entry) for entry in path) for path, _ in flat}


def stored_tree(step_path: str) -> Any:
    """The metadata tree of a step's state (nested dicts; leaves describe the arrays)."""
    checkpointer = reader()
    try:
        stored = checkpointer.metadata(step_path).item_metadata[STATE_ITEM]
    finally:
        checkpointer.close()
    return getattr(stored, "tree", stored)


def read_step(
    step_path: str, like: Any = None, *, partial: bool = False, with_meta: bool = True
) -> tuple[Any, dict[str, Any] | None]:
    """Restore the `state` item of one step (like the template `like`) and its metadata.

    With `partial`, `like` may hold a part of the stored tree (e.g. `{"model": ...}`); each
    of its leaves must be stored (orbax would otherwise hand back the template's value).
    Without `like` the state comes back as orbax stores it (nested dicts of arrays).
    """
    if like is None:
        state_args = ocp.args.PyTreeRestore()
    else:
        if partial:
            missing = sorted(leaf_paths(like) - leaf_paths(stored_tree(step_path)))
            if missing:
                shown = ", ".join("/".join(p) for p in missing[:5])
                raise ConfigError(
                    f"the template `like` has {len(missing)} leaves the checkpoint {step_path} "
                    f"does not store (first: {shown}). Pass a template of the saved state, or "
                    f"of a part of it (e.g. {{'model': eqx.filter(model, eqx.is_array)}})."
                )
        restore_args = ocp.checkpoint_utils.construct_restore_args(like)
        state_args = ocp.args.PyTreeRestore(
            item=like, restore_args=restore_args, partial_restore=partial
        )
    items: dict[str, Any] = {STATE_ITEM: state_args}
    if with_meta:
        items[META_ITEM] = ocp.args.JsonRestore()
    checkpointer = reader()
    try:
        restored = checkpointer.restore(step_path, args=ocp.args.Composite(**items))
    except ValueError as error:
        if like is None:
            raise
        reason = " ".join(str(error).split())[:400]
        raise ConfigError(
            f"the template `like` does not match the state saved in {step_path} ({reason}). "
            f"Pass a template with the structure, shapes and dtypes of the `state` given to "
            f"on_validation_end, e.g. {{'model': eqx.filter(model, eqx.is_array), "
            f"'opt_state': optimizer.init(...)}}."
        ) from None
    finally:
        checkpointer.close()
    return restored[STATE_ITEM], (restored[META_ITEM] if with_meta else None)


def read_meta(step_path: str) -> dict[str, Any]:
    checkpointer = reader()
    try:
        restored = checkpointer.restore(
            step_path, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
        )
    finally:
        checkpointer.close()
    meta = restored[META_ITEM]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointCorruptError(f"{step_path} is not an fcb orbax checkpoint.")
    return meta
