"""The RNG states a Torch checkpoint records: NumPy's global generator read directly is
exactly `np.random.get_state()`, and restoring a capture gives the same draws."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fcb.torch._rng as rng
from fcb.torch._payload import rng_state, set_rng_state


def legacy_state():
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return keys, pos, has_gauss, cached


def assert_same_capture(capture):
    keys, pos, has_gauss, cached = legacy_state()
    assert capture[0].dtype == np.uint32 and np.array_equal(capture[0], keys)
    assert capture[1:] == (pos, has_gauss, cached)
    assert type(capture[1]) is int and type(capture[2]) is int and type(capture[3]) is float


def draws():
    return (
        np.random.standard_normal(3).tolist(),  # uses and leaves the Gaussian cache
        np.random.random(2).tolist(),
        random.random(),
        random.gauss(0.0, 1.0),
        torch.rand(2).tolist(),
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    normals=st.integers(0, 5),
    uniforms=st.integers(0, 700),  # past one refill of the 624-word key
)
def test_the_direct_read_is_exactly_get_state(seed, normals, uniforms):
    np.random.seed(seed)
    np.random.random(uniforms)
    for _ in range(normals):  # an odd count leaves a cached Gaussian
        np.random.standard_normal()
    assert_same_capture(rng.NUMPY.capture())
    assert rng.NUMPY.exact


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), normals=st.integers(0, 3))
def test_restoring_a_capture_gives_identical_draws(seed, normals):
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    for _ in range(normals):
        np.random.standard_normal()
        random.gauss(0.0, 1.0)
    saved = rng_state()
    expected = draws()
    draws()  # move every generator on
    set_rng_state(saved)
    assert draws() == expected


def test_a_state_set_by_hand_is_read_exactly():
    keys = np.arange(624, dtype=np.uint32) * np.uint32(2654435761)
    np.random.set_state(("MT19937", keys, 17, 1, -2.5))
    assert_same_capture(rng.NUMPY.capture())
    np.random.set_state(("MT19937", keys, 17, 0, 0.0))
    assert_same_capture(rng.NUMPY.capture())


def test_a_new_global_generator_is_checked_again(monkeypatch):
    replaced = np.random.RandomState(np.random.MT19937(5))
    monkeypatch.setattr(np.random.mtrand, "_rand", replaced)
    monkeypatch.setattr(np.random, "get_state", replaced.get_state)
    replaced.standard_normal()
    assert_same_capture(rng.NUMPY.capture())


@pytest.mark.parametrize("found", [None, "mismatch"])
def test_without_an_exact_direct_read_get_state_is_used(monkeypatch, found):
    numpy_state = rng.NumpyState()
    if found is None:  # e.g. another interpreter, or a layout not found
        monkeypatch.setattr(rng, "_gauss_offsets", lambda: None)
    else:  # a read that disagrees with get_state: never trusted again
        monkeypatch.setattr(rng, "_gauss_offsets", lambda: (0, 8))
    np.random.seed(3)
    np.random.standard_normal()
    assert_same_capture(numpy_state.capture())
    assert_same_capture(numpy_state.capture())
    assert numpy_state.exact is (found is None)


def test_the_saved_record_keeps_its_format():
    np.random.seed(11)
    np.random.standard_normal()
    saved = rng_state()["numpy"]
    keys, pos, has_gauss, cached = legacy_state()
    assert saved["keys"].dtype == torch.int64 and saved["keys"].tolist() == keys.tolist()
    assert (saved["pos"], saved["has_gauss"], saved["cached_gaussian"]) == (pos, has_gauss, cached)


# -- Python's random -------------------------------------------------------------------------


def assert_same_random_capture(capture):
    version, state, gauss_next = random.getstate()
    assert capture["state"].dtype == torch.int64 and capture["state"].tolist() == list(state)
    assert (capture["version"], capture["gauss_next"]) == (version, gauss_next)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    gaussians=st.integers(0, 3),  # an odd count leaves gauss_next set
    uniforms=st.integers(0, 700),  # past one refill of the 624-word key
)
def test_the_direct_read_of_random_is_exactly_getstate(seed, gaussians, uniforms):
    random.seed(seed)
    for _ in range(uniforms):
        random.random()
    for _ in range(gaussians):
        random.gauss(0.0, 1.0)
    assert_same_random_capture(rng.PYTHON_RANDOM.capture())
    assert rng.PYTHON_RANDOM.exact


def test_a_random_state_set_by_hand_is_read_exactly():
    words = tuple(int(w) for w in np.arange(624, dtype=np.uint64) * 2654435761 % 2**32)
    for position, gauss_next in [(0, None), (624, -0.25), (311, 3.5)]:
        random.setstate((3, (*words, position), gauss_next))
        assert_same_random_capture(rng.PYTHON_RANDOM.capture())


def test_another_random_generator_is_checked_again(monkeypatch):
    other = random.Random(8)
    other.random()
    monkeypatch.setattr(random, "getstate", other.getstate)
    monkeypatch.setattr(random, "setstate", other.setstate)
    capture = rng.PYTHON_RANDOM.capture()
    assert_same_random_capture(capture)
    assert rng.PYTHON_RANDOM._source[0] is other
    monkeypatch.undo()
    assert_same_random_capture(rng.PYTHON_RANDOM.capture())


@pytest.mark.parametrize("found", [None, "mismatch"])
def test_without_an_exact_direct_read_of_random_getstate_is_used(monkeypatch, found):
    random_state = rng.PythonRandomState()
    # a layout not found (e.g. another interpreter), or a read that disagrees with getstate
    monkeypatch.setattr(rng, "_random_offset", lambda: None if found is None else 0)
    random.seed(4)
    random.gauss(0.0, 1.0)
    assert_same_random_capture(random_state.capture())
    assert_same_random_capture(random_state.capture())
    assert random_state.exact is (found is None)


def test_a_capture_outlives_later_draws():
    random.seed(9)
    capture = rng.PYTHON_RANDOM.capture()
    expected = capture["state"].clone()
    random.random()  # the view reads the live generator; a capture is a copy
    assert torch.equal(capture["state"], expected)


def test_the_random_key_is_saved_as_one_tensor():
    """`torch.save` calls back into Python per pickled object: 625 ints cost more than a
    tensor (the record of a checkpoint written before holds the tuple; it still loads)."""
    saved = rng_state()["random"]
    assert sorted(saved) == ["gauss_next", "state", "version"]
    assert saved["state"].shape == (625,)


def test_a_saved_tuple_of_random_getstate_is_restored():
    random.seed(12)
    old_record = {"random": random.getstate()}  # as an earlier checkpoint holds it
    expected = [random.random() for _ in range(3)]
    random.seed(99)
    set_rng_state(old_record)
    assert [random.random() for _ in range(3)] == expected
