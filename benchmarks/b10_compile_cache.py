"""B10: what JAX's persistent compilation cache (`fcb.enable_compile_cache`) saves a fresh
process: the first `TorchAdapter` check, and `fcb replay` of the demo's history.

Each figure is the median over fresh processes, in three settings: no cache
(`FCB_COMPILE_CACHE=0`), an empty cache (each process its own new directory: it compiles and
writes), and a warm cache (a directory an earlier, untimed process filled).

- first check: `TorchAdapter(EarlyStopping + ModelCheckpoint(top-1, last) + ReduceLROnPlateau)`
  on a small MLP, `on_fit_start()` then the first `on_validation_end` (compile, check, write
  of the first checkpoint), timed alone; JAX is imported but not warmed up, as in a script;
- `fcb replay`: `python -m fcb.cli replay RUN/history.jsonl --monitor val_loss` over a
  `fcb demo` run (early-stopped, its default options), the whole process timed.

B3c (fcb.replay of 10,000 configurations x 1,000 checks, compile included) is measured the
same three ways by `benchmarks/replay.py` (rows B3c, B3ce, B3cw).

Run: python benchmarks/b10_compile_cache.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import Row, cli  # noqa: E402

_FIRST_CHECK = textwrap.dedent(
    """
    import json, sys, tempfile, time
    import torch
    import fcb, fcb.torch
    if sys.argv[1] != "-":
        fcb.enable_compile_cache(sys.argv[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    chain = fcb.chain(
        fcb.EarlyStopping("val_loss", patience=10),
        fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=5),
    )
    adapter = fcb.torch.TorchAdapter(
        chain, model=model, optimizer=optimizer, dirpath=tempfile.mkdtemp()
    )
    adapter.on_fit_start()
    start = time.perf_counter()
    adapter.on_validation_end({"val_loss": torch.tensor(0.5)}, step=0)
    first = time.perf_counter() - start
    adapter.on_fit_end()
    print(json.dumps({"seconds": first}))
    """
)


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "FCB_"))}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _first_check(cache: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_CHECK, cache], check=True, capture_output=True,
        text=True, env=_environment(),
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def _replay_process(history: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fcb.cli", "replay", history, "--monitor", "val_loss"],
        check=True, capture_output=True, text=True, env=env,
    )
    return time.perf_counter() - start


def three_ways(measure, repeats: int) -> dict[str, float]:
    """Median seconds with no cache, an empty cache and a warm cache. `measure(kind, dir)`."""
    warm = tempfile.mkdtemp(prefix="fcb-cache-warm-")
    measure("warm", warm)  # fills it
    found: dict[str, list[float]] = {"none": [], "empty": [], "warm": []}
    for _ in range(repeats):  # interleaved: each setting sees the same stretch of load
        found["none"].append(measure("none", None))
        found["empty"].append(measure("empty", tempfile.mkdtemp(prefix="fcb-cache-empty-")))
        found["warm"].append(measure("warm", warm))
    return {kind: statistics.median(values) for kind, values in found.items()}


def run(quick: bool = False) -> list[Row]:
    repeats = 1 if quick else 5
    checks = three_ways(lambda kind, d: _first_check(d or "-"), repeats)
    run_dir = os.path.join(tempfile.mkdtemp(prefix="fcb-demo-"), "run")
    subprocess.run(
        [sys.executable, "-m", "fcb.cli", "demo", "--out", run_dir, "--quiet",
         *(["--epochs", "6"] if quick else [])],
        check=True, capture_output=True, text=True, env=_environment(FCB_COMPILE_CACHE="0"),
    )
    history = os.path.join(run_dir, "history.jsonl")
    with open(history) as f:
        count = sum(1 for line in f if '"val_loss"' in line)

    def replay(kind: str, directory: str | None) -> float:
        if directory is None:
            return _replay_process(history, _environment(FCB_COMPILE_CACHE="0"))
        return _replay_process(history, _environment(XDG_CACHE_HOME=directory))

    replays = three_ways(replay, repeats)
    rows = []
    for id, what, found, target in (
        ("B10a", "the first TorchAdapter check in a fresh process (EarlyStopping + "
         "ModelCheckpoint + ReduceLROnPlateau: compile, check, first checkpoint written)",
         checks, 0.2),
        ("B10b", f"`fcb replay` of the demo history ({count} checks, 30 configurations), the "
         "whole process", replays, None),
    ):
        rows.append(Row(
            id=id,
            what=what + f"; warm compilation cache against none (median of {repeats} fresh "
                        f"processes each; an empty cache: {found['empty']:.2f} s)",
            fcb=f"{found['warm']:.3f} s",
            peer=f"{found['none']:.3f} s",
            ratio=found["warm"] / found["none"],
            target=f"warm <= {target} s" if target else "",
            met=found["warm"] <= target if target else None,
        ))
    return rows


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
