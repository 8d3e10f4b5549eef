"""fcb.orbax in a multi-process JAX run: 2 CPU processes meeting through
`jax.distributed.initialize` on localhost, saving global (replicated) arrays with orbax's
multi-host protocol."""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).parent / "orbax_multiprocess_worker.py"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(directory, scenario, out):
    out.mkdir(exist_ok=True)
    for old in out.glob("process*.jsonl"):
        old.unlink()
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", XLA_FLAGS="")
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(directory), scenario, str(out), str(port), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in (0, 1)
    ]
    try:
        results = [process.communicate(timeout=240) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    return {
        i: [json.loads(line) for line in (out / f"process{i}.jsonl").read_text().splitlines()]
        for i in (0, 1)
    }


def checks(lines):
    """The decisions of each check (each process's own validation loss left out)."""
    drop = ("process", "val_loss")
    return [{k: v for k, v in line.items() if k not in drop} for line in lines if "stop" in line]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_full")
    return root / "run", launch(root / "run", "train", root)


def test_both_processes_make_the_same_decisions_and_one_set_of_steps(full):
    directory, by_process = full
    assert checks(by_process[0]) == checks(by_process[1])
    last = checks(by_process[0])[-1]
    assert last["stop"] and last["reason"] == 4  # patience, at the same step on both
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {k: v["step"] for k, v in manifest["slots"].items()} == {
        k: v for k, v in last["slots"].items() if v >= 0
    }
    assert sorted((directory / "steps").iterdir()) == sorted(
        directory / f for f in manifest["files"]
    )
    assert by_process[0][-1]["weights"] == by_process[1][-1]["weights"]


def test_the_metric_is_the_mean_over_processes(full):
    directory, by_process = full
    manifest = json.loads((directory / "manifest.json").read_text())
    best = manifest["slots"]["best_model"]
    local = [
        next(line["val_loss"] for line in by_process[i] if line.get("step") == best["step"])
        for i in (0, 1)
    ]
    assert local[0] != local[1]  # each process validates on its own examples
    # the callbacks keep values in float32
    assert math.isclose(best["value"], (local[0] + local[1]) / 2, rel_tol=1e-6)


def test_resume_gives_the_uninterrupted_decisions(full, tmp_path):
    _, reference = full
    first = launch(tmp_path / "run", "partial", tmp_path / "a")
    rest = launch(tmp_path / "run", "resume", tmp_path / "b")
    for i in (0, 1):
        assert checks(first[i]) + checks(rest[i]) == checks(reference[i])
        assert rest[i][-1]["weights"] == reference[i][-1]["weights"]


def test_nan_on_one_process_stops_both(tmp_path):
    by_process = launch(tmp_path / "run", "nan", tmp_path)
    for i in (0, 1):
        last = checks(by_process[i])[-1]
        assert last["step"] == 3 and last["stop"] and last["reason"] == 5  # TERMINATE_ON_NAN


def test_a_manifest_write_failure_on_process_0_reaches_both(tmp_path):
    """fcb's own write fails on the primary (fsync: ENOSPC): one collective after the write
    raises it on both processes at the same step; the manifest still lists committed steps."""
    directory = tmp_path / "run"
    by_process = launch(directory, "fail_manifest", tmp_path)
    errors = {i: [line for line in by_process[i] if "error" in line] for i in (0, 1)}
    assert errors[0][0]["step"] == errors[1][0]["step"] == 2
    assert "No space left on device" in errors[0][0]["error"]
    assert "failed on another process (process 0: CheckpointWriteError" in errors[1][0]["error"]
    assert "No space left on device" in errors[1][0]["error"]
    surfaced = max(errors[i][0]["seconds"] for i in (0, 1))
    assert surfaced < 5
    manifest = json.loads((directory / "manifest.json").read_text())
    assert max(record["step"] for record in manifest["files"].values()) == 1
    print(f"manifest write failure: raised on both processes within {surfaced * 1000:.0f} ms")


def test_an_orbax_write_failure_on_process_0_reaches_both(tmp_path):
    """orbax's write of step 2 fails on the primary (in orbax's background thread): orbax's
    processes wait for one another at its barriers until the timeout (10 s here), then both
    raise at step 2, each naming the I/O error, and step 2 is not in the manifest."""
    directory = tmp_path / "run"
    by_process = launch(directory, "fail_orbax", tmp_path)
    errors = {i: [line for line in by_process[i] if "error" in line] for i in (0, 1)}
    assert errors[0][0]["step"] == errors[1][0]["step"] == 2
    for i in (0, 1):
        assert "could not commit step 2" in errors[i][0]["error"]
        assert "Input/output error" in errors[i][0]["error"]
    surfaced = max(errors[i][0]["seconds"] for i in (0, 1))
    assert surfaced < 10 + 20  # orbax's timeout, with room for a loaded machine
    manifest = json.loads((directory / "manifest.json").read_text())
    assert max(record["step"] for record in manifest["files"].values()) == 1
    assert not list((directory / "steps").glob("2*"))
    print(f"orbax write failure: raised on both processes after {surfaced:.1f} s")
