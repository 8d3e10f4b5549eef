"""fcb.grid builds its table and columns without a dict per configuration: the same grid as
building the configurations one by one, and no conversion program for integer options."""

from __future__ import annotations

import itertools
import json

import jax
import jax.monitoring as monitoring
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb._state_dict import encode_config


def _reference(axes):
    """The configurations as fcb.grid built them before: a dict per combination."""
    combos = list(itertools.product(*axes.values()))
    configs = [dict(zip(axes, combo, strict=True)) for combo in combos]
    names = tuple(configs[0])
    return names, tuple(tuple(c[n] for n in names) for c in configs), configs


def _assert_members_built_alone(g, factory, fixed, configs):
    for index, config in enumerate(configs):
        alone = factory(**fixed, **config)
        for many, one in zip(
            jax.tree_util.tree_leaves(g.callback), jax.tree_util.tree_leaves(alone), strict=True
        ):
            assert np.asarray(many).dtype == np.asarray(one).dtype
            np.testing.assert_array_equal(np.asarray(many)[index], np.asarray(one))


_ints = st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4)
_reals = st.lists(
    st.one_of(st.integers(0, 10), st.floats(0, 1e3, allow_nan=False, allow_subnormal=True)),
    min_size=1, max_size=3,
)


@settings(max_examples=40, deadline=None)
@given(
    patience=_ints,
    min_delta=_reals,
    start=st.lists(st.one_of(st.integers(0, 1000), st.just(2**31)), min_size=1, max_size=3),
    as_array=st.booleans(),
    order=st.permutations(["patience", "min_delta", "start_from_step"]),
    count=st.integers(1, 3),
    through_function=st.booleans(),
)
def test_the_fast_grid_equals_the_grid_built_one_configuration_at_a_time(
    patience, min_delta, start, as_array, order, count, through_function
):
    values = {"patience": patience, "min_delta": min_delta, "start_from_step": start}
    axes = {name: values[name] for name in order[:count]}
    if as_array:
        axes = {name: np.asarray(v) for name, v in axes.items()}
    factory = (
        (lambda **options: fcb.EarlyStopping(**options)) if through_function else fcb.EarlyStopping
    )
    fixed = {"monitor": "val_loss"}
    expected = {k: tuple(v.tolist() if isinstance(v, np.ndarray) else v) for k, v in axes.items()}
    names, table, configs = _reference(expected)
    try:
        g = fcb.grid(factory, **fixed, **axes)
    except fcb.ConfigError:  # start_from_step beyond int32: refused by every configuration
        assert max(axes.get("start_from_step", [0])) > 2**31 - 1
        return
    assert g.names == names
    assert g.values == table
    assert g.configs == configs
    assert [type(v) for row in g.values for v in row] == [type(v) for row in table for v in row]
    _assert_members_built_alone(g, factory, fixed, configs)


def test_the_table_is_one_static_leaf_that_encodes_as_before():
    g = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2], min_delta=[0, 0.5])
    assert isinstance(g.values, tuple)
    assert g.values == ((1, 0), (1, 0.5), (2, 0), (2, 0.5))
    assert repr(g.values) == "((1, 0), (1, 0.5), (2, 0), (2, 0.5))"
    assert jax.tree_util.tree_leaves(g.values) == [g.values]  # one leaf, not 8
    same = fcb.Grid(g.callback, g.configs)
    assert same.values == g.values and hash(same.values) == hash(g.values)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(g)
    config = encode_config(g)
    assert config["values"] == [[1, 0], [1, 0.5], [2, 0], [2, 0.5]]
    json.dumps(config)


def test_an_integer_axis_compiles_no_conversion_program():
    fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2])  # the scalar programs
    compiles = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(count)
    try:
        g = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=range(1, 1238),
                     start_from_step=[0, 3, 5])  # a size no test builds
    finally:
        monitoring.unregister_event_duration_listener(count)
    assert len(g) == 1237 * 3
    assert compiles == []
    assert g.callback.patience.dtype == np.int32
    assert g.callback.patience[-4:].tolist() == [1236, 1237, 1237, 1237]


def test_a_factory_that_reduces_an_option_never_gives_every_configuration_its_result():
    """Built from the whole column, `jnp.max` gives every configuration the largest value;
    the first and last configurations built alone then differ from the batch, and the grid
    is built under vmap, where each configuration sees its own value."""
    import jax.numpy as jnp

    def factory(patience):
        return fcb.EarlyStopping("val_loss", patience=jnp.max(jnp.asarray(patience)))

    g = fcb.grid(factory, patience=[1, 2, 3, 4, 5])
    assert g.callback.patience.tolist() == [1, 2, 3, 4, 5]
    # one that cannot be traced either is refused, not batched with the largest value
    with pytest.raises(fcb.ConfigError, match=r"could not be built under jax\.vmap"):
        fcb.grid(
            lambda patience: fcb.EarlyStopping("val_loss", patience=int(np.max(patience))),
            patience=[1, 2, 3],
        )
