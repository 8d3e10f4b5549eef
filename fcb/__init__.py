"""fcb: functional, pure-state training callbacks for JAX and PyTorch."""

import importlib.metadata

from . import _monitor as monitor
from ._best_checkpoint import (
    BestCheckpoint as BestCheckpoint,
    BestCheckpointState as BestCheckpointState,
)
from ._chain import (
    Chain as Chain,
    NamedChain as NamedChain,
    chain as chain,
    named_chain as named_chain,
)
from ._compile_cache import enable_compile_cache as enable_compile_cache
from ._core import (
    NO_STEP as NO_STEP,
    ActionNames as ActionNames,
    Actions as Actions,
    Callback as Callback,
    Metrics as Metrics,
    StopReason as StopReason,
    merge_actions as merge_actions,
    scaled_lr as scaled_lr,
)
from ._early_stopping import (
    EarlyStopping as EarlyStopping,
    EarlyStoppingState as EarlyStoppingState,
)
from ._errors import (
    CheckpointCorruptError as CheckpointCorruptError,
    CheckpointError as CheckpointError,
    CheckpointWriteError as CheckpointWriteError,
    ConfigChangedWarning as ConfigChangedWarning,
    ConfigError as ConfigError,
    DirectoryInUseError as DirectoryInUseError,
    MetricShapeError as MetricShapeError,
    MetricTypeError as MetricTypeError,
    MissingMetricError as MissingMetricError,
    StateDictError as StateDictError,
)
from ._grid import Grid as Grid, grid as grid
from ._model_checkpoint import (
    ModelCheckpoint as ModelCheckpoint,
    ModelCheckpointState as ModelCheckpointState,
)
from ._monitor import Outcome as Outcome
from ._reduce_lr_on_plateau import (
    ReduceLROnPlateau as ReduceLROnPlateau,
    ReduceLROnPlateauState as ReduceLROnPlateauState,
)
from ._replay import replay as replay
from ._replay_result import ReplayResult as ReplayResult
from ._runner import Runner as Runner
from ._state_dict import load_state_dict as load_state_dict, state_dict as state_dict
from ._terminate_on_nan import (
    TerminateOnNaN as TerminateOnNaN,
    TerminateOnNaNState as TerminateOnNaNState,
)
from ._vram_drift import VRAMDrift as VRAMDrift, VRAMDriftState as VRAMDriftState

try:
    __version__ = importlib.metadata.version("fcb")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "NO_STEP",
    "ActionNames",
    "Actions",
    "BestCheckpoint",
    "BestCheckpointState",
    "Callback",
    "Chain",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigChangedWarning",
    "ConfigError",
    "DirectoryInUseError",
    "EarlyStopping",
    "EarlyStoppingState",
    "Grid",
    "MetricShapeError",
    "MetricTypeError",
    "Metrics",
    "MissingMetricError",
    "ModelCheckpoint",
    "ModelCheckpointState",
    "NamedChain",
    "Outcome",
    "ReduceLROnPlateau",
    "ReduceLROnPlateauState",
    "ReplayResult",
    "Runner",
    "StateDictError",
    "StopReason",
    "TerminateOnNaN",
    "TerminateOnNaNState",
    "VRAMDrift",
    "VRAMDriftState",
    "chain",
    "enable_compile_cache",
    "grid",
    "load_state_dict",
    "merge_actions",
    "monitor",
    "named_chain",
    "replay",
    "scaled_lr",
    "state_dict",
]
