"""fcb.replay's programs kept on disk and keyed before tracing (`fcb._program_cache`): a
program loaded from the cache gives exactly the results of one traced again, and a program is
only loaded for exactly the key it was stored under."""

from __future__ import annotations

import os
import shutil

import chex
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fcb
from fcb import _monitored, _program_cache, _replay


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A JAX compilation cache directory for the test only, and an empty in-memory cache."""
    saved = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv("FCB_COMPILE_CACHE", raising=False)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    _program_cache._loaded.clear()
    yield tmp_path / "jax" / _program_cache.SUBDIRECTORY
    _program_cache._loaded.clear()
    jax.config.update("jax_compilation_cache_dir", saved)


@pytest.fixture
def loads(monkeypatch):
    """The files fcb read a program or a value from, in order."""
    found: list[str] = []
    read = _program_cache._read

    def spy(path, key):
        payload = read(path, key)
        if payload is not None:
            found.append(os.path.basename(path))
        return payload

    monkeypatch.setattr(_program_cache, "_read", spy)
    return found


def _history(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    curve = 1.0 / (1.0 + t / 5.0) + 0.01 * t + 0.05 * rng.standard_normal(n)
    return {"val_loss": curve.astype(np.float32), "val_acc": rng.random(n).astype(np.float32)}


def _grids():
    return [
        fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2, 4], min_delta=[0, 0.02]),
        fcb.grid(fcb.EarlyStopping, monitor="val_acc", mode="max", patience=[1, 3]),
        fcb.grid(fcb.ModelCheckpoint, monitor="val_loss", save_top_k=3, alpha=[0.5, 0.9]),
        fcb.grid(fcb.ReduceLROnPlateau, monitor="val_loss", patience=[1, 2], factor=[0.5]),
        fcb.grid(
            lambda patience: fcb.chain(
                fcb.EarlyStopping("val_loss", patience=patience),
                fcb.ModelCheckpoint("val_loss", save_top_k=2),
            ),
            patience=[1, 3],
        ),
        fcb.grid(fcb.BestCheckpoint, metric_key="val_loss", tolerances=(2,), min_delta=[0, 0.01]),
    ]


def _assert_same(a, b):
    for field in ("stop_step", "stop_reason", "checks", "best_step"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.best_value, b.best_value)  # NaN where the other is
    assert a.slots.keys() == b.slots.keys()
    for slot in a.slots:
        np.testing.assert_array_equal(a.slots[slot], b.slots[slot])
        np.testing.assert_array_equal(a.slot_values[slot], b.slot_values[slot])
    chex.assert_trees_all_equal(a.state, b.state)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(which=st.integers(0, 5), seed=st.integers(0, 2**16), n=st.integers(1, 40))
def test_a_program_from_the_cache_gives_the_results_of_one_traced_again(
    cache_dir, loads, which, seed, n
):
    batch, history = _grids()[which], _history(seed, n)
    jax.config.update("jax_compilation_cache_dir", None)
    traced = fcb.replay(batch, history)  # the ordinary path, no cache
    jax.config.update("jax_compilation_cache_dir", str(cache_dir.parent))
    _program_cache._loaded.clear()
    stored = fcb.replay(batch, history)
    _program_cache._loaded.clear()
    del loads[:]
    loaded = fcb.replay(batch, history)
    assert [name.rsplit(".", 1)[1] for name in loads] == ["value", "program"]
    _assert_same(traced, stored)
    _assert_same(traced, loaded)


def test_a_program_on_disk_is_run_without_tracing_anything(cache_dir, monkeypatch):
    batch, history = _grids()[0], _history(0, 30)
    expected = fcb.replay(batch, history)
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".program", ".value"]
    _program_cache._loaded.clear()

    def never(*args, **kwargs):
        raise AssertionError("traced although the cache holds the program")

    monkeypatch.setattr(_replay, "_replay_batch_loop", never)
    monkeypatch.setattr(_monitored, "_KeyRecorder", never)
    _assert_same(fcb.replay(batch, history), expected)


def test_chunks_share_one_program(cache_dir, loads):
    batch, history = _grids()[0], _history(1, 25)
    whole = fcb.replay(batch, history)
    _program_cache._loaded.clear()
    chunked = fcb.replay(batch, history, chunk_size=4)  # 2 chunks of 3
    _program_cache._loaded.clear()
    del loads[:]
    _assert_same(fcb.replay(batch, history, chunk_size=4), whole)
    _assert_same(chunked, whole)
    assert len(loads) == 2 and len(list(cache_dir.glob("*.program"))) == 2  # sizes 6 and 3


def test_the_source_digest_follows_every_file_of_the_package(tmp_path):
    package = tmp_path / "fcb"
    shutil.copytree(_program_cache.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    digest = _program_cache.source_digest(str(package))
    assert digest == _program_cache.source_digest(_program_cache.PACKAGE)
    seen = {digest}
    changes = [
        lambda: (package / "_early_stopping.py").write_text(
            (package / "_early_stopping.py").read_text().replace("patience", "patience ", 1)),
        lambda: (package / "torch" / "extra.py").write_text("x = 1\n"),
        lambda: (package / "torch" / "extra.py").rename(package / "extra.py"),
        lambda: (package / "extra.py").write_text(""),
    ]
    for change in changes:
        change()
        seen.add(_program_cache.source_digest(str(package)))
    assert len(seen) == len(changes) + 1


def test_another_fcb_source_or_version_is_another_key(cache_dir, monkeypatch, loads):
    batch, history = _grids()[0], _history(2, 20)
    expected = fcb.replay(batch, history)
    original = _program_cache._machine
    machine = dict(original())
    monkeypatch.setattr(_program_cache, "source_digest", lambda package: "0" * 64)
    original.cache_clear()  # read again, with the other source digest
    versions = [{}, {"jax": "0.0.1"}, {"jaxlib": "0.0.1"}, {"equinox": "0.0.1"}]
    for changed in versions:
        if changed:
            monkeypatch.setattr(_program_cache, "_machine", lambda c=changed: {**machine, **c})
        _program_cache._loaded.clear()
        del loads[:]
        _assert_same(fcb.replay(batch, history), expected)
        assert loads == []  # compiled again, under a key of its own
    assert len(list(cache_dir.glob("*.program"))) == 1 + len(versions)
    original.cache_clear()


def test_a_jax_setting_is_part_of_the_key(cache_dir, loads):
    batch, history = _grids()[0], _history(3, 20)
    fcb.replay(batch, history)
    _program_cache._loaded.clear()
    del loads[:]
    saved = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        fcb.replay(batch, history)
    finally:
        jax.config.update("jax_default_matmul_precision", saved)
    assert loads == [] and len(list(cache_dir.glob("*.program"))) == 2


class _OwnStopping(fcb.EarlyStopping):
    """A user's class: its code is not in fcb's source hash."""


def test_a_class_of_the_users_own_is_never_cached(cache_dir):
    own = fcb.grid(_OwnStopping, monitor="val_loss", patience=[1, 2])
    plain = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2])
    history = _history(4, 20)
    result = fcb.replay(own, history)
    assert not cache_dir.exists()
    np.testing.assert_array_equal(result.stop_step, fcb.replay(plain, history).stop_step)


@pytest.mark.parametrize(
    "value",
    [lambda: 0, print, object(), {1: "a"}, np.array([1.0]), b"bytes", 1j, {"a": lambda: 0}],
    ids=["lambda", "builtin", "object", "int-keyed dict", "array", "bytes", "complex", "nested"],
)
def test_a_value_the_key_cannot_describe_exactly_is_not_cacheable(value):
    with pytest.raises(_program_cache._NotCacheable):
        _program_cache._plain(value)


_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def _identical(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a.hex() == b.hex()  # 0.0 and -0.0 apart
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_identical(a[k], b[k]) for k in a)  # in order
    return a == b


@given(_PLAIN, _PLAIN)
def test_equal_descriptions_mean_identical_values(a, b):
    """Sound: values the key tells apart may be equal (1 and 1.0, 0.0 and -0.0), never the
    reverse."""
    assert (_program_cache._plain(a) == _program_cache._plain(b)) == _identical(a, b)


def _damage(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the payload
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _other_format(path):
    path.write_bytes(b"fcb-program 0\n" + path.read_bytes()[len(_program_cache.FORMAT):])


def _bad_header(path):
    data = path.read_bytes()
    path.write_bytes(_program_cache.FORMAT + b"{not json\n" + data[data.index(b"\n", 14) + 1:])


@pytest.mark.parametrize("spoil", [_damage, _truncate, _other_format, _bad_header])
def test_a_spoiled_file_is_compiled_again_and_replaced(cache_dir, loads, spoil):
    batch, history = _grids()[2], _history(5, 20)
    expected = fcb.replay(batch, history)
    (program,) = cache_dir.glob("*.program")
    good = program.read_bytes()
    spoil(program)
    _program_cache._loaded.clear()
    del loads[:]
    _assert_same(fcb.replay(batch, history), expected)
    assert [name.rsplit(".", 1)[1] for name in loads] == ["value"]  # not the program
    assert program.read_bytes()[:14] == good[:14]
    _program_cache._loaded.clear()
    del loads[:]
    _assert_same(fcb.replay(batch, history), expected)
    assert [name.rsplit(".", 1)[1] for name in loads] == ["value", "program"]


def test_a_file_of_another_key_is_not_run(cache_dir, loads):
    history = _history(6, 20)
    first = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2])
    second = fcb.grid(fcb.EarlyStopping, monitor="val_loss", patience=[1, 2], mode="max")
    fcb.replay(first, history)
    (first_program,) = cache_dir.glob("*.program")
    expected = fcb.replay(second, history)
    (second_program,) = set(cache_dir.glob("*.program")) - {first_program}
    second_program.write_bytes(first_program.read_bytes())  # as if two keys hashed alike
    _program_cache._loaded.clear()
    del loads[:]
    _assert_same(fcb.replay(second, history), expected)
    assert all(not name.endswith(".program") for name in loads)


def test_turned_off_by_the_environment(cache_dir, monkeypatch):
    monkeypatch.setenv("FCB_COMPILE_CACHE", "0")
    fcb.replay(_grids()[0], _history(7, 10))
    assert not cache_dir.exists()


def test_a_directory_that_cannot_be_written_is_no_error(cache_dir):
    cache_dir.parent.mkdir(parents=True)
    cache_dir.write_text("a file where the directory would be")
    batch, history = _grids()[0], _history(8, 15)
    result = fcb.replay(batch, history)
    jax.config.update("jax_compilation_cache_dir", None)
    _assert_same(result, fcb.replay(batch, history))


def test_a_program_jax_jit_refuses_takes_the_ordinary_path(cache_dir, monkeypatch):
    batch, history = _grids()[0], _history(9, 15)
    expected = fcb.replay(batch, history)
    _program_cache._loaded.clear()
    for path in cache_dir.iterdir():
        path.unlink()

    def refuse(function):
        raise TypeError("not a valid JAX type")

    monkeypatch.setattr(_program_cache.jax, "jit", refuse)
    _assert_same(fcb.replay(batch, history), expected)
    assert not list(cache_dir.glob("*.program"))
