"""fcb.torch: files match the manifest and the decisions; resume; faults; dedup; guards."""

import errno
import json
import os

import numpy as np
import pytest
import torch
import torch_training

import fcb
import fcb.torch
from fcb import _files


def manifest(dirpath):
    with open(os.path.join(dirpath, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted reference run."""
    dirpath = str(tmp_path_factory.mktemp("full"))
    decisions, weights = torch_training.train(dirpath)
    return dirpath, decisions, weights


def test_files_on_disk_match_manifest_and_decisions(full_run):
    dirpath, decisions, _ = full_run
    m = manifest(dirpath)
    final = decisions[-1]
    assert final["stop"] and len(decisions) < 40
    assert {k: v for k, v in final["slots"].items() if v >= 0} == {
        name: slot["step"] for name, slot in m["slots"].items()
    }
    # Exactly the referenced steps are on disk, each once; every slot name is a link to it.
    on_disk = sorted(os.listdir(os.path.join(dirpath, "steps")))
    assert on_disk == sorted(os.path.basename(f) for f in m["files"])
    for name, slot in m["slots"].items():
        link, target = os.path.join(dirpath, slot["link"]), os.path.join(dirpath, slot["file"])
        assert os.path.samefile(link, target), name
        payload = fcb.torch.load_checkpoint(link)
        assert payload["fcb"]["step"] == slot["step"]
        _files.verify(target, m["files"][slot["file"]])
    # The tolerance slots froze on earlier steps than the overall best in this run.
    assert final["slots"]["best.val_loss.tolerance=1"] < final["slots"]["best.val_loss"]
    # The learning rate was reduced by the plateau callback, as torch's scheduler would.
    assert decisions[-1]["lr"] < decisions[0]["lr"]


def test_best_checkpoint_holds_the_best_weights(full_run):
    dirpath, _, _ = full_run
    (_, _), (x_val, y_val) = torch_training.data()
    model, _ = torch_training.model_and_optimizer()
    model.load_state_dict(
        fcb.torch.load_checkpoint(os.path.join(dirpath, "best_model.pt"))["model"]
    )
    with torch.no_grad():
        loss = float(torch.nn.functional.mse_loss(model(x_val), y_val))
    assert loss == pytest.approx(manifest(dirpath)["slots"]["best_model"]["value"], rel=1e-6)


@pytest.mark.parametrize("k", [2, 4, 6, 7, 9, 15])
def test_resume_equivalence(full_run, tmp_path, k):
    """Stop after epoch k, drop everything in memory, resume from disk: same decisions,
    manifest slots and final weights as the uninterrupted run. k=4 is at a new best of the
    reference run, k=6 and k=9 are after the tolerance-1 slot froze, k=7 and k=15 are checks
    where the plateau cut the learning rate."""
    _, decisions, weights = full_run
    dirpath = str(tmp_path)
    first, _ = torch_training.train(dirpath, stop_after=k)
    assert first == decisions[: k + 1]
    rest, resumed_weights = torch_training.train(dirpath, resume=True)
    assert first + rest == decisions
    for name, tensor in weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    reference = manifest(full_run[0])
    resumed = manifest(dirpath)
    for key in ("slots", "event_step", "callbacks"):
        assert resumed[key] == reference[key], key
    assert {k: v["size"] for k, v in resumed["files"].items()} == {
        k: v["size"] for k, v in reference["files"].items()
    }


def test_resume_into_another_directory_keeps_the_old_run(full_run, tmp_path):
    _ = full_run
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    torch_training.train(old, stop_after=5)
    before = {
        name: os.stat(os.path.join(old, "steps", name)).st_size
        for name in os.listdir(os.path.join(old, "steps"))
    }
    old_manifest = manifest(old)
    model, optimizer = torch_training.model_and_optimizer()
    adapter = fcb.torch.TorchAdapter(
        torch_training.callbacks(), model=model, optimizer=optimizer, dirpath=new, resume_from=old
    )
    adapter.on_fit_start()
    assert adapter.resumed_step == 5
    adapter.on_fit_end()
    assert manifest(old) == old_manifest
    assert {
        n: os.stat(os.path.join(old, "steps", n)).st_size
        for n in os.listdir(os.path.join(old, "steps"))
    } == before
    assert manifest(new)["slots"] == old_manifest["resume"]["slots"]


def test_background_writer_gives_the_same_files_and_decisions(full_run, tmp_path):
    dirpath, decisions, _ = full_run
    got, _ = torch_training.train(str(tmp_path), background=True)
    assert got == decisions
    assert manifest(str(tmp_path))["slots"] == manifest(dirpath)["slots"]


def test_bytes_written_with_tolerances_equal_best_and_last(tmp_path):
    """Three tolerances on top of best + last write no extra file: every step they hold was
    already written as best. Bytes differ only by the callbacks' state carried in each file."""

    def run(chain, name):
        written = []
        original = fcb.torch.CheckpointStore.commit

        def commit(self, **kwargs):
            written.append((self.files_written, self.bytes_written))
            return original(self, **kwargs)

        fcb.torch.CheckpointStore.commit = commit
        try:
            torch_training.train(str(tmp_path / name), chain=chain)
        finally:
            fcb.torch.CheckpointStore.commit = original
        return max(written)

    es = fcb.EarlyStopping("val_loss", patience=8)
    best_and_last = fcb.chain(es, fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True))
    with_tolerances = fcb.chain(
        es,
        fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(1, 3, 5)),
    )
    files_tol, bytes_tol = run(with_tolerances, "tol")
    files_plain, bytes_plain = run(best_and_last, "plain")
    assert files_tol == files_plain > 0
    state_bytes = len(json.dumps(fcb.state_dict(with_tolerances.init(), with_tolerances)))
    assert 0 <= bytes_tol - bytes_plain < files_tol * state_bytes


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_disk_fault_keeps_previous_files_and_raises(tmp_path, monkeypatch, failing, code):
    dirpath = str(tmp_path)
    model, optimizer = torch_training.model_and_optimizer()
    chain = fcb.chain(fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True))
    adapter = fcb.torch.TorchAdapter(chain, model=model, optimizer=optimizer, dirpath=dirpath)
    adapter.on_fit_start()
    adapter.on_validation_end({"val_loss": 1.0}, step=0)
    before = manifest(dirpath)
    state_before = adapter.state_dict()

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if failing == "write":
        monkeypatch.setattr(_files.ChecksumWriter, "write", fail)
    else:
        monkeypatch.setattr(_files.os, failing, fail)
    with pytest.raises(fcb.CheckpointWriteError, match=r"could not write .*step-00000001\.pt"):
        adapter.on_validation_end({"val_loss": 0.5}, step=1)
    monkeypatch.undo()
    assert manifest(dirpath) == before
    assert adapter.state_dict() == state_before  # the failed event did not happen
    assert not [n for n in os.listdir(os.path.join(dirpath, "steps")) if n.startswith(".fcb-tmp")]
    assert fcb.torch.load_checkpoint(os.path.join(dirpath, "last.pt"))["fcb"]["step"] == 0
    # The event can be retried once the disk is back.
    actions = adapter.on_validation_end({"val_loss": 0.5}, step=1)
    assert int(actions.slots["best_model"]) == 1
    adapter.on_fit_end()


def test_background_write_error_surfaces_at_the_next_event(tmp_path, monkeypatch):
    model, optimizer = torch_training.model_and_optimizer()
    chain = fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True)
    adapter = fcb.torch.TorchAdapter(
        chain, model=model, optimizer=optimizer, dirpath=str(tmp_path), background=True
    )
    adapter.on_fit_start()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files.os, "fsync", fail)
    adapter.on_validation_end({"val_loss": 1.0}, step=0)
    adapter._writer.wait()
    monkeypatch.undo()
    with pytest.raises(fcb.CheckpointWriteError, match="background checkpoint write failed"):
        adapter.on_validation_end({"val_loss": 0.9}, step=1)
    with pytest.raises(fcb.CheckpointWriteError, match="No space left"):
        adapter.on_fit_end()


def test_second_writer_on_one_directory_is_refused(tmp_path):
    first = fcb.torch.TorchAdapter(fcb.ModelCheckpoint(), dirpath=str(tmp_path))
    first.on_fit_start()
    second = fcb.torch.TorchAdapter(fcb.ModelCheckpoint(), dirpath=str(tmp_path))
    with pytest.raises(fcb.DirectoryInUseError, match=r"being written by another fcb adapter"):
        second.on_fit_start()
    first.on_fit_end()
    second.on_fit_start()  # free again
    second.on_fit_end()


class Composite(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 1)


def test_model_names_save_only_those_submodules(tmp_path):
    model = Composite()
    chain = fcb.chain(
        fcb.BestCheckpoint("val_loss", tolerances=[2], model_names=["encoder"]),
        fcb.ModelCheckpoint("val_loss", save_top_k=0, save_last=True),
    )
    adapter = fcb.torch.TorchAdapter(chain, model=model, dirpath=str(tmp_path))
    adapter.on_fit_start()
    adapter.on_validation_end({"val_loss": 1.0}, step=0)
    adapter.on_fit_end()
    best = fcb.torch.load_checkpoint(tmp_path / "best.val_loss.pt")
    assert set(best["model"]) == {"encoder"} and best["models"] == ["encoder"]
    assert set(best["model"]["encoder"]) == {"weight", "bias"}
    last = fcb.torch.load_checkpoint(tmp_path / "last.pt")
    assert set(last["model"]) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}
    bad = fcb.torch.TorchAdapter(
        fcb.BestCheckpoint("val_loss", model_names=["decoder"]), model=model, dirpath=str(tmp_path)
    )
    with pytest.raises(
        fcb.ConfigError, match=r"submodule 'decoder', but the model .* \['encoder', 'head'\]"
    ):
        bad.on_fit_start()


class CountCalls(fcb.Callback):
    def init(self):
        return jax_zero()

    def __call__(self, state, metrics, *, step):
        return state + 1, self.no_actions()


def jax_zero():
    import jax.numpy as jnp

    return jnp.asarray(0, jnp.int32)


def test_nested_callbacks_run_on_the_live_model_at_each_new_best(tmp_path):
    model = torch.nn.Linear(2, 1)
    child = CountCalls()
    chain = fcb.BestCheckpoint("val_loss", tolerances=[1], callbacks=[child])
    seen = []

    def evaluate(m):
        seen.append(float(m.weight.sum()))
        return {"test_loss": 0.1}

    adapter = fcb.torch.TorchAdapter(chain, model=model, dirpath=str(tmp_path), evaluate=evaluate)
    adapter.on_fit_start()
    for step, value in enumerate([1.0, 0.5, 0.7, 0.9, 0.2]):
        with torch.no_grad():
            model.weight.fill_(step)
        adapter.on_validation_end({"val_loss": value}, step=step)
    adapter.on_fit_end()
    assert seen == [0.0, 2.0, 8.0]  # the live weights at steps 0, 1 and 4 (new bests)
    assert int(adapter.runner.state.children[0]) == 3


def test_trainer_protocol_stop_flag_and_default_root_dir(tmp_path):
    class Trainer:
        def __init__(self):
            self.should_stop = False
            self.default_root_dir = str(tmp_path)
            self.epoch = 0

        def state_dict(self):
            return {"epoch": self.epoch}

        def load_state_dict(self, d):
            self.epoch = d["epoch"]

    trainer = Trainer()
    assert isinstance(trainer, fcb.torch.Trainer)
    adapter = fcb.torch.TorchAdapter(
        fcb.chain(fcb.EarlyStopping("val_loss", patience=1), fcb.ModelCheckpoint()),
        model=torch.nn.Linear(1, 1),
        trainer=trainer,
    )
    for step, value in enumerate([1.0, 2.0]):
        trainer.epoch = step
        adapter.on_validation_end({"val_loss": torch.tensor(value, requires_grad=True)}, step=step)
    assert trainer.should_stop and adapter.should_stop
    assert "did not improve" in adapter.stop_message
    adapter.on_fit_end()
    assert os.path.exists(tmp_path / "checkpoints" / "best_model.pt")
    assert fcb.torch.load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"] == {
        "epoch": 1
    }


def test_metric_errors_are_clear(tmp_path):
    adapter = fcb.torch.TorchAdapter(fcb.EarlyStopping("val_loss"), dirpath=str(tmp_path))
    with pytest.raises(
        fcb.MetricShapeError, match=r"'val_loss' must be a scalar, got a tensor of shape \(3,\)"
    ):
        adapter.on_validation_end({"val_loss": torch.ones(3)}, step=0)
    with pytest.raises(fcb.MissingMetricError, match=r"available keys: \['loss'\]"):
        adapter.on_validation_end({"loss": 1.0}, step=0)
    with pytest.raises(fcb.ConfigError, match=r"`check_on` must be"):
        fcb.torch.TorchAdapter(fcb.EarlyStopping(), check_on="epoch")
    adapter.on_fit_end()


def test_no_retracing_over_many_events(tmp_path):
    adapter = fcb.torch.TorchAdapter(
        fcb.chain(fcb.EarlyStopping("val_loss", patience=1000), fcb.ReduceLROnPlateau("val_loss")),
        dirpath=str(tmp_path),
    )
    adapter.on_fit_start()
    rng = np.random.default_rng(0)
    for step in range(50):
        adapter.on_validation_end({"val_loss": float(rng.random())}, step=step)
    assert adapter.runner._check._cache_size() == 1
    adapter.on_fit_end()


def test_vram_drift_without_cuda_is_a_noop_with_one_info_line(tmp_path, caplog):
    chain = fcb.chain(fcb.EarlyStopping("val_loss"), fcb.VRAMDrift(max_drift_fraction=0.1))
    adapter = fcb.torch.TorchAdapter(chain, dirpath=str(tmp_path))
    with caplog.at_level("INFO", logger="fcb"):
        adapter.on_fit_start()
        for step in range(3):
            actions = adapter.on_validation_end({"val_loss": 1.0 - step / 10}, step=step)
    lines = [r for r in caplog.records if "VRAMDrift" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert bool(actions.events["vram_drift/metric_missing"])
    assert not bool(actions.events["vram_drift/drift"])
    adapter.on_fit_end()


def test_resuming_a_run_that_had_stopped_sets_should_stop(full_run, tmp_path):
    dirpath, decisions, _ = full_run
    model, optimizer = torch_training.model_and_optimizer()
    adapter = fcb.torch.TorchAdapter(
        torch_training.callbacks(),
        model=model,
        optimizer=optimizer,
        dirpath=str(tmp_path),
        resume_from=dirpath,
    )
    adapter.on_fit_start()
    assert adapter.resumed_step == decisions[-1]["step"]
    assert adapter.should_stop and "did not improve" in adapter.stop_message
    adapter.on_fit_end()
