"""One rank of a DDP run with long epochs, for test_preemption_distributed.py (torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/preemption_ddp_worker.py DIR OUT

A plain Torch loop: a check per epoch (`on_validation_end`) and `on_train_batch_end` after
every other batch, over `EPOCHS * BATCHES` global steps. Each batch's data comes from its
global step and the rank, so a resumed run trains exactly as an uninterrupted one. Appends to
OUT/rank{rank}.jsonl (each line with its wall-clock `time`): the pid (first line), one line per
batch (before its hook), one per check, and at the end the stop, the last step trained and the
final weights. The same
command resumes a run DIR holds (the default `existing_run="resume"`).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import fcb
import fcb.torch

EPOCHS = 3
BATCHES = 20
BATCH_SECONDS = 0.02  # room for the test to send its signal in the middle of a run


def data(step: int, rank: int, shape: tuple[int, int] = (16, 4)):
    rng = np.random.default_rng((step, rank))
    x = rng.normal(size=shape).astype(np.float32)
    y = x @ np.arange(1, shape[1] + 1, dtype=np.float32)[:, None] + 0.5
    return torch.from_numpy(x), torch.from_numpy(y)


def main(dirpath: str, out: str) -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    log = open(os.path.join(out, f"rank{rank}.jsonl"), "a")

    def emit(line: dict) -> None:
        log.write(json.dumps({"rank": rank, "time": time.time(), **line}) + "\n")
        log.flush()

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x_val, y_val = data(10**9, rank, (32, 4))  # each rank validates on its own shard
    adapter = fcb.torch.TorchAdapter(
        fcb.chain(
            fcb.EarlyStopping("val_loss", patience=100),
            fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        ),
        model=model,
        optimizer=optimizer,
        dirpath=dirpath,
    )
    adapter.on_fit_start()  # installs the SIGTERM handler: only now may the test signal
    emit({"pid": os.getpid(), "resumed": adapter.resumed_step})
    start = 0 if adapter.resumed_step is None else adapter.resumed_step + 1
    step = start - 1
    for step in range(start, EPOCHS * BATCHES):
        x, y = data(step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces the gradients: the ranks stay in step
        optimizer.step()
        time.sleep(BATCH_SECONDS)
        emit({"batch": step})
        if (step + 1) % BATCHES == 0:
            with torch.no_grad():
                val_loss = torch.nn.functional.mse_loss(model(x_val), y_val).item()
            actions = adapter.on_validation_end({"val_loss": val_loss}, step=step)
            slots = {k: int(v) for k, v in actions.slots.items()}
            emit({"check": step, "stop": bool(actions.stop), "slots": slots})
        else:
            adapter.on_train_batch_end(step=step)
        if adapter.should_stop:
            break
    stopped, message = adapter.should_stop, adapter.stop_message
    slots = adapter.slots  # rank 0's store; {} on rank 1, which opens none
    adapter.on_fit_end()
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    emit({"done": True, "stopped": stopped, "message": message, "last_step": step,
          "slots": slots, "weights": weights})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
