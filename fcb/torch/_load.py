"""Read Torch checkpoints of an fcb run: one file, checked against the run's manifest."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import IO, Any, cast

import torch

from .._errors import CheckpointCorruptError, ConfigError, DirectoryInUseError
from .._host.live import being_written, open_listed, read_live, verify_open, writer_pid
from .._host.manifest import MANIFEST_NAME
from .._host.rundir import find_run
from ._loadable import weights_only_reason
from ._store import read_manifest

CHECKPOINT_FORMAT = "fcb.checkpoint"


def torch_load(source: str | IO[bytes], path: str | None = None) -> Any:
    """`torch.load` of an fcb checkpoint (a path, or an open file at `path`; tensors on the
    CPU, weights only: no code from the file runs); a file that cannot be read that way is
    a `CheckpointCorruptError`."""
    name = path or source
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:
        reason = weights_only_reason(error)
        if "does not allow" in reason:  # a whole file whose bytes are fine, of other objects
            raise CheckpointCorruptError(
                f"{name} cannot be loaded as an fcb checkpoint: {reason}. fcb loads weights "
                f"only (no code from the file runs while loading) and never writes such a "
                f"checkpoint: it comes from an earlier fcb, or was replaced. If you trust the "
                f"file and that type, allow it while loading: with "
                f"torch.serialization.safe_globals([...]): ..."
            ) from None
        raise CheckpointCorruptError(
            f"{name} cannot be loaded as an fcb checkpoint ({reason})."
        ) from error


def _manifest_dir(path: str) -> str:
    """The run directory of a checkpoint file: beside it (a slot name), or one up (a step)."""
    directory = os.path.dirname(os.path.abspath(path))
    for candidate in (directory, os.path.dirname(directory)):
        if os.path.exists(os.path.join(candidate, MANIFEST_NAME)):
            return candidate
    if writer_pid(directory) is not None:
        raise DirectoryInUseError(
            being_written(directory, f"it has committed no checkpoint yet, so {path} is none.")
        )
    raise CheckpointCorruptError(
        f"{path}: there is no {MANIFEST_NAME} beside it (in {directory}) nor one directory up, "
        f"so it is not a checkpoint of an fcb run (or no checkpoint was written there yet)."
    )


def _not_a_file(path: str) -> ConfigError:
    run = find_run(path)
    names: list[str] = []
    if run is not None:
        try:
            slots = read_manifest(run)["slots"]
            names = sorted(s.get("link", s["file"]) for s in slots.values())
        except CheckpointCorruptError:
            pass
    listed = f" in {run}: {', '.join(names)}" if names else " (e.g. best_model.pt, last.pt)"
    return ConfigError(
        f"load_checkpoint: {path} is a directory; pass the path of one of its checkpoints"
        f"{listed}."
    )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one fcb Torch checkpoint file (tensors on the CPU) after checking the manifest.

    `path` is a slot's name (`best_model.pt`, `last.pt`...) or a step file; the run's
    manifest (beside it, or one directory up for a step file) must list it, and its size and
    CRC-32 must match the record. A sharded run's slot (`best_model`, a directory) or step
    directory is read whole: every shard file checked, the model's and optimizer's state as
    plain tensors (the optimizer's keyed by parameter name, as
    `torch.distributed.checkpoint.state_dict.get_state_dict` gives it), in one process
    without a process group. A run being written is read as one snapshot: the manifest
    first, then the file it lists, read again when a commit raced the read.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and find_run(path) is not None:
        raise _not_a_file(path)
    manifest_dir = _manifest_dir(path)
    relative = os.path.relpath(os.path.abspath(path), manifest_dir)

    def listed(manifest: dict[str, Any]) -> str:
        name = os.path.basename(os.path.normpath(path))
        slot = next((s for s in manifest["slots"].values() if s.get("link") == name), None)
        record_key = slot["file"] if slot else relative
        if record_key not in manifest["files"]:
            raise CheckpointCorruptError(
                f"{path} is not listed in {manifest_dir}/{MANIFEST_NAME}."
            )
        return record_key

    if os.path.isdir(path):  # a sharded step (or a slot's link to one): read whole
        from ._sharded_payload import load_sharded

        def read_sharded(manifest: dict[str, Any]) -> dict[str, Any]:
            record_key = listed(manifest)
            return load_sharded(os.path.join(manifest_dir, record_key),
                                manifest["files"][record_key])

        return read_live(manifest_dir, "torch", read_sharded)

    def read(manifest: dict[str, Any]) -> tuple[str, dict[str, Any], IO[bytes]]:
        record_key = listed(manifest)
        return record_key, manifest["files"][record_key], open_listed(
            manifest_dir, manifest, record_key
        )

    record_key, record, f = read_live(manifest_dir, "torch", read, discard=lambda r: r[2].close())
    target = os.path.join(manifest_dir, record_key)
    with f:  # the file as the manifest listed it, even if the writer has deleted it since
        verify_open(f, target, record)
        payload = torch_load(f, target)
    found = payload.get("fcb", {}).get("step") if isinstance(payload, dict) else None
    if found is not None and record.get("step") is not None and found != record["step"]:
        raise CheckpointCorruptError(
            f"{target} holds step {found}, the manifest records step {record['step']} (another "
            f"step's file copied over it, its record edited?)."
        )
    return payload


def export_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Write the checkpoint at `path` (a slot's name or a step, single-file or sharded) as
    one plain `torch.save` file `out` (atomically), read whole and checked as
    [`load_checkpoint`][fcb.torch.load_checkpoint] reads it; returns `out`.

    A sharded slot becomes a file any process loads with `torch.load(out,
    weights_only=True)`, without a process group or the run directory."""
    from .._files import atomic_write

    payload = load_checkpoint(path)
    out = os.fspath(out)
    if os.path.isdir(out):
        raise ConfigError(
            f"export_checkpoint: `out` must be a file path, got the directory {out}; pass e.g. "
            f"{os.path.join(out, 'model.pt')}."
        )
    atomic_write(out, lambda f: torch.save(payload, cast(IO[bytes], f)))
    return out


@contextlib.contextmanager
def loaded_weights(
    parts: Any, path: str, location: Mapping[str, Any], context: Any
) -> Iterator[Any]:
    """The weights of the checkpoint at `path` (its manifest record `location`; checked as
    `load_checkpoint` checks it) in the live model `parts.model` while the context lasts,
    then the live weights back (a host copy of them is held meanwhile). A checkpoint of some
    submodules (`model_names`) loads only those; a Lightning checkpoint loads its
    `state_dict` into the LightningModule."""
    from ._payload import check_shapes
    from ._writer import host_copy

    if os.path.isdir(path):
        from ._sharded_payload import loaded_sharded

        with loaded_sharded(parts, path, location):
            yield context
        return
    payload = load_checkpoint(path)
    what = f"the checkpoint of step {location.get('step')} ({path})"
    if isinstance(payload.get("fcb"), dict) and "model" in payload:
        models = payload.get("models")
        saved = payload["model"]
        targets = (
            [(parts._submodule(n), saved[n]) for n in models] if models
            else [(parts.model, saved)]
        )
    elif "state_dict" in payload:  # Trainer.save_checkpoint's
        targets = [(parts.model, payload["state_dict"])]
    else:
        raise CheckpointCorruptError(f"{what} holds no model weights (keys {sorted(payload)}).")
    for target, saved in targets:
        check_shapes(target, saved, what)
    live = [host_copy(target.state_dict()) for target, _ in targets]
    try:
        for target, saved in targets:
            target.load_state_dict(saved)
        yield context
    finally:
        for (target, _), weights in zip(targets, live, strict=True):
            target.load_state_dict(weights)
