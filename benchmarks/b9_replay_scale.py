"""B9: how `fcb.replay`'s time and memory grow with the work (configurations x checks).

For 1k, 10k and 100k EarlyStopping configurations (patience 1..200 x 5, 50 or 500 min_delta
values between 0 and 0.01: the same mix of configurations at every size) over histories of 1k
and 10k checks (`replay.make_history`: a loss that falls, levels off and rises again), each
size in a fresh process: the time of a compiled replay (the best of three calls after the
first; the first, compile included, is shown beside it), its time per configuration-check run
(the checks each configuration runs up to its stop, summed), and its peak memory (the
process's peak resident set growth over the calls, compile included; grid and history are
built before). A grid larger than `fcb.replay`'s `chunk_size` (8,192) runs in chunks: memory
stays bounded by a chunk, time grows with the configurations.

Peer, at 10k x 1k: Optuna's `PatientPruner(MedianPruner(), patience, min_delta)`, the decision
a sweep user would otherwise compute: per configuration a study with that pruner, one trial
reporting the same values check after check and asking `should_prune()` at each (timed on a
sample of configurations, per configuration-check, in the same process as fcb's replay).

Run: python benchmarks/b9_replay_scale.py [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import Row, cli  # noqa: E402

FULL = [(1_000, 1_000), (10_000, 1_000), (100_000, 1_000), (1_000, 10_000), (10_000, 10_000),
        (100_000, 10_000)]
QUICK = [(200, 50), (1_000, 50)]
PEER_AT = (10_000, 1_000)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(configs: int, checks: int, sample: int) -> dict[str, float]:
    """One size, in this process: replay times, peak memory and (optionally) Optuna's time."""
    import numpy as np
    from replay import make_history, warm_up_jax

    import fcb

    warm_up_jax()
    history = {"val_loss": make_history(checks)}
    # the same configurations at every size: patience 1..200 x (configs / 200) min_delta values
    patience = np.arange(1, 201)
    min_delta = np.linspace(0.0, 0.01, max(configs // 200, 1))
    batch = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=patience,
                     min_delta=min_delta)
    before = max(_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    start = time.perf_counter()
    result = fcb.replay(batch, history)
    first = time.perf_counter() - start
    warm = float("inf")
    for _ in range(3):  # the least disturbed of three compiled runs
        start = time.perf_counter()
        fcb.replay(batch, history)
        warm = min(warm, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    out = {"first": first, "warm": warm, "peak_mib": max(peak, 0) / 1024,
           "mean_checks": float(np.mean(result.checks)), "configs": len(result)}
    if sample:
        rng = np.random.default_rng(0)
        picked = rng.choice(len(result), size=min(sample, len(result)), replace=False)
        cost, decisions = optuna_loop(history["val_loss"],
                                      [result.configs[i] for i in picked])
        out["optuna_per_check"] = cost / decisions
    return out


def optuna_loop(values, configs) -> tuple[float, int]:
    """Optuna's PatientPruner + MedianPruner decisions over `values`, one study per
    configuration: (seconds, decisions made)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    values = [float(v) for v in values]
    decisions = 0
    start = time.perf_counter()
    for config in configs:
        pruner = optuna.pruners.PatientPruner(
            optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0),
            patience=int(config["patience"]), min_delta=float(config["min_delta"]),
        )
        study = optuna.create_study(direction="minimize", pruner=pruner)
        trial = study.ask()
        for step, value in enumerate(values):
            trial.report(value, step)
            decisions += 1
            if trial.should_prune():
                break
    return time.perf_counter() - start, decisions


def in_fresh_process(configs: int, checks: int, sample: int) -> dict[str, float]:
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import b9_replay_scale as b; "
            f"print(json.dumps(b.measure({configs}, {checks}, {sample})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=HERE).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool = False) -> list[Row]:
    sizes = QUICK if quick else FULL
    peer_at = sizes[1] if quick else PEER_AT
    sample = 3 if quick else 20
    found = {size: in_fresh_process(*size, sample if size == peer_at else 0) for size in sizes}
    rows = []
    for (configs, checks), r in found.items():
        per = r["warm"] / (r["configs"] * r["mean_checks"]) * 1e9
        rows.append(Row(
            id=f"B9.{configs // 1000 or configs}{'k' if configs >= 1000 else ''}x"
               f"{checks // 1000 or checks}{'k' if checks >= 1000 else ''}",
            what=f"fcb.replay of {configs:,} EarlyStopping configurations x {checks:,} checks, "
                 f"compiled: time per configuration-check run (each configuration's checks up "
                 f"to its stop), and the process's peak memory growth "
                 f"over the calls (compile included)",
            fcb=f"{per:.2f} ns ({r['warm']:.3f} s; first call {r['first']:.2f} s)",
            peer=f"peak +{r['peak_mib']:.0f} MiB",
            ratio=None, target="", met=None,
            note=f"the configurations run {r['mean_checks']:.0f} checks on average",
        ))
    for checks in sorted({c for _, c in sizes}):
        small, large = sorted(c for c, k in sizes if k == checks)[-2:]
        growth = (found[large, checks]["warm"] / large) / (found[small, checks]["warm"] / small)
        rows.append(Row(
            id=f"B9.lin{checks // 1000 or checks}{'k' if checks >= 1000 else ''}",
            what=f"fcb.replay time per configuration at {large:,} configurations / at "
                 f"{small:,} ({checks:,} checks): linear growth",
            fcb=f"{found[large, checks]['warm'] / large * 1e6:.1f} us",
            peer=f"{found[small, checks]['warm'] / small * 1e6:.1f} us",
            ratio=growth, target="<= 1.2x", met=growth <= 1.2,
        ))
    peer = found[peer_at]
    ours = peer["warm"] / (peer["configs"] * peer["mean_checks"])
    rows.append(Row(
        id="B9o",
        what=f"fcb.replay at {peer_at[0]:,} x {peer_at[1]:,} against Optuna PatientPruner + "
             f"MedianPruner decisions in a Python loop (timed on {sample} configurations), per "
             f"configuration-check",
        fcb=f"{ours * 1e9:.2f} ns", peer=f"{peer['optuna_per_check'] * 1e6:.1f} us",
        ratio=ours / peer["optuna_per_check"], target="", met=None,
    ))
    return rows


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
