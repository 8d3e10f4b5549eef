"""The file operations behind sharded steps (`fcb.torch._dcp_io`), in one process."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from fcb.torch._dcp_io import StagingBuffers, Trash  # noqa: E402


def test_staging_reuses_its_buffers_and_reallocates_when_the_layout_changes():
    buffers = StagingBuffers()
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"lr": 0.1}}
    first = buffers.stage(state)
    assert torch.equal(first["model"]["w"], state["model"]["w"])
    assert first["model"]["w"].data_ptr() != state["model"]["w"].data_ptr()  # a copy
    state["model"]["w"] += 1
    state["optimizer"]["lr"] = 0.05
    second = buffers.stage(state)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # reused
    assert torch.equal(second["model"]["w"], state["model"]["w"])
    assert second["optimizer"]["lr"] == 0.05
    for changed in (
        {"model": {"w": torch.zeros(3, 2)}, "optimizer": {"lr": 0.1}},  # shape
        {"model": {"w": torch.zeros(2, 3, dtype=torch.float64)}, "optimizer": {"lr": 0.1}},
        {"model": {"w": torch.zeros(2, 3), "b": torch.ones(2)}, "optimizer": {"lr": 0.1}},
    ):
        staged = buffers.stage(changed)
        for key, tensor in changed["model"].items():
            assert torch.equal(staged["model"][key], tensor)
            assert staged["model"][key].dtype == tensor.dtype


def test_the_trash_renames_a_step_at_once_and_deletes_its_files_in_the_background(tmp_path):
    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / "__0_0.distcp").write_bytes(b"x" * 4096)
    trash = Trash()
    trash.remove(str(step))
    assert not step.exists()  # gone by name before remove returns
    trash.empty()
    assert os.listdir(tmp_path) == []
