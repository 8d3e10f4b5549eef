"""SIGKILL a training process at random points; every slot must load and resume must finish
with the decisions, slot table and weights of an uninterrupted run.

FCB_KILLS sets the number of kills (default 20; the long mode runs 200):

    FCB_KILLS=200 python -m pytest tests/test_kill.py -s

Every other run writes with the background writer, so kills also land while a write
thread is busy. After each kill the directory is checked as it was left (before any repair):
`fcb inspect` passes, every file the manifest lists is complete and every slot loads. A
run killed before its first manifest is started again from scratch; a training process that
died on its own before the kill counts as crashed. The outcomes are counted and printed;
the goal is 0 corrupted, 0 missing, 0 divergent, 0 crashed.
"""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch_training

import fcb.torch
from fcb import _files

KILLS = int(os.environ.get("FCB_KILLS", "20"))
HIDDEN = 20000  # ~1 MB per checkpoint, so kills land inside writes too
SCRIPT = pathlib.Path(__file__).parent / "torch_training.py"
HAS_CLI = importlib.util.find_spec("fcb.cli") is not None


class Missing(Exception):
    """A file the manifest lists is not on disk."""


def check_directory(dirpath):
    """Every file the manifest lists is complete and loads; every slot name points at it."""
    manifest = fcb.torch.read_manifest(os.path.join(dirpath, "manifest.json"))
    for relative, record in manifest["files"].items():
        if not os.path.exists(os.path.join(dirpath, relative)):
            raise Missing(relative)
        _files.verify(os.path.join(dirpath, relative), record)
    for slot in manifest["slots"].values():
        payload = torch.load(os.path.join(dirpath, slot["file"]), weights_only=True)
        assert payload["fcb"]["step"] == slot["step"]
    return manifest


def inspect(dirpath):
    """`fcb inspect DIR`'s exit code and output (0 when it is not installed yet)."""
    if not HAS_CLI:
        return 0, ""
    from fcb import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["inspect", dirpath])
    return code, out.getvalue()


def _resume_file(dirpath):
    return fcb.torch.read_manifest(os.path.join(dirpath, "manifest.json"))["resume"]["file"]


def slot_table(manifest):
    """What a resumed run must reproduce exactly: slots, last check, callbacks' state, resume
    point, and each file's size (the bytes differ only by nothing: same weights, same state)."""
    return {
        "slots": manifest["slots"],
        "event_step": manifest["event_step"],
        "callbacks": manifest["callbacks"],
        "resume": manifest["resume"],
        "files": manifest["files"],
    }


@pytest.fixture
def one_thread():
    """Torch arithmetic that is the same in this process and in the killed ones: one thread
    in both (a matrix product's result may depend on how many threads split it), so a
    resumed run can differ from the reference only by what its checkpoints hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    torch.set_num_threads(threads)


def resume_differences(dirpath, resume, reference, weights, reference_table, **train):
    """Train `dirpath` to the end (resuming it when `resume`); what differs from the
    uninterrupted run: decisions, weights, the manifest's slot table, the step files on
    disk, `fcb inspect`."""
    resumed, resumed_weights = torch_training.train(dirpath, resume=resume, hidden=HIDDEN, **train)
    table = slot_table(check_directory(dirpath))
    return [
        name
        for name, same in [
            ("decisions", resumed == reference[len(reference) - len(resumed) :]),
            ("weights", all(torch.equal(resumed_weights[k], v) for k, v in weights.items())),
            *((f"manifest {key}", table[key] == reference_table[key]) for key in table),
            ("step files", sorted(os.listdir(os.path.join(dirpath, "steps")))
             == sorted(os.path.basename(f) for f in table["files"])),
            ("fcb inspect", inspect(dirpath)[0] == 0),
        ]
        if not same
    ]


def test_random_kills_never_corrupt_and_resume_exactly(tmp_path, one_thread):
    reference, weights = torch_training.train(str(tmp_path / "reference"), hidden=HIDDEN)
    reference_table = slot_table(check_directory(str(tmp_path / "reference")))
    rng = random.Random(20261122)
    outcomes = {
        "corrupted": 0, "missing": 0, "divergent": 0, "inspect_failed": 0, "crashed": 0,
        "killed_before_first_save": 0, "resumed": 0, "background": 0,
    }
    problems = []
    for kill in range(KILLS):
        dirpath = str(tmp_path / f"run{kill}")
        background = kill % 2 == 1
        outcomes["background"] += background
        with open(tmp_path / f"run{kill}.stderr", "w+") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(SCRIPT), dirpath, "--hidden", str(HIDDEN)]
                + (["--background"] if background else []),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=one_thread,
            )
            lines = rng.randrange(1, len(reference))  # at least one check: past the imports
            for _ in range(lines):
                if not process.stdout.readline():
                    break
            time.sleep(rng.random() * 0.05)
            process.send_signal(signal.SIGKILL)
            code = process.wait()
            process.stdout.close()
            stderr.seek(0)
            errors = stderr.read()
        if code not in (-signal.SIGKILL, 0):  # it died on its own, before the kill
            outcomes["crashed"] += 1
            problems.append(f"run{kill}: exited with {code} before the kill: {errors}")
            continue
        fresh = not os.path.exists(os.path.join(dirpath, "manifest.json"))
        if fresh:
            outcomes["killed_before_first_save"] += 1
        else:
            try:
                check_directory(dirpath)
            except Missing as error:
                outcomes["missing"] += 1
                problems.append(f"run{kill}: missing {error}")
                continue
            except (fcb.CheckpointCorruptError, AssertionError, RuntimeError) as error:
                outcomes["corrupted"] += 1
                problems.append(f"run{kill}: {error}")
                continue
            code, output = inspect(dirpath)
            if code != 0:
                outcomes["inspect_failed"] += 1
                problems.append(f"run{kill}: fcb inspect exited {code}: {output}")
        # A run killed before its first manifest has nothing to resume: it starts again.
        resumed_from = None if fresh else _resume_file(dirpath)
        differences = resume_differences(dirpath, not fresh, reference, weights, reference_table)
        outcomes["resumed"] += not fresh
        if differences:
            outcomes["divergent"] += 1
            problems.append(
                f"run{kill} ({lines} checks seen, resumed from {resumed_from}): differs in "
                f"{differences}"
            )
    print(f"kills: {KILLS}, outcomes: {json.dumps(outcomes)}")
    for problem in problems:
        print(problem)
    assert outcomes["corrupted"] == outcomes["missing"] == outcomes["divergent"] == 0, outcomes
    assert outcomes["inspect_failed"] == outcomes["crashed"] == 0, problems
    assert outcomes["resumed"] >= KILLS // 2, outcomes  # most kills landed mid-run


def test_background_writes_are_byte_identical_to_direct_writes(tmp_path):
    """The kill test compares every file's checksum with the uninterrupted run's, across
    both writers: a background write must save exactly the bytes a direct one does (the
    state dicts' types and module `_metadata` included)."""
    direct, background = str(tmp_path / "direct"), str(tmp_path / "background")
    torch_training.train(direct, epochs=4)
    torch_training.train(background, epochs=4, background=True)
    files = [fcb.torch.read_manifest(os.path.join(d, "manifest.json"))["files"]
             for d in (direct, background)]
    assert files[0] == files[1]
    payload = fcb.torch.load_checkpoint(os.path.join(background, "last.pt"))
    assert hasattr(payload["model"], "_metadata")


CRASH_SCRIPT = pathlib.Path(__file__).parent / "crash_at.py"
CRASH_EPOCHS = 3
CRASH_STRIDE = int(os.environ.get("FCB_CRASH_STRIDE", "7"))
"""Kill before every 7th file-system operation (`FCB_CRASH_STRIDE=1`: before each one)."""


@pytest.mark.parametrize("background", [False, True], ids=["direct", "background"])
def test_a_kill_before_any_file_operation_resumes_exactly(tmp_path, one_thread, background):
    """Deterministic kill points: the run is SIGKILLed just before its Nth operation that
    changes the disk (`tests/crash_at.py`), for N across the whole run; each directory is
    left consistent and its resume ends as the uninterrupted run does."""
    reference, weights = torch_training.train(
        str(tmp_path / "reference"), hidden=HIDDEN, epochs=CRASH_EPOCHS
    )
    reference_table = slot_table(check_directory(str(tmp_path / "reference")))
    options = ["--hidden", str(HIDDEN), "--epochs", str(CRASH_EPOCHS)]
    options += ["--background"] if background else []
    counted = subprocess.run(
        [sys.executable, str(CRASH_SCRIPT), str(tmp_path / "counted"), *options],
        env=one_thread, capture_output=True, text=True, check=True,
    )
    operations = int(counted.stderr.strip().splitlines()[-1].split()[-1])
    assert operations > 10 * CRASH_EPOCHS, counted.stderr  # the counter sees the writes
    problems, killed = [], 0
    first = 1 + background * (CRASH_STRIDE // 2)  # the two writers are cut at other points
    for point in range(first, operations + 1, CRASH_STRIDE):
        dirpath = str(tmp_path / f"at{point}")
        run = subprocess.run(
            [sys.executable, str(CRASH_SCRIPT), dirpath, *options],
            env=dict(one_thread, CRASH_AT=str(point)), capture_output=True, text=True,
        )
        if run.returncode != -signal.SIGKILL:
            problems.append(f"at {point}: exited {run.returncode}: {run.stderr[-2000:]}")
            continue
        killed += 1
        resume = os.path.exists(os.path.join(dirpath, "manifest.json"))
        try:
            if resume:
                check_directory(dirpath)
            differences = resume_differences(
                dirpath, resume, reference, weights, reference_table, epochs=CRASH_EPOCHS
            )
        except (Missing, fcb.CheckpointCorruptError, AssertionError, RuntimeError) as error:
            differences = [f"{type(error).__name__}: {error}"]
        if differences:
            problems.append(f"at {point} (resumed: {resume}): differs in {differences}")
    assert not problems, problems
    assert killed >= operations // CRASH_STRIDE, killed
