"""SIGKILL a JAX training process (async orbax saves) at random points; every slot must
restore and resume must finish with the decisions and weights of an uninterrupted run.

FCB_KILLS sets the number of kills (default 10; the long mode runs 200).
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import chex
import orbax.checkpoint as ocp
import orbax_training

import fcb
import fcb.orbax
from fcb.orbax import _store

KILLS = int(os.environ.get("FCB_KILLS", "10"))
HIDDEN = 16384  # ~1.8 MB per checkpoint, so kills land inside orbax's writes too
SCRIPT = pathlib.Path(__file__).parent / "orbax_training.py"


def check_directory(dirpath):
    """Every step the manifest lists is a committed orbax checkpoint of that step, and only
    those steps are on disk once the adapter has opened the directory."""
    manifest = fcb.orbax.read_manifest(dirpath)
    for relative, record in manifest["files"].items():
        path = os.path.join(dirpath, relative)
        assert ocp.utils.is_checkpoint_finalized(path), path
        assert _store.read_meta(path)["step"] == record["step"]
    for name in manifest["slots"]:
        restored = fcb.orbax.restore(dirpath, name)
        assert sorted(restored) == ["model", "opt_state"], name
    return manifest


def test_random_kills_never_corrupt_and_resume_exactly(tmp_path):
    # Killed processes share one compilation cache: each then starts in seconds.
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    rng = random.Random(20261122)
    outcomes = {"corrupted": 0, "divergent": 0, "killed_before_first_save": 0, "resumed": 0}

    def spawn(kill):
        dirpath = str(tmp_path / f"run{kill}")
        command = [sys.executable, str(SCRIPT), dirpath, "--hidden", str(HIDDEN), "--wait"]
        return dirpath, subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    upcoming = spawn(0)
    reference, params = orbax_training.train(str(tmp_path / "reference"), hidden=HIDDEN)
    for kill in range(KILLS):
        dirpath, process = upcoming
        process.stdin.write("go\n")
        process.stdin.flush()
        lines = rng.randrange(0, len(reference))
        for _ in range(lines):
            if not process.stdout.readline():
                break
        time.sleep(rng.random() * 0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        process.stdin.close()
        if kill + 1 < KILLS:  # the next process imports while this run is checked and resumed
            upcoming = spawn(kill + 1)
        if not os.path.exists(os.path.join(dirpath, "manifest.json")):
            outcomes["killed_before_first_save"] += 1
            continue
        try:
            check_directory(dirpath)
        except (fcb.CheckpointError, AssertionError, ValueError, FileNotFoundError):
            outcomes["corrupted"] += 1
            continue
        resumed, resumed_params = orbax_training.train(dirpath, resume=True, hidden=HIDDEN)
        manifest = check_directory(dirpath)
        on_disk = sorted(ocp.utils.checkpoint_steps(os.path.join(dirpath, "steps")))
        assert on_disk == sorted(r["step"] for r in manifest["files"].values())
        assert not [n for n in os.listdir(os.path.join(dirpath, "steps")) if "tmp" in n]
        try:
            assert resumed == reference[len(reference) - len(resumed) :]
            chex.assert_trees_all_equal(resumed_params, params)
        except AssertionError:
            outcomes["divergent"] += 1
        outcomes["resumed"] += 1
    print(f"kills: {KILLS}, outcomes: {json.dumps(outcomes)}")
    assert outcomes["corrupted"] == outcomes["divergent"] == 0, outcomes
    assert outcomes["resumed"] >= KILLS // 2, outcomes
