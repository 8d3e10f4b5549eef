"""`python -m fcb.cli` and the installed `fcb` command: JAX's persistent compilation cache
on (`fcb.enable_compile_cache`; `FCB_COMPILE_CACHE=0` turns it off), then the subcommand."""

import sys
from collections.abc import Sequence

from fcb.cli import main as run


def _enable_compile_cache() -> None:
    from fcb._compile_cache import enable_compile_cache  # imports JAX: not for --help

    enable_compile_cache()


def main(argv: Sequence[str] | None = None) -> int:
    """The `fcb` command: `fcb.cli.main` with compiled programs kept on disk (a bad
    `FCB_COMPILE_CACHE` is a usage error: one line, exit code 2)."""
    return run(argv, before_run=_enable_compile_cache)


if __name__ == "__main__":
    sys.exit(main())
