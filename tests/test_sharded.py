"""Sharded Torch models (FSDP2 over 2 gloo ranks, torchrun): checkpoints through
torch.distributed.checkpoint, loaded whole in one process, resumed on other world sizes,
and never half-written by a kill or a full disk."""

import json
import os
import pathlib
import random
import subprocess
import sys
import warnings

import pytest
import torch

import fcb
import fcb.torch
from fcb._files import TMP_PREFIX, verify_location
from fcb.cli import main as fcb_main

WORKER = pathlib.Path(__file__).parent / "sharded_worker.py"
KILLS = int(os.environ.get("FCB_SHARDED_KILLS", "3"))
"""Kills of a rank mid-commit (more with FCB_SHARDED_KILLS=N)."""

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def launch(port, nproc=2, **config):
    out = pathlib.Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    config = {"epochs": 12, **config, "out": str(out), "dirpath": str(config["dirpath"])}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "--master_port", str(port), str(WORKER), json.dumps(config)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    return result


def ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def gathered(out, step):
    return torch.load(pathlib.Path(out) / f"gathered-{step}.pt", weights_only=True)


def assert_same_state(loaded, expected):
    assert set(loaded["model"]) == set(expected["model"])
    for key, value in expected["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    state = expected["optimizer"]["state"]
    assert set(loaded["optimizer"]["state"]) == set(state)
    for name, entries in state.items():
        for entry, value in entries.items():
            assert torch.equal(torch.as_tensor(loaded["optimizer"]["state"][name][entry]),
                               torch.as_tensor(value)), (name, entry)


def decisions(run):
    """Every check of a run's history: step, metrics and events (what a resume must repeat)."""
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [
        {k: line.get(k) for k in ("step", "metrics", "events", "stop")}
        for line in lines if "step" in line and "metrics" in line
    ]


def listed_complete(run):
    """Every location the manifest lists is complete; returns the listed steps."""
    if not (run / "manifest.json").exists():
        return []
    manifest = fcb.torch.read_manifest(run)
    for relative, record in manifest["files"].items():
        verify_location(str(run / relative), record)
    return sorted(record["step"] for record in manifest["files"].values())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    ok(launch(29641, dirpath=base / "run", out=base / "out"))
    return base / "run", base / "out"


def test_each_slot_loaded_in_one_process_equals_the_gathered_state_of_its_step(reference):
    run, out = reference
    manifest = fcb.torch.read_manifest(run)
    assert {s["kind"] for s in manifest["slots"].values()} >= {"best", "tolerance", "last"}
    for slot in manifest["slots"].values():
        loaded = fcb.torch.load_checkpoint(run / slot["link"])
        assert loaded["fcb"]["step"] == slot["step"]
        assert_same_state(loaded, gathered(out, slot["step"]))
        shards = manifest["files"][slot["file"]]["shards"]
        assert set(shards) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "fcb.pt",
                               "rng-1.pt"}
    # one directory per step, whatever the number of slots holding it; nothing half-written
    steps = sorted(os.listdir(run / "steps"))
    assert steps == sorted({s["file"].split("/")[1] for s in manifest["slots"].values()})
    assert not [name for name in steps if name.startswith(TMP_PREFIX)]
    assert fcb_main(["inspect", str(run)]) == 0


def test_export_writes_one_plain_file_of_the_slot(reference, tmp_path):
    run, out = reference
    slot = fcb.torch.read_manifest(run)["slots"]["best.val_loss"]
    target = tmp_path / "model.pt"
    assert fcb_main(["export", str(run), "--slot", "best.val_loss", "-o", str(target)]) == 0
    exported = torch.load(target, weights_only=True)
    assert_same_state(exported, gathered(out, slot["step"]))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model.load_state_dict(exported["model"])  # a plain module takes it as it is


def test_a_damaged_shard_is_refused_by_load_and_inspect(reference, tmp_path):
    run, _ = reference
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    slot = fcb.torch.read_manifest(copy)["slots"]["last"]
    shard = copy / slot["file"] / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(fcb.CheckpointCorruptError, match=r"__1_0\.distcp does not match"):
        fcb.torch.load_checkpoint(copy / "last")
    assert fcb_main(["inspect", str(copy)]) == 1


def test_background_saves_commit_the_same_checkpoints(reference, tmp_path):
    run, out = reference
    ok(launch(29642, dirpath=tmp_path / "run", out=tmp_path / "out", background=True))
    expected = fcb.torch.read_manifest(run)["slots"]
    manifest = fcb.torch.read_manifest(tmp_path / "run")
    assert {n: (s["step"], s["value"]) for n, s in manifest["slots"].items()} == {
        n: (s["step"], s["value"]) for n, s in expected.items()
    }
    for slot in manifest["slots"].values():
        assert_same_state(fcb.torch.load_checkpoint(tmp_path / "run" / slot["link"]),
                          gathered(out, slot["step"]))
    assert listed_complete(tmp_path / "run")


@pytest.mark.parametrize("kill", range(KILLS))
def test_a_rank_killed_mid_commit_leaves_complete_steps_and_resumes_exactly(
    reference, tmp_path, kill
):
    run, out = reference
    chooser = random.Random(1000 + kill)
    rank = kill % 2
    fsyncs = int((pathlib.Path(out) / f"fsyncs-{rank}.txt").read_text())  # the whole run's
    at = chooser.randint(4, fsyncs - 2)
    killed = launch(29643 + kill % 3, dirpath=tmp_path / "run", out=tmp_path / "out",
                    kill_rank=rank, kill_at=at)
    assert killed.returncode != 0, f"rank {rank} was not killed at fsync {at}"
    listed_complete(tmp_path / "run")
    ok(launch(29646, dirpath=tmp_path / "run", out=tmp_path / "out"))
    assert decisions(tmp_path / "run") == decisions(run)
    last = max(int(p.stem.split("-")[1]) for p in pathlib.Path(out).glob("gathered-*.pt"))
    assert_same_state(gathered(tmp_path / "out", last), gathered(out, last))
    assert listed_complete(tmp_path / "run")


def test_resume_on_other_world_sizes_restores_the_state_exactly(tmp_path):
    run = tmp_path / "run"
    ok(launch(29647, dirpath=run, out=tmp_path / "a", epochs=5))  # 2 ranks: steps 0..4
    ok(launch(29648, nproc=1, dirpath=run, out=tmp_path / "b", epochs=8, refuse=True))
    assert_same_state(torch.load(tmp_path / "b" / "resumed.pt"), gathered(tmp_path / "a", 4))
    ok(launch(29649, dirpath=run, out=tmp_path / "c", epochs=12))  # 1 -> 2 ranks
    assert_same_state(torch.load(tmp_path / "c" / "resumed.pt"), gathered(tmp_path / "b", 7))
    assert "Leave `sharded` at None" in (tmp_path / "b" / "refused.txt").read_text()
    assert listed_complete(run)


def test_a_full_disk_on_one_rank_fails_the_check_on_every_rank(tmp_path):
    result = launch(29650, dirpath=tmp_path / "run", out=tmp_path / "out",
                    enospc_rank=1, enospc_step=3, epochs=6)
    assert result.returncode != 0
    for rank in (0, 1):
        step, message = (tmp_path / "out" / f"error-{rank}.txt").read_text().split("\n", 1)
        assert step == "3"
        assert "No space left on device" in message
    assert max(listed_complete(tmp_path / "run")) < 3
    assert not [n for n in os.listdir(tmp_path / "run" / "steps") if "step-00000003" in n]


# -- one process: no torchrun --------------------------------------------------------------


def _train(dirpath, epochs, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    chain = fcb.named_chain(
        stop=fcb.EarlyStopping("val_loss", patience=3),
        ckpt=fcb.ModelCheckpoint("val_loss", save_last=True),
    )
    adapter = fcb.torch.TorchAdapter(chain, model=model, optimizer=optimizer, dirpath=dirpath,
                                     **options)
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    y = x.sum(1, keepdim=True) ** 2
    adapter.on_fit_start()
    resumed = {k: v.clone() for k, v in model.state_dict().items()}
    for epoch in adapter.epochs(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        adapter.on_validation_end({"val_loss": loss.item() + 0.1 * (epoch % 3 == 1)})
    adapter.on_fit_end()
    return adapter, model, resumed


def test_one_process_sharded_run_resumes_into_an_unsharded_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, model, _ = _train(tmp_path / "run", 4, sharded=True)
        saved = fcb.torch.load_checkpoint(tmp_path / "run" / "last")
        assert saved["fcb"]["step"] == 3
        for key, value in model.state_dict().items():
            assert torch.equal(saved["model"][key], value)
        # sharded=None decides from the run: it was saved sharded, so DCP reads it back
        adapter, _, resumed = _train(tmp_path / "run", 8)
    assert adapter.resumed_step == 3
    for key, value in saved["model"].items():
        assert torch.equal(resumed[key], value)
    assert all("shards" in r for r in fcb.torch.read_manifest(tmp_path / "run")["files"].values())


def test_a_single_file_run_is_not_resumed_sharded(tmp_path):
    _train(tmp_path / "run", 2)
    with pytest.raises(fcb.CheckpointCorruptError, match=r"single-file checkpoints.*sharded=False"):
        _train(tmp_path / "run", 4, sharded=True)


def test_sharded_must_be_a_bool_or_none(tmp_path):
    with pytest.raises(fcb.ConfigError, match=r"`sharded` must be None.*got sharded = 'yes'"):
        fcb.torch.TorchAdapter(fcb.EarlyStopping("val_loss"), dirpath=tmp_path, sharded="yes")
