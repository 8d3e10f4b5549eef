"""SIGKILL a training process at random points; every slot must load and resume must finish
with the decisions and weights of an uninterrupted run.

FCB_KILLS sets the number of kills (default 20; the long mode runs 200).
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import torch
import torch_training

import fcb.torch
from fcb import _files

KILLS = int(os.environ.get("FCB_KILLS", "20"))
HIDDEN = 20000  # ~1 MB per checkpoint, so kills land inside writes too
SCRIPT = pathlib.Path(__file__).parent / "torch_training.py"


def check_directory(dirpath):
    """Every file the manifest lists is complete and loads; every slot name points at it."""
    manifest = fcb.torch.read_manifest(os.path.join(dirpath, "manifest.json"))
    for relative, record in manifest["files"].items():
        _files.verify(os.path.join(dirpath, relative), record)
    for slot in manifest["slots"].values():
        payload = torch.load(os.path.join(dirpath, slot["file"]), weights_only=True)
        assert payload["fcb"]["step"] == slot["step"]
    return manifest


def test_random_kills_never_corrupt_and_resume_exactly(tmp_path):
    reference, weights = torch_training.train(str(tmp_path / "reference"), hidden=HIDDEN)
    rng = random.Random(20261122)
    outcomes = {"corrupted": 0, "missing": 0, "divergent": 0, "killed_before_first_save": 0}
    for kill in range(KILLS):
        dirpath = str(tmp_path / f"run{kill}")
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), dirpath, "--hidden", str(HIDDEN)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines = rng.randrange(0, len(reference))
        for _ in range(lines):
            if not process.stdout.readline():
                break
        time.sleep(rng.random() * 0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        if not os.path.exists(os.path.join(dirpath, "manifest.json")):
            outcomes["killed_before_first_save"] += 1
            continue
        try:
            check_directory(dirpath)
        except (fcb.CheckpointCorruptError, AssertionError, RuntimeError):
            outcomes["corrupted"] += 1
            continue
        resumed, resumed_weights = torch_training.train(dirpath, resume=True, hidden=HIDDEN)
        check_directory(dirpath)
        same = resumed == reference[len(reference) - len(resumed) :] and all(
            torch.equal(resumed_weights[k], v) for k, v in weights.items()
        )
        outcomes["divergent"] += not same
    print(f"kills: {KILLS}, outcomes: {json.dumps(outcomes)}")
    assert outcomes["corrupted"] == outcomes["missing"] == outcomes["divergent"] == 0, outcomes
