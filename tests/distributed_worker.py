"""One rank of a tiny DDP run with fcb.torch (launched by torchrun from test_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py DIR SCENARIO OUT
SCENARIO: train | partial | resume | nan | fail. Appends one JSON line per check to
OUT/rank{rank}.jsonl.
"""

from __future__ import annotations

import datetime
import errno
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import fcb
import fcb.torch
from fcb import _files


def main(dirpath: str, scenario: str, out: str) -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    log = open(os.path.join(out, f"rank{rank}.jsonl"), "a")

    def emit(line: dict) -> None:
        log.write(json.dumps(line) + "\n")
        log.flush()

    generator = torch.Generator().manual_seed(99)
    x = torch.randn(128, 6, generator=generator)
    y = x @ torch.randn(6, 1, generator=generator) + torch.randn(128, 1, generator=generator)
    shard = slice(rank * 32, (rank + 1) * 32)  # each rank validates on its own shard
    x_val, y_val = x[64:][shard], y[64:][shard]
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(6, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    chain = fcb.chain(
        fcb.TerminateOnNaN(keys=("val_loss",)),
        fcb.EarlyStopping("val_loss", patience=3),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
    )
    adapter = fcb.torch.TorchAdapter(
        chain,
        model=model,
        optimizer=optimizer,
        dirpath=dirpath,
        resume_from=dirpath if scenario == "resume" else None,
    )
    adapter.on_fit_start()
    start = 0 if adapter.resumed_step is None else adapter.resumed_step + 1
    stop_after = 4 if scenario == "partial" else None
    scenario = "train" if scenario == "partial" else scenario
    for epoch in range(start, 60):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[:64][shard]), y[:64][shard]).backward()
        optimizer.step()
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(model(x_val), y_val).item()
        if scenario == "nan" and rank == 1 and epoch == 3:
            val_loss = float("nan")
        if scenario == "fail" and rank == 0 and epoch == 2:

            def fail(*_args, **_kwargs):
                raise OSError(errno.EIO, "Input/output error")

            _files.os.fsync = fail  # type: ignore[attr-defined]
        started = time.perf_counter()
        try:
            actions = adapter.on_validation_end({"val_loss": val_loss}, step=epoch)
        except fcb.CheckpointWriteError as error:
            seconds = time.perf_counter() - started
            emit({"rank": rank, "step": epoch, "error": str(error), "seconds": seconds})
            adapter.on_exception(error)
            return 0
        line = {
            "rank": rank,
            "step": epoch,
            "stop": adapter.should_stop,
            "reason": int(actions.stop_reason),
            "slots": {k: int(v) for k, v in actions.slots.items()},
        }
        emit(line)
        if adapter.should_stop or (stop_after is not None and epoch >= stop_after):
            break
    adapter.on_fit_end()
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    emit({"rank": rank, "done": True, "weights": weights})
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2], sys.argv[3])
    # A caught write error's traceback holds the adapter and the DDP model in reference
    # cycles; collect them so the model's reference to the gloo group is gone before the
    # group is destroyed, instead of at interpreter exit (where gloo's threads may abort).
    gc.collect()
    dist.destroy_process_group()
    sys.exit(code)
