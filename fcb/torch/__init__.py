"""fcb.torch: apply fcb actions to a Torch trainer or plain loop, with crash-safe checkpoints.

Installed with `pip install fcb[torch]`.
"""

from ._adapter import (
    TorchAdapter as TorchAdapter,
    Trainer as Trainer,
    load_checkpoint as load_checkpoint,
)
from ._load import export_checkpoint as export_checkpoint
from ._store import CheckpointStore as CheckpointStore, read_manifest as read_manifest

__all__ = [
    "CheckpointStore",
    "TorchAdapter",
    "Trainer",
    "export_checkpoint",
    "load_checkpoint",
    "read_manifest",
]
