"""Every Torch checkpoint fcb writes can be loaded with `torch.load(weights_only=True)`.

A state dict holding another object (a NumPy array, an `argparse.Namespace`) is refused at
the first check, naming the entry, before anything is written; a file that a weights-only
load refuses anyway (an earlier fcb wrote it) is a `CheckpointCorruptError` that does not
advise `weights_only=False`; the RNG states fcb saves itself (torch, CUDA, NumPy, `random`)
are in a loadable form and restored on resume.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fcb
import fcb.torch
from fcb import _files

try:
    from fcb._host.manifest import write_manifest
except ImportError:  # a manifest without a checksum

    def write_manifest(path, manifest):
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump(manifest, f)

CHAIN = fcb.ModelCheckpoint("val_loss", save_last=True)


def manifest(dirpath):
    with open(os.path.join(dirpath, "manifest.json")) as f:
        return json.load(f)


class NumpyTrainer:
    """A trainer whose state dict holds NumPy's RNG state, as many hand-written loops do."""

    def __init__(self, convert=False):
        self.should_stop = False
        self.convert = convert
        self.epoch = 0

    def state_dict(self):
        name, keys, pos, has_gauss, cached = np.random.get_state()
        if self.convert:  # the fix the message gives
            keys = keys.tolist()
        return {"epoch": self.epoch, "np_rng": (name, keys, pos, has_gauss, cached)}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]


def test_numpy_values_in_a_state_dict_are_refused_at_the_first_check(tmp_path):
    adapter = fcb.torch.TorchAdapter(
        CHAIN, model=torch.nn.Linear(2, 1), trainer=NumpyTrainer(), dirpath=str(tmp_path)
    )
    with pytest.raises(
        fcb.CheckpointWriteError,
        match=r"^TorchAdapter: the checkpoint of step 0 is not written: "
        r"trainer\.state_dict\(\)\['np_rng'\]\[1\] holds a numpy\.ndarray, which "
        r"torch\.load\(weights_only=True\) refuses: the weights-only unpickler does not allow "
        r"numpy\._core\.multiarray\._reconstruct; no run could load this checkpoint or resume "
        r"from it\. Keep tensors, numbers, strings, lists, tuples and dicts in state dicts "
        r"\(e\.g\. torch\.from_numpy\(array\) or array\.tolist\(\) for a NumPy array",
    ):
        adapter.on_validation_end({"val_loss": 1.0})
    # nothing was written, and the check did not happen: the next one is step 0 again
    assert not (tmp_path / "manifest.json").exists()
    assert os.listdir(tmp_path / "steps") == []
    adapter.trainer.convert = True
    adapter.on_validation_end({"val_loss": 1.0})
    adapter.on_fit_end()
    assert manifest(tmp_path)["slots"]["last"]["step"] == 0
    payload = fcb.torch.load_checkpoint(tmp_path / "last.pt")
    assert payload["trainer"]["np_rng"][0] == "MT19937"


@pytest.mark.parametrize(
    ("value", "path", "kind"),
    [
        (argparse.Namespace(lr=0.1), r"\['config'\]", r"argparse\.Namespace"),
        ({"counts": __import__("collections").defaultdict(int)}, r"\['config'\]\['counts'\]",
         r"collections\.defaultdict"),
        ([1, np.float32(0.5)], r"\['config'\]\[1\]", r"numpy\.float32"),
        ({np.int64(3): "three"}, r"\['config'\] \(the key np\.int64\(3\)\)", r"numpy\.int64"),
        ({"fn": lambda x: x}, r"\['config'\]\['fn'\]", r"function"),
    ],
    ids=["namespace", "defaultdict", "numpy scalar", "numpy key", "lambda"],
)
def test_the_deepest_refused_entry_is_named(tmp_path, value, path, kind):
    class Scheduler:
        def state_dict(self):
            return {"last_epoch": 3, "config": value}

        def load_state_dict(self, state):
            pass

    adapter = fcb.torch.TorchAdapter(
        CHAIN, model=torch.nn.Linear(2, 1), scheduler=Scheduler(), dirpath=str(tmp_path)
    )
    with pytest.raises(
        fcb.CheckpointWriteError, match=rf"scheduler\.state_dict\(\){path} holds a {kind}"
    ):
        adapter.on_validation_end({"val_loss": 1.0})
    adapter.on_exception()


def test_a_type_allowed_with_safe_globals_is_saved_and_loaded(tmp_path):
    """The check is torch's own rule: what the user allows, it allows."""

    class Scheduler:
        def state_dict(self):
            return {"config": argparse.Namespace(lr=0.1)}

        def load_state_dict(self, state):
            self.loaded = state

    with torch.serialization.safe_globals([argparse.Namespace]):
        adapter = fcb.torch.TorchAdapter(
            CHAIN, model=torch.nn.Linear(2, 1), scheduler=Scheduler(), dirpath=str(tmp_path)
        )
        adapter.on_validation_end({"val_loss": 1.0})
        adapter.on_fit_end()
        assert fcb.torch.load_checkpoint(tmp_path / "last.pt")["scheduler"]["config"].lr == 0.1


def test_background_writes_are_checked_at_the_check(tmp_path):
    adapter = fcb.torch.TorchAdapter(
        CHAIN, model=torch.nn.Linear(2, 1), trainer=NumpyTrainer(), dirpath=str(tmp_path),
        background=True,
    )
    with pytest.raises(fcb.CheckpointWriteError, match=r"trainer\.state_dict\(\)\['np_rng'\]"):
        adapter.on_validation_end({"val_loss": 1.0})
    adapter.on_exception()


# -- a file a weights-only load refuses (an earlier fcb could write one) ------------------------


def unloadable_run(tmp_path):
    """A run whose `last` checkpoint holds an argparse.Namespace, its record matching."""
    run = tmp_path / "run"
    adapter = fcb.torch.TorchAdapter(CHAIN, model=torch.nn.Linear(2, 1), dirpath=str(run))
    adapter.on_validation_end({"val_loss": 1.0})
    adapter.on_fit_end()
    m = manifest(run)
    path = run / m["slots"]["last"]["file"]
    payload = torch.load(path, weights_only=True)
    payload["trainer"] = {"args": argparse.Namespace(lr=0.1)}
    os.unlink(run / "last.pt")
    torch.save(payload, path)
    m["files"][m["slots"]["last"]["file"]].update(_files.file_checksum(str(path)))
    write_manifest(run, m)  # sealed again, as a tool rewriting the file would
    return run, path


def test_an_unloadable_file_is_corrupt_without_advising_weights_only_false(tmp_path):
    run, path = unloadable_run(tmp_path)
    pattern = (
        rf"^{path} cannot be loaded as an fcb checkpoint: the weights-only unpickler does not "
        r"allow argparse\.Namespace\. fcb loads weights only \(no code from the file runs "
        r"while loading\) and never writes such a checkpoint"
    )
    readers = {
        "load_checkpoint": lambda: fcb.torch.load_checkpoint(run / "last.pt"),
        "resume": lambda: fcb.torch.TorchAdapter(
            CHAIN, model=torch.nn.Linear(2, 1), dirpath=str(tmp_path / "resumed"),
            resume_from=str(run),
        ).on_fit_start(),
    }
    for name, read in readers.items():
        with pytest.raises(fcb.CheckpointCorruptError, match=pattern) as caught:
            read()
        error = caught.value
        assert "weights_only=False" not in str(error), name
        # torch's own message, which advises it, is not shown under fcb's
        assert error.__cause__ is None and error.__suppress_context__, name


# -- the RNG states fcb saves ------------------------------------------------------------------


def draws():
    return (
        torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]
    )


def test_torch_numpy_and_random_generators_are_restored_on_resume(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    adapter = fcb.torch.TorchAdapter(CHAIN, model=torch.nn.Linear(2, 1), dirpath=str(tmp_path))
    adapter.on_validation_end({"val_loss": 1.0})
    adapter.on_fit_end()
    expected = draws()  # what an uninterrupted run draws after the check
    draws()
    resumed = fcb.torch.TorchAdapter(
        CHAIN, model=torch.nn.Linear(2, 1), dirpath=str(tmp_path), resume_from=str(tmp_path)
    )
    resumed.on_fit_start()
    resumed.on_exception()
    assert draws() == expected
    rng = fcb.torch.load_checkpoint(tmp_path / "last.pt")["rng"]
    assert sorted(rng) == ["numpy", "random", "torch"]  # no CUDA in use here


def test_cuda_generators_are_saved_once_cuda_is_in_use_and_restored(tmp_path, monkeypatch):
    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device: restored.update({device: state})
    )
    adapter = fcb.torch.TorchAdapter(CHAIN, model=torch.nn.Linear(2, 1), dirpath=str(tmp_path))
    adapter.on_validation_end({"val_loss": 1.0})
    adapter.on_fit_end()
    saved = fcb.torch.load_checkpoint(tmp_path / "last.pt")["rng"]["cuda"]
    assert [s.tolist() for s in saved] == [[1, 2, 3], [4]]
    resumed = fcb.torch.TorchAdapter(
        CHAIN, model=torch.nn.Linear(2, 1), dirpath=str(tmp_path), resume_from=str(tmp_path)
    )
    resumed.on_fit_start()
    resumed.on_exception()
    assert {d: s.tolist() for d, s in restored.items()} == {0: [1, 2, 3], 1: [4]}


# -- Lightning --------------------------------------------------------------------------------

pl = pytest.importorskip("pytorch_lightning")
import fcb.lightning  # noqa: E402


class Hyper(pl.LightningModule):
    def __init__(self, args):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def lightning_fit(root, args, max_epochs, ckpt_path=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=8)
    callback = fcb.lightning.FcbCallback(fcb.ModelCheckpoint("val_loss", save_last=True))
    trainer = pl.Trainer(
        default_root_dir=str(root), max_epochs=max_epochs, callbacks=[callback],
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Hyper(args), data, data, ckpt_path=ckpt_path)
    return trainer


def test_lightning_hyperparameters_holding_a_namespace_are_refused(tmp_path):
    with pytest.raises(
        fcb.CheckpointWriteError,
        match=r"^FcbCallback: the checkpoint of step 0 is not written: "
        r"checkpoint\['hyper_parameters'\]\['args'\] \(the LightningModule's "
        r"save_hyperparameters\(\)\) holds a argparse\.Namespace, which "
        r"torch\.load\(weights_only=True\) refuses; no run could load this checkpoint",
    ):
        lightning_fit(tmp_path, argparse.Namespace(lr=0.05), max_epochs=2)
    directory = tmp_path / "checkpoints"
    assert not (directory / "manifest.json").exists()
    assert os.listdir(directory / "steps") == []
    # the fix the message gives: a dict; Lightning then resumes from fcb's checkpoint
    lightning_fit(tmp_path / "ok", {"lr": 0.05}, max_epochs=2)
    last = tmp_path / "ok" / "checkpoints" / "last.ckpt"
    assert fcb.torch.load_checkpoint(last)["hyper_parameters"] == {"args": {"lr": 0.05}}
    trainer = lightning_fit(tmp_path / "ok", {"lr": 0.05}, max_epochs=3, ckpt_path=str(last))
    assert trainer.current_epoch == 3


_leaves = st.sampled_from(
    [1, 2.5, "s", None, True, b"b", torch.zeros(2), torch.nn.Parameter(torch.ones(1)),
     torch.Size([2]), torch.float32, np.zeros(2), argparse.Namespace(a=1), frozenset({1})]
)
_payloads = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["a", "b", 1, (1, 2)]), inner, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(payload=_payloads)
def test_the_quick_walk_of_every_save_agrees_with_the_full_one(payload):
    """`check_loadable` walks a payload without building entry paths; whatever it does not
    vouch for goes to the full walk: it refuses exactly what the full walk finds."""
    from fcb.torch._loadable import _plainly_loadable, check_loadable, find_unloadable

    found = find_unloadable(payload)
    if _plainly_loadable(payload):
        assert found is None
    refused = False
    try:
        check_loadable("owner", 3, {"model": payload}, lambda entry, path: f"{entry}{path}")
    except fcb.CheckpointWriteError:
        refused = True
    assert refused == (found is not None)
