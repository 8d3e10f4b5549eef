"""Preemption under torch.distributed: SIGTERM to one of two gloo ranks (torchrun) stops both
at the same step with one resume point, and a relaunch finishes as an uninterrupted run."""

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from preemption_ddp_worker import BATCHES, EPOCHS
from test_orbax_multiprocess import free_port

import fcb.cli

WORKER = pathlib.Path(__file__).parent / "preemption_ddp_worker.py"

STEPS = EPOCHS * BATCHES
STOPPED = re.compile(
    r"the job received (SIGTERM|a preemption signal) \(on this or another process\); a "
    r"resumable checkpoint of step (\d+) was written"
)


def start(dirpath, out):
    """torchrun of the worker over 2 ranks, not waited for."""
    out.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(WORKER), str(dirpath), str(out),
    ]
    with open(out / "torchrun.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(process, out, timeout):
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    assert code == 0, (out / "torchrun.log").read_text()[-4000:]
    return {rank: lines(out, rank) for rank in (0, 1)}


def lines(out, rank):
    path = out / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def checks(by_rank):
    return [
        {k: v for k, v in line.items() if k not in ("rank", "time")}
        for line in by_rank
        if "check" in line
    ]


def wait_for_batch(out, rank, batch, timeout=120):
    """The pid of `rank` once it has logged `batch` (its handler is installed by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = lines(out, rank)
        if any(line.get("batch", -1) >= batch for line in found):
            return found[0]["pid"]
        time.sleep(0.002)
    raise AssertionError(f"rank {rank} did not reach batch {batch} in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run: the final weights, slots and checks to match."""
    root = tmp_path_factory.mktemp("preempt_reference")
    by_rank = finish(start(root / "run", root / "out"), root / "out", timeout=240)
    return by_rank, json.loads((root / "run" / "manifest.json").read_text())


def test_sigterm_to_one_rank_stops_both_at_one_resume_point_and_resume_matches(
    reference, tmp_path, capsys
):
    by_rank_reference, manifest_reference = reference
    dirpath, first_out, second_out = tmp_path / "run", tmp_path / "first", tmp_path / "second"
    target = random.Random().randrange(1, STEPS - 2 * BATCHES)  # well before the end
    process = start(dirpath, first_out)
    pid = wait_for_batch(first_out, 1, target)
    os.kill(pid, signal.SIGTERM)  # rank 1 only; rank 0 learns of it at the next hook
    sent = time.time()
    first = finish(process, first_out, timeout=30)  # far below the 60 s group timeout
    exited = time.time() - sent

    done = {rank: first[rank][-1] for rank in (0, 1)}
    found = {rank: STOPPED.fullmatch(done[rank]["message"]) for rank in (0, 1)}
    assert all(found.values()), (target, done)
    assert found[1].group(1) == "SIGTERM"  # the rank that received it names it
    step = int(found[0].group(2))
    assert int(found[1].group(2)) == step
    assert done[0]["stopped"] and done[1]["stopped"]
    assert done[0]["last_step"] == done[1]["last_step"]
    # the resume point is the first hook's step that saw the flag (or the check right after)
    assert target <= step <= done[0]["last_step"] <= step + 1 < STEPS - 1, (target, done)
    assert checks(first[0]) == checks(first[1])

    manifest = json.loads((dirpath / "manifest.json").read_text())
    assert manifest["resume"]["step"] == step and manifest["slots"]["last"]["step"] == step
    assert done[0]["slots"] == {k: v["step"] for k, v in manifest["slots"].items()}
    assert sorted(p.name for p in (dirpath / "steps").iterdir()) == sorted(
        os.path.basename(f) for f in manifest["files"]
    )  # one set of files (rank 0's), nothing half-written
    assert fcb.cli.main(["inspect", str(dirpath)]) == 0, capsys.readouterr()

    second = finish(start(dirpath, second_out), second_out, timeout=240)
    for rank in (0, 1):
        assert second[rank][0]["resumed"] == step
        assert not second[rank][-1]["stopped"] and second[rank][-1]["last_step"] == STEPS - 1
        assert second[rank][-1]["weights"] == by_rank_reference[rank][-1]["weights"]
        assert checks(first[rank]) + checks(second[rank]) == checks(by_rank_reference[rank])
    assert second[0][-1]["slots"] == by_rank_reference[0][-1]["slots"]
    manifest = json.loads((dirpath / "manifest.json").read_text())
    assert manifest["slots"].keys() == manifest_reference["slots"].keys()
    assert {k: v["step"] for k, v in manifest["slots"].items()} == {
        k: v["step"] for k, v in manifest_reference["slots"].items()
    }
    print(
        f"SIGTERM to rank 1 after its batch {target}: both ranks stopped after step "
        f"{done[0]['last_step']} (resume point {step}) and ended their fit "
        f"{max(d['time'] for d in done.values()) - sent:.2f} s after the signal; torchrun "
        f"exited 0 {exited:.2f} s after it"
    )
