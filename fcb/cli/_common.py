"""What every `fcb` subcommand shares: the usage error and exit codes, the one-line error
message, tables and value formatting, finding and reading a run's manifest, and the progress
bar."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

# The host layer imports JAX (through the core): the functions that read a run import it,
# so that `fcb --help` and `fcb --version` stay fast.

USAGE_EXIT = 2
CORRUPT_EXIT = 1


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line, exit code 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


_LIBRARY_PREFIX = re.compile(r"^fcb\.[\w.]+: ")
"""The library's own prefix on its errors ("fcb.replay: "): the command names itself."""


def _fail(args: argparse.Namespace | None, message: str, prog: str | None = None) -> None:
    command = getattr(args, "command", None)
    prog = prog or (f"fcb {command}" if command else "fcb")
    message = _LIBRARY_PREFIX.sub("", " ".join(message.split()))
    print(f"{prog}: error: {message}", file=sys.stderr)


def _missing(path: str, what: str) -> UsageError:
    """The one wording of a path that does not exist, for every subcommand."""
    return UsageError(f"{path} does not exist; pass {what}.")


# -- tables and values -----------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _value(value: Any) -> str:
    if isinstance(value, str):  # non-finite numbers are spelled out in manifests
        return value
    if value is None:
        return "-"
    return f"{float(value):.5g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _by_tolerance(slots: Iterable[str]) -> list[str]:
    """Tolerance slot names (`best_model.tolerance=3`) in order of their tolerance."""
    return sorted(slots, key=lambda s: int(s.rsplit("=", 1)[1]))


def _kind(slot: Mapping[str, Any]) -> str:
    """What a manifest's slot holds: its recorded kind ("best", "top_k", "last",
    "tolerance"); manifests written before kinds were recorded hold no kind."""
    return str(slot.get("kind", ""))


# -- run directories -------------------------------------------------------------------------


def _recorded_metrics(rows: Sequence[Mapping[str, Any]], steps: str | None = None) -> list[str]:
    """The keys of a history's rows that hold a number at some check, in order; the step
    and epoch counters are not metrics."""
    counters = {"step", "epoch", steps}
    found: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in counters and key not in found and _is_number(value):
                found[key] = None
    return list(found)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _not_a_history(path: str, why: str) -> str:
    return (
        f"{path} is not a metric history ({why}): pass a CSV with a header row of metric "
        f"names (e.g. Lightning's metrics.csv), a JSONL history (history.jsonl), or a run "
        f"directory recorded with history=True."
    )


def _install_hint(extra: str) -> str:
    """How to install an extra: from PyPI, and with the checkout's constraints when fcb runs
    from a source tree that has them."""
    command = f"pip install 'fcb[{extra}]'"
    constraints = os.path.join(os.path.dirname(__file__), "..", "..", "constraints.txt")
    if os.path.isfile(constraints):
        pinned = os.path.normpath(constraints)
        command += f" (in this checkout: pip install -c {pinned} -e '.[{extra}]')"
    return command


def _find_manifest(run_dir: str) -> str:
    """The directory holding a run's manifest: RUN_DIR or RUN_DIR/checkpoints."""
    from .._host.rundir import MANIFEST_NAME, find_run

    if not os.path.exists(run_dir):
        raise _missing(run_dir, "a run directory")
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is not a directory; pass a run directory.")
    found = find_run(run_dir)
    if found is not None:
        return found
    raise UsageError(
        f"{run_dir} has no {MANIFEST_NAME} (nor checkpoints/{MANIFEST_NAME}): not an fcb run "
        f"directory, or no checkpoint was written yet."
    )


def _storage(directory: str) -> str:
    from .._host.manifest import MANIFEST_NAME

    try:
        with open(os.path.join(directory, MANIFEST_NAME), "rb") as f:
            raw = json.loads(f.read())
    except (OSError, ValueError):
        return "torch"  # read_manifest reports what is wrong with it
    return str(raw.get("storage", "torch")) if isinstance(raw, dict) else "torch"


def _read_manifest(directory: str, storage: str) -> dict[str, Any]:
    from .._host.manifest import read_manifest

    return read_manifest(directory, storage=storage)


def _monitor_of(config: Any) -> tuple[str, str] | None:
    """The first (metric, mode) a state dict's recorded config monitors."""
    if isinstance(config, Mapping):
        key = config.get("monitor", config.get("metric_key"))
        if isinstance(key, str) and config.get("mode") in ("min", "max"):
            return key, str(config["mode"])
        for value in config.values():
            found = _monitor_of(value)
            if found:
                return found
    elif isinstance(config, list):
        for value in config:
            found = _monitor_of(value)
            if found:
                return found
    return None


# -- progress --------------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on a terminal; a line every 10 checks otherwise. Epochs count
    from 0, as the steps of the run's checks do (`fcb inspect`, `fcb plot`): the last of
    `total` epochs is `total - 1`."""

    def __init__(self, total: int, stream: IO[str], enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.tty = enabled and stream.isatty()
        self.width = 0

    def update(self, epoch: int, text: str) -> None:
        if not self.enabled:
            return
        done, last = epoch + 1, self.total - 1
        if self.tty:
            filled = round(24 * done / self.total)
            line = f"\repoch {epoch:>3} of 0-{last} [{'#' * filled}{'.' * (24 - filled)}] {text}"
            self.width = max(self.width, len(line))
            self.stream.write(line.ljust(self.width))
            self.stream.flush()
        elif done % 10 == 0 or done == self.total:
            self.stream.write(f"epoch {epoch:>3} of 0-{last}  {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
