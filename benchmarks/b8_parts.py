"""Where the one-callback event of B8.1 goes: each part of the session's rules taken out alone.

Not part of the suite (`run.py`): a diagnostic for the row B8.1. The adapter is B8.1's (one
EarlyStopping, saves stubbed); each case replaces one part of the session's check with what
it returns on a quiet check (no stop, no save, no interrupt), and the events are timed with
every case in turn, 31 repeats of 300 events. What a case saves is the most that making its
part free could gain. The floor of any event is the last line: a jitted function of the same
shape (a state vector and an input vector in; the state and an output vector out, read back).

Run: python benchmarks/b8_parts.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import b8_growth
import jax
import jax.numpy as jnp
import numpy as np
from _common import interleaved, median, timed
from b1_host_cost import FcbSide, metric_sequence

EVENTS, REPEATS = 300, 31
QUICK = 20, 2


def patched(side: FcbSide) -> dict[str, Callable[[], Callable[[], None]]]:
    """Each case: a function that takes one part out and returns how to put it back."""
    session = side.adapter.session
    runner, engine, interrupts = session.runner, session.engine, session.interrupts
    rates = engine.learning_rates()

    def replace(owner: Any, name: str, value: Any) -> Callable[[], Callable[[], None]]:
        def take_out() -> Callable[[], None]:
            had = name in vars(owner)
            old = vars(owner).get(name)
            setattr(owner, name, value)

            def put_back() -> None:
                if had:
                    setattr(owner, name, old)
                else:
                    delattr(owner, name)

            return put_back

        return take_out

    def host_metrics(metrics: Any) -> dict[str, Any]:
        return {k: np.asarray(v, np.float32) for k, v in metrics.items()}

    return {
        "nothing (the whole event)": lambda: lambda: None,
        "step numbering (next_step)": replace(session, "next_step", lambda step: step),
        "metrics' checks and reduction": replace(session, "metrics", lambda m: m),
        "metric conversion (host_metrics)": replace(runner, "host_metrics", host_metrics),
        "learning rates read for the rollback": replace(engine, "learning_rates", lambda: rates),
        "learning rates applied": replace(engine, "apply_lr", lambda actions: None),
        "the slot plan (_write)": replace(session, "_write", lambda *a, **k: None),
        "interrupts (signal, time limit)": replace(
            interrupts, "reasons", lambda step: (False, False, False)
        ),
        "the stop's agreement": replace(
            session.processes, "agree_on_error", lambda error, *flags: flags
        ),
        "events and history (_report)": replace(session, "_report", lambda *a, **k: None),
        "resume points (_after_check)": replace(session, "_after_check", lambda *a, **k: None),
    }


def dispatch_floor(count: int, repeats: int) -> float:
    """Seconds per call of a jitted function of the chain program's shape, read back."""
    program = jax.jit(lambda state, inputs: (state + inputs[0], state[:2] * 2))
    state = jnp.zeros(8, jnp.int32)
    inputs = np.zeros(2, np.int32)
    for _ in range(100):
        state, out = program(state, inputs)
        np.asarray(out)

    def loop() -> None:
        nonlocal state
        for _ in range(count):
            state, out = program(state, inputs)
            np.asarray(out)

    return min(timed(loop) for _ in range(repeats)) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    events, repeats = QUICK if parser.parse_args(argv).quick else (EVENTS, REPEATS)
    # 1,000 to warm up, then each of the 11 cases once to warm up and once per repeat
    metrics = metric_sequence(1000 + events * (repeats + 1) * 12)
    b8_growth.PATIENCE = len(metrics)  # the events here outnumber B8's patience: no stop
    side = FcbSide(b8_growth.fcb_chain(1), metrics)
    side.events(1000)
    cases = patched(side)

    def subject(take_out: Callable[[], Callable[[], None]]) -> Callable[[], float]:
        def measure() -> float:
            put_back = take_out()
            try:
                return side.events(events)
            finally:
                put_back()

        return measure

    times = interleaved(
        {name: subject(case) for name, case in cases.items()}, repeats=repeats, warmup=1
    )
    whole = median(times["nothing (the whole event)"])
    print(f"B8.1's event, one EarlyStopping ({events} events x {repeats} repeats, medians)\n")
    print(f"{'taken out':40s} {'per event':>10s} {'saves':>8s}")
    saved = 0.0
    for name, values in times.items():
        seconds = median(values)
        saved += max(whole - seconds, 0.0)
        print(f"{name:40s} {seconds * 1e6:7.2f} us {(whole - seconds) * 1e6:5.2f} us")
    print(f"{'every part above (sum of the savings)':40s} {(whole - saved) * 1e6:7.2f} us")
    floor = dispatch_floor(events, repeats)
    print(f"{'a jitted call of the same shape':40s} {floor * 1e6:7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
