"""Rank agreement for the Torch adapter under `torch.distributed` (DDP, FSDP, any backend).

Every rank runs the same pure callbacks on the same reduced metrics, so every rank makes the
same decisions; only rank 0 touches the checkpoint directory, and every rank learns of its
success or failure through one collective, so no rank waits forever for another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .._ranks import (
    ProcessGroup,
    key_fingerprint,
    keys_differ,
)


class Group(ProcessGroup):
    """The default process group when `torch.distributed` is initialised, else a no-op."""

    kind = "rank"

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.index = self.rank
        self.world_size = dist.get_world_size() if self.active else 1

    def _device(self) -> torch.device:
        # NCCL reduces only CUDA tensors; gloo and mpi take CPU tensors.
        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce_metrics(self, metrics: Mapping[str, Any], reduction: str | None) -> dict[str, Any]:
        """The metrics reduced over ranks (one collective); a key set that differs between
        ranks is an error on every rank, never a hang or a silent mix-up."""
        if not self.active or reduction is None or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        values = [float(metrics[k]) for k in keys]
        fingerprint = float(key_fingerprint(keys))
        # NaN and inf propagate through every reduction: a rank that sees NaN stops all.
        op = {
            "mean": dist.ReduceOp.SUM,
            "sum": dist.ReduceOp.SUM,
            "max": dist.ReduceOp.MAX,
            "min": dist.ReduceOp.MIN,
        }[reduction]
        data = torch.tensor(values, dtype=torch.float64, device=self._device())
        check = torch.tensor([fingerprint, -fingerprint], dtype=torch.float64, device=data.device)
        dist.all_reduce(data, op=op)
        dist.all_reduce(check, op=dist.ReduceOp.MAX)
        if check[0].item() != -check[1].item():
            raise keys_differ("TorchAdapter", keys)
        if reduction == "mean":
            data /= self.world_size
        return dict(zip(keys, data.tolist(), strict=True))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_text(self, text: str | None) -> list[str | None]:
        messages: list[Any] = [None] * self.world_size
        dist.all_gather_object(messages, text)
        return messages

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
