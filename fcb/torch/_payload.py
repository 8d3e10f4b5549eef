"""What a Torch checkpoint of one step holds, and how a resume point is read back."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import IO, Any

import torch

from .._canonical import canonical_json
from .._errors import CheckpointCorruptError, CheckpointWriteError, ConfigError, MetricShapeError
from .._files import atomic_write, link_atomic
from .._host.engine import Check, check_state_dict_owner
from .._host.live import open_listed, read_live, verify_open
from .._host.manifest import MANIFEST_NAME
from ._load import CHECKPOINT_FORMAT, torch_load
from ._loadable import check_loadable
from ._rng import rng_state as rng_state, set_rng_state as set_rng_state

_PARTS = {
    "model": "model.state_dict()",
    "optimizer": "optimizer.state_dict()",
    "scheduler": "scheduler.state_dict()",
    "trainer": "trainer.state_dict()",
}


def number(owner: str, key: str, value: Any) -> Any:
    """Torch tensors as Python numbers (detached); anything else unchanged for validation."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MetricShapeError(
                f"{owner}: metric {key!r} must be a scalar, got a tensor of shape "
                f"{tuple(value.shape)}. Reduce it first, e.g. x.mean()."
            )
        return value.item()  # a number, also of a tensor that requires grad
    return value


def check_parts(owner: str, model: Any, optimizer: Any, scheduler: Any, trainer: Any) -> None:
    """The parts of a Torch loop whose state a checkpoint holds, checked when given."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"{owner}: `model` must be a torch.nn.Module, got {type(model).__name__}."
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"{owner}: `optimizer` must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}."
        )
    check_state_dict_owner(owner, "scheduler", scheduler)
    if trainer is not None:
        if not hasattr(trainer, "should_stop"):
            raise ConfigError(
                f"{owner}: `trainer` must have a `should_stop` attribute (fcb sets it when a "
                f"callback stops the run), got {type(trainer).__name__}: {trainer!r}."
            )
        if callable(getattr(trainer, "state_dict", None)):
            check_state_dict_owner(owner, "trainer", trainer)


def step_payload(
    parts: Any, check: Check, models: tuple[str, ...] | None, copy: Callable[[Any], Any]
) -> dict[str, Any]:
    """The checkpoint of `check.step`: fcb's record, and the state dicts of the adapter's
    `parts` (model, or only its submodules `models`; optimizer, scheduler, trainer, RNG),
    each passed through `copy` (a host copy for a background write)."""
    payload: dict[str, Any] = {"fcb": fcb_record(check)}
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
    # what the user's objects returned is checked; fcb's own record and RNG states (built here
    # of tensors, ints and strings) load by construction, and walking them costs per save
    check_loadable(parts.owner, check.step, payload, describe_entry)
    payload["rng"] = rng_state()
    return payload


def fcb_record(check: Check) -> dict[str, Any]:
    """fcb's own record in the checkpoint of `check.step`: the step, the callbacks' state
    and the slot table (what a resume reads besides the model)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "step": check.step,
        # compact JSON (a pickled nested dict would be several times larger); the canonical
        # text, which the manifest's seal hashes too: a state dict encoded once gives both
        "callbacks": canonical_json(check.callbacks),
        "slots": {name: s for name, (s, _, _) in check.plan.slots.items()},
    }


def describe_entry(entry: str, path: str) -> str:
    """Where a value of a Torch payload comes from, for messages."""
    return f"{_PARTS.get(entry, f'the checkpoint[{entry!r}]')}{path}"


def resume_files(record: Mapping[str, Any]) -> list[str]:
    """Every file a resumed run keeps: the resume point's and its slots'."""
    return sorted({record["file"]} | {s["file"] for s in record["slots"].values()})


def open_resume_point(
    source: str, record: dict[str, Any], manifest: dict[str, Any]
) -> dict[str, IO[bytes]]:
    """Open every file of the run's resume point: one snapshot, even of a run being written
    (an open file outlives the writer's deletion of it).

    `record` and `manifest` are what the session read; when the run has committed since,
    they are brought up to date in place, so the session resumes from the snapshot read."""

    def read(current: dict[str, Any]) -> tuple[dict[str, Any], dict[str, IO[bytes]]]:
        resume = current.get("resume")
        if not resume:
            raise CheckpointCorruptError(
                f"{source} has no resumable checkpoint any more: the run there started over."
            )
        files: dict[str, IO[bytes]] = {}
        try:
            for relative in resume_files(resume):
                if relative not in current["files"]:
                    raise CheckpointCorruptError(
                        f"{os.path.join(source, MANIFEST_NAME)}: the resume point needs "
                        f"{relative}, which its file table does not list (edited by hand?)."
                    )
                files[relative] = open_listed(source, current, relative)
        except BaseException:
            close_all(files)
            raise
        return current, files

    current, files = read_live(source, "torch", read, discard=lambda read: close_all(read[1]))
    if current != manifest:
        manifest.clear()
        manifest.update(current)
        record.clear()
        record.update(current["resume"])
    return files


def close_all(files: Mapping[str, IO[bytes]]) -> None:
    for f in files.values():
        f.close()


def read_resume_point(
    source: str, record: Mapping[str, Any], manifest: Mapping[str, Any],
    files: Mapping[str, IO[bytes]],
) -> tuple[dict[str, Any], Any]:
    """The payload of a run's resume point and the callbacks' state dict it records, read
    from the snapshot `files` (`open_resume_point`).

    Every file the resumed run keeps is checked first: a damaged best checkpoint is refused
    now, not found when it is loaded after training."""
    for relative in resume_files(record):
        verify_open(files[relative], os.path.join(source, relative), manifest["files"][relative])
    path = os.path.join(source, record["file"])
    payload = torch_load(files[record["file"]], path)
    meta = payload.get("fcb", {}) if isinstance(payload, dict) else {}
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("step") != record["step"]:
        raise CheckpointCorruptError(
            f"{path} is not the fcb checkpoint of step {record['step']} that the manifest "
            f"records (found {meta.get('format')!r} at step {meta.get('step')!r})."
        )
    return payload, json.loads(meta["callbacks"])


def adopt_files(
    store: Any, source: str, record: Mapping[str, Any], manifest: Mapping[str, Any],
    files: Mapping[str, IO[bytes]],
) -> dict[str, Any]:
    """Resuming into another directory: whatever run it held is replaced, not mixed in; the
    resume point's files are linked (never moved: the old run keeps its files), or copied
    from the snapshot when the old run has deleted them meanwhile."""
    store.start_over()
    adopted = {}
    for slot in record["slots"].values():
        relative = slot["file"]
        _bring(files[relative], os.path.join(source, relative), store.path(relative))
        adopted[relative] = manifest["files"][relative]
    return adopted


def _bring(snapshot: IO[bytes], source: str, destination: str) -> None:
    held = os.fstat(snapshot.fileno())
    try:
        if os.path.samestat(os.stat(source), held):
            link_atomic(source, destination)
            if os.path.samestat(os.stat(destination), held):
                return
    except (OSError, CheckpointWriteError):
        pass  # deleted (or replaced) by the old run since the snapshot: copy what was read
    snapshot.seek(0)
    atomic_write(destination, lambda out: shutil.copyfileobj(snapshot, out, 1 << 22))


def check_shapes(
    model: torch.nn.Module, saved: Mapping[str, Any], what: str = "the resume point's model"
) -> None:
    """The model must hold exactly the saved tensors' names and shapes: `load_state_dict`
    copies every matching tensor before it raises on a mismatch, leaving a half-loaded model."""
    current = model.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = sorted(
        f"{key}: saved {tuple(saved[key].shape)}, model {tuple(current[key].shape)}"
        for key in set(current) & set(saved)
        if isinstance(saved[key], torch.Tensor)
        and isinstance(current[key], torch.Tensor)
        and saved[key].shape != current[key].shape
    )
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"other shapes {shapes[:5]}" if shapes else "",
        ]
        raise ConfigError(
            f"{what} does not fit the model given ({type(model).__name__}): "
            f"{'; '.join(p for p in parts if p)}. Build the model the run was saved with."
        )


def restore_payload(parts: Any, payload: Mapping[str, Any]) -> None:
    """Load a resume point's state dicts into the adapter's `parts`: all of them or, when one
    fails, none (what was loaded is put back)."""
    if parts.model is not None:
        check_shapes(parts.model, payload["model"])
    targets = [
        (parts.model, payload.get("model")),
        (parts.optimizer, payload.get("optimizer")),
        (parts.scheduler, payload.get("scheduler")),
        (parts.trainer, payload.get("trainer")),
    ]
    targets = [(target, saved) for target, saved in targets if target is not None and saved]
    before = [copy.deepcopy(target.state_dict()) for target, _ in targets]
    loaded = 0
    try:
        for target, saved in targets:
            target.load_state_dict(saved)
            loaded += 1
        if "rng" in payload:
            set_rng_state(payload["rng"])
    except BaseException:
        for (target, _), state in list(zip(targets, before, strict=True))[: loaded + 1]:
            with contextlib.suppress(Exception):
                target.load_state_dict(state)
        raise
