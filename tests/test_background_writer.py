"""The background writer's host copies: reused memory never holds two steps at once."""

from __future__ import annotations

import os
import threading

import torch

import fcb
import fcb.torch
from fcb.torch._writer import BackgroundWriter as _BackgroundWriter

LARGE = (512, 1024)  # 2 MiB of float32: large enough to be reused


def test_a_copy_is_reused_only_after_its_write_is_done():
    writer = _BackgroundWriter()
    try:
        source = torch.randn(LARGE)
        first = writer.host_copy(source)
        assert torch.equal(first, source) and first.data_ptr() != source.data_ptr()
        release = threading.Event()
        writer.submit(release.wait)  # the job holding `first` has not run yet
        second = writer.host_copy(source)
        assert second.data_ptr() != first.data_ptr()
        release.set()
        writer.submit(lambda: None)
        writer.wait()
        third = writer.host_copy(source.mul(2))
        assert third.data_ptr() in (first.data_ptr(), second.data_ptr())
        assert torch.equal(third, source.mul(2))
    finally:
        writer.shutdown()


def test_small_and_special_tensors_are_plain_copies():
    writer = _BackgroundWriter()
    try:
        small = torch.arange(10.0)
        for tensor in (small, torch.randn(LARGE).t(), torch.randn(LARGE).to_sparse()):
            copy = writer.host_copy(tensor)
            assert copy.layout == tensor.layout and copy.shape == tensor.shape
            assert torch.equal(copy.to_dense(), tensor.to_dense())
            assert copy.stride() == tensor.stride() or tensor.layout != torch.strided
    finally:
        writer.shutdown()


def test_each_background_checkpoint_holds_the_weights_of_its_step(tmp_path):
    model = torch.nn.Linear(1024, 512)  # 2 MiB of weights
    adapter = fcb.torch.TorchAdapter(
        fcb.ModelCheckpoint("val_loss", save_top_k=-1, save_last=True),
        model=model,
        dirpath=str(tmp_path),
        background=True,
    )
    adapter.on_fit_start()
    for step in range(8):  # faster than the writer: the queue fills and copies are reused
        with torch.no_grad():
            model.weight.fill_(step)
        adapter.on_validation_end({"val_loss": 1.0 / (step + 1)}, step=step)
        with torch.no_grad():
            model.weight.fill_(-1.0)  # the next "training step" changes the live weights
    adapter.on_fit_end()
    for step in range(8):
        path = os.path.join(tmp_path, "steps", f"step-{step:08d}.pt")
        weight = fcb.torch.load_checkpoint(path)["model"]["weight"]
        assert torch.all(weight == step), step
