"""Read Torch checkpoints of an fcb run: one file, checked against the run's manifest."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from .._errors import CheckpointCorruptError
from .._files import verify
from .._host.manifest import MANIFEST_NAME
from ._store import read_manifest

CHECKPOINT_FORMAT = "fcb.checkpoint"


def torch_load(path: str) -> Any:
    """`torch.load` of an fcb checkpoint (tensors on the CPU, weights only); a file that
    cannot be read that way is a `CheckpointCorruptError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointCorruptError(
            f"{path} cannot be loaded as an fcb checkpoint ({reason})."
        ) from error


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one fcb Torch checkpoint file (tensors on the CPU) after checking the manifest.

    `path` is a slot's name (`best_model.pt`, `last.pt`...) or a step file; the run's
    manifest (beside it, or one directory up for a step file) must list it, and its size and
    CRC-32 must match the record.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    manifest_dir = (
        directory
        if os.path.exists(os.path.join(directory, MANIFEST_NAME))
        else os.path.dirname(directory)
    )
    manifest = read_manifest(os.path.join(manifest_dir, MANIFEST_NAME))
    relative = os.path.relpath(os.path.abspath(path), manifest_dir)
    slot = manifest["slots"].get(os.path.splitext(os.path.basename(path))[0])
    record_key = slot["file"] if slot else relative
    if record_key not in manifest["files"]:
        raise CheckpointCorruptError(f"{path} is not listed in {manifest_dir}/{MANIFEST_NAME}.")
    target = os.path.join(manifest_dir, record_key)
    record = manifest["files"][record_key]
    verify(target, record)
    payload = torch_load(target)
    found = payload.get("fcb", {}).get("step") if isinstance(payload, dict) else None
    if found is not None and record.get("step") is not None and found != record["step"]:
        raise CheckpointCorruptError(
            f"{target} holds step {found}, the manifest records step {record['step']} (another "
            f"step's file copied over it, its record edited?)."
        )
    return payload
