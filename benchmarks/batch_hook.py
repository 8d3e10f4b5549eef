"""B11: per-call cost of `on_train_batch_end(step=...)` when nothing is due.

The hook a loop calls after every training batch (preemption, time limits and resume
schedules act there). With nothing due on a single process it must cost next to nothing: no
dispatch, no collective, no I/O. Each side runs the same Python loop over global steps:

- fcb: `adapter.on_train_batch_end(step=step)` on a started adapter (`on_fit_start`, default
  options: SIGTERM handler installed, no schedules) over `fcb.chain(EarlyStopping,
  ModelCheckpoint)` in a temporary directory; the Torch adapter (with a model and optimizer)
  and the orbax adapter (passing its `state=` pytree, as an orbax loop does);
- peer: the bare loop, the same `for step in range(...)` without the hook.

The cost per call is (hook loop - bare loop) / calls, best of the repeats (the two loops
alternate inside each repeat, so both see the same machine load); the ratio is the hook
loop's time over the bare loop's.

Run: python benchmarks/batch_hook.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, cli, interleaved

import fcb

TARGET_NS = 2000.0


def callbacks() -> fcb.Callback:
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=10),
        fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
    )


@contextmanager
def torch_adapter(dirpath: str) -> Iterator[Callable[[int, int], None]]:
    import torch

    import fcb.torch

    model = torch.nn.Linear(4, 1)
    adapter = fcb.torch.TorchAdapter(
        callbacks(), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dirpath=dirpath,
    )
    adapter.on_fit_start()
    hook = adapter.on_train_batch_end

    def loop(first: int, calls: int) -> None:
        for step in range(first, first + calls):
            hook(step=step)

    try:
        yield loop
    finally:
        adapter.on_fit_end()


@contextmanager
def orbax_adapter(dirpath: str) -> Iterator[Callable[[int, int], None]]:
    import jax.numpy as jnp

    import fcb.orbax

    params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros((1,))}
    adapter = fcb.orbax.OrbaxAdapter(callbacks(), dirpath)
    adapter.on_fit_start(like=params)
    hook = adapter.on_train_batch_end

    def loop(first: int, calls: int) -> None:
        for step in range(first, first + calls):
            hook(step=step, state=params)  # as an orbax loop calls it

    try:
        yield loop
    finally:
        adapter.on_fit_end()


def bare_loop(first: int, calls: int) -> None:
    for _step in range(first, first + calls):  # the same loop, binding the step too
        pass


def measure(
    loop: Callable[[int, int], None], calls: int, repeats: int
) -> tuple[float, float]:
    """(hook loop, bare loop) nanoseconds per iteration, best of `repeats`; `loop(first,
    calls)` calls the hook at the steps `first` to `first + calls - 1`."""
    next_step = [0]  # the global step goes on rising from one repeat to the next

    def timed(run_loop: Callable[[int, int], None]) -> Callable[[], float]:
        def once() -> float:
            first = next_step[0]
            next_step[0] += calls
            start = time.perf_counter_ns()
            run_loop(first, calls)
            return (time.perf_counter_ns() - start) / calls

        return once

    times = interleaved({"hook": timed(loop), "bare": timed(bare_loop)}, repeats=repeats)
    return min(times["hook"]), min(times["bare"])


def run(quick: bool = False) -> list[Row]:
    calls, repeats = (2_000, 2) if quick else (200_000, 9)
    rows = []
    for id, name, adapter in (
        ("B11", "TorchAdapter", torch_adapter), ("B11o", "OrbaxAdapter", orbax_adapter)
    ):
        with tempfile.TemporaryDirectory() as dirpath, adapter(dirpath) as loop:
            hooked, bare = measure(loop, calls, repeats)
        cost = hooked - bare
        rows.append(
            Row(
                id,
                f"{name}.on_train_batch_end(step=...) with nothing due (default options, "
                f"EarlyStopping + ModelCheckpoint, started), per call, against the bare loop; "
                f"best of {repeats} x {calls:,} calls",
                f"{cost:,.0f} ns per call",
                f"{bare:,.0f} ns per iteration",
                hooked / bare,
                f"<= {TARGET_NS:,.0f} ns per call",
                cost <= TARGET_NS,
            )
        )
    return rows


def main(argv: Any = None) -> int:
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
