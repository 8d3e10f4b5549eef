"""B5: bytes written over a 50-epoch run: one write per step, however many slots hold it.

A small Torch regression model is trained for 50 epochs (seeded, so every run sees the same
validation losses: new bests at epochs 0-5, a long plateau, new bests again from epoch 36).
The same run is checkpointed by `fcb.torch.TorchAdapter` with:

- `BestCheckpoint(tolerances=(2, 5, 10))` + `ModelCheckpoint(save_top_k=0, save_last=True)`:
  3 tolerance slots + best + last;
- `BestCheckpoint()` + `ModelCheckpoint(save_top_k=0, save_last=True)`: best + last;
- `BestCheckpoint(tolerances=(2, 5, 10))` and `BestCheckpoint()` alone (no `last`).

Bytes are counted by the store (`CheckpointStore.bytes_written`: checkpoint files only; the
manifest and hard links are not counted). The one-file-per-slot scheme (what noether does:
each slot is its own file, written again whenever the slot takes a new step) is counted on
the same slot decisions: each time a slot takes the current step it writes that step's whole
checkpoint (the size of fcb's file for the step).

Run: python benchmarks/b5_bytes_written.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, cli

import fcb
import fcb.torch

TOLERANCES = (2, 5, 10)


def data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 32, generator=generator)
    w = torch.randn(32, 1, generator=generator)
    y = 3 * torch.tanh(x @ w) + 0.5 * torch.randn(512, 1, generator=generator)
    return (x[:256], y[:256]), (x[256:], y[256:])


def chain(tolerances: tuple[int, ...], last: bool) -> fcb.Callback:
    best = fcb.BestCheckpoint("val_loss", tolerances=tolerances)
    if not last:
        return best
    return fcb.chain(best, fcb.ModelCheckpoint("val_loss", save_top_k=0, save_last=True))


def train(callbacks: fcb.Callback, epochs: int, hidden: int) -> dict[str, Any]:
    """Train with fcb checkpointing; return the bytes and files written and the decisions."""
    (x, y), (x_val, y_val) = data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    with tempfile.TemporaryDirectory(prefix="fcb-b5-") as directory:
        adapter = fcb.torch.TorchAdapter(
            callbacks, model=model, optimizer=optimizer, dirpath=directory
        )
        adapter.on_fit_start()
        assert adapter.store is not None
        store = adapter.store
        slot_steps: list[dict[str, int]] = []
        payload_sizes: list[int] = []
        for epoch in range(epochs):
            order = torch.randperm(256, generator=torch.Generator().manual_seed(epoch))
            for batch in order.split(32):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
                optimizer.step()
            with torch.no_grad():
                val_loss = torch.nn.functional.mse_loss(model(x_val), y_val)
            before = store.bytes_written
            actions = adapter.on_validation_end({"val_loss": val_loss}, step=epoch)
            slot_steps.append({name: int(step) for name, step in actions.slots.items()})
            payload_sizes.append(store.bytes_written - before)
        adapter.on_fit_end()
        return {
            "bytes": store.bytes_written,
            "files": store.files_written,
            "slots": slot_steps,
            "sizes": payload_sizes,
        }


def one_file_per_slot(slot_steps: list[dict[str, int]], sizes: list[int]) -> tuple[int, int]:
    """Bytes and files a one-file-per-slot store writes for the same decisions."""
    written, files = 0, 0
    held: dict[str, int] = {}
    for step, slots in enumerate(slot_steps):
        for name, slot_step in slots.items():
            if slot_step == step and held.get(name) != step:
                written += sizes[step]
                files += 1
            held[name] = slot_step
    return written, files


def same_writes(ours: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """The same files written, give or take the callbacks' state each file embeds."""
    return ours["files"] == baseline["files"] and ours["bytes"] <= 1.01 * baseline["bytes"]


def extra(ours: dict[str, Any], baseline: dict[str, Any]) -> str:
    difference = (ours["bytes"] - baseline["bytes"]) / max(ours["files"], 1)
    return (
        f"same files written; {difference:.0f} more bytes per file: the tolerance slots' "
        "bookkeeping in the callbacks state each checkpoint embeds"
    )


def run(quick: bool = False) -> list[Row]:
    epochs, hidden = (8, 16) if quick else (50, 256)
    full = train(chain(TOLERANCES, last=True), epochs, hidden)
    best_last = train(chain((), last=True), epochs, hidden)
    tolerances_only = train(chain(TOLERANCES, last=False), epochs, hidden)
    best_only = train(chain((), last=False), epochs, hidden)
    step_size = max(full["sizes"])  # one checkpoint: model, optimizer, RNG, callbacks
    per_slot_bytes, per_slot_files = one_file_per_slot(full["slots"], full["sizes"])
    megabytes = 1e6

    def size(result: dict[str, Any]) -> str:
        return f"{result['bytes'] / megabytes:.2f} MB ({result['files']} files)"

    rows = [
        Row(
            id="B5",
            what=f"bytes written, {epochs} epochs: {len(TOLERANCES)} tolerances + best + last, "
            "against best + last",
            fcb=size(full),
            peer=size(best_last),
            ratio=full["bytes"] / best_last["bytes"],
            target="1.0x",
            met=same_writes(full, best_last),
            note=f"one step file is {step_size / megabytes:.2f} MB; {extra(full, best_last)}",
        ),
        Row(
            id="B5a",
            what=f"bytes written, {epochs} epochs: {len(TOLERANCES)} tolerances + best, "
            "against best only",
            fcb=size(tolerances_only),
            peer=size(best_only),
            ratio=tolerances_only["bytes"] / best_only["bytes"],
            target="1.0x",
            met=same_writes(tolerances_only, best_only),
            note=extra(tolerances_only, best_only),
        ),
        Row(
            id="B5b",
            what=f"bytes written, {epochs} epochs: {len(TOLERANCES)} tolerances + best + last, "
            "against one file per slot (noether's scheme, same decisions)",
            fcb=size(full),
            peer=f"{per_slot_bytes / megabytes:.2f} MB ({per_slot_files} files)",
            ratio=full["bytes"] / per_slot_bytes,
            target="",
            met=None,
        ),
        Row(
            id="B5c",
            what=f"bytes written, {epochs} epochs: {len(TOLERANCES)} tolerances + best + last, "
            "against best only (the difference is `last`, written at every epoch)",
            fcb=size(full),
            peer=size(best_only),
            ratio=full["bytes"] / best_only["bytes"],
            target="",
            met=None,
        ),
    ]
    return rows


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
