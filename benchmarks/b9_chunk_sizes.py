"""fcb.replay's time per configuration at 10,000 and 100,000 configurations for several
`chunk_size` values, in one process (EarlyStopping, 1,000 checks, patience 1..200 x
min_delta; best of 5 compiled runs each). The chunk width that keeps a chunk's carry in
the caches sets `fcb.replay`'s default.

Run: python benchmarks/b9_chunk_sizes.py
"""

from __future__ import annotations

import time

import numpy as np
from replay import make_history, warm_up_jax

import fcb


def per_configuration(batch: fcb.Grid, history: dict, chunk_size: int) -> float:
    fcb.replay(batch, history, chunk_size=chunk_size)  # compiled once per chunk width
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fcb.replay(batch, history, chunk_size=chunk_size)
        best = min(best, time.perf_counter() - start)
    return best / len(batch) * 1e6


def main() -> None:
    warm_up_jax()
    history = {"val_loss": make_history(1000)}
    batches = {
        configs: fcb.grid(
            fcb.EarlyStopping,
            monitor="val_loss",
            patience=np.arange(1, 201),
            min_delta=np.linspace(0.0, 0.01, configs // 200),
        )
        for configs in (10_000, 100_000)
    }
    print("| chunk_size | us per configuration, 10k | 100k | 100k / 10k |")
    print("|---|---|---|---|")
    for chunk_size in (2048, 4096, 8192, 16384):
        small, large = (per_configuration(b, history, chunk_size) for b in batches.values())
        print(f"| {chunk_size:,} | {small:.3f} | {large:.3f} | {large / small:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
