"""B12: sharded checkpoints of an FSDP2 model over 2 gloo ranks (launched with torchrun).

    python benchmarks/b12_sharded_save.py [--saves N] [--width W]

B12: one check of TorchAdapter + ModelCheckpoint(save_last=True) (every check writes a new
step through torch.distributed.checkpoint, commits the manifest with every shard's CRC-32, and
deletes the previous step) against a direct `dcp.save` of the same state into a new directory
(and the deletion of the previous one), interleaved; the ratio is the median per-pair ratio.
B12a: the time the loop is blocked by a check with `background=True` (staging to host
memory; the save runs while the loop trains on) against the synchronous check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fcb
    import fcb.torch

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(4)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, args.width)).sum().backward()
    optimizer.step()  # Adam's state exists: the save holds it
    base = args.dir

    def adapter(name: str, background: bool):
        chain = fcb.ModelCheckpoint("val_loss", save_top_k=0, save_last=True)
        a = fcb.torch.TorchAdapter(chain, model=model, optimizer=optimizer,
                                   dirpath=os.path.join(base, name), background=background)
        a.on_fit_start()
        return a

    sync, background = adapter("fcb", False), adapter("fcb-bg", True)
    fcb_times, direct_times, blocked = [], [], []
    previous = None
    def settle(seconds: float = 0.1) -> None:
        # each timed part starts on a quiet machine: fcb deletes a replaced step's files in
        # the background, which must not slow the direct save timed next
        time.sleep(seconds)
        dist.barrier()

    for i in range(args.saves + 1):  # the first pair warms up
        settle()
        start = time.perf_counter()
        sync.on_validation_end({"val_loss": 1.0 / (i + 1)}, step=i)
        dist.barrier()
        fcb_time = time.perf_counter() - start

        settle()
        start = time.perf_counter()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        target = os.path.join(base, "direct", f"step-{i}")
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 storage_writer=dcp.FileSystemWriter(target, sync_files=True))
        if rank == 0 and previous is not None:
            shutil.rmtree(previous)
        previous = target
        dist.barrier()
        direct_time = time.perf_counter() - start

        settle()
        start = time.perf_counter()
        background.on_validation_end({"val_loss": 1.0 / (i + 1)}, step=i)
        blocked_time = time.perf_counter() - start
        background.wait()  # its save done and committed before the next pair is timed
        if i:
            fcb_times.append(fcb_time)
            direct_times.append(direct_time)
            blocked.append(blocked_time)
    sync.on_fit_end()
    background.on_fit_end()
    if rank == 0:
        record = fcb.torch.read_manifest(os.path.join(base, "fcb"))["files"]
        size = sum(s["size"] for r in record.values() for s in r["shards"].values())
        print(json.dumps({
            "fcb": fcb_times, "direct": direct_times, "blocked": blocked, "bytes": size,
        }))
    dist.destroy_process_group()


def _ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--port", type=int, default=29661)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as directory:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(args.port), __file__, "--saves", str(args.saves),
             "--width", str(args.width), "--dir", directory],
            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    data = json.loads(result.stdout.strip().splitlines()[-1])
    ratios = [f / d for f, d in zip(data["fcb"], data["direct"], strict=True)]
    blocked = [b / f for b, f in zip(data["blocked"], data["fcb"], strict=True)]
    mib = data["bytes"] / 2**20
    what = (f"FSDP2 MLP ({args.width}x{args.width} x 4) + Adam over 2 gloo ranks, "
            f"{mib:.1f} MiB per step, {args.saves} checks")
    ratio, blocked_ratio = statistics.median(ratios), statistics.median(blocked)
    print("| id | what | fcb | peer | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    print(f"| B12 | sharded save, one check of TorchAdapter + ModelCheckpoint(save_last=True): "
          f"{what}, against a direct dcp.save of the same state (and deleting the previous "
          f"step) | {_ms(data['fcb'])} | {_ms(data['direct'])} | {ratio:.3f}x | <= 1.05x | "
          f"{'yes' if ratio <= 1.05 else '**no**'} |")
    print(f"| B12a | time the loop is blocked by a check with background=True (DCP async "
          f"save: staging to host memory) against the synchronous check: {what} | "
          f"{_ms(data['blocked'])} | {_ms(data['fcb'])} | {blocked_ratio:.3f}x | <= 0.25x | "
          f"{'yes' if blocked_ratio <= 0.25 else '**no**'} |")


if __name__ == "__main__":
    main()
