"""fcb.orbax: apply fcb actions to JAX pytrees and equinox models, with orbax checkpoints.

Installed with `pip install fcb[jax]`.
"""

from ._adapter import (
    OrbaxAdapter as OrbaxAdapter,
    device_free_memory as device_free_memory,
)
from ._restore import restore as restore, restore_model as restore_model
from ._store import read_manifest as read_manifest

__all__ = ["OrbaxAdapter", "device_free_memory", "read_manifest", "restore", "restore_model"]
