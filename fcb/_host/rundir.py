"""Where a run keeps its files: RUN_DIR itself, or RUN_DIR/checkpoints (the Torch default).

The one lookup every reader uses (resume, `load_checkpoint`, `fcb inspect`, `fcb plot`,
`fcb replay`): a run directory is given as the directory holding `manifest.json`, or as the
trainer's root directory whose `checkpoints/` subdirectory holds it.
"""

from __future__ import annotations

import os

from .manifest import MANIFEST_NAME

HISTORY_NAME = "history.jsonl"
CHECKPOINTS_DIR = "checkpoints"


def _candidates(run_dir: str | os.PathLike[str]) -> tuple[str, str]:
    run_dir = os.fspath(run_dir)
    return run_dir, os.path.join(run_dir, CHECKPOINTS_DIR)


def find_run(run_dir: str | os.PathLike[str]) -> str | None:
    """The directory holding the run's manifest, or None when neither has one."""
    for candidate in _candidates(run_dir):
        if os.path.isfile(os.path.join(candidate, MANIFEST_NAME)):
            return candidate
    return None


def find_history(run_dir: str | os.PathLike[str]) -> str | None:
    """The history file of a run directory (or its `checkpoints/` subdirectory), if any."""
    for candidate in _candidates(run_dir):
        path = os.path.join(candidate, HISTORY_NAME)
        if os.path.isfile(path):
            return path
    return None
