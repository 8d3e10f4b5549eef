"""What a Torch checkpoint of one step holds, and how a resume point is read back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._errors import CheckpointCorruptError, MetricShapeError
from .._files import verify
from .._host.engine import Check
from ._load import CHECKPOINT_FORMAT, torch_load


def number(owner: str, key: str, value: Any) -> Any:
    """Torch tensors as Python numbers (detached); anything else unchanged for validation."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MetricShapeError(
                f"{owner}: metric {key!r} must be a scalar, got a tensor of shape "
                f"{tuple(value.shape)}. Reduce it first, e.g. x.mean()."
            )
        return value.detach().item()
    return value


def step_payload(
    parts: Any, check: Check, models: tuple[str, ...] | None, copy: Callable[[Any], Any]
) -> dict[str, Any]:
    """The checkpoint of `check.step`: fcb's record, and the state dicts of the adapter's
    `parts` (model, or only its submodules `models`; optimizer, scheduler, trainer, RNG),
    each passed through `copy` (a host copy for a background write)."""
    payload: dict[str, Any] = {
        "fcb": {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "step": check.step,
            # compact JSON: a pickled nested dict would be several times larger
            "callbacks": json.dumps(check.callbacks, separators=(",", ":")),
            "slots": {name: s for name, (s, _, _) in check.plan.slots.items()},
        }
    }
    if parts.model is not None:
        if models:
            payload["model"] = {n: copy(parts._submodule(n).state_dict()) for n in models}
            payload["models"] = list(models)
            return payload
        payload["model"] = copy(parts.model.state_dict())
    if parts.optimizer is not None:
        payload["optimizer"] = copy(parts.optimizer.state_dict())
    if parts.scheduler is not None:
        payload["scheduler"] = copy(parts.scheduler.state_dict())
    if parts.trainer is not None and hasattr(parts.trainer, "state_dict"):
        payload["trainer"] = copy(parts.trainer.state_dict())
    payload["rng"] = {"torch": torch.random.get_rng_state()}
    return payload


def read_resume_point(
    source: str, record: Mapping[str, Any], manifest: Mapping[str, Any]
) -> tuple[dict[str, Any], Any]:
    """The payload of a run's resume point and the callbacks' state dict it records.

    Every file the resumed run keeps is checked first: a damaged best checkpoint is refused
    now, not found when it is loaded after training."""
    for relative in sorted({record["file"]} | {s["file"] for s in record["slots"].values()}):
        if relative not in manifest["files"]:
            raise CheckpointCorruptError(
                f"{os.path.join(source, 'manifest.json')}: the resume point needs "
                f"{relative}, which its file table does not list (edited by hand?)."
            )
        verify(os.path.join(source, relative), manifest["files"][relative])
    path = os.path.join(source, record["file"])
    payload = torch_load(path)
    meta = payload.get("fcb", {}) if isinstance(payload, dict) else {}
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("step") != record["step"]:
        raise CheckpointCorruptError(
            f"{path} is not the fcb checkpoint of step {record['step']} that the manifest "
            f"records (found {meta.get('format')!r} at step {meta.get('step')!r})."
        )
    return payload, json.loads(meta["callbacks"])


def restore_payload(parts: Any, payload: Mapping[str, Any]) -> None:
    """Load a resume point's state dicts into the adapter's `parts`."""
    if parts.model is not None:
        parts.model.load_state_dict(payload["model"])
    if parts.optimizer is not None and "optimizer" in payload:
        parts.optimizer.load_state_dict(payload["optimizer"])
    if parts.scheduler is not None and "scheduler" in payload:
        parts.scheduler.load_state_dict(payload["scheduler"])
    if parts.trainer is not None and "trainer" in payload:
        parts.trainer.load_state_dict(payload["trainer"])
    if "rng" in payload:
        torch.random.set_rng_state(payload["rng"]["torch"])
