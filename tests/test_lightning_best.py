"""Lightning and fcb's best checkpoints: `trainer.test(ckpt_path="best")` loads fcb's best
slot, and the post-training pass evaluates the slots on the LightningModule."""

import dataclasses
import os
import warnings

import jax
import numpy as np
import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import fcb  # noqa: E402
import fcb.lightning  # noqa: E402
import fcb.torch  # noqa: E402


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.seen_in_test: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, _):
        self.seen_in_test.append({k: v.clone() for k, v in self.state_dict().items()})
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + torch.randn(48, 1, generator=g)
    split = [torch.utils.data.TensorDataset(x[i:i + 16], y[i:i + 16]) for i in (0, 16, 32)]
    return [torch.utils.data.DataLoader(d, batch_size=8) for d in split]


def held_out_loss(model: torch.nn.Module) -> dict[str, float]:
    x, y = data()[2].dataset.tensors
    return {"loss": float(torch.nn.functional.mse_loss(model.net(x), y))}


def trainer(root, callback, **kwargs):
    return pl.Trainer(
        default_root_dir=str(root), callbacks=[callback], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        **kwargs,
    )


def chain():
    child = fcb.EarlyStopping("best=val_loss/loss", patience=100)
    return fcb.chain(
        fcb.BestCheckpoint("val_loss", tolerances=[1], callbacks=[child]),
        fcb.ModelCheckpoint(save_last=True),
    )


def fitted(root, **options):
    pl.seed_everything(0, verbose=False)
    model = Regression()
    callback = fcb.lightning.FcbCallback(chain(), evaluate=held_out_loss, **options)
    fit = trainer(root, callback, max_epochs=8)
    train, val, _ = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.fit(model, train, val)
    return fit, callback, model


def slot_weights(directory, slot):
    manifest = fcb.torch.read_manifest(str(directory))
    record = manifest["slots"][slot]
    path = os.path.join(str(directory), record["link"])
    return record["step"], fcb.torch.load_checkpoint(path)["state_dict"]


def test_trainer_test_with_ckpt_path_best_evaluates_fcb_best_slot(tmp_path):
    fit, callback, model = fitted(tmp_path)
    directory = tmp_path / "checkpoints"
    step, best = slot_weights(directory, "best.val_loss")
    last_step, last = slot_weights(directory, "last")
    assert step != last_step  # the best slot is not the last step's weights
    assert fit.checkpoint_callback is callback
    assert callback.best_model_path == os.path.join(str(directory), "best.val_loss.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.test(model, data()[2], ckpt_path="best")
    assert fit.ckpt_path == callback.best_model_path
    assert model.seen_in_test
    for seen in model.seen_in_test:  # exactly the weights of fcb's best slot
        assert seen.keys() == best.keys()
        assert all(torch.equal(seen[k], best[k]) for k in best)
    assert not all(torch.equal(last[k], best[k]) for k in best)
    value = fcb.torch.read_manifest(str(directory))["slots"]["best.val_loss"]["value"]
    assert float(callback.best_model_score) == pytest.approx(value)


def test_a_new_trainer_tests_the_best_slot_of_a_run_in_dirpath(tmp_path):
    fitted(tmp_path)
    directory = tmp_path / "checkpoints"
    _, best = slot_weights(directory, "best.val_loss")
    model = Regression()
    callback = fcb.lightning.FcbCallback(chain(), dirpath=directory)
    assert callback.best_model_path.endswith("best.val_loss.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "other", callback).test(model, data()[2], ckpt_path="best")
    assert all(torch.equal(model.seen_in_test[0][k], best[k]) for k in best)


def test_the_pass_at_test_end_evaluates_each_slot_and_keeps_the_weights(tmp_path):
    fit, callback, model = fitted(tmp_path, evaluate_at_test_end="all", history=True)
    directory = tmp_path / "checkpoints"
    manifest_bytes = (directory / "manifest.json").read_bytes()
    before = callback.adapter.runner.state[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.test(model, data()[2], ckpt_path="best")
    _, best = slot_weights(directory, "best.val_loss")
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)  # put back
    assert set(callback.evaluated) == {"best.val_loss", "best.val_loss.tolerance=1"}
    for slot, evaluated in callback.evaluated.items():
        step, weights = slot_weights(directory, slot)
        direct = Regression()
        direct.load_state_dict(weights)
        assert evaluated.step == step
        assert evaluated.results == pytest.approx(held_out_loss(direct), abs=0, rel=0)
    # the nested EarlyStopping saw both evaluations under its prefixed key (mode "min"),
    # after those of training; the parent's own bookkeeping is untouched
    after = callback.adapter.runner.state[0]
    best, wait = float(before.children[0].best), int(before.children[0].wait_count)
    for evaluated in callback.evaluated.values():  # Lightning's rule, by hand
        loss = np.float32(evaluated.results["loss"])
        best, wait = (float(loss), 0) if loss < best else (best, wait + 1)
    assert float(after.children[0].best) == best
    assert int(after.children[0].wait_count) == wait
    parent = lambda state: [  # noqa: E731
        np.asarray(leaf).tolist() for leaf in jax.tree_util.tree_leaves(
            dataclasses.replace(state, children=None)
        )
    ]
    assert parent(after) == parent(before)
    assert (directory / "manifest.json").read_bytes() == manifest_bytes
    lines = (directory / "history.jsonl").read_text().splitlines()
    assert sum('"evaluated"' in line for line in lines) == 2
    assert all(r.get("step") is not None for r in fcb._history.read_rows(str(directory)))


def test_trainer_validate_after_fit_evaluates_the_best_slot_and_changes_nothing(tmp_path):
    fit, _, model = fitted(tmp_path, history=True)
    directory = tmp_path / "checkpoints"
    files = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = fit.validate(model, data()[1], ckpt_path="best", verbose=False)
    value = fcb.torch.read_manifest(str(directory))["slots"]["best.val_loss"]["value"]
    assert metrics["val_loss"] == pytest.approx(value, rel=1e-6)  # the best slot's weights
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == files


def test_best_model_path_is_empty_before_any_checkpoint_and_named_once_known(tmp_path):
    callback = fcb.lightning.FcbCallback(chain(), dirpath=tmp_path / "run")
    assert callback.best_model_path == ""
    assert callback.best_model_score is None
    assert callback.best_slot() == "best.val_loss"
    assert fcb.lightning.FcbCallback(fcb.ModelCheckpoint("val_loss")).best_slot() == "best_model"
    assert fcb.lightning.FcbCallback(fcb.EarlyStopping("val_loss")).best_slot() is None


def test_lightning_refuses_its_own_checkpointing_off_with_fcb_as_the_checkpoint_callback():
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="enable_checkpointing=False"):
        pl.Trainer(callbacks=[fcb.lightning.FcbCallback(chain())], enable_checkpointing=False)
    trainer_ = pl.Trainer(callbacks=[fcb.lightning.FcbCallback(chain())], logger=False)
    assert not [c for c in trainer_.callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]


def test_bad_evaluate_at_test_end_is_refused():
    with pytest.raises(fcb.ConfigError, match=r"`slots` names \['nope'\]"):
        fcb.lightning.FcbCallback(chain(), evaluate_at_test_end=["nope"])
    with pytest.raises(fcb.ConfigError, match=r"`evaluate_at_test_end` must be True"):
        fcb.lightning.FcbCallback(chain(), evaluate_at_test_end=3)
