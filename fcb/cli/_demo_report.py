"""What `fcb demo` prints: its settings, the summary of its run, and what an interrupted demo
kept."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import IO, Any

from .._host.rundir import HISTORY_NAME
from ._common import _by_tolerance, _read_manifest, _size, _table, _value

DEMO_SIZES = {"train": 256, "val": 1024, "features": 20, "hidden": 256, "batch": 32}
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "early_stopping": {"patience": 10, "min_delta": 1e-3},
    "model_checkpoint": {"save_top_k": 2, "save_last": True},
    "best_checkpoint": {"tolerances": (3, 6)},
    "reduce_lr_on_plateau": {"factor": 0.5, "patience": 4},
}
"""The demo's callbacks' options (all monitor val_loss, lower is better), printed with
its summary."""


def _settings_line() -> str:
    def options(name: str) -> str:
        return ", ".join(
            f"{k}={', '.join(map(str, v)) if isinstance(v, tuple) else f'{v:g}'}"
            if not isinstance(v, bool) else k
            for k, v in DEMO_SETTINGS[name].items()
        )

    return (
        f"  callbacks on val_loss: EarlyStopping({options('early_stopping')}), "
        f"ReduceLROnPlateau({options('reduce_lr_on_plateau')}), "
        f"ModelCheckpoint({options('model_checkpoint')}), "
        f"BestCheckpoint({options('best_checkpoint')})"
    )


def _kept(out: str, framework: str) -> str:
    """What an interrupted demo leaves in `out`."""
    try:
        manifest = _read_manifest(out, "orbax" if framework == "jax" else "torch")
    except Exception:  # nothing committed yet, or a commit cut short: say so, do not fail
        return f"no checkpoint was committed in {out} (the previous demo run there is gone)."
    slots = ", ".join(
        f"{name} (epoch {slot['step']})" for name, slot in sorted(manifest["slots"].items())
    )
    return (
        f"{out} keeps the checkpoints committed before the interrupt: {slots}; see "
        f"fcb inspect {out}."
    )


def _slot_rows(directory: str, manifest: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, slot in sorted(manifest["slots"].items(), key=lambda item: item[0]):
        shown = slot.get("link") or slot["file"]
        rows.append([name, str(slot["step"]), _value(slot.get("value")),
                     os.path.join(directory, shown)])
    return rows


def _demo_summary(
    out: IO[str], directory: str, framework: str, report: Mapping[str, Any], elapsed: float
) -> None:
    storage = "orbax" if framework == "jax" else "torch"
    manifest = _read_manifest(directory, storage)
    last = report["last_step"]
    print(f"fcb demo ({framework}): {report['model']}", file=out)
    print(
        f"  data: {DEMO_SIZES['train']} training and {DEMO_SIZES['val']} validation samples "
        f"(synthetic, seeded); epochs count from 0, as the run's steps do",
        file=out,
    )
    print(_settings_line(), file=out)
    if report["stop"]:
        print(f"stopped after epoch {last}: {report['stop']}", file=out)
    else:
        print(f"trained all {report['checks']} epochs without stopping", file=out)
    line = f"{report['checks']} checks in {elapsed:.1f} s"
    if report["written"]:
        files, size = report["written"]
        line += f"; {files} checkpoint files written ({_size(size)}), {len(manifest['files'])} kept"
    else:
        line += f"; {len(manifest['files'])} checkpointed steps kept"
    print(line, file=out)
    first_lr, last_lr = report["lr"]
    if not math.isclose(last_lr, first_lr, rel_tol=1e-6):
        print(f"learning rate {first_lr:g} -> {last_lr:.3g} (ReduceLROnPlateau)", file=out)
    print("", file=out)
    print(_table(["slot", "epoch", "val_loss", "file"], _slot_rows(directory, manifest), {1, 2}),
          file=out)
    summary = report["summary"]
    tolerances = _by_tolerance({k.split("/")[0] for k in summary if ".tolerance=" in k})
    if tolerances:
        print("", file=out)
    tolerance_delta = DEMO_SETTINGS["best_checkpoint"].get("min_delta", 0.0)
    for slot in tolerances:
        t = slot.rsplit("=", 1)[1]
        stopped = summary.get(f"{slot}/stopped_step", -1.0)
        kept = int(summary.get(f"{slot}/best_step", -1.0))
        when = f"have stopped after epoch {int(stopped)}" if stopped >= 0 else "not have stopped"
        same = " (the epoch this run stopped at)" if report["stop"] and stopped == last else ""
        print(
            f"EarlyStopping(patience={t}, min_delta={tolerance_delta:g}) would {when}{same}, "
            f"keeping epoch {kept} (val_loss {_value(summary.get(f'{slot}/best_value'))}): "
            f"slot {slot}",
            file=out,
        )
    print("", file=out)
    print("next:", file=out)
    print(f"  fcb inspect {directory}", file=out)
    print(f"  fcb plot {directory} -o demo.png", file=out)
    print(
        f"  fcb replay {os.path.join(directory, HISTORY_NAME)} --monitor val_loss "
        f"--patience 1:30 --min-delta 0,1e-3 --plot replay.png",
        file=out,
    )
