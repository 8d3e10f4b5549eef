"""One rank of a small FSDP2 run whose checkpoints are evaluated after training (launched by
torchrun from test_post_training.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/post_training_sharded_worker.py RUN OUT

Trains 5 checks, then runs `evaluate_checkpoints("all")` and `evaluate_checkpoints("last")`
on the trained adapter and on a fresh one (never started); each rank writes OUT/rank-R.json:
the results per slot (`[step, results]`) and whether the live sharded weights were kept.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

import fcb
import fcb.torch

LOSSES = [0.5, 0.4, 0.6, 0.7, 0.3]
X = torch.linspace(-1.0, 1.0, 24).reshape(6, 4)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def score(model: torch.nn.Module) -> dict[str, float]:
    out = model(X)
    return {"out": float(out.sum()), "sq": float((out**2).mean())}


def callbacks() -> fcb.Callback:
    return fcb.chain(
        fcb.BestCheckpoint("val_loss", tolerances=(1,), callbacks=[
            fcb.EarlyStopping("best=val_loss/out", "max", patience=100),
        ]),
        fcb.ModelCheckpoint(save_top_k=0, save_last=True),
    )


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in get_model_state_dict(model).items()
    }


def local_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def passes(adapter: fcb.torch.TorchAdapter) -> dict[str, list]:
    evaluated = {**adapter.evaluate_checkpoints("all"), **adapter.evaluate_checkpoints("last")}
    return {slot: [r.step, r.results] for slot, r in evaluated.items() if r is not None}


def main(dirpath: str, out: str) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    model = sharded(build_model())
    adapter = fcb.torch.TorchAdapter(callbacks(), model=model, dirpath=dirpath, evaluate=score)
    for step, loss in enumerate(LOSSES):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.1 * (i + 1))
        adapter.on_validation_end({"val_loss": loss}, step=step)
    adapter.on_fit_end()
    whole, local = full_state(model), local_state(model)
    evaluated = passes(adapter)
    live_kept = same(full_state(model), whole) and same(local_state(model), local)

    other = sharded(build_model())  # a new process's model: its own weights are kept
    other_whole = full_state(other)
    fresh = fcb.torch.TorchAdapter(callbacks(), model=other, dirpath=dirpath, evaluate=score)
    fresh_results = passes(fresh)
    fresh_live_kept = same(full_state(other), other_whole) and not fresh.session.started
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump({"evaluated": evaluated, "fresh": fresh_results, "live_kept": live_kept,
                   "fresh_live_kept": fresh_live_kept}, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
