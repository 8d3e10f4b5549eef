"""The `fcb` command line: its parser, and `main`, which runs a subcommand and turns every
error into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .._errors import (
    CheckpointError,
    ConfigError,
    MetricShapeError,
    MetricTypeError,
    MissingMetricError,
    StateDictError,
)
from ._common import CORRUPT_EXIT, USAGE_EXIT, UsageError, _fail

BROKEN_PIPE_EXIT = 141
"""A reader that closed the pipe (`fcb replay ... | head`): 128 + SIGPIPE, as a shell
utility ends, without a traceback."""


def _subcommand(name: str) -> Callable[[argparse.Namespace], int]:
    """`fcb.cli._<name>._<name>`, imported when it runs: each one imports what it needs
    (JAX, torch, orbax, matplotlib), and `fcb --help` none of it."""

    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"{__package__}._{name}")
        command: Callable[[argparse.Namespace], int] = getattr(module, f"_{name}")
        return command(args)

    return run


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage block) raised to `main`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


def _parser() -> _Parser:
    parser = _Parser(
        prog="fcb",
        description="Functional, pure-state training callbacks: demo, inspect, export, replay, "
        "plot.",
    )
    parser.add_argument("--version", action="version", version=f"fcb {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo", help="train a small model with early stopping and checkpoints",
        description="Train a small model on synthetic data with EarlyStopping, "
        "ModelCheckpoint, BestCheckpoint(tolerances) and ReduceLROnPlateau.",
    )
    demo.add_argument("--out", default=os.path.join("runs", "demo"),
                      help="run directory (default: runs/demo; a previous demo run is replaced)")
    demo.add_argument("--framework", choices=("torch", "jax"), default="torch")
    demo.add_argument("--epochs", type=int, default=100, help="maximum epochs (default: 100)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_subcommand("demo"))

    inspect = commands.add_parser(
        "inspect", help="list a run's checkpoints and check them against the manifest",
        description="Table of slots; every file is checked against the manifest (size and "
        "CRC-32 for Torch runs). Exits with 1 on any corruption.",
    )
    inspect.add_argument("run_dir", metavar="RUN_DIR")
    inspect.set_defaults(run=_subcommand("inspect"))

    export = commands.add_parser(
        "export", help="write one slot of a Torch run (sharded too) as a plain torch.save file",
        description="Reads the slot whole (every shard checked against the manifest) and "
        "writes it as one file that torch.load(..., weights_only=True) reads anywhere.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--slot", default=None,
                        help="the slot to export (default: the run's only best slot)")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write")
    export.set_defaults(run=_subcommand("export"))

    rep = commands.add_parser(
        "replay", help="replay EarlyStopping configurations over a recorded history",
        description="Run every combination of --patience and --min-delta over a recorded "
        "metric history (CSV with a header row, JSONL, or a run directory) at once.",
    )
    rep.add_argument("history", metavar="HISTORY")
    rep.add_argument("--study", default=None, metavar="NAME",
                     help="replay every trial of the Optuna study NAME; HISTORY is its storage "
                     "URL, e.g. sqlite:///study.db (use --monitor value)")
    rep.add_argument("--monitor", required=True, help="the metric to monitor, e.g. val_loss")
    rep.add_argument("--mode", choices=("min", "max"), default="min")
    rep.add_argument("--patience", default="1:30",
                     help="values: 1:50 (inclusive range), 1:50:5, or 1,2,5 (default: 1:30)")
    rep.add_argument("--min-delta", default="0", help="values, e.g. 0,1e-3,1e-2 (default: 0)")
    rep.add_argument("--steps", default=None,
                     help="the column holding step numbers (default: 'step' when present)")
    rep.add_argument("--sort", default=None,
                     choices=("best_value", "checks", "stop_step", "patience", "min_delta"))
    rep.add_argument("--rows", type=int, default=20, help="rows to show (0: all; default 20)")
    rep.add_argument("--plot", default=None, metavar="PNG", help="write a plot of the sweep")
    rep.set_defaults(run=_subcommand("replay"))

    plot = commands.add_parser(
        "plot", help="plot a run's monitored metric with best, tolerance and stop markers",
        description="Plot the monitored metric over steps from RUN/history.jsonl (or a "
        "history file: JSONL, or CSV such as Lightning's metrics.csv), with the best "
        "checkpoint, the tolerance checkpoints and the stop marked.",
    )
    plot.add_argument("run_dir", metavar="RUN",
                      help="a run directory recorded with history=True, or a history file")
    plot.add_argument("-o", "--output", required=True, metavar="PNG")
    plot.add_argument("--metric", default=None, help="default: the metric the callbacks monitor")
    plot.add_argument("--steps", default=None,
                      help="the column holding step numbers (default: 'step' when present; "
                      "for Lightning's metrics.csv, 'epoch' counts as fcb does by default)")
    plot.set_defaults(run=_subcommand("plot"))
    return parser


def _version() -> str:
    import fcb

    return fcb.__version__


_USER_ERRORS = (
    ConfigError,
    MissingMetricError,
    MetricTypeError,
    MetricShapeError,
    StateDictError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def main(
    argv: Sequence[str] | None = None, *, before_run: Callable[[], object] | None = None
) -> int:
    """Run the `fcb` command with `argv` (default: `sys.argv[1:]`); return the exit code.
    `before_run` is called once the command line is parsed, before the subcommand runs (not
    for `--help` or `--version`); its errors end the command as the subcommand's do.

    Errors print one line on stderr; a usage error returns 2:

    >>> from fcb.cli import main
    >>> main(["inspect", "no/such/run"])
    2
    >>> history = {"val_loss": [0.5, 0.4, 0.45, 0.41, 0.3]}
    >>> import csv, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "history.csv")
    >>> with open(path, "w", newline="") as f:
    ...     csv.writer(f).writerows([["val_loss"], *([v] for v in history["val_loss"])])
    >>> main([*f"replay {path} --monitor val_loss --patience 1:3".split()])
    replay: 3 configurations x 5 checks; best = lowest val_loss
    #  patience  min_delta  stop_step         reason  checks  best_step  best val_loss
    0         1          0          2       patience       3          1            0.4
    1         2          0          3       patience       4          1            0.4
    2         3          0        > 4  history ended       5          4            0.3
    <BLANKLINE>
    best val_loss: 0.3 at step 4 with patience=3, min_delta=0 (5 checks)
    trade-offs (fewer checks, or a better value):
      patience=1    min_delta=0            3 checks  best val_loss 0.4
      patience=3    min_delta=0            5 checks  best val_loss 0.3
    0
    """
    args: argparse.Namespace | None = None
    try:
        args = _parser().parse_args(argv)
        if before_run is not None:
            before_run()
        run: Callable[[argparse.Namespace], int] = args.run
        code = run(args)
        sys.stdout.flush()  # here, not at exit: a reader that has gone is handled below
        return code
    except UsageError as error:
        _fail(args, str(error), error.prog)
        return USAGE_EXIT
    except _USER_ERRORS as error:
        _fail(args, str(error))
        return USAGE_EXIT
    except CheckpointError as error:
        _fail(args, str(error))
        return CORRUPT_EXIT
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130
    except BrokenPipeError:
        # the reader is gone: send what is still buffered nowhere, so that neither this nor
        # the interpreter's flush at exit prints a traceback
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # stdout is no file (captured): nothing will flush it
            pass
        return BROKEN_PIPE_EXIT
