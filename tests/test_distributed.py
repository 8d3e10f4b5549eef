"""fcb.torch under torch.distributed: 2 processes with the gloo backend (torchrun)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).parent / "distributed_worker.py"


def launch(dirpath, scenario, port, out):
    out.mkdir(exist_ok=True)
    for old in out.glob("rank*.jsonl"):
        old.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            str(WORKER),
            str(dirpath),
            scenario,
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    by_rank = {
        rank: [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    return by_rank


def checks(lines):
    return [{k: v for k, v in line.items() if k != "rank"} for line in lines if "step" in line]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    dirpath = tmp_path_factory.mktemp("ddp_full")
    return dirpath, launch(dirpath / "run", "train", 29611, dirpath)


def test_both_ranks_make_the_same_decisions_and_one_set_of_files(full):
    dirpath, by_rank = full
    dirpath = dirpath / "run"
    assert checks(by_rank[0]) == checks(by_rank[1])
    last = checks(by_rank[0])[-1]
    assert last["stop"] and last["reason"] == 4  # patience, on both ranks at the same step
    manifest = json.loads((dirpath / "manifest.json").read_text())
    assert {k: v["step"] for k, v in manifest["slots"].items()} == {
        k: v for k, v in last["slots"].items() if v >= 0
    }
    written = sorted(p.name for p in (dirpath / "steps").iterdir())
    assert written == sorted(os.path.basename(f) for f in manifest["files"])
    assert by_rank[0][-1]["weights"] == by_rank[1][-1]["weights"]  # DDP kept them in sync


def test_resume_gives_the_uninterrupted_decisions(full, tmp_path):
    _, reference = full
    first = launch(tmp_path / "run", "partial", 29612, tmp_path / "a")
    rest = launch(tmp_path / "run", "resume", 29613, tmp_path / "b")
    for rank in (0, 1):
        assert checks(first[rank]) + checks(rest[rank]) == checks(reference[rank])
        assert rest[rank][-1]["weights"] == reference[rank][-1]["weights"]


def test_nan_on_one_rank_stops_both(tmp_path):
    by_rank = launch(tmp_path / "run", "nan", 29614, tmp_path)
    for rank in (0, 1):
        last = checks(by_rank[rank])[-1]
        assert last["step"] == 3 and last["stop"] and last["reason"] == 5  # TERMINATE_ON_NAN


def test_write_failure_on_rank_0_reaches_both_ranks(tmp_path):
    by_rank = launch(tmp_path / "run", "fail", 29615, tmp_path)
    errors = {rank: [line for line in by_rank[rank] if "error" in line] for rank in (0, 1)}
    assert errors[0] and errors[1]
    assert errors[0][0]["step"] == errors[1][0]["step"] == 2
    assert "Input/output error" in errors[0][0]["error"]
    assert "failed on another rank (rank 0: CheckpointWriteError" in errors[1][0]["error"]
    surfaced = max(errors[rank][0]["seconds"] for rank in (0, 1))
    assert surfaced < 30  # one collective after the failed write, far below the group timeout
    print(f"write failure surfaced on both ranks within {surfaced * 1000:.1f} ms of the check")


def test_lightning_ddp_two_processes_agree(tmp_path):
    """A real Trainer(strategy="ddp", devices=2) on CPU with the bridge: both ranks stop at the
    same epoch with the same slot table, and rank 0 alone wrote one set of files."""
    out = tmp_path / "out"
    out.mkdir()
    worker = pathlib.Path(__file__).parent / "lightning_ddp_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "root"), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [
        [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    assert checks(ranks[0]) == checks(ranks[1]) and ranks[0][-1]["stop"]
    directory = tmp_path / "root" / "checkpoints"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(p.name for p in (directory / "steps").iterdir()) == sorted(
        os.path.basename(f) for f in manifest["files"]
    )
    assert not list(directory.glob("not-written*"))
    assert manifest["slots"]["best_model"]["step"] == ranks[0][-1]["best"][0]
