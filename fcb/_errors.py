"""Errors and warnings raised by fcb. Each message names the field or key, the value and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A callback was built with an invalid option."""


class MetricTypeError(TypeError):
    """A metric value is not a real number (a string, None, a tensor that needs `.detach()`...)."""


class MetricShapeError(ValueError):
    """A metric value is not a scalar."""


class MissingMetricError(KeyError):
    """A monitored metric is absent from the metrics of a check (strict callbacks only)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class StateDictError(ValueError):
    """A state dict cannot be loaded into this callback (other type, version, shape or dtype)."""


class ConfigChangedWarning(UserWarning):
    """A state dict was saved with a different config; the current config is used."""


class CheckpointError(RuntimeError):
    """Base class of the errors adapters raise about checkpoint files."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint or the manifest failed; the previous files are intact."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file or manifest does not match what was recorded (size, checksum, format)."""


class RunExistsError(CheckpointError):
    """The checkpoint directory holds a run that the adapter was not asked to resume or
    replace (`existing_run`); nothing was changed."""


class DirectoryInUseError(CheckpointError):
    """Another adapter (this process or another) is writing to the same checkpoint directory."""


_PUBLIC: tuple[type, ...] = (
    ConfigError,
    MetricTypeError,
    MetricShapeError,
    MissingMetricError,
    StateDictError,
    ConfigChangedWarning,
    CheckpointError,
    CheckpointWriteError,
    CheckpointCorruptError,
    DirectoryInUseError,
)
for _cls in _PUBLIC:
    _cls.__module__ = "fcb"  # shown as fcb.ConfigError in tracebacks: the public name
