"""fcb: functional, pure-state training callbacks for JAX and PyTorch.

The public names are imported on first use (PEP 562), so that `import fcb.cli` (the `fcb`
command's `--help` and `--version`) does not pay for importing JAX.
"""

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from ._combinators import (
        AllOf as AllOf,
        AllOfState as AllOfState,
        all_of as all_of,
        any_of as any_of,
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
        stop_message as stop_message,
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
        RunExistsError as RunExistsError,
        StateDictError as StateDictError,
    )
    from ._grid import Grid as Grid, grid as grid
    from ._host.evaluation import EvaluatedSlot as EvaluatedSlot
    from ._in_memory_slot import InMemorySlot as InMemorySlot
    from ._model_checkpoint import (
        ModelCheckpoint as ModelCheckpoint,
        ModelCheckpointState as ModelCheckpointState,
    )
    from ._monitor import Outcome as Outcome
    from ._packed import Packed as Packed, packed as packed
    from ._reduce_lr_on_plateau import (
        ReduceLROnPlateau as ReduceLROnPlateau,
        ReduceLROnPlateauState as ReduceLROnPlateauState,
    )
    from ._replay import replay as replay
    from ._replay_result import ReplayResult as ReplayResult
    from ._resume_change import (
        ResumeReport as ResumeReport,
        resume_with_changes as resume_with_changes,
    )
    from ._runner import Runner as Runner
    from ._state_dict import load_state_dict as load_state_dict, state_dict as state_dict
    from ._terminate_on_nan import (
        TerminateOnNaN as TerminateOnNaN,
        TerminateOnNaNState as TerminateOnNaNState,
    )
    from ._time_limit import TimeLimit as TimeLimit, TimeLimitState as TimeLimitState
    from ._vram_drift import VRAMDrift as VRAMDrift, VRAMDriftState as VRAMDriftState

_PUBLIC_MODULES = {
    "stop_message": "._core",
    "monitor": "._monitor",
    "BestCheckpoint": "._best_checkpoint",
    "BestCheckpointState": "._best_checkpoint",
    "Chain": "._chain",
    "NamedChain": "._chain",
    "chain": "._chain",
    "named_chain": "._chain",
    "AllOf": "._combinators",
    "AllOfState": "._combinators",
    "all_of": "._combinators",
    "any_of": "._combinators",
    "enable_compile_cache": "._compile_cache",
    "EvaluatedSlot": "._host.evaluation",
    "NO_STEP": "._core",
    "ActionNames": "._core",
    "Actions": "._core",
    "Callback": "._core",
    "Metrics": "._core",
    "StopReason": "._core",
    "merge_actions": "._core",
    "scaled_lr": "._core",
    "EarlyStopping": "._early_stopping",
    "EarlyStoppingState": "._early_stopping",
    "CheckpointCorruptError": "._errors",
    "CheckpointError": "._errors",
    "CheckpointWriteError": "._errors",
    "ConfigChangedWarning": "._errors",
    "ConfigError": "._errors",
    "DirectoryInUseError": "._errors",
    "RunExistsError": "._errors",
    "MetricShapeError": "._errors",
    "MetricTypeError": "._errors",
    "MissingMetricError": "._errors",
    "StateDictError": "._errors",
    "Grid": "._grid",
    "grid": "._grid",
    "ModelCheckpoint": "._model_checkpoint",
    "ModelCheckpointState": "._model_checkpoint",
    "Outcome": "._monitor",
    "InMemorySlot": "._in_memory_slot",
    "Packed": "._packed",
    "packed": "._packed",
    "ReduceLROnPlateau": "._reduce_lr_on_plateau",
    "ReduceLROnPlateauState": "._reduce_lr_on_plateau",
    "replay": "._replay",
    "ReplayResult": "._replay_result",
    "ResumeReport": "._resume_change",
    "resume_with_changes": "._resume_change",
    "Runner": "._runner",
    "load_state_dict": "._state_dict",
    "state_dict": "._state_dict",
    "TerminateOnNaN": "._terminate_on_nan",
    "TerminateOnNaNState": "._terminate_on_nan",
    "TimeLimit": "._time_limit",
    "TimeLimitState": "._time_limit",
    "VRAMDrift": "._vram_drift",
    "VRAMDriftState": "._vram_drift",
}
"""Each public name -> the private module defining it (`monitor` is the module itself)."""


def __getattr__(name: str) -> Any:
    module_name = _PUBLIC_MODULES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fcb' has no attribute {name!r}")
    module = importlib.import_module(module_name, __name__)
    value = module if name == "monitor" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC_MODULES})


try:
    __version__ = importlib.metadata.version("fcb")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "NO_STEP",
    "ActionNames",
    "Actions",
    "AllOf",
    "AllOfState",
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
    "EvaluatedSlot",
    "Grid",
    "InMemorySlot",
    "MetricShapeError",
    "MetricTypeError",
    "Metrics",
    "MissingMetricError",
    "ModelCheckpoint",
    "ModelCheckpointState",
    "NamedChain",
    "Outcome",
    "Packed",
    "ReduceLROnPlateau",
    "ReduceLROnPlateauState",
    "ReplayResult",
    "ResumeReport",
    "RunExistsError",
    "Runner",
    "StateDictError",
    "StopReason",
    "TerminateOnNaN",
    "TerminateOnNaNState",
    "TimeLimit",
    "TimeLimitState",
    "VRAMDrift",
    "VRAMDriftState",
    "all_of",
    "any_of",
    "chain",
    "enable_compile_cache",
    "grid",
    "load_state_dict",
    "merge_actions",
    "monitor",
    "named_chain",
    "packed",
    "replay",
    "resume_with_changes",
    "scaled_lr",
    "state_dict",
    "stop_message",
]
