"""`fcb export`: one slot of a Torch run (single-file or sharded) as a plain `torch.save`
file, read whole and checked against the manifest."""

from __future__ import annotations

import argparse
import os

from ._common import UsageError, _find_manifest, _install_hint, _read_manifest, _storage


def _export(args: argparse.Namespace) -> int:
    directory = _find_manifest(args.run_dir)
    storage = _storage(directory)
    if storage != "torch":
        raise UsageError(
            f"{directory} holds a run written by fcb.{storage}; `fcb export` writes Torch "
            f"checkpoints (restore an orbax run with fcb.orbax)."
        )
    try:
        from ..torch import export_checkpoint
    except ImportError as error:
        raise UsageError(f"exporting needs torch ({error}): {_install_hint('torch')}.") from None
    slots = _read_manifest(directory, storage)["slots"]
    name = args.slot
    if name is None:
        best = sorted(n for n, s in slots.items() if s.get("kind", "best") == "best")
        if len(best) != 1:
            raise UsageError(
                f"{directory} has {len(best)} best slots ({', '.join(best) or 'none'}); pick "
                f"one with --slot NAME (slots: {', '.join(sorted(slots)) or 'none'})."
            )
        name = best[0]
    slot = slots.get(name) or next((s for s in slots.values() if s.get("link") == name), None)
    if slot is None:
        raise UsageError(
            f"{directory} has no slot {name!r}; its slots: {', '.join(sorted(slots)) or 'none'}."
        )
    out = export_checkpoint(os.path.join(directory, slot.get("link", slot["file"])), args.output)
    print(f"exported slot {name} (step {slot['step']}) of {directory} to {out}")
    return 0
