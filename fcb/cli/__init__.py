"""The `fcb` command: `demo`, `inspect`, `replay` and `plot`.

Every user mistake ends in one line on stderr (`fcb <command>: error: ...`) and exit code 2;
a corrupt checkpoint found by `inspect` exits with 1. Torch, orbax and matplotlib are imported
only by the subcommands that need them.
"""

from ._common import UsageError as UsageError
from ._parser import main as main

__all__ = ["UsageError", "main"]
