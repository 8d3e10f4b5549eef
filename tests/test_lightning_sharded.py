"""fcb.lightning under Lightning's sharded strategies on 2 CPU processes: every rank writes
its shards of a checkpointed step into fcb's step directory (once per step), the manifest
verifies, one process reads a slot whole, and a resume through `resume_path` continues
exactly as the uninterrupted run."""

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import fcb  # noqa: E402
import fcb.lightning  # noqa: E402
import fcb.torch  # noqa: E402
from fcb.cli import main as fcb_main  # noqa: E402

WORKER = pathlib.Path(__file__).parent / "lightning_sharded_worker.py"

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def launch(port, strategy, out, *fits):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), str(WORKER), strategy, str(out), *fits],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def lines(out, name):
    with open(out / name) as f:
        return [json.loads(line) for line in f]


def checks(out, tag, rank=0):
    return {line["step"]: line for line in lines(out, f"{tag}-rank{rank}.jsonl")}


def saves(out, tag, rank):
    """The steps a rank's strategy saved, in order, from the temporary directories it was
    given (each write's own: its step, then the store's count of writes)."""
    names = [os.path.basename(line["path"]) for line in lines(out, f"{tag}-saves-rank{rank}.jsonl")]
    matches = [re.fullmatch(r"\.fcb-tmp-step-(\d{8})-\d+", name) for name in names]
    assert all(matches), (rank, names)
    return [int(match.group(1)) for match in matches]


def params(out, tag, step):
    return torch.load(out / f"{tag}-params-{step}.pt", weights_only=True)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    """ModelParallelStrategy: an uninterrupted run of 6 epochs, and a run of 3 epochs
    resumed in a second launch to 6."""
    out = tmp_path_factory.mktemp("fsdp2")
    launch(29655, "fsdp2", out, "whole:6:test:pass", "part:3")
    first = {rank: saves(out, "part", rank) for rank in (0, 1)}
    launch(29656, "fsdp2", out, "part:6:resume")
    return out, first


def assert_verified_sharded_run(out, tag, steps, weights_key):
    run = out / tag
    manifest = fcb.torch.read_manifest(str(run))
    assert fcb_main(["inspect", str(run)]) == 0
    for name, slot in manifest["slots"].items():
        relative = slot["file"]
        assert relative.startswith("steps/step-") and (run / relative).is_dir(), name
        assert os.path.realpath(run / slot["link"]) == os.path.realpath(run / relative)
        shards = manifest["files"][relative]["shards"]
        assert {"meta.pt", ".metadata"} <= set(shards), shards  # Lightning's own save
        assert any(f.endswith(".distcp") for f in shards)
    # every rank took part in each step's save, once, whatever number of slots held it
    for rank in (0, 1):
        assert saves(out, tag, rank) == list(steps), rank
    best = manifest["slots"]["best_model"]
    loaded = fcb.torch.load_checkpoint(str(run / best["link"]))
    assert loaded["callbacks"]["fcb"]["step"] == best["step"]  # recorded while saving it
    assert loaded["epoch"] == best["step"]
    expected = params(out, tag, best["step"])
    assert set(loaded[weights_key]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[weights_key][key], value), key
    return manifest


def test_model_parallel_steps_are_sharded_directories_that_verify_and_load(fsdp2):
    out, _ = fsdp2
    recorded = checks(out, "whole")
    assert sorted(recorded) == list(range(6))
    assert all(line["sharded"] for line in recorded.values())
    assert_verified_sharded_run(out, "whole", range(6), "state_dict")
    assert checks(out, "whole", 1) == {
        s: {**line, "rank": 1} for s, line in recorded.items()
    }  # both ranks took the same decisions


def test_trainer_test_with_ckpt_path_best_loads_the_sharded_best_slot(fsdp2):
    out, _ = fsdp2
    run = out / "whole"
    best = fcb.torch.read_manifest(str(run))["slots"]["best_model"]
    with open(out / "whole-tested.json") as f:
        assert json.load(f)["ckpt_path"] == str(run / best["link"])
    tested = torch.load(out / "whole-tested.pt", weights_only=True)
    expected = params(out, "whole", best["step"])  # the live weights were zeroed before
    assert set(tested) == set(expected)
    assert all(torch.equal(tested[k], expected[k]) for k in expected)
    assert_the_pass_evaluates_each_slot_on_every_rank(out, "whole")


def test_a_resume_through_resume_path_continues_as_the_uninterrupted_run(fsdp2):
    out, first = fsdp2
    # the first launch wrote steps 0..2; the resumed one starts after step 2
    assert first == {r: list(range(3)) for r in (0, 1)}
    whole, part = checks(out, "whole"), checks(out, "part")
    assert sorted(part) == list(range(6))
    for step in range(6):
        assert part[step] == whole[step], step  # decisions, stops, gathered weights' digest
        resumed, uninterrupted = params(out, "part", step), params(out, "whole", step)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), step
    assert_verified_sharded_run(out, "part", range(6), "state_dict")
    assert fcb.torch.read_manifest(str(out / "part"))["slots"] == (
        fcb.torch.read_manifest(str(out / "whole"))["slots"]
    )


def test_fsdp_sharded_state_dict_steps_verify_load_and_resume(tmp_path):
    # FSDPStrategy (FSDP1, sharded state dicts): 3 epochs whole; 2, then resumed to 3
    launch(29657, "fsdp1", tmp_path, "f1:3:pass", "part:2")
    launch(29658, "fsdp1", tmp_path, "part:3:resume")
    recorded = checks(tmp_path, "f1")
    assert sorted(recorded) == [0, 1, 2] and all(line["sharded"] for line in recorded.values())
    assert_verified_sharded_run(tmp_path, "f1", range(3), "model")  # FSDPStrategy's key
    part = checks(tmp_path, "part")
    assert part == recorded  # decisions, stops, gathered weights' digest
    for step in range(3):
        resumed, uninterrupted = params(tmp_path, "part", step), params(tmp_path, "f1", step)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), step
    assert_verified_sharded_run(tmp_path, "part", range(3), "model")
    assert_the_pass_evaluates_each_slot_on_every_rank(tmp_path, "f1")


def assert_the_pass_evaluates_each_slot_on_every_rank(out, tag):
    """`evaluate_checkpoints` under the sharded strategy: on both ranks, each slot's
    evaluation saw exactly the weights recorded at its step, and the module's own came back."""
    slots = fcb.torch.read_manifest(str(out / tag))["slots"]
    recorded = checks(out, tag)
    for rank in (0, 1):
        with open(out / f"{tag}-pass-rank{rank}.json") as f:
            line = json.load(f)
        assert line["kept"], rank
        assert set(line["evaluated"]) == {"best_model", "last"}, rank
        for slot, (step, evaluated) in line["evaluated"].items():
            assert step == slots[slot]["step"], (rank, slot)
            # the evaluation's results pass as float32, as metrics do
            assert evaluated == pytest.approx(recorded[step]["digest"], rel=1e-6), (rank, slot)


# -- refused configurations (one process, no fit) ----------------------------------------------


def start(callbacks, strategy, tmp_path):
    callback = fcb.lightning.FcbCallback(callbacks, dirpath=tmp_path / "run")
    adapter = callback.adapter
    adapter.model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    adapter.on_fit_start(types.SimpleNamespace(strategy=strategy, should_stop=False))
    return adapter


def test_fsdp_full_state_dict_is_refused_naming_the_fix(tmp_path):
    strategy = pl.strategies.FSDPStrategy(state_dict_type="full")
    with pytest.raises(fcb.ConfigError, match=r"state_dict_type='sharded'"):
        start(fcb.ModelCheckpoint("val_loss"), strategy, tmp_path)
    assert not (tmp_path / "run").exists()


def test_model_parallel_without_distributed_checkpoint_is_refused(tmp_path):
    strategy = pl.strategies.ModelParallelStrategy(save_distributed_checkpoint=False)
    with pytest.raises(fcb.ConfigError, match=r"save_distributed_checkpoint=True"):
        start(fcb.ModelCheckpoint("val_loss"), strategy, tmp_path)


def test_submodule_variants_under_a_sharded_strategy_are_refused(tmp_path):
    strategy = pl.strategies.ModelParallelStrategy()
    subset = fcb.BestCheckpoint("val_loss", model_names=["0"])
    with pytest.raises(fcb.ConfigError, match=r"Drop model_names"):
        start(subset, strategy, tmp_path)


def test_a_sharded_model_under_a_single_file_strategy_is_refused(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    callback = fcb.lightning.FcbCallback(fcb.ModelCheckpoint("val_loss"), dirpath=tmp_path)
    adapter = callback.adapter
    adapter.model = types.SimpleNamespace()  # what holds_sharded_state asks of a module
    adapter.model.modules = lambda: [FullyShardedDataParallel.__new__(FullyShardedDataParallel)]
    strategy = pl.strategies.DDPStrategy()
    with pytest.raises(fcb.ConfigError, match=r"writes single-file checkpoints"):
        adapter.on_fit_start(types.SimpleNamespace(strategy=strategy, should_stop=False))
