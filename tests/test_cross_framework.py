"""One metric history through fcb.torch and fcb.orbax: the same decisions at every check, the
same slot -> step tables, the same steps kept on disk, the same resume point."""

import math
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fcb
import fcb.orbax
import fcb.torch

NAN, INF = math.nan, math.inf

# New bests, exact ties (with the best and with the worst of the top 3), NaN and inf (the
# tolerances freeze on them), a plateau that lowers the learning rate twice, a late best.
HISTORY = [
    0.90, 0.80, 0.80, 0.85, 0.70, 0.70, NAN, 0.75, 0.72, 0.72,
    0.65, INF, 0.66, 0.66, 0.64, 0.70, 0.71, NAN, 0.69, 0.60,
    0.61, 0.62, 0.63, 0.64, 0.65, 0.66, 0.67, 0.68,
]  # fmt: skip


def callbacks():
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=6, check_finite=False),
        fcb.ModelCheckpoint("val_loss", save_top_k=3, save_last=True),
        fcb.ModelCheckpoint("val_loss", filename="even", save_top_k=-1, save_last=False, every_n=2),
        fcb.BestCheckpoint("val_loss", tolerances=(1, 2, 4)),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=1),
    )


def random_history(seed, n=30):
    """Values from a small set, so ties are frequent, with NaN and inf sprinkled in."""
    rng = np.random.default_rng(seed)
    values = rng.choice(
        [0.5, 0.55, 0.6, 0.65, 0.7, NAN, INF], size=n, p=[0.2, 0.2, 0.2, 0.15, 0.15, 0.05, 0.05]
    )
    return [float(v) for v in values]


def decision(actions):
    return {
        "stop": bool(actions.stop),
        "stop_reason": int(actions.stop_reason),
        "save": bool(actions.save),
        "archive": bool(actions.archive),
        "slots": {name: int(step) for name, step in actions.slots.items()},
        "lr_scale": float(actions.lr_scale),
        "events": sorted(name for name, fired in actions.events.items() if bool(fired)),
    }


def run_torch(history, dirpath):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adapter = fcb.torch.TorchAdapter(callbacks(), model=model, optimizer=optimizer, dirpath=dirpath)
    adapter.on_fit_start()
    decisions, tables, rates = [], [], []
    for step, value in enumerate(history):
        with torch.no_grad():
            model.weight.fill_(step)
        actions = adapter.on_validation_end({"val_loss": value}, step=step)
        decisions.append(decision(actions))
        tables.append({n: s["step"] for n, s in adapter.store.manifest["slots"].items()})
        rates.append(optimizer.param_groups[0]["lr"])
        if adapter.should_stop:
            break
    manifest = adapter.store.manifest
    adapter.on_fit_end()
    steps = {int(re.match(r"step-(\d+)", name).group(1)) for name in os.listdir(f"{dirpath}/steps")}
    return decisions, tables, rates, manifest, steps


def run_orbax(history, dirpath):
    adapter = fcb.orbax.OrbaxAdapter(callbacks(), dirpath)
    adapter.on_fit_start()
    decisions, tables, rates = [], [], []
    lr = jnp.float32(0.1)
    for step, value in enumerate(history):
        weight = jnp.full((1, 3), float(step))
        actions = adapter.on_validation_end(
            {"val_loss": value},
            step=step,
            state=lambda actions, w=weight, lr=lr: {"weight": w, "lr": fcb.scaled_lr(lr, actions)},
        )
        lr = fcb.scaled_lr(lr, actions)
        decisions.append(decision(actions))
        tables.append(adapter.slots)
        rates.append(float(lr))
        if adapter.should_stop:
            break
    adapter.wait()
    manifest = fcb.orbax.read_manifest(dirpath)
    adapter.on_fit_end()
    steps = {int(name) for name in os.listdir(f"{dirpath}/steps") if name.isdigit()}
    return decisions, tables, rates, manifest, steps


@pytest.mark.parametrize("history", [HISTORY, random_history(1)], ids=["hand", "random"])
def test_torch_and_orbax_adapters_decide_and_keep_the_same(history, tmp_path):
    t_decisions, t_tables, t_rates, t_manifest, t_steps = run_torch(history, str(tmp_path / "t"))
    o_decisions, o_tables, o_rates, o_manifest, o_steps = run_orbax(history, str(tmp_path / "o"))
    assert o_decisions == t_decisions
    assert o_tables == t_tables
    assert o_rates == pytest.approx(t_rates, rel=1e-6)  # torch scales in float64, JAX float32
    assert o_steps == t_steps
    for key in ("event_step", "callbacks"):
        assert o_manifest[key] == t_manifest[key], key
    assert {n: (s["step"], s["value"]) for n, s in o_manifest["slots"].items()} == {
        n: (s["step"], s["value"]) for n, s in t_manifest["slots"].items()
    }
    assert o_manifest["resume"]["step"] == t_manifest["resume"]["step"]
    assert o_manifest["resume"]["stop_message"] == t_manifest["resume"]["stop_message"]
    archived = sorted(int(re.search(r"(\d+)", a).group(1)) for a in t_manifest["archive"])
    assert sorted(int(a.split("/")[-1]) for a in o_manifest["archive"]) == archived


def test_the_hand_written_history_covers_the_cases(tmp_path):
    """The parity above is only as good as the history: it must see ties, non-finite
    values, tolerance freezes, learning-rate cuts, archives and a stop."""
    decisions, tables, rates, manifest, _ = run_orbax(HISTORY, str(tmp_path))
    final = tables[-1]
    assert final["best.val_loss.tolerance=1"] < final["best.val_loss.tolerance=4"]
    assert final["best.val_loss.tolerance=4"] < final["best.val_loss"] == final["best_model"]
    assert any("best.val_loss/tolerance_exceeded" in d["events"] for d in decisions)
    assert sorted(set(rates), reverse=True)[:3] == pytest.approx([0.1, 0.05, 0.025])
    assert any(d["archive"] for d in decisions) and manifest["archive"]
    assert decisions[-1]["stop"] and len(decisions) < len(HISTORY)
    assert manifest["slots"]["best_model-top3"]["step"] >= 0
    # The restored best holds the weights written at that step (the step number).
    restored = fcb.orbax.restore(tmp_path, "best_model", like={"weight": jnp.zeros((1, 3))})
    chex.assert_trees_all_equal(restored["weight"], jnp.full((1, 3), float(final["best_model"])))
    assert isinstance(restored["weight"], jax.Array)
