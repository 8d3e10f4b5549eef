"""ModelCheckpoint: top-k, best, last, every_n, ties and NaN; parity and resume."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb.testing import (
    assert_jit_equivalent,
    assert_resume_equivalent,
    assert_vmap_equivalent,
    run,
)

POOL = [-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0, math.nan, math.inf, -math.inf]


def reference_top_k(values, k, mode, every_n):
    """Lightning's `ModelCheckpoint` rule, in plain Python, after every check.

    A finite value enters when the table is not full or it is strictly better than the worst
    entry, and then evicts the oldest entry tied at the worst value (Lightning's
    `kth_best_model_path`: `max` over a dict in insertion order). Ranks list the entries best
    first, equal values in the order they entered. Non-finite values never enter (fcb).
    """
    sign = 1.0 if mode == "min" else -1.0
    table = []  # (value, step) in the order they entered
    out = []
    for step, value in enumerate(values):
        if (step + 1) % every_n == 0 and math.isfinite(value):
            worst = max((sign * v for v, _ in table), default=math.inf)
            if len(table) < k or sign * value < worst:
                if len(table) == k:
                    del table[[sign * v for v, _ in table].index(worst)]
                table.append((value, step))
        ranked = sorted(table, key=lambda e: sign * e[0])  # stable: ties by entry order
        out.append([s for _, s in ranked] + [-1] * (k - len(table)))
    return out


histories = st.lists(st.sampled_from(POOL), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(
    values=histories,
    k=st.integers(1, 4),
    mode=st.sampled_from(["min", "max"]),
    every_n=st.integers(1, 3),
)
def test_top_k_matches_reference_after_every_check(values, k, mode, every_n):
    ckpt = fcb.ModelCheckpoint("val_loss", mode, save_top_k=k, every_n=every_n)
    _, actions = run(ckpt, {"val_loss": np.asarray(values, np.float32)})
    expected = reference_top_k(values, k, mode, every_n)
    slots = ckpt.rank_slots()
    got = np.stack([np.asarray(actions.slots[s]) for s in slots], axis=1)
    np.testing.assert_array_equal(got, np.asarray(expected))
    # save is true exactly when the current step is held by a slot (rank or last).
    last = [
        max((i for i in range(step + 1) if (i + 1) % every_n == 0), default=-1)
        for step in range(len(values))
    ]
    np.testing.assert_array_equal(np.asarray(actions.slots["last"]), last)
    held = (got == np.arange(len(values))[:, None]).any(axis=1) | (
        np.asarray(last) == np.arange(len(values))
    )
    np.testing.assert_array_equal(np.asarray(actions.save), held)


def test_slots_values_and_events():
    ckpt = fcb.ModelCheckpoint("acc", mode="max", save_top_k=2, filename="model")
    state = ckpt.init()
    state, a = ckpt(state, {"acc": 0.5}, step=10)
    assert {k: int(v) for k, v in a.slots.items()} == {"model": 10, "model-top2": -1, "last": 10}
    assert bool(a.events["model/improved"]) and bool(a.save)
    assert math.isnan(float(a.slot_values["model-top2"]))
    state, a = ckpt(state, {"acc": 0.4}, step=11)
    assert {k: int(v) for k, v in a.slots.items()} == {"model": 10, "model-top2": 11, "last": 11}
    assert not bool(a.events["model/improved"])
    state, a = ckpt(state, {"acc": 0.4}, step=12)  # tie with the worst kept: older stays
    assert int(a.slots["model-top2"]) == 11 and int(a.slots["last"]) == 12
    state, a = ckpt(state, {"acc": 0.9}, step=13)
    assert [int(a.slots[s]) for s in ("model", "model-top2")] == [13, 10]
    assert float(a.slot_values["model"]) == pytest.approx(0.9)


def test_nan_never_enters_and_never_evicts():
    ckpt = fcb.ModelCheckpoint("val_loss", save_top_k=3, save_last=False)
    _, a = run(ckpt, {"val_loss": np.array([0.5, np.nan, np.inf, -np.inf, 0.7], np.float32)})
    assert [int(a.slots[s][-1]) for s in ckpt.rank_slots()] == [0, 4, -1]
    assert list(np.asarray(a.save)) == [True, False, False, False, True]


def test_save_top_k_zero_keeps_only_last():
    ckpt = fcb.ModelCheckpoint("val_loss", save_top_k=0)
    assert ckpt.action_names().slots == ("last",)
    _, a = run(ckpt, {"val_loss": np.array([0.5, 0.4], np.float32)})
    assert list(np.asarray(a.slots["last"])) == [0, 1]


def test_save_top_k_minus_one_archives_every_finite_check():
    ckpt = fcb.ModelCheckpoint("val_loss", save_top_k=-1, save_last=False)
    assert ckpt.action_names().slots == ("best_model",)
    _, a = run(ckpt, {"val_loss": np.array([0.5, 0.4, np.nan, 0.6], np.float32)})
    assert list(np.asarray(a.archive)) == [True, True, False, True]
    assert list(np.asarray(a.slots["best_model"])) == [0, 1, 1, 1]


def test_missing_metric_non_strict_still_updates_last():
    ckpt = fcb.ModelCheckpoint("val_loss", strict=False)
    state = ckpt.init()
    state, a = ckpt(state, {"train_loss": 1.0}, step=0)
    assert int(a.slots["last"]) == 0 and int(a.slots["best_model"]) == -1
    assert bool(a.events["best_model/metric_missing"]) and bool(a.save)
    with pytest.raises(fcb.MissingMetricError, match=r"available keys: \['train_loss'\]"):
        fcb.ModelCheckpoint("val_loss")(ckpt.init(), {"train_loss": 1.0}, step=0)


HISTORY = {"val_loss": np.array([0.5, 0.3, 0.3, np.nan, 0.2, 0.25, 0.6, 0.1], np.float32)}


@pytest.mark.parametrize("k", [0, 1, 3, -1])
def test_jit_scan_and_resume_parity(k):
    ckpt = fcb.ModelCheckpoint("val_loss", save_top_k=k, every_n=2 if k == 3 else 1)
    assert_jit_equivalent(ckpt, HISTORY)
    assert_resume_equivalent(ckpt, HISTORY)


def test_vmap_over_every_n():
    every = jnp.array([1, 2, 3], jnp.int32)
    stacked = jax.vmap(lambda n: fcb.ModelCheckpoint("val_loss", save_top_k=2, every_n=n))(every)
    singles = [fcb.ModelCheckpoint("val_loss", save_top_k=2, every_n=int(n)) for n in every]
    assert_vmap_equivalent(stacked, singles, HISTORY)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_top_k": -2}, r"`save_top_k` must be an integer >= -1 .* got save_top_k = -2"),
        ({"save_top_k": 1.5}, r"save_top_k = 1.5"),
        ({"save_top_k": True}, r"save_top_k = True"),
        (
            {"save_top_k": 10_000},
            r"`save_top_k` must be at most 100, got save_top_k = 10000\. .*pass save_top_k=-1",
        ),
        ({"every_n": [1, 2]}, r"`every_n` must be an integer, got every_n = \[1, 2\]"),
        ({"every_n": 0}, r"`every_n` must be an integer >= 1, got every_n = 0"),
        ({"filename": "a/b"}, r"`filename` must be a file name stem .* got filename = 'a/b'"),
        ({"filename": ""}, r"filename = ''"),
        ({"filename": "last"}, r"`filename` must differ from 'last'"),
        ({"mode": "minimum"}, r"`mode` must be 'min' or 'max', got mode = 'minimum'"),
        ({"monitor": ""}, r"`monitor` must be a non-empty metric name"),
        ({"dirpath": 3}, r"`dirpath` must be a str, got dirpath = 3"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(fcb.ConfigError, match=match):
        fcb.ModelCheckpoint(**kwargs)


def test_two_checkpoints_with_one_filename_clash_in_a_chain():
    with pytest.raises(fcb.ConfigError, match=r"slot name 'best_model' is emitted by both"):
        fcb.chain(fcb.ModelCheckpoint("val_loss"), fcb.ModelCheckpoint("acc", mode="max"))


def test_largest_save_top_k_is_traced_in_whole_table_operations():
    """Rank slots cost a split into scalars, not an operation per rank and rule (the old
    code unrolled about 6.5 operations per rank, and a large save_top_k took minutes and
    GBs to compile)."""
    from fcb._model_checkpoint import MAX_SAVE_TOP_K

    def equations(k):
        ckpt = fcb.ModelCheckpoint("val_loss", save_top_k=k)
        check = lambda s, v, step: ckpt(s, {"val_loss": v}, step=step)  # noqa: E731
        jaxpr = jax.make_jaxpr(check)(ckpt.init(), jnp.float32(1.0), jnp.int32(0))
        return len(jaxpr.jaxpr.eqns)

    per_rank = (equations(MAX_SAVE_TOP_K) - equations(1)) / (MAX_SAVE_TOP_K - 1)
    assert per_rank <= 2.5, per_rank
    fcb.ModelCheckpoint("val_loss", save_top_k=MAX_SAVE_TOP_K)  # the maximum is accepted
