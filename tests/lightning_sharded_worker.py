"""A Lightning Trainer under a sharded strategy on 2 CPU processes, driven by fcb.lightning.

    python -m torch.distributed.run --nproc_per_node 2 tests/lightning_sharded_worker.py \
        STRATEGY OUT FIT [FIT ...]

STRATEGY is `fsdp2` (ModelParallelStrategy, `fully_shard` in `configure_model`) or `fsdp1`
(FSDPStrategy(state_dict_type="sharded") through `CPUFSDPStrategy`). Each FIT is
`TAG:MAX_EPOCHS` or `TAG:MAX_EPOCHS:resume` (`ckpt_path=fcb.lightning.resume_path(...)`),
run one after the other with checkpoints in OUT/TAG. Each rank appends its per-check
decisions to OUT/TAG-rank{rank}.jsonl and every strategy save to OUT/TAG-saves-rank{rank}
.jsonl; rank 0 saves the gathered parameters of every check to OUT/TAG-params-{step}.pt.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

import fcb
import fcb.lightning


class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    """FSDPStrategy on CPU processes (a limitation of Lightning on CPU, not of fcb).

    Lightning refuses `accelerator="cpu"` for the exact `FSDPStrategy` type (a subclass is
    let through), and wraps the model with `device_id=None` on CPU, which torch's FSDP turns
    into the current accelerator and rejects; this subclass passes `device_id=cpu`.
    """

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        return FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Net(pl.LightningModule):
    def __init__(self, fsdp2: bool):
        super().__init__()
        self.fsdp2 = fsdp2
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.fsdp2 and not isinstance(self.net, FSDPModule):  # sharded once (fit, test)
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        # not synced: fcb reduces the metric over ranks itself
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, _):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def full_parameters(trainer, pl_module):
    """The whole parameters, by name (a collective)."""
    if getattr(pl_module, "fsdp2", False):
        return {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in pl_module.named_parameters()
        }
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        return {name: p.detach().clone() for name, p in pl_module.named_parameters()}


# a checkpoint callback, listed after the FcbCallback: Lightning runs checkpoint callbacks
# after the others, in their order, so this one sees each check's decisions
class Record(pl.callbacks.Checkpoint):
    def __init__(self, fcb_callback, out, tag):
        self.fcb_callback, self.out, self.tag = fcb_callback, out, tag

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        params = full_parameters(trainer, pl_module)
        rank, step = trainer.global_rank, trainer.current_epoch
        if rank == 0:
            torch.save(params, os.path.join(self.out, f"{self.tag}-params-{step}.pt"))
        line = {
            "rank": rank,
            "step": step,
            "global_step": trainer.global_step,
            "stop": bool(trainer.should_stop),
            "best": self.fcb_callback.adapter.runner.state[1].steps.tolist(),
            "sharded": self.fcb_callback.adapter._sharded,
            "digest": digest(params),
        }
        with open(os.path.join(self.out, f"{self.tag}-rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


class RecordTest(pl.Callback):
    """The whole parameters the test loop runs with (`trainer.test(ckpt_path="best")`)."""

    def __init__(self, out, tag):
        self.out, self.tag = out, tag

    def on_test_start(self, trainer, pl_module):
        params = full_parameters(trainer, pl_module)
        if trainer.global_rank == 0:
            torch.save(params, os.path.join(self.out, f"{self.tag}-tested.pt"))
            with open(os.path.join(self.out, f"{self.tag}-tested.json"), "w") as f:
                json.dump({"ckpt_path": trainer.ckpt_path}, f)


def spy_saves(strategy, out, tag):
    """Record every path the strategy's own save is called with, per rank."""
    save = strategy.save_checkpoint

    def recorded(checkpoint, filepath, storage_options=None):
        with open(os.path.join(out, f"{tag}-saves-rank{strategy.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"path": os.fspath(filepath)}) + "\n")
        return save(checkpoint, filepath, storage_options)

    strategy.save_checkpoint = recorded


def make_strategy(kind):
    if kind == "fsdp2":
        return pl.strategies.ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"
        )
    return CPUFSDPStrategy(state_dict_type="sharded", process_group_backend="gloo")


def loaders():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(96, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.5 * torch.randn(96, 1, generator=g)
    train = torch.utils.data.TensorDataset(x[:64], y[:64])
    val = torch.utils.data.TensorDataset(x[64:], y[64:])
    return (
        torch.utils.data.DataLoader(train, batch_size=8),
        torch.utils.data.DataLoader(val, batch_size=16),
    )


def digest(params):
    return sum(float(p.double().sum()) for p in params.values())


def fit(kind, out, tag, max_epochs, resume, test=False, evaluate=False):
    pl.seed_everything(0, verbose=False)
    dirpath = os.path.join(out, tag)
    callback = fcb.lightning.FcbCallback(
        fcb.chain(
            fcb.EarlyStopping("val_loss", patience=50),
            fcb.ModelCheckpoint("val_loss", save_top_k=2),
        ),
        dirpath=dirpath,
        evaluate=lambda module: {"digest": digest(full_parameters(trainer, module))},
    )
    strategy = make_strategy(kind)
    spy_saves(strategy, out, tag)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=2, num_nodes=1, strategy=strategy,
        callbacks=[callback, Record(callback, out, tag), RecordTest(out, tag)],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=out,
    )
    train, val = loaders()
    ckpt_path = fcb.lightning.resume_path(dirpath) if resume else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = Net(kind == "fsdp2")
        trainer.fit(net, train, val, ckpt_path=ckpt_path)
        if test:  # the strategy loads fcb's best slot, a sharded directory
            with torch.no_grad():  # so that only the loaded checkpoint can give the weights
                for parameter in net.parameters():
                    parameter.zero_()
            trainer.test(net, val, ckpt_path="best")
        if evaluate:  # the pass on every rank: each slot's shards in the module, then back
            live = full_parameters(trainer, net)
            evaluated = callback.evaluate_checkpoints(["best_model", "last"])
            kept = full_parameters(trainer, net)
            line = {
                "evaluated": {s: [e.step, e.results["digest"]] for s, e in evaluated.items()},
                "kept": all(torch.equal(live[k], kept[k]) for k in live),
            }
            with open(os.path.join(out, f"{tag}-pass-rank{trainer.global_rank}.json"), "w") as f:
                json.dump(line, f)


def main(kind, out, *fits):
    for spec in fits:
        tag, max_epochs, *rest = spec.split(":")
        fit(kind, out, tag, int(max_epochs), resume="resume" in rest, test="test" in rest,
            evaluate="pass" in rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
