"""B6: how long the training loop is blocked per save, background writer against synchronous.

Two `fcb.torch.TorchAdapter`s checkpoint the same model and optimizer (about 100 MB of
tensors: a 12.6 M-parameter MLP and its SGD momentum) with `ModelCheckpoint(save_last=True)`,
so every event writes a step file (atomic: temporary file, fsync, rename, manifest). One writes
synchronously; the other with `background=True`, where the event copies the state to host
memory and queues the write. The time measured is the `on_validation_end` call: what the
training loop waits for. Between two events the background writer is allowed to finish
(`adapter.wait()`, not timed), as it would while the next epoch trains; a loop that saves
faster than the disk writes waits for the queue instead.

Run: python benchmarks/b6_background.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, cli, interleaved, median, ms, ratios, spread, timed

import fcb
import fcb.torch


def model_and_optimizer(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for parameter in model.parameters():  # momentum buffers exist after the first step
        optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return model, optimizer


class Saver:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, background: bool):
        self.directory = tempfile.TemporaryDirectory(prefix="fcb-b6-")
        self.adapter = fcb.torch.TorchAdapter(
            fcb.ModelCheckpoint("val_loss", save_top_k=0, save_last=True),
            model=model,
            optimizer=optimizer,
            dirpath=self.directory.name,
            background=background,
        )
        self.adapter.on_fit_start()
        self.step = 0

    def save(self) -> float:
        """One event (one save); the seconds the caller was blocked."""
        self.adapter.wait()  # the previous write finished while the next epoch "trained"
        os.sync()  # start every save with no dirty pages of the previous one
        step, self.step = self.step, self.step + 1
        return timed(lambda: self.adapter.on_validation_end({"val_loss": 1.0}, step=step))

    def close(self) -> int:
        self.adapter.on_fit_end()
        assert self.adapter.store is None
        self.directory.cleanup()
        return self.step


def run(quick: bool = False) -> list[Row]:
    width, repeats = (64, 2) if quick else (2500, 9)
    model, optimizer = model_and_optimizer(width)
    megabytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    sync, background = Saver(model, optimizer, False), Saver(model, optimizer, True)
    try:
        times = interleaved({"fcb": background.save, "peer": sync.save}, repeats=repeats, warmup=1)
    finally:
        sync.close(), background.close()
    per_repeat = ratios(times["fcb"], times["peer"])
    ratio = median(per_repeat)
    return [
        Row(
            id="B6",
            what=f"time the loop is blocked per save ({megabytes:.0f} MB of model + optimizer "
            "state): background writer against synchronous atomic save",
            fcb=ms(median(times["fcb"])),
            peer=ms(median(times["peer"])),
            ratio=ratio,
            target="<= 0.25x",
            met=ratio <= 0.25,
            note=f"{repeats} saves each, {spread(per_repeat)}",
        )
    ]


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
