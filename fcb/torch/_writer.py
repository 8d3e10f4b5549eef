"""The Torch adapter's background writer and the host copies it writes."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import torch


def host_copy(obj: Any, copy_tensor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of a state dict whose tensors live in host memory and share nothing.

    Mappings keep their type and a module state dict its `_metadata` (the module versions
    `load_state_dict` migrates by), so a background write saves what a direct one does.
    `copy_tensor` makes the tensors' copies (default: new host tensors).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True) if copy_tensor is None else copy_tensor(obj)
    if isinstance(obj, dict):
        kind = OrderedDict if isinstance(obj, OrderedDict) else dict
        copied = kind((k, host_copy(v, copy_tensor)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            copied._metadata = deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, copy_tensor) for v in obj)
    return obj


_REUSED_BYTES = 1 << 20
"""Host copies at least this large are reused from one background write to the next."""

_Lent = list[tuple[tuple[Any, ...], torch.Tensor]]


class BackgroundWriter:
    """Runs store jobs in order on one thread; the first error is kept and re-raised.

    It also makes the host copies the jobs write. The memory of a large copy is reused once
    the job that wrote it is done: fresh memory for a large state costs page faults, often
    more than the copy itself, and the training loop waits for the copies.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], _Lent] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self._spare: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._spare_lock = threading.Lock()
        self._lent: _Lent = []  # copies made for the job about to be submitted
        self._thread = threading.Thread(target=self._run, name="fcb-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, lent = item
            try:
                if self.error is None:
                    job()
            except BaseException as error:  # surfaced at the next event and at fit end
                self.error = error
            finally:
                self._give_back(lent)
                self._jobs.task_done()
        self._jobs.task_done()

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` for the next submitted job, in reused memory if possible."""
        tensor = tensor.detach()
        if (
            type(tensor) is not torch.Tensor
            or tensor.layout != torch.strided
            or tensor.is_quantized
            or tensor.numel() * tensor.element_size() < _REUSED_BYTES
        ):
            return tensor.to("cpu", copy=True)
        key = (tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        with self._spare_lock:
            spares = self._spare.get(key)
            buffer = spares.pop() if spares else None
        if buffer is None:
            buffer = torch.empty_like(tensor, device="cpu")
        buffer.copy_(tensor)
        self._lent.append((key, buffer))
        return buffer

    def _give_back(self, lent: _Lent) -> None:
        with self._spare_lock:
            for key, buffer in lent:
                spares = self._spare.setdefault(key, [])
                if len(spares) < 4:  # at most as many as writes can be in flight
                    spares.append(buffer)

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`; the host copies made since the last submit are its to write."""
        lent, self._lent = self._lent, []
        self._jobs.put((job, lent))

    def wait(self) -> None:
        self._jobs.join()

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join()
