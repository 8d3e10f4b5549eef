"""ModelCheckpoint's top-k against the real pytorch_lightning ModelCheckpoint.

Lightning's callback is driven through its own `on_validation_end` hook, with a stub trainer
that records the files it would write and delete (the way Lightning's unit tests drive
callbacks without a fit), and once through a real `pl.Trainer` to show the stub is faithful.
After every check the kept set, the best and the next checkpoint to evict must agree.
"""

import math
import os
import re
import types
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pl = pytest.importorskip("pytorch_lightning")
torch = pytest.importorskip("torch")

from pytorch_lightning.callbacks import ModelCheckpoint as LightningCheckpoint  # noqa: E402
from pytorch_lightning.trainer.states import TrainerFn  # noqa: E402

import fcb  # noqa: E402

# Few distinct values, so that histories are full of ties (the case that used to differ);
# all exact in float32, so both sides compare the same numbers.
POOL = [-1.0, 0.0, 0.25, 0.5, 1.0, 2.0]
_EPOCH = re.compile(r"epoch=(\d+)")


def _epoch(path):
    return int(_EPOCH.search(os.path.basename(path)).group(1)) if path else -1


def _is_last(path):
    return os.path.basename(path).startswith("last")


class _Strategy:
    def reduce_boolean_decision(self, decision, all=True):
        return bool(decision)

    def remove_checkpoint(self, filepath):
        self.files.discard(filepath)

    def barrier(self, *_):
        pass


class StubTrainer:
    """What `ModelCheckpoint.on_validation_end` reads of a trainer, fitting on one process."""

    def __init__(self):
        self.strategy = _Strategy()
        self.strategy.files = set()
        self.fast_dev_run = False
        self.state = types.SimpleNamespace(fn=TrainerFn.FITTING)
        self.sanity_checking = False
        self.is_global_zero = True
        self.loggers = []
        self.ckpt_path = None
        self.current_epoch = 0
        self.global_step = 0
        self.callback_metrics = {}

    @property
    def files(self):
        return self.strategy.files

    def save_checkpoint(self, filepath, weights_only=False):
        self.strategy.files.add(filepath)


def lightning_checks(tmp_dir, values, k, mode, every_n):
    """Lightning's record after each validation: (kept epochs, best, kth, last)."""
    callback = LightningCheckpoint(
        dirpath=str(tmp_dir),
        filename="{epoch}",
        monitor="val_loss",
        mode=mode,
        save_top_k=k,
        save_last=True,
        every_n_epochs=every_n,
        save_on_train_epoch_end=False,
    )
    callback.CHECKPOINT_NAME_LAST = "last-{epoch}"  # so that the record shows which epoch
    trainer = StubTrainer()
    records = []
    for epoch, value in enumerate(values):
        trainer.current_epoch, trainer.global_step = epoch, epoch + 1
        trainer.callback_metrics = {"val_loss": torch.tensor(value)}
        callback.on_validation_end(trainer, None)
        kept = {_epoch(p) for p in callback.best_k_models}
        full = k > 0 and len(callback.best_k_models) == k
        records.append(
            {
                "kept": kept,
                "best": _epoch(callback.best_model_path),
                "next_to_evict": _epoch(callback.kth_best_model_path) if full else -1,
                "last": _epoch(callback.last_model_path),
            }
        )
        # The stub's files are exactly the kept checkpoints plus `last`.
        assert {_epoch(p) for p in trainer.files if not _is_last(p)} == kept
    return records


def fcb_checks(values, k, mode, every_n):
    """fcb's record after each check, in the same form."""
    ckpt = fcb.ModelCheckpoint("val_loss", mode, save_top_k=k, every_n=every_n)
    state = ckpt.init()
    records, archived, entered_at = [], set(), -1
    for step, value in enumerate(values):
        state, actions = ckpt(state, {"val_loss": np.float32(value)}, step=step)
        if k == -1:
            archived |= {step} if bool(actions.archive) else set()
            kept = set(archived)
        else:
            kept = {int(s) for s in np.asarray(state.steps) if s >= 0}
        if step in kept:
            entered_at = step
        records.append(
            {
                "kept": kept,
                "best": int(actions.slots[ckpt.filename]) if k != 0 else -1,
                "next_to_evict": int(ckpt.next_to_evict(state)),
                "last": int(actions.slots["last"]),
                "entered_at": entered_at,
            }
        )
    return records


def assert_same_decisions(values, k, mode, every_n, lightning):
    mine = fcb_checks(values, k, mode, every_n)
    for check, (theirs, ours) in enumerate(zip(lightning, mine, strict=True)):
        where = f"check {check} of {values} (save_top_k={k}, mode={mode}, every_n={every_n})"
        assert ours["kept"] == theirs["kept"], where
        assert ours["best"] == theirs["best"], where
        if k != -1:  # keep-all never evicts; Lightning's kth is then just the worst kept
            assert ours["next_to_evict"] == theirs["next_to_evict"], where
        # Documented difference: Lightning's `last` moves only on a top-k save; fcb's `last`
        # is the last scheduled check. Lightning's is fcb's latest top-k entry.
        assert theirs["last"] == ours["entered_at"], where


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.sampled_from(POOL), min_size=1, max_size=20),
    k=st.sampled_from([1, 2, 3, 4, -1]),
    mode=st.sampled_from(["min", "max"]),
    every_n=st.integers(1, 3),
)
def test_top_k_best_and_eviction_match_lightning(tmp_path_factory, values, k, mode, every_n):
    lightning = lightning_checks(tmp_path_factory.mktemp("pl"), values, k, mode, every_n)
    assert_same_decisions(values, k, mode, every_n, lightning)


def test_tied_worst_evicts_the_oldest(tmp_path):
    """The issue's example: mode="min", save_top_k=2, history [1.0, 1.0, 0.5]."""
    values = [1.0, 1.0, 0.5]
    lightning = lightning_checks(tmp_path, values, 2, "min", 1)
    assert lightning[-1]["kept"] == {1, 2}
    ckpt = fcb.ModelCheckpoint("val_loss", "min", save_top_k=2)
    state = ckpt.init()
    for step, value in enumerate(values):
        state, actions = ckpt(state, {"val_loss": value}, step=step)
    assert [int(actions.slots[s]) for s in ckpt.rank_slots()] == [2, 1]
    assert int(ckpt.next_to_evict(state)) == 1
    assert_same_decisions(values, 2, "min", 1, lightning)


class _Scripted(pl.LightningModule):
    """Logs a scripted `val_loss` at each validation; trains a single weight."""

    def __init__(self, values):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.values = values

    def training_step(self, batch, _):
        return (self.weight - batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val_loss", torch.tensor(self.values[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Recorder(pl.Callback):
    def __init__(self, checkpoint):
        self.checkpoint, self.records = checkpoint, []

    def on_train_epoch_end(self, trainer, pl_module):  # after validation and the checkpoint
        c = self.checkpoint
        full = len(c.best_k_models) == c.save_top_k
        self.records.append(
            {
                "kept": {_epoch(p) for p in c.best_k_models},
                "best": _epoch(c.best_model_path),
                "next_to_evict": _epoch(c.kth_best_model_path) if full else -1,
                "last": _epoch(c.last_model_path),
            }
        )


@pytest.mark.parametrize(
    ("values", "k", "mode"),
    [([1.0, 1.0, 0.5, 0.5, 2.0, 0.25, 0.5, 0.5], 3, "min"), ([0.5, 1.0, 1.0, 0.5, 2.0], 2, "max")],
)
def test_stub_matches_a_real_trainer(tmp_path, values, k, mode):
    checkpoint = LightningCheckpoint(
        dirpath=str(tmp_path / "pl"),
        filename="{epoch}",
        monitor="val_loss",
        mode=mode,
        save_top_k=k,
        save_last=True,
        save_on_train_epoch_end=False,
    )
    checkpoint.CHECKPOINT_NAME_LAST = "last-{epoch}"
    recorder = _Recorder(checkpoint)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)))
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_epochs=len(values),
        callbacks=[checkpoint, recorder],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Scripted(values), data, data)
    stub = lightning_checks(tmp_path / "stub", values, k, mode, 1)
    assert recorder.records == stub
    on_disk = {_epoch(p.name) for p in (tmp_path / "pl").iterdir() if not _is_last(p.name)}
    assert on_disk == stub[-1]["kept"]
    assert_same_decisions(values, k, mode, 1, stub)


def test_non_finite_values_are_where_fcb_and_lightning_differ(tmp_path):
    """Lightning keeps a NaN check as +inf while its table has room; fcb never keeps one."""
    values = [math.nan, 0.5]
    lightning = lightning_checks(tmp_path, values, 2, "min", 1)
    assert lightning[-1]["kept"] == {0, 1}
    ckpt = fcb.ModelCheckpoint("val_loss", save_top_k=2)
    state = ckpt.init()
    for step, value in enumerate(values):
        state, _ = ckpt(state, {"val_loss": value}, step=step)
    assert [int(s) for s in state.steps] == [1, -1]


def test_lightning_last_moves_only_on_a_top_k_save(tmp_path):
    """Lightning 2.6 writes `last` at a validation only when that validation saved a top-k
    checkpoint; fcb's `last` is the last scheduled check (documented difference)."""
    worse = [0.5, 0.6, 0.7]
    assert [r["last"] for r in lightning_checks(tmp_path / "a", worse, 1, "min", 1)] == [0, 0, 0]
    assert [r["last"] for r in fcb_checks(worse, 1, "min", 1)] == [0, 1, 2]
    # every_n: an unscheduled check saves nothing, `last` included (both)
    falling = [0.5, 0.4, 0.3, 0.2]
    assert [r["last"] for r in lightning_checks(tmp_path / "b", falling, 1, "min", 2)] == [
        -1,
        1,
        1,
        3,
    ]
    assert [r["last"] for r in fcb_checks(falling, 1, "min", 2)] == [-1, 1, 1, 3]


def test_lightning_save_top_k_zero_writes_last_only_when_training_ends(tmp_path):
    callback = LightningCheckpoint(
        dirpath=str(tmp_path),
        filename="{epoch}",
        monitor="val_loss",
        save_top_k=0,
        save_last=True,
        save_on_train_epoch_end=False,
    )
    callback.CHECKPOINT_NAME_LAST = "last-{epoch}"
    trainer = StubTrainer()
    for epoch, value in enumerate([0.5, 0.4, 0.3]):
        trainer.current_epoch, trainer.global_step = epoch, epoch + 1
        trainer.callback_metrics = {"val_loss": torch.tensor(value)}
        callback.on_validation_end(trainer, None)
        assert callback.last_model_path == "" and not trainer.files
    callback.on_train_end(trainer, None)
    assert _epoch(callback.last_model_path) == 2
    # fcb's `last` follows every check
    assert [r["last"] for r in fcb_checks([0.5, 0.4, 0.3], 0, "min", 1)] == [0, 1, 2]
