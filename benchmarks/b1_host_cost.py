"""B1: host cost of one validation event, fcb's Torch adapter against Lightning + torch.

Both sides run the same checks on the same metric sequence, one event at a time, and keep
the same checkpoints: the best by `val_loss`, and the latest at every check.

- fcb: `TorchAdapter(fcb.chain(EarlyStopping, ModelCheckpoint(save_top_k=1, save_last=True),
  ReduceLROnPlateau))`, driven through `on_validation_end`: metric conversion, the jitted
  chain, slot comparison (`plan_checkpoints`), learning-rate update, events. The `last` slot
  holds every check; a step that is also the best is one file.
- peer: Lightning's `EarlyStopping.on_validation_end` and the `on_validation_end` of two
  `ModelCheckpoint`s (top-k checks, file names, version counter) with a stub trainer, and
  `torch.optim.lr_scheduler.ReduceLROnPlateau.step`. One ModelCheckpoint keeps the best
  (`monitor="val_loss", save_top_k=1`), one without a monitor keeps the latest: Lightning's
  `save_last=True` copies a checkpoint only at a step that saved another one (66 of the
  first 2,000 events here, rarer after), so it would build 15 to 100 times fewer checkpoints
  than fcb.

Three rows. B1: decisions only. Each side's save call is replaced by a stub that records what
would be saved: Lightning's `ModelCheckpoint._save_checkpoint`, fcb's `TorchAdapter._save`
(which updates the slot table as a commit would). B1b: saves build their checkpoint in memory
on both sides and write nothing: Lightning's `_save_checkpoint` builds the dict
`Trainer.save_checkpoint` would (model, optimizer, scheduler, callback states); fcb's adapter
runs unchanged over a store that keeps files in memory (`MemoryStore`), so it builds the
payload, the callbacks' state dict and the manifest. B1c: saves also build the bytes each side
writes, and stop there. Lightning's `_atomic_save` serialises the checkpoint dict with
`torch.save` into a `BytesIO` before it opens the file: that much runs. fcb's `BytesStore`
serialises each step file as `CheckpointStore.write` does (`torch.save` through the CRC-32
writer, into a `BytesIO`) and encodes the sealed manifest as `atomic_write_json` does.

Run: python benchmarks/b1_host_cost.py [--quick]
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, cli, interleaved, median, ratios, spread, timed, us

import fcb
import fcb.torch
from fcb._canonical import canonical_json
from fcb._files import ChecksumWriter
from fcb._host.manifest import plan_checkpoints, with_files
from fcb.torch._store import CheckpointStore

PATIENCE = 10_000  # no stop: every event runs the whole chain on both sides


class MemoryStore(CheckpointStore):
    """The adapter's store with the file system taken out: payloads are built, not written."""

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, relative: str, step: int, models: Any, payload: Any) -> None:
        self._record(relative, step, models, {"size": 0, "crc32": 0})

    def _install(self, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        manifest, _ = with_files(manifest, files)
        self.manifest, self._written = manifest, {}


class BytesStore(MemoryStore):
    """A `MemoryStore` that also builds the bytes of every file it would write: each step
    file as `CheckpointStore.write` serialises it, and the manifest as `atomic_write_json`."""

    manifest_bytes = 0

    def write(self, relative: str, step: int, models: Any, payload: Any) -> None:
        out = ChecksumWriter(io.BytesIO())
        torch.save(payload, out)  # type: ignore[arg-type]
        self._record(relative, step, models, {"size": out.size, "crc32": out.crc32})

    def _install(self, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        manifest, _ = with_files(manifest, files)
        self.manifest_bytes = len(canonical_json(manifest).encode())
        self.manifest, self._written = manifest, {}


def metric_sequence(count: int, seed: int = 0) -> list[torch.Tensor]:
    """A noisy falling validation loss: improvements become rarer, plateaus longer."""
    rng = np.random.default_rng(seed)
    t = np.arange(count)
    values = 1.0 / np.sqrt(1.0 + t / 20.0) + 0.02 * rng.standard_normal(count)
    return [torch.tensor(v, dtype=torch.float32) for v in values.astype(np.float32)]


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def fcb_chain() -> fcb.Callback:
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=PATIENCE),
        fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=5),
    )


class InMemoryAdapter(fcb.torch.TorchAdapter):
    """The Torch adapter over a `MemoryStore`."""

    store_class: type[MemoryStore] = MemoryStore

    def open_store(self, processes: Any) -> MemoryStore:
        return self.store_class(self.dirpath)


class InMemoryBytesAdapter(InMemoryAdapter):
    """The Torch adapter over a `BytesStore`."""

    store_class = BytesStore


class DecisionsOnlyAdapter(InMemoryAdapter):
    """The Torch adapter with its save (payload, callbacks' state dict, commit) replaced by a
    record of the slot table, as the peer's save calls are stubbed."""

    def on_fit_start(self, *args: Any, **kwargs: Any) -> None:
        super().on_fit_start(*args, **kwargs)
        session = self.session

        def record_slots(
            actions: Any, step: int, metrics: Any, context: Any, said: str = ""
        ) -> None:
            store = session.store
            current = {name: s["step"] for name, s in store.manifest["slots"].items()}
            plan = plan_checkpoints(actions, step, session.runner.slot_models, current)
            if plan is not None:
                store.manifest["slots"] = {
                    name: {"step": slot_step}
                    for name, (slot_step, _, _) in plan.slots.items()
                    if slot_step >= 0
                }

        session._write = record_slots  # type: ignore[method-assign]


class FcbSide:
    def __init__(
        self,
        chain: fcb.Callback,
        metrics: list[torch.Tensor],
        *,
        payload: bool = False,
        to_bytes: bool = False,
        keys: tuple[str, ...] = ("val_loss",),
    ):
        self.model, self.optimizer = model_and_optimizer()
        directory = tempfile.mkdtemp(prefix="fcb-bench-")  # never written: MemoryStore
        adapter_class = DecisionsOnlyAdapter
        if payload or to_bytes:
            adapter_class = InMemoryBytesAdapter if to_bytes else InMemoryAdapter
        self.adapter = adapter_class(
            chain, model=self.model, optimizer=self.optimizer, dirpath=directory
        )
        self.adapter.on_fit_start()
        self.metrics, self.keys, self.step = metrics, keys, 0

    def events(self, count: int) -> float:
        adapter, metrics, keys, start = self.adapter, self.metrics, self.keys, self.step
        self.step += count

        def loop() -> None:
            for step in range(start, start + count):
                value = metrics[step]
                adapter.on_validation_end(dict.fromkeys(keys, value), step=step)

        return timed(loop) / count

    def best_step(self) -> int:
        assert self.adapter.store is not None
        return int(self.adapter.store.manifest["slots"]["best_model"]["step"])


# -- Lightning ------------------------------------------------------------------------------


class _Strategy:
    def reduce_boolean_decision(self, decision: Any, all: bool = True) -> Any:
        return decision

    def remove_checkpoint(self, filepath: str) -> None:
        pass

    def barrier(self, name: str | None = None) -> None:
        pass


class StubTrainer:
    """What Lightning's EarlyStopping and ModelCheckpoint read of a Trainer at validation end."""

    def __init__(self, directory: str, model: torch.nn.Module, optimizer: Any, scheduler: Any):
        from pytorch_lightning.trainer.states import TrainerFn, TrainerState

        self.state = TrainerState(fn=TrainerFn.FITTING)
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.fast_dev_run = False
        self.sanity_checking = False
        self.should_stop = False
        self.strategy = _Strategy()
        self.current_epoch = 0
        self.global_step = 0
        self.is_global_zero = True
        self.world_size = 1
        self.global_rank = 0
        self.ckpt_path = None
        self.loggers: list[Any] = []
        self.default_root_dir = directory
        self.check_val_every_n_epoch = 1
        self.val_check_interval = 1.0
        self.num_val_batches = [1]
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.callbacks: list[Any] = []
        self.saved: dict[str, Any] = {}
        self.saves = 0

    def dump_checkpoint(self) -> dict[str, Any]:
        """The content `Trainer.save_checkpoint` would write (its main parts), in memory."""
        return {
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "state_dict": self.model.state_dict(),
            "optimizer_states": [self.optimizer.state_dict()],
            "lr_schedulers": [self.scheduler.state_dict()],
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks},
        }


def lightning_checkpoint_class(payload: bool, to_bytes: bool = False) -> type:
    from pytorch_lightning.callbacks import ModelCheckpoint

    class StubSaveCheckpoint(ModelCheckpoint):
        """Lightning's ModelCheckpoint; the save records the file name (B1), builds the
        checkpoint dict in memory (B1b), or also its bytes as `_atomic_save` does before it
        opens the file (B1c). It never writes a file."""

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            trainer.saves += 1
            if to_bytes:
                buffer = io.BytesIO()
                torch.save(trainer.dump_checkpoint(), buffer)
                trainer.saved[filepath] = buffer.tell()
            else:
                trainer.saved[filepath] = trainer.dump_checkpoint() if payload else None
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath

    return StubSaveCheckpoint


def lightning_callbacks(
    count: int,
    directory: str,
    *,
    payload: bool = False,
    to_bytes: bool = False,
    save_last: bool = True,
    latest: bool = False,
) -> list[Any]:
    """`count` callbacks: EarlyStopping and ModelCheckpoint alternately (one: EarlyStopping).

    `latest`: one more ModelCheckpoint, without a monitor, keeps the checkpoint of every
    check, as fcb's `last` slot does. Lightning's own `save_last=True` does not: since 2.x it
    copies a checkpoint only when another one was saved at the same step (here: at the
    monitored improvements, 66 of the first 2,000 events and rarer after)."""
    from pytorch_lightning.callbacks import EarlyStopping

    checkpoint_class = lightning_checkpoint_class(payload, to_bytes)
    callbacks: list[Any] = []
    for i in range(count):
        if i % 2 == 0:
            callbacks.append(
                EarlyStopping("val_loss", patience=PATIENCE + i, check_on_train_epoch_end=False)
            )
        else:
            callbacks.append(
                checkpoint_class(
                    dirpath=os.path.join(directory, f"checkpoints-{i}"),
                    monitor="val_loss",
                    save_top_k=1,
                    save_last=save_last,
                    save_on_train_epoch_end=False,
                )
            )
    if latest:
        callbacks.append(
            checkpoint_class(
                dirpath=os.path.join(directory, "checkpoints-latest"),
                save_top_k=1,
                save_on_train_epoch_end=False,
            )
        )
    return callbacks


class LightningSide:
    def __init__(
        self,
        metrics: list[torch.Tensor],
        *,
        callbacks: int = 2,
        scheduler: bool = True,
        payload: bool = False,
        to_bytes: bool = False,
        save_last: bool = True,
        latest: bool = False,
    ):
        self.model, self.optimizer = model_and_optimizer()
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=0.5, patience=5
        )
        directory = tempfile.mkdtemp(prefix="lightning-bench-")  # never written
        self.trainer = StubTrainer(directory, self.model, self.optimizer, self.scheduler)
        self.callbacks = lightning_callbacks(
            callbacks,
            directory,
            payload=payload,
            to_bytes=to_bytes,
            save_last=save_last,
            latest=latest,
        )
        self.trainer.callbacks = self.callbacks
        self.use_scheduler = scheduler
        self.metrics, self.step = metrics, 0

    def events(self, count: int) -> float:
        trainer, callbacks, metrics, start = self.trainer, self.callbacks, self.metrics, self.step
        scheduler = self.scheduler if self.use_scheduler else None
        self.step += count

        def loop() -> None:
            for step in range(start, start + count):
                trainer.callback_metrics = {"val_loss": metrics[step]}
                trainer.current_epoch, trainer.global_step = step, step + 1
                for callback in callbacks:
                    callback.on_validation_end(trainer, None)
                if scheduler is not None:
                    scheduler.step(trainer.callback_metrics["val_loss"])

        return timed(loop) / count

    def best_step(self) -> int:
        monitored = [c for c in self.callbacks if getattr(c, "monitor", None) == "val_loss"]
        path = os.path.basename(monitored[-1].best_model_path)  # epoch=E-step=S.ckpt
        return int(path.split("-")[0].split("=")[1])


_BUILDS = {
    "B1": "decisions only (save calls stubbed on both sides), no file written",
    "B1b": "checkpoints built in memory on both sides, no file written",
    "B1c": "checkpoints built in memory down to the bytes each side would write (torch.save "
    "into a BytesIO on both sides; fcb also the CRC-32 and the sealed manifest's JSON), no file "
    "written",
}
_TARGETS = {"B1": 1.0, "B1b": 1.5}


def compare(row_id: str, events: int, repeats: int) -> Row:
    payload, to_bytes = row_id != "B1", row_id == "B1c"
    metrics = metric_sequence(events * (repeats + 2))
    ours = FcbSide(fcb_chain(), metrics, payload=payload, to_bytes=to_bytes)
    # the same checkpoints on both sides: the best, and the latest at every check
    peer = LightningSide(metrics, payload=payload, to_bytes=to_bytes, save_last=False, latest=True)
    times = interleaved(
        {"fcb": lambda: ours.events(events), "peer": lambda: peer.events(events)},
        repeats=repeats,
        warmup=2,
    )
    fcb_lr = ours.optimizer.param_groups[0]["lr"]
    peer_lr = peer.optimizer.param_groups[0]["lr"]
    same = ours.best_step() == peer.best_step() and bool(np.isclose(fcb_lr, peer_lr, rtol=1e-6))
    per_repeat = ratios(times["fcb"], times["peer"])
    ratio = median(per_repeat)
    what = (
        "host cost per validation event: EarlyStopping + ModelCheckpoint(top-1, last) + "
        "ReduceLROnPlateau, " + _BUILDS[row_id]
    )
    target = _TARGETS.get(row_id)
    note = f"{events} events x {repeats} repeats, {spread(per_repeat)}; "
    if to_bytes:
        store = ours.adapter.store
        assert isinstance(store, BytesStore)
        sizes = [r["size"] for r in store.manifest["files"].values()]
        peer_size = max(peer.trainer.saved.values())
        note += (
            f"bytes per save: fcb {max(sizes):,} (step file) + {store.manifest_bytes:,} "
            f"(manifest), Lightning {peer_size:,}; "
        )
    if payload:
        store = ours.adapter.store
        assert store is not None
        note += (
            f"checkpoints built: fcb {store.files_written:,} step files (the best shares the "
            f"latest's), Lightning {peer.trainer.saves:,} for {peer.step:,} events; "
        )
    note += f"same best step and learning rate on both sides: {same}"
    return Row(
        id=row_id,
        what=what,
        fcb=us(median(times["fcb"])),
        peer=us(median(times["peer"])),
        ratio=ratio,
        target="" if target is None else f"<= {target}x",
        met=None if target is None else ratio <= target,
        note=note,
    )


def run(quick: bool = False) -> list[Row]:
    events, repeats = (20, 2) if quick else (200, 41)
    return [compare(row_id, events, repeats) for row_id in ("B1", "B1b", "B1c")]


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
