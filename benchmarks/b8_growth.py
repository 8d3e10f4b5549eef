"""B8: how the host cost per event grows with the number of callbacks, fcb against Lightning.

Chains of 1, 4 and 16 callbacks, EarlyStopping and ModelCheckpoint(top-1) alternately (one:
EarlyStopping), all monitoring `val_loss`, driven event by event with saves stubbed on both
sides, as in B1: fcb through `TorchAdapter.on_validation_end` (one jitted dispatch for the whole
chain), Lightning through each callback's `on_validation_end` with a stub trainer.

Two more rows split the one-callback event: B8.1r is `Runner.check` alone (the metric's
conversion, the jitted dispatch, the actions read back), B8.1d the jitted dispatch of the
chain's program alone (its inputs built beforehand, the packed actions read back to the
host): what any event of fcb's costs before the adapter applies the actions.

Run: python benchmarks/b8_growth.py [--quick]
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from _common import Row, cli, interleaved, median, ratios, spread, timed, us
from b1_host_cost import PATIENCE, FcbSide, LightningSide, metric_sequence

import fcb

COUNTS = (1, 4, 16)
ONE_CALLBACK_TARGET = 1.5


class RunnerSide:
    """The one-callback chain's `Runner.check` alone (`part="runner"`), or its jitted
    program's dispatch alone (`part="dispatch"`), over the same metrics and steps."""

    def __init__(self, metrics: list[Any], part: str):
        self.runner = fcb.Runner(fcb_chain(1))
        self.values = [float(m) for m in metrics]
        self.part, self.step = part, 0
        self.runner.check({"val_loss": 1.0}, step=0)  # compiled, the state packed

    def events(self, count: int) -> float:
        runner, values, start = self.runner, self.values, self.step + 1
        self.step += count
        if self.part == "runner":

            def loop() -> None:
                for step in range(start, start + count):
                    runner.check({"val_loss": values[step - 1]}, step=step)

            return timed(loop) / count
        buffer, packing = runner._packed_state()
        keys = ("val_loss",)
        inputs = [
            np.array([step, np.float32(values[step - 1]).view(np.int32)], np.int32)
            for step in range(start, start + count)
        ]

        def dispatch() -> None:
            state = buffer
            for packed_inputs in inputs:
                state, actions = runner._check(state, packed_inputs, keys, packing)
                np.asarray(actions)

        return timed(dispatch) / count


def fcb_chain(count: int) -> fcb.Callback:
    callbacks: dict[str, fcb.Callback] = {}
    for i in range(count):
        if i % 2 == 0:
            callbacks[f"stop{i}"] = fcb.EarlyStopping("val_loss", patience=PATIENCE + i)
        else:
            callbacks[f"keep{i}"] = fcb.ModelCheckpoint(
                "val_loss", save_top_k=1, save_last=False, filename=f"best-{i}"
            )
    return fcb.named_chain(**callbacks)  # named: each callback's events get its own prefix


PARTS = {
    "runner": ("B8.1r", "host cost per event, 1 callback: Runner.check alone (metric conversion, "
               "the jitted dispatch, the actions read back)"),
    "dispatch": ("B8.1d", "host cost per event, 1 callback: the jitted dispatch of the chain's "
                 "program alone (inputs built beforehand, the packed actions read back)"),
}


def run(quick: bool = False) -> list[Row]:
    events, repeats = (20, 2) if quick else (200, 21)
    counts = COUNTS[:2] if quick else COUNTS
    metrics = metric_sequence(events * (repeats + 2))
    subjects = {}
    for count in counts:
        ours = FcbSide(fcb_chain(count), metrics)
        peer = LightningSide(metrics, callbacks=count, scheduler=False, save_last=False)
        subjects[f"fcb-{count}"] = lambda side=ours: side.events(events)
        subjects[f"peer-{count}"] = lambda side=peer: side.events(events)
    for part in PARTS:
        alone = RunnerSide(metrics, part)
        subjects[part] = lambda side=alone: side.events(events)
    times = interleaved(subjects, repeats=repeats, warmup=2)
    rows = []
    for count in counts:
        per_repeat = ratios(times[f"fcb-{count}"], times[f"peer-{count}"])
        ratio = median(per_repeat)
        rows.append(
            Row(
                id=f"B8.{count}",
                what=f"host cost per event, {count} callback{'s' if count > 1 else ''} "
                "(EarlyStopping / ModelCheckpoint alternately), saves stubbed",
                fcb=us(median(times[f"fcb-{count}"])),
                peer=us(median(times[f"peer-{count}"])),
                ratio=ratio,
                target=f"<= {ONE_CALLBACK_TARGET}x" if count == 1 else "",
                met=ratio <= ONE_CALLBACK_TARGET if count == 1 else None,
                note=spread(per_repeat),
            )
        )
    for part, (row, what) in PARTS.items():
        per_repeat = ratios(times[part], times["peer-1"])
        rows.append(
            Row(
                id=row,
                what=what,
                fcb=us(median(times[part])),
                peer=us(median(times["peer-1"])),
                ratio=median(per_repeat),
                target="",
                met=None,
                note=f"against Lightning's one-callback event; {spread(per_repeat)}",
            )
        )
    first, last = counts[0], counts[-1]
    fcb_growth = median(ratios(times[f"fcb-{last}"], times[f"fcb-{first}"]))
    peer_growth = median(ratios(times[f"peer-{last}"], times[f"peer-{first}"]))
    rows.append(
        Row(
            id="B8",
            what=f"cost growth from {first} to {last} callbacks (cost at {last} / cost at {first})",
            fcb=f"{fcb_growth:.2f}x",
            peer=f"{peer_growth:.2f}x",
            ratio=fcb_growth / peer_growth,
            target="grows slower than Lightning",
            met=fcb_growth < peer_growth,
            note=f"{events} events x {repeats} repeats",
        )
    )
    return rows


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
