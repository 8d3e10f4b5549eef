"""One rank of a small FSDP2 run with fcb.torch (launched by torchrun from test_sharded.py).

    python -m torch.distributed.run --nproc_per_node N tests/sharded_worker.py CONFIG_JSON

CONFIG: dirpath, out (a directory), epochs (train epochs 0..epochs-1 at most), background,
kill_rank / kill_at (this rank exits at its kill_at-th fsync: a kill mid-commit),
enospc_rank / enospc_step (fsync fails with ENOSPC on that rank from that step on).
Rank 0 writes OUT/gathered-STEP.pt (the full parameters and optimizer state at each check),
OUT/resumed.pt (the same, right after the resume) and OUT/result.json.
"""

from __future__ import annotations

import datetime
import errno
import gc
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fcb
import fcb.torch


def full(value):
    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full(v) for v in value]
    return value


def main(config: dict) -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = config["out"]
    calls = {"fsync": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["fsync"] += 1
        if config.get("kill_rank") == rank and calls["fsync"] == config.get("kill_at"):
            os._exit(137)
        if config.get("enospc_rank") == rank and step_now[0] >= config.get("enospc_step", 1e9):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    step_now = [-1]
    os.fsync = fsync

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(64, 16, generator=generator)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    chain = fcb.named_chain(
        stop=fcb.EarlyStopping("val_loss", patience=3),
        best=fcb.BestCheckpoint("val_loss", tolerances=(2,)),
        last=fcb.ModelCheckpoint("val_loss", save_top_k=0, save_last=True),
    )
    if config.get("refuse"):  # a sharded model never goes to a single-file store
        try:
            fcb.torch.TorchAdapter(chain, model=model, optimizer=optimizer, sharded=False,
                                   dirpath=os.path.join(out, "refused")).on_fit_start()
        except fcb.ConfigError as error:
            with open(os.path.join(out, "refused.txt"), "w") as f:
                f.write(str(error))
    adapter = fcb.torch.TorchAdapter(
        chain, model=model, optimizer=optimizer, dirpath=config["dirpath"],
        background=config.get("background", False), history=True,
    )
    adapter.on_fit_start()
    if adapter.resumed_step is not None:  # full_tensor() is a collective: every rank
        model_state, optimizer_state = get_state_dict(model, optimizer)
        resumed = {"model": full(model_state), "optimizer": full(optimizer_state)}
        if rank == 0:
            torch.save(resumed, os.path.join(out, "resumed.pt"))
    # the batch of every epoch is split over the ranks the same way whatever the world size
    per_rank = 64 // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    try:
        for epoch in adapter.epochs(config["epochs"]):
            step_now[0] = epoch
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                val = torch.nn.functional.mse_loss(model(x[rows]), y[rows]).item()
            model_state, optimizer_state = get_state_dict(model, optimizer)
            gathered = {"model": full(model_state), "optimizer": full(optimizer_state)}
            if rank == 0:
                torch.save(gathered, os.path.join(out, f"gathered-{epoch}.pt"))
            # a wiggle makes bests, tolerance bests and patience all happen in a few epochs
            adapter.on_validation_end({"val_loss": val + 0.05 * math.sin(2.3 * epoch)},
                                      step=epoch)
        adapter.on_fit_end()
    except fcb.CheckpointWriteError as error:
        if rank == 0 or config.get("enospc_rank") is not None:
            with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
                f.write(f"{step_now[0]}\n{error}")
        adapter.on_exception(error)
        return 3
    with open(os.path.join(out, f"fsyncs-{rank}.txt"), "w") as f:
        f.write(str(calls["fsync"]))
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"stopped": adapter.should_stop, "last_step": adapter.session.last_step,
                       "fsyncs": calls["fsync"]}, f)
    return 0


if __name__ == "__main__":
    code = main(json.loads(sys.argv[1]))
    gc.collect()  # a caught error's traceback cycles hold the model and so the group
    dist.destroy_process_group()
    sys.exit(code)
