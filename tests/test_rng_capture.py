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
