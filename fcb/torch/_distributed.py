"""The collectives of `torch.distributed` (DDP, FSDP, any backend) for fcb's process rules.

Every rule over the ranks (metric reduction, stop agreement, error agreement) lives in
`fcb._host.processes`; this module only moves words between ranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .._host.processes import ProcessGroup


class TorchCollectives:
    """All-gather and barrier over the default process group (a no-op when it is not
    initialised)."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.count = dist.get_world_size() if self.active else 1
        self.index = dist.get_rank() if self.active else 0

    def _device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo and mpi take CPU tensors.
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_words(self, words: np.ndarray) -> np.ndarray:
        # int64 carries every uint32 exactly, on every backend
        local = torch.from_numpy(np.asarray(words, np.uint32).astype(np.int64)).to(self._device())
        rows = [torch.empty_like(local) for _ in range(self.count)]
        dist.all_gather(rows, local)
        return torch.stack(rows).cpu().numpy().astype(np.uint32)

    def barrier(self, name: str) -> None:
        del name
        dist.barrier()


def ranks() -> ProcessGroup:
    """The ranks of the run, as `torch.distributed` sees them now."""
    return ProcessGroup(TorchCollectives(), kind="rank")
