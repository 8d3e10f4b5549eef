"""Load: many checks through fcb.torch.TorchAdapter without memory growth, and many saves
with top-k rotation without disk growth.

FCB_LOAD_EVENTS sets the number of checks (default 10,000); the long mode is

    FCB_LOAD_EVENTS=100000 python -m pytest -m slow tests/test_load.py -s

(`-m slow` runs the 100,000-check test even without the variable). FCB_LOAD_SAVES sets the
number of saves of the rotation test (default 1,000).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import fcb
import fcb.torch
from fcb import _files

EVENTS = int(os.environ.get("FCB_LOAD_EVENTS", "10000"))
SLOW_EVENTS = max(EVENTS, 100_000)
SAVES = int(os.environ.get("FCB_LOAD_SAVES", "1000"))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def chain():
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=10**8),
        fcb.ModelCheckpoint("val_loss", save_top_k=3, save_last=False),
        fcb.ReduceLROnPlateau("val_loss", patience=50, factor=0.5, min_lr=1e-6),
    )


def run_events(dirpath, events, warm_up, leak=None):
    """`events` checks of i.i.d. losses: the top 3 change about 3 ln(events) times, so
    nearly every check writes nothing. Returns the RSS after warm-up and at the end, and
    the number of checks that wrote a file."""
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adapter = fcb.torch.TorchAdapter(chain(), model=model, optimizer=optimizer, dirpath=dirpath)
    adapter.on_fit_start()
    losses = np.random.default_rng(0).random(events + warm_up).astype(np.float32)
    writes = 0
    for step, loss in enumerate(losses):
        if step == warm_up:
            writes = adapter.store.files_written
            start = rss_bytes()
        actions = adapter.on_validation_end(
            {"val_loss": float(loss), "train_loss": torch.tensor(float(loss))}, step=step
        )
        if leak is not None:  # a copy: a check that repeats the last outcome shares its actions
            leak.append(jax.tree_util.tree_map(np.copy, actions))
    end = rss_bytes()
    writes = adapter.store.files_written - writes
    assert not adapter.should_stop
    adapter.on_fit_end()
    return start, end, writes


def check_memory(tmp_path, events):
    warm_up = 1000  # compilation, caches and allocator pools settle in the first checks
    start, end, writes = run_events(str(tmp_path / "run"), events, warm_up)
    growth = end - start
    # What a leak of one check's actions per check would cost, measured the same way: the
    # bound below must be well under it, or the test could not see such a leak.
    calibration = 2000
    leak: list = []
    leak_start, leak_end, _ = run_events(str(tmp_path / "leak"), calibration, warm_up, leak)
    per_leaked_check = (leak_end - leak_start) / calibration
    # Bound: 4 MiB of allocator noise (arenas growing and shrinking) plus 64 bytes per check
    # (an object of that size kept per check is the smallest leak we promise to catch).
    bound = 4 * 2**20 + 64 * events
    print(
        f"load: {events} checks after {warm_up} warm-up, {writes} wrote a file; RSS "
        f"{start / 2**20:.1f} MiB -> {end / 2**20:.1f} MiB (growth {growth / 2**20:+.2f} MiB, "
        f"bound {bound / 2**20:.1f} MiB); leaking one check's actions per check costs "
        f"{per_leaked_check:.0f} B/check"
    )
    assert per_leaked_check * events > 2 * bound, (per_leaked_check, bound)
    assert growth < bound, f"RSS grew {growth} B over {events} checks (bound {bound} B)"
    assert writes < 20 * np.log(events + warm_up)  # a file only when the top 3 change


def check_memory_in_a_fresh_process(tmp_path, events):
    """`check_memory` in a process of its own: a test process that ran other tests holds
    freed heap, which a leak would fill without RSS growing (seen: a 2 GB test process in
    which leaking every check's actions grew RSS by a tenth of what it costs)."""
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(events)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_many_checks_do_not_grow_memory(tmp_path):
    check_memory_in_a_fresh_process(tmp_path, EVENTS)


@pytest.mark.slow
def test_long_many_checks_do_not_grow_memory(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the long mode (a few minutes): run with -m slow")
    check_memory_in_a_fresh_process(tmp_path, SLOW_EVENTS)


def disk_usage(dirpath):
    """Bytes of the distinct files under `dirpath` (a hard link counts once)."""
    seen = {}
    for root, _, names in os.walk(dirpath):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            seen[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(seen.values())


def test_saves_with_top_k_rotation_keep_the_disk_bounded(tmp_path):
    """Every check is a new best, so every check writes a file and the top 3 rotate: the
    directory holds the three slot steps (last is the newest of them) and nothing else,
    at every check."""
    dirpath = str(tmp_path / "run")
    model = torch.nn.Linear(64, 64)
    chain = fcb.ModelCheckpoint("val_loss", save_top_k=3, save_last=True)
    adapter = fcb.torch.TorchAdapter(chain, model=model, dirpath=dirpath)
    adapter.on_fit_start()
    largest = peak = 0
    for step in range(SAVES):
        with torch.no_grad():
            model.weight.add_(1e-3)
        adapter.on_validation_end({"val_loss": 1.0 / (step + 1)}, step=step)
        steps = os.listdir(os.path.join(dirpath, "steps"))
        if step >= 2:
            assert len(steps) == 3, steps
        largest = max(largest, *(os.path.getsize(os.path.join(dirpath, "steps", n)) for n in steps))
        if step % 50 == 0 or step == SAVES - 1:
            peak = max(peak, disk_usage(dirpath))
            assert not [n for n in os.listdir(dirpath) if n.startswith(_files.TMP_PREFIX)]
    written = adapter.store.files_written
    adapter.on_fit_end()
    assert written == SAVES  # every check wrote its step once, whatever the slots holding it
    with open(os.path.join(dirpath, "manifest.json")) as f:
        manifest = json.load(f)
    newest = [SAVES - 1, SAVES - 2, SAVES - 3]
    assert {n: s["step"] for n, s in manifest["slots"].items()} == {
        "best_model": newest[0], "best_model-top2": newest[1], "best_model-top3": newest[2],
        "last": newest[0],
    }
    assert sorted(os.listdir(os.path.join(dirpath, "steps"))) == [
        f"step-{s:08d}.pt" for s in sorted(newest)
    ]
    assert sorted(os.listdir(dirpath)) == sorted(
        ["manifest.json", "steps", "best_model.pt", "best_model-top2.pt",
         "best_model-top3.pt", "last.pt"]  # the lock file goes with the finished run
    )
    # Three step files (slot names are links to them) and the manifest, whatever the count.
    manifest_bytes = os.path.getsize(os.path.join(dirpath, "manifest.json"))
    bound = 3 * largest + manifest_bytes + 4096
    print(f"rotation: {SAVES} saves, {written} files written, disk peak "
          f"{peak / 1024:.0f} KiB (bound {bound / 1024:.0f} KiB, file {largest / 1024:.0f} KiB)")
    assert peak <= bound


if __name__ == "__main__":
    check_memory(pathlib.Path(sys.argv[1]), int(sys.argv[2]))
