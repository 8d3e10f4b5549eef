"""How fast is `fcb.replay` at sweeping early-stopping configurations over a recorded history?

Compares, in one process, on the same history and the same configurations:

- fcb: `fcb.replay(fcb.grid(fcb.EarlyStopping, patience=..., min_delta=...), history)`, one
  compiled `vmap` of a `lax.scan` over every check, for every configuration;
- Lightning: the real `pytorch_lightning.callbacks.EarlyStopping`, driven through its
  `on_validation_end` hook with a stub trainer, one configuration after the other, each loop
  breaking at its stop (as a training loop would);
- flax: `flax.training.early_stopping.EarlyStopping.update`, looped the same way.

The peers run on a random sample of the configurations and are extrapolated to all of them
(their cost per configuration does not depend on the others). fcb is timed on all of them,
cold (grid built, replay compiled and run) and warm (the compiled replay run again, best of
five). "Cold" is measured in fresh processes (the median of `--cold-repeats`), each of
which first compiles and runs an unrelated one-line `jax.jit`: JAX's backend and XLA
compiler start-up, which every JAX program pays once, are not fcb's cost; what stays is
building the grid, tracing, lowering and compiling fcb.replay's own function, and the run.
Also paid before the timer, and reported apart: importing the modules fcb.grid and
fcb.replay use (`import fcb` imports them on first use; equinox is most of it) and the
process's first full garbage collection (the objects importing JAX and equinox created;
whichever code allocates next pays it, 50-90 ms here).

Run: python benchmarks/replay.py [--configs 10000] [--steps 1000] [--sample 200]
     [--cold-repeats 5]
Needs: pip install -c constraints.txt -e ".[all,bench]"
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import fcb


def make_history(steps: int, seed: int = 0) -> np.ndarray:
    """A validation loss that falls, levels off and slowly rises again, with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    curve = 1.0 / (1.0 + t / 40.0) + 3e-4 * t + 0.01 * rng.standard_normal(steps)
    return curve.astype(np.float32)


def grid_values(configs: int) -> tuple[np.ndarray, np.ndarray]:
    """`configs` = patience values x min_delta values (50 min_delta values when possible)."""
    deltas = 50 if configs % 50 == 0 else 1
    patience = np.arange(1, configs // deltas + 1)
    min_delta = np.linspace(0.0, 0.01, deltas) if deltas > 1 else np.zeros(1)
    return patience, min_delta


def warm_up_jax() -> None:
    """Pay JAX's one-time start-up (backend, XLA compiler) on an unrelated function."""
    jax.numpy.zeros(1).block_until_ready()
    jax.jit(lambda x: x + 1)(jax.numpy.zeros(1)).block_until_ready()


def import_fcb() -> tuple[float, float]:
    """Seconds to import what fcb.grid and fcb.replay use, and for the first full garbage
    collection of the process."""
    start = time.perf_counter()
    fcb.EarlyStopping, fcb.grid, fcb.replay  # noqa: B018  (fcb imports them on first use)
    imported = time.perf_counter()
    gc.collect()
    return imported - start, time.perf_counter() - imported


def time_fcb(history: np.ndarray, patience: np.ndarray, min_delta: np.ndarray):
    start = time.perf_counter()
    batch = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=patience, min_delta=min_delta)
    built = time.perf_counter()
    result = fcb.replay(batch, {"val_loss": history})
    cold = time.perf_counter() - start
    warm = []
    for _ in range(5):
        again = time.perf_counter()
        fcb.replay(batch, {"val_loss": history})
        warm.append(time.perf_counter() - again)
    return result, built - start, cold, min(warm)  # the least disturbed of the runs


def time_cold(args: argparse.Namespace, cache: str | None = None) -> dict[str, float]:
    """Median seconds over fresh processes of each part ("imports", "collect", "build",
    "cold": grid build + replay, the last two timed together): a process compiles
    fcb.replay's function only once. `cache`: "empty" gives each process empty compile
    caches (`fcb.enable_compile_cache`: JAX's persistent compilation cache and fcb's program
    cache), "warm" ones that a first (untimed) process filled; None, no cache."""
    runs = []
    shared = tempfile.mkdtemp(prefix="fcb-bench-cache-") if cache == "warm" else None
    for repeat in range(args.cold_repeats + (1 if shared else 0)):
        command = [sys.executable, os.path.abspath(__file__), "--cold-only", "--configs",
                   str(args.configs), "--steps", str(args.steps), "--seed", str(args.seed)]
        if cache is not None:
            command += ["--compile-cache", shared or tempfile.mkdtemp(prefix="fcb-bench-cache-")]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        if shared is None or repeat > 0:  # the first process fills the shared cache
            runs.append(json.loads(out.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


class _Strategy:
    def reduce_boolean_decision(self, decision, all=True):
        return decision


class _State:
    def __init__(self):
        from pytorch_lightning.trainer.states import TrainerFn

        self.fn = TrainerFn.FITTING


class StubTrainer:
    """What `EarlyStopping.on_validation_end` reads of a Trainer, and nothing else."""

    def __init__(self):
        self.state = _State()
        self.sanity_checking = False
        self.fast_dev_run = False
        self.strategy = _Strategy()
        self.should_stop = False
        self.current_epoch = 0
        self.callback_metrics = {}


def time_lightning(history: np.ndarray, configs: list[tuple[int, float]]):
    import torch
    from pytorch_lightning.callbacks import EarlyStopping

    torch.set_num_threads(1)  # scalar ops: spare them thread-pool overhead, in fairness
    values = [torch.tensor(v) for v in history.tolist()]  # as logged: one tensor per check
    stops = []
    start = time.perf_counter()
    for patience, min_delta in configs:
        callback = EarlyStopping(
            monitor="val_loss", patience=patience, min_delta=min_delta, mode="min",
            check_on_train_epoch_end=False, verbose=False,
        )
        trainer = StubTrainer()
        stop = -1
        for epoch, value in enumerate(values):
            trainer.current_epoch = epoch
            trainer.callback_metrics = {"val_loss": value}
            callback.on_validation_end(trainer, None)
            if trainer.should_stop:
                stop = epoch
                break
        stops.append(stop)
    return stops, time.perf_counter() - start


def time_flax(history: np.ndarray, configs: list[tuple[int, float]]):
    from flax.training.early_stopping import EarlyStopping

    values = history.tolist()
    stops = []
    start = time.perf_counter()
    for patience, min_delta in configs:
        early_stop = EarlyStopping(min_delta=min_delta, patience=patience)
        stop = -1
        for epoch, value in enumerate(values):
            early_stop = early_stop.update(value)
            if early_stop.should_stop:
                stop = epoch
                break
        stops.append(stop)
    return stops, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=1_000)
    parser.add_argument("--sample", type=int, default=200, help="peer configurations timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cold-repeats", type=int, default=5, help="fresh processes timing the cold replay"
    )
    parser.add_argument("--cold-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_cache:
        fcb.enable_compile_cache(args.compile_cache)

    warm_up_jax()
    history = make_history(args.steps, args.seed)
    patience, min_delta = grid_values(args.configs)
    imports_s, collect_s = import_fcb()
    result, build_s, cold_s, warm_s = time_fcb(history, patience, min_delta)
    if args.cold_only:
        print(json.dumps(
            {"imports": imports_s, "collect": collect_s, "build": build_s, "cold": cold_s}
        ))
        return
    empty_s = warm_cache_s = None
    before = {"imports": imports_s, "collect": collect_s}
    if args.cold_repeats > 0:
        parts = time_cold(args)
        build_s, cold_s = parts["build"], parts["cold"]
        before = {"imports": parts["imports"], "collect": parts["collect"]}
        empty_s = time_cold(args, "empty")["cold"]
        warm = time_cold(args, "warm")
        warm_cache_s = warm["cold"]
        before_warm = warm["imports"] + warm["collect"]
    total = len(result)

    rng = np.random.default_rng(args.seed)
    sample = rng.choice(total, size=min(args.sample, total), replace=False)
    configs = [(result.configs[i]["patience"], result.configs[i]["min_delta"]) for i in sample]
    lightning_stops, lightning_s = time_lightning(history, configs)
    lightning_total = lightning_s / len(sample) * total
    agree = sum(int(s == result.stop_step[i]) for s, i in zip(lightning_stops, sample))
    try:
        flax_stops, flax_s = time_flax(history, configs)
        flax_total: float | None = flax_s / len(sample) * total
    except ImportError:
        flax_total = None

    checks = int(result.checks.sum())
    machine = platform.processor() or platform.machine()
    print(f"fcb.replay benchmark, {datetime.date.today()}, {machine}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, jax {jax.__version__}")
    print(f"{total} configurations (patience 1..{patience[-1]} x {len(min_delta)} min_delta) "
          f"x {args.steps} checks; the configurations stop after {checks / total:.0f} checks on "
          f"average")
    print()
    print(f"{'':<34}{'seconds':>10}{'per config':>14}")
    print(f"{'import fcb.grid / fcb.replay':<34}{before['imports']:>10.3f}"
          f"   (paid before the timer: first use of the names; not in the rows below)")
    print(f"{'first full garbage collection':<34}{before['collect']:>10.3f}"
          f"   (paid before the timer: the objects importing JAX and equinox made)")
    print(f"{'fcb.grid (build 1 batch)':<34}{build_s:>10.3f}")
    print(f"{'fcb.replay first call':<34}{cold_s - build_s:>10.3f}"
          f"   (trace, lower, compile, run; cold = median of {max(args.cold_repeats, 1)} "
          f"fresh processes)")
    print(f"{'fcb.replay cold (build+compile+run)':<34}{cold_s:>10.3f}"
          f"{cold_s / total * 1e6:>11.1f} us")
    if empty_s is not None and warm_cache_s is not None:
        print(f"{'  with an empty compile cache':<34}{empty_s:>10.3f}"
              f"{empty_s / total * 1e6:>11.1f} us   (fcb.enable_compile_cache, fresh processes)")
        print(f"{'  with a warm compile cache':<34}{warm_cache_s:>10.3f}"
              f"{warm_cache_s / total * 1e6:>11.1f} us   (a process before filled it)")
        print(f"{'    with the imports and collection':<34}{warm_cache_s + before_warm:>10.3f}"
              f"   (the same processes, everything after JAX's start-up)")
    print(f"{'fcb.replay warm (compiled)':<34}{warm_s:>10.3f}{warm_s / total * 1e6:>11.1f} us")
    print(f"{'Lightning EarlyStopping loop':<34}{lightning_total:>10.1f}"
          f"{lightning_s / len(sample) * 1e6:>11.0f} us   (timed on {len(sample)}, extrapolated)")
    if flax_total is not None:
        print(f"{'flax EarlyStopping loop':<34}{flax_total:>10.2f}"
              f"{flax_s / len(sample) * 1e6:>11.0f} us   (timed on {len(sample)}, extrapolated)")
    print()
    print(f"speed-up vs Lightning: {lightning_total / cold_s:,.0f}x cold, "
          f"{lightning_total / warm_s:,.0f}x warm (target >= 1000x)")
    if flax_total is not None:
        print(f"speed-up vs flax:      {flax_total / cold_s:,.0f}x cold, "
              f"{flax_total / warm_s:,.0f}x warm (target >= 30x)")
    print(f"stop steps identical to Lightning's on {agree}/{len(sample)} sampled configurations")
    if flax_total is not None:
        later = sum(int(f == s + 1) for f, s in zip(flax_stops, lightning_stops))
        print(f"(flax counts patience differently: it stops one check after Lightning on "
              f"{later}/{len(sample)})")
    print()
    what = (f"fcb.replay of {total:,} EarlyStopping configurations x {args.steps:,} checks "
            f"against a {{peer}} EarlyStopping loop (extrapolated from a sample); speed-up, ")
    kinds = {
        "": ("compiled", warm_s),
        "c": (f"compile included: grid built, fcb.replay traced, compiled and run once (median "
              f"of {max(args.cold_repeats, 1)} fresh processes; JAX's own start-up paid first "
              f"by an unrelated jit, fcb's imports and the first full garbage collection "
              f"before the timer)", cold_s),
    }
    if empty_s is not None and warm_cache_s is not None:
        fresh = f"median of {args.cold_repeats} fresh processes"
        kinds["ce"] = (f"compile included, compile caches empty (fcb.enable_compile_cache: "
                       f"JAX's persistent cache and fcb's program cache; {fresh})", empty_s)
        kinds["cw"] = (f"compile included, compile caches warm (filled by an earlier process: "
                       f"the replay's executable loaded, nothing traced; {fresh})",
                       warm_cache_s)
    peers = [("", "Lightning", lightning_total, 1000.0)]
    if flax_total is not None:
        peers.append(("f", "flax", flax_total, 30.0))
    print("| id | what | fcb | peer | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    for suffix, peer, peer_s, target in peers:
        for kind, (label, fcb_s) in kinds.items():
            speedup = peer_s / fcb_s
            ratio = f"{speedup:,.0f}" if speedup >= 100 else f"{speedup:.3g}"
            aim, met = f">= {target:,.0f}x faster", "yes" if speedup >= target else "**no**"
            if kind == "ce":  # an empty cache: reported as measured
                aim, met = "", ""
            print(f"| B3{suffix}{kind} | {what.format(peer=peer)}{label} | {fcb_s:.3f} s | "
                  f"{peer_s:.3g} s | {ratio}x | {aim} | {met} |")


if __name__ == "__main__":
    main()
