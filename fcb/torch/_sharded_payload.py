"""What a sharded Torch checkpoint holds, how it is resumed, and how one process reads it whole.

The model's and optimizer's state go through `torch.distributed.checkpoint.state_dict`
(`get_state_dict` / `set_state_dict`: FSDP2 and tensor-parallel DTensors, FSDP1, or plain
modules alike; the optimizer's state is keyed by parameter name), so a step saved by N ranks
resumes on M ranks: DCP reshards. Without a process group the same calls read the step whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .._errors import CheckpointCorruptError, ConfigError
from .._files import verify_location
from .._host.engine import Check
from ._load import CHECKPOINT_FORMAT, torch_load
from ._loadable import check_loadable
from ._payload import describe_entry, fcb_record, rng_state, set_rng_state
from ._sharded import RECORD_FILE, ShardedStore, _one_process, is_sharded, rng_file
from ._writer import host_copy

_NOT_WHOLE = (
    "{owner}: the model holds sharded parameters (DTensor: FSDP2 fully_shard, tensor "
    "parallel, or FSDP1), which a single-file checkpoint cannot hold whole: rank 0 would save "
    "only its own shards. Leave `sharded` at None (sharded models are saved with "
    "torch.distributed.checkpoint) or pass sharded=True."
)


def holds_sharded_state(model: Any) -> bool:
    """Whether `model` holds state that only `torch.distributed.checkpoint` saves whole:
    DTensor parameters or buffers, or an FSDP1 wrapper."""
    # neither kind can exist before its module is imported (and importing them costs seconds)
    tensor, fsdp = (sys.modules.get(f"torch.distributed.{m}") for m in ("tensor", "fsdp"))
    if model is None or (tensor is None and fsdp is None):
        return False
    if fsdp is not None and any(
        isinstance(m, fsdp.FullyShardedDataParallel) for m in model.modules()
    ):
        return True
    tensors = [*model.parameters(), *model.buffers()]
    return tensor is not None and any(isinstance(t, tensor.DTensor) for t in tensors)


def check_sharded_option(owner: str, sharded: Any) -> bool | None:
    if sharded is not None and not isinstance(sharded, bool):
        raise ConfigError(
            f"{owner}: `sharded` must be None (decide from the model and the run), True or "
            f"False, got sharded = {sharded!r}."
        )
    return sharded


def sharded_choice(owner: str, sharded: bool | None, model: Any, runs: list[str]) -> bool:
    """Whether the adapter saves sharded: when asked, or (`None`) when the model is sharded
    or the run it resumes (in one of `runs`) was; a sharded model with `sharded=False` is a
    `ConfigError`, never a partial save."""
    holds = holds_sharded_state(model)
    if sharded is False and holds:
        raise ConfigError(_NOT_WHOLE.format(owner=owner))
    if sharded is not None:
        return sharded
    return holds or any(_run_is_sharded(run) for run in runs)


def _run_is_sharded(directory: str) -> bool:
    """Whether the run in `directory` (if any) was saved sharded (a resume 2 -> 1 process
    into an unsharded model reads it through DCP)."""
    from .._host.rundir import find_run
    from ._store import read_manifest

    run = find_run(directory)
    if run is None:
        return False
    try:
        files = read_manifest(run)["files"]
    except Exception:
        return False  # the store's open reports what is wrong with it
    return any(is_sharded(record) for record in files.values())


def _model_state(parts: Any, models: tuple[str, ...] | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if models:
        return {"model": {n: get_model_state_dict(parts._submodule(n)) for n in models}}
    if parts.optimizer is None:
        return {"model": get_model_state_dict(parts.model)}
    model_state, optimizer_state = get_state_dict(parts.model, parts.optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def sharded_step(
    parts: Any, check: Check, models: tuple[str, ...] | None, rank: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DCP state of `check.step` and this rank's own files beside it (rank 0: fcb's
    record, the scheduler's and trainer's state; every rank: its random generators)."""
    state = _model_state(parts, models)
    if rank:
        return state, {rng_file(rank): rng_state()}
    files: dict[str, Any] = {}
    if rank == 0:
        record: dict[str, Any] = {"fcb": fcb_record(check), "rng": rng_state()}
        if models:
            record["models"] = list(models)
        else:
            if parts.scheduler is not None:
                record["scheduler"] = parts.scheduler.state_dict()
            if parts.trainer is not None and hasattr(parts.trainer, "state_dict"):
                record["trainer"] = parts.trainer.state_dict()
            check_loadable(parts.owner, check.step, record, describe_entry)
        files[RECORD_FILE] = record
    return state, files


def step_record(path: str) -> dict[str, Any]:
    """Rank 0's record file of the sharded step at `path`, checked to be fcb's."""
    record = torch_load(os.path.join(path, RECORD_FILE))
    meta = record.get("fcb", {}) if isinstance(record, dict) else {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointCorruptError(f"{path} is not a sharded fcb checkpoint.")
    return record


def read_sharded_resume(
    parts: Any, source: str, record: Mapping[str, Any], manifest: Mapping[str, Any]
) -> tuple[Any, Callable[[], None]]:
    """The callbacks' state of a sharded resume point and the restore of the model,
    optimizer, scheduler, trainer and RNG (on any number of ranks; DCP reshards)."""
    path = os.path.join(source, record["file"])
    parts.group.on_primary(lambda: verify_location(path, manifest["files"][record["file"]]))
    saved = step_record(path)
    meta = saved["fcb"]
    if meta.get("step") != record["step"]:
        raise CheckpointCorruptError(
            f"{path} holds step {meta.get('step')!r}, the manifest records step "
            f"{record['step']} (another step's files copied over it?)."
        )

    def restore() -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        # loaded into copies: a resume point that does not fit leaves the model as it was
        target = _copies(_model_state(parts, None))
        _load_into(target, path, parts.model)
        set_state_dict(
            parts.model, [] if parts.optimizer is None else parts.optimizer,
            model_state_dict=target["model"], optim_state_dict=target.get("optimizer", {}),
        )
        for part, key in ((parts.scheduler, "scheduler"), (parts.trainer, "trainer")):
            if part is not None and key in saved:
                part.load_state_dict(saved[key])
        rank = parts.group.index
        own = os.path.join(path, rng_file(rank))
        if rank == 0 and "rng" in saved:
            set_rng_state(saved["rng"])
        elif rank and os.path.exists(own):  # a rank the saving run had not: left as it is
            set_rng_state(torch_load(own))

    return json.loads(meta["callbacks"]), restore


def loaded_sharded(
    parts: Any, path: str, location: Mapping[str, Any]
) -> contextlib.AbstractContextManager[None]:
    """The model weights of the sharded step at `path` (its manifest record `location`) in
    the live model while the context lasts, then the live weights back; on every rank (DCP
    reshards). A step of some submodules (`model_names`) loads only those."""
    models = tuple(step_record(path).get("models") or ())
    modules = {n: parts._submodule(n) for n in models} if models else parts.model
    return loaded_modules(parts.group, path, location, "model", modules)


@contextlib.contextmanager
def loaded_modules(
    group: Any, path: str, location: Mapping[str, Any], key: str, modules: Any
) -> Iterator[None]:
    """The weights DCP holds under `key` at `path` in `modules` (a module, or a mapping from
    name to module for `key`'s entries) while the context lasts, then their own weights
    back. The shards are verified first (on the primary) against `location`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    group.on_primary(lambda: verify_location(path, location))
    named = dict(modules) if isinstance(modules, Mapping) else {"": modules}
    live = {name: _copies(get_model_state_dict(m)) for name, m in named.items()}
    loaded = {name: _copies(weights) for name, weights in live.items()}  # read in place
    _load_into({key: loaded if isinstance(modules, Mapping) else loaded[""]}, path,
               next(iter(named.values())))
    try:
        for name, module in named.items():
            set_model_state_dict(module, loaded[name])
        yield
    finally:
        for name, module in named.items():
            set_model_state_dict(module, live[name])


@contextlib.contextmanager
def loaded_fsdp1(
    group: Any, path: str, location: Mapping[str, Any], model: Any
) -> Iterator[None]:
    """`loaded_modules` for an FSDP1 module saved as Lightning's FSDPStrategy saves it: its
    sharded state dict (`StateDictType.SHARDED_STATE_DICT`) under the entry `"model"`."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    group.on_primary(lambda: verify_location(path, location))
    # the live weights as this rank holds them (its shards of the flat parameters): copied
    # back in place afterwards, exactly
    own = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        target = model.state_dict()
        _load_into({"model": target}, path, model)
        try:
            model.load_state_dict(target)
            yield
        finally:
            with torch.no_grad():
                for tensor, saved in zip((*model.parameters(), *model.buffers()), own,
                                         strict=True):
                    tensor.copy_(saved)


def _load_into(target: dict[str, Any], path: str, model: Any) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(target, checkpoint_id=path, no_dist=_one_process())
    except Exception as error:
        raise ConfigError(
            f"the checkpoint {path} does not fit the model given ({type(model).__name__}): "
            f"{error}. Build the model (and optimizer) the run was saved with."
        ) from error


def _copies(state: Any) -> Any:
    """A copy of a state dict whose tensors share nothing (DTensors stay DTensors)."""
    return host_copy(state, lambda tensor: tensor.detach().clone())


def adopt_sharded(
    store: ShardedStore, source: str, record: Mapping[str, Any], manifest: Mapping[str, Any]
) -> dict[str, Any]:
    """Resuming into another directory: the resume point's step directories are brought
    over (their files hard-linked, copied where links fail); the old run keeps its own."""
    store.start_over()
    adopted: dict[str, Any] = {}

    def bring() -> None:
        for slot in record["slots"].values():
            relative = slot["file"]
            if relative in adopted:
                continue
            partial = store._partial(relative)
            os.makedirs(partial, exist_ok=True)
            for name in manifest["files"][relative]["shards"]:
                origin, copy = os.path.join(source, relative, name), os.path.join(partial, name)
                try:
                    os.link(origin, copy)
                except OSError:
                    import shutil

                    shutil.copyfile(origin, copy)
            os.replace(partial, store.path(relative))
            adopted[relative] = manifest["files"][relative]

    store.processes.on_primary(bring)
    if not store.processes.is_primary:
        adopted = {s["file"]: manifest["files"][s["file"]] for s in record["slots"].values()}
    return adopted


def load_sharded(path: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The whole checkpoint of a sharded step in this process (plain tensors on the CPU):
    the same entries as a single-file checkpoint (`fcb`, `model`, `optimizer` keyed by
    parameter name, `scheduler`, `trainer`), its files checked against `record` first."""
    # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does: the planner
    # rebuilds the whole state from the step's metadata (public `load` copies the dict)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    verify_location(path, record)
    whole: dict[str, Any] = {}
    try:
        _load_state_dict(
            whole, storage_reader=dcp.FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(), no_dist=True,
        )
    except Exception as error:
        raise CheckpointCorruptError(
            f"{path} cannot be read as a sharded checkpoint: {error}"
        ) from error
    lightning_meta = os.path.join(path, "meta.pt")
    if not os.path.exists(os.path.join(path, RECORD_FILE)) and os.path.exists(lightning_meta):
        # a Lightning strategy's sharded checkpoint: the rest of its dict is in meta.pt
        return {**torch_load(lightning_meta), **whole}
    saved = step_record(path)
    payload = {"fcb": saved["fcb"], **whole}
    payload.update({k: v for k, v in saved.items() if k not in ("fcb", "rng")})
    return payload

