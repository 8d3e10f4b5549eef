"""What fcb checks of a Lightning Trainer: its strategy's checkpoints, where a checkpoint's
entries come from (for messages)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from ._errors import ConfigError

_ENTRIES = {
    "hyper_parameters": "the LightningModule's save_hyperparameters()",
    "datamodule_hyper_parameters": "the LightningDataModule's save_hyperparameters()",
    "state_dict": "the LightningModule's state_dict()",
    "callbacks": "a callback's state_dict()",
    "optimizer_states": "an optimizer's state_dict()",
    "lr_schedulers": "a scheduler's state_dict()",
}


def sharded_strategy(owner: str, trainer: Any) -> str | None:
    """The name of the Trainer's strategy when it saves sharded checkpoints (a directory of
    DCP shards written by every rank, `meta.pt` beside them), None for a strategy that
    saves one file; a sharded strategy set to gather the whole model is a `ConfigError`."""
    strategy = getattr(trainer, "strategy", None)
    model_parallel = getattr(pl.strategies, "ModelParallelStrategy", None)
    if model_parallel is not None and isinstance(strategy, model_parallel):
        if not getattr(strategy, "_save_distributed_checkpoint", True):
            raise ConfigError(
                f"{owner}: ModelParallelStrategy(save_distributed_checkpoint=False) gathers "
                f"the whole model on rank 0 for each checkpoint; fcb saves sharded models "
                f"sharded (every rank writes its shards; fcb.torch.load_checkpoint and `fcb "
                f"export` read a step whole in one process). Pass "
                f"save_distributed_checkpoint=True (the default)."
            )
        return type(strategy).__name__
    fsdp = getattr(pl.strategies, "FSDPStrategy", None)
    if fsdp is not None and isinstance(strategy, fsdp):
        kind = getattr(strategy, "_state_dict_type", "sharded")
        if kind != "sharded":
            raise ConfigError(
                f"{owner}: FSDPStrategy(state_dict_type={kind!r}) gathers the whole model on "
                f"rank 0 for each checkpoint; fcb saves sharded models sharded (every rank "
                f"writes its shards; fcb.torch.load_checkpoint and `fcb export` read a step "
                f"whole in one process). Pass FSDPStrategy(state_dict_type='sharded')."
            )
        return f"{type(strategy).__name__}(state_dict_type='sharded')"
    return None


def describe(entry: str, path: str) -> str:
    """Where a value of a Lightning checkpoint comes from, for messages."""
    where = _ENTRIES.get(entry, "added by an on_save_checkpoint hook")
    return f"checkpoint[{entry!r}]{path} ({where})"
