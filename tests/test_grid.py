"""fcb.grid / fcb.Grid: batches of configurations, exact per configuration, clear errors."""

from __future__ import annotations

import time

import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
import fcb.testing


def _same(a, b):
    chex.assert_trees_all_equal(a, b)


def test_configurations_are_the_cartesian_product_last_axis_fastest():
    g = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=range(1, 4), min_delta=[0, 1e-3])
    assert len(g) == 6
    assert g.names == ("patience", "min_delta")
    assert g.configs == [
        {"patience": p, "min_delta": d} for p in (1, 2, 3) for d in (0, 1e-3)
    ]
    assert g.callback.patience.tolist() == [1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(
        g.callback.min_delta, np.asarray([0, 1e-3] * 3, np.float32)
    )
    assert g.callback.monitor == "val_loss"


@pytest.mark.parametrize(
    ("factory", "axes", "fixed"),
    [
        (fcb.EarlyStopping, {"patience": range(0, 5), "min_delta": [0.0, 0.01, 0.5]}, {}),
        (
            fcb.EarlyStopping,
            {"stopping_threshold": [0.1, 0.2], "baseline": np.array([1.0, 2.0])},
            {"mode": "max", "check_finite": False},
        ),
        (
            fcb.ReduceLROnPlateau,
            {"factor": [0.1, 0.5], "patience": [0, 2], "cooldown": [0, 1]},
            {"threshold_mode": "abs"},
        ),
        (fcb.BestCheckpoint, {"min_delta": [0, 0.1], "every_n": [1, 2]}, {"tolerances": (1, 3)}),
        (fcb.ModelCheckpoint, {"every_n": [1, 3]}, {"save_top_k": 2}),
    ],
)
def test_each_member_equals_the_configuration_built_alone(factory, axes, fixed):
    g = fcb.grid(factory, **fixed, **axes)
    for index, config in enumerate(g.configs):
        _same(g[index], factory(**fixed, **config))


@settings(max_examples=30, deadline=None)
@given(
    patience=st.lists(st.integers(0, 1000), min_size=1, max_size=5),
    min_delta=st.lists(
        st.floats(0, 10, allow_nan=False, allow_subnormal=False), min_size=1, max_size=4
    ),
)
def test_members_are_exact_for_any_values(patience, min_delta):
    g = fcb.grid(fcb.EarlyStopping, patience=patience, min_delta=min_delta)
    assert len(g) == len(patience) * len(min_delta)
    for index in (0, len(g) - 1):
        _same(g[index], fcb.EarlyStopping(**g.configs[index]))


def test_a_function_varies_several_callbacks_of_a_chain():
    def factory(patience, factor):
        return fcb.named_chain(
            stop=fcb.EarlyStopping("val_loss", patience=patience),
            plateau=fcb.ReduceLROnPlateau("val_loss", factor=factor, patience=1),
        )

    g = fcb.grid(factory, patience=[2, 5], factor=np.array([0.1, 0.5]))
    assert g.configs == [
        {"patience": 2, "factor": 0.1},
        {"patience": 2, "factor": 0.5},
        {"patience": 5, "factor": 0.1},
        {"patience": 5, "factor": 0.5},
    ]
    for index, config in enumerate(g.configs):
        _same(g[index], factory(**config))


def test_grid_runs_as_one_batched_callback():
    g = fcb.grid(
        lambda patience, every_n: fcb.chain(
            fcb.EarlyStopping("val_loss", patience=patience),
            fcb.ModelCheckpoint("val_loss", save_top_k=2, every_n=every_n),
        ),
        patience=[1, 3],
        every_n=[1, 2],
    )
    history = {"val_loss": np.array([0.5, 0.4, 0.45, 0.41, 0.3, 0.35, 0.36])}
    members = [g[i] for i in range(len(g))]
    fcb.testing.assert_vmap_equivalent(g.callback, members, history)
    state, actions = fcb.testing.run(g, history)
    assert actions.stop.shape == (7, 4)
    for index, member in enumerate(members):
        single_state, single_actions = fcb.testing.run(member, history)
        _same(jax.tree_util.tree_map(lambda x, i=index: x[i], state), single_state)
        _same(jax.tree_util.tree_map(lambda x, i=index: x[:, i], actions), single_actions)


def test_grid_state_round_trips_through_state_dict():
    g = fcb.grid(fcb.BestCheckpoint, metric_key="val_loss", tolerances=(1, 2), min_delta=[0, 0.1])
    history = {"val_loss": np.array([0.5, 0.4, 0.45, 0.41])}
    fcb.testing.assert_resume_equivalent(g, history)


def test_fixed_values_and_tuples_are_not_axes():
    g = fcb.grid(fcb.TerminateOnNaN, keys=("loss", "grad_norm"))
    assert len(g) == 1 and g.configs == [{}]
    assert g[0].keys == ("loss", "grad_norm")
    g = fcb.grid(fcb.BestCheckpoint, tolerances=(1, 5), every_n=[1, 2])
    assert g[1].tolerances == (1, 5)


def test_ten_thousand_configurations_build_quickly():
    start = time.perf_counter()
    g = fcb.grid(
        fcb.EarlyStopping,
        monitor="val_loss",
        patience=np.arange(1, 201),
        min_delta=np.linspace(0, 0.01, 50),
    )
    elapsed = time.perf_counter() - start
    assert len(g) == 10_000 and g.callback.patience.shape == (10_000,)
    assert elapsed < 5, f"fcb.grid took {elapsed:.1f} s for 10,000 configurations"


def test_indexing():
    g = fcb.grid(fcb.EarlyStopping, patience=[1, 2, 3])
    assert int(g[-1].patience) == 3
    with pytest.raises(IndexError, match="index 3 is out of range for 3"):
        g[3]
    with pytest.raises(TypeError, match="index with an int"):
        g["patience"]


# -- errors ----------------------------------------------------------------------------------


def test_invalid_value_names_the_configuration_and_the_field():
    with pytest.raises(fcb.ConfigError, match=r"configuration \{'patience': -1\}.*`patience`"):
        fcb.grid(fcb.EarlyStopping, patience=[2, -1])


def test_structural_option_cannot_vary():
    with pytest.raises(fcb.ConfigError, match="`save_top_k` changes the structure of"):
        fcb.grid(fcb.ModelCheckpoint, save_top_k=[1, 2])


def test_non_numeric_axis_is_rejected():
    with pytest.raises(fcb.ConfigError, match=r"only numeric options can vary.*mode = \['min'"):
        fcb.grid(fcb.EarlyStopping, mode=["min", "max"])
    with pytest.raises(fcb.ConfigError, match=r"only numeric options.*True"):
        fcb.grid(fcb.EarlyStopping, check_finite=[True, False])


def test_empty_axis_and_bad_arrays():
    with pytest.raises(fcb.ConfigError, match="`patience` has no values"):
        fcb.grid(fcb.EarlyStopping, patience=[])
    with pytest.raises(fcb.ConfigError, match=r"`patience` must be 1-D, got an array of shape"):
        fcb.grid(fcb.EarlyStopping, patience=np.ones((2, 2), int))


def test_factory_must_return_a_callback():
    with pytest.raises(fcb.ConfigError, match=r"must return an fcb.Callback, got dict"):
        fcb.grid(lambda patience: {"patience": patience}, patience=[1, 2])
    with pytest.raises(fcb.ConfigError, match="first argument must be a callback class"):
        fcb.grid("EarlyStopping", patience=[1])


def test_factory_that_is_not_traceable_is_reported():
    def factory(patience):
        return fcb.EarlyStopping(patience=int(patience) + 1)

    with pytest.raises(fcb.ConfigError, match=r"could not be built under jax.vmap with patience"):
        fcb.grid(factory, patience=[1, 2])


def test_grid_of_a_batch_with_mismatched_axes():
    with pytest.raises(fcb.ConfigError, match="same leading"):
        fcb.Grid(fcb.EarlyStopping(patience=np.array([1, 2]), min_delta=np.array([0.0, 1, 2])))
    batch = fcb.grid(fcb.EarlyStopping, patience=[1, 2, 3]).callback
    with pytest.raises(fcb.ConfigError, match="2 configs were given for a batch of 3"):
        fcb.Grid(batch, [{}, {}])
    with pytest.raises(fcb.ConfigError, match="must name the same options"):
        fcb.Grid(batch, [{"patience": 1}, {"patience": 2}, {"p": 3}])
    with pytest.raises(fcb.ConfigError, match=r"must be an fcb.Callback"):
        fcb.Grid({"patience": np.arange(3)})


def test_a_member_prints_its_settings():
    grid = fcb.grid(fcb.EarlyStopping, patience=[1, 2], min_delta=[0.0, 1e-3])
    text = repr(grid[3])
    assert "patience=2," in text and "min_delta=0.001," in text and "i32[]" not in text
    assert "patience=i32[4]" in repr(grid.callback)  # a batch still shows its shape
