"""The callbacks' state dict encoded once per checkpoint: the text a checkpoint records and
the manifest's seal hashes is exactly the canonical JSON of `fcb.state_dict(...)`."""

from __future__ import annotations

import copy
import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fcb
from fcb._canonical import MARK, EncodedStateDict, canonical_json, canonical_object, fill, template
from fcb._host.schema import manifest_checksum, read_manifest, seal, write_manifest
from fcb._runner import Packing


def reference(value):
    """What the canonical JSON is by definition: `json.dumps` of plain dicts."""
    return json.dumps(
        json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":"), allow_nan=False
    )


CHAINS = [
    lambda: fcb.EarlyStopping("val_loss", patience=3),
    lambda: fcb.chain(
        fcb.EarlyStopping("val_loss", patience=2, min_delta=0.01),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=1),
    ),
    lambda: fcb.named_chain(
        best=fcb.BestCheckpoint("val_loss", tolerances=(1, 2)),
        nan=fcb.TerminateOnNaN(keys=("val_loss",)),
    ),
]

metric = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(min_value=-1e3, max_value=1e3, width=32),
)


@settings(max_examples=40, deadline=None)
@given(
    chain=st.sampled_from(range(len(CHAINS))),
    values=st.lists(metric, min_size=1, max_size=8),
)
def test_the_encoded_state_dict_is_fcb_state_dict_and_its_canonical_json(chain, values):
    callback = CHAINS[chain]()
    runner = fcb.Runner(callback)
    for step, value in enumerate(values):
        runner.check({"val_loss": value}, step=step)
        encoded = runner.encoded_state_dict()
        expected = fcb.state_dict(runner.state, callback)
        assert type(encoded) is EncodedStateDict
        assert encoded == expected == runner.state_dict()
        assert encoded.json == reference(expected) == canonical_json(dict(encoded))
        assert json.loads(encoded.json) == expected


class MixedState(fcb.Callback):
    """Leaves of every packed dtype, non-finite floats and a 2-d leaf among them."""

    def init(self):
        return {
            "half": jnp.asarray([1.0, jnp.nan], jnp.bfloat16),
            "f16": jnp.asarray([-jnp.inf, 0.5], jnp.float16),
            "single": jnp.asarray(2.0, jnp.float32),
            "count": jnp.asarray([3, -4], jnp.int16),
            "bytes": jnp.asarray(200, jnp.uint8),
            "unsigned": jnp.asarray(2**32 - 1, jnp.uint32),
            "flag": jnp.asarray([True, False]),
        }

    def __call__(self, state, metrics, *, step):
        return state, self.no_actions()


class MatrixState(MixedState):
    def init(self):
        return {**super().init(), "matrix": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}


@pytest.mark.parametrize("callback", [MixedState(), MatrixState()])
def test_every_dtype_and_non_finite_value_is_encoded_as_fcb_state_dict_spells_it(callback):
    runner = fcb.Runner(callback)
    runner.check({"x": 1.0}, step=0)
    assert runner._buffer is not None  # the packed path
    encoded = runner.encoded_state_dict()
    assert encoded == fcb.state_dict(runner.state, callback)
    assert encoded.json == reference(encoded)
    assert encoded["state"]["leaves"]["['half']"]["value"] == [1.0, "nan"]


@pytest.mark.parametrize("callback", [MixedState(), MatrixState()])
def test_host_values_are_the_leaves_tolist(callback):
    tree = callback.init()
    packing = Packing.of(tree)
    buffer = np.asarray(packing.pack(tree))
    values = packing.host_values(buffer)
    expected = [leaf.tolist() for leaf in packing.host_leaves(buffer)]
    assert repr(values) == repr(expected)  # NaN compares unequal; its spelling does not
    assert [type(v) for v in values] == [type(v) for v in expected]


def test_an_encoded_state_dict_is_read_only_and_copies_are_plain_dicts():
    runner = fcb.Runner(fcb.EarlyStopping("val_loss"))
    runner.check({"val_loss": 1.0}, step=0)
    encoded = runner.encoded_state_dict()
    for change in (
        lambda d: d.__setitem__("version", 2),
        lambda d: d.pop("version"),
        lambda d: d.update(version=2),
        lambda d: d.clear(),
        lambda d: d.setdefault("x", 1),
        lambda d: d.__delitem__("version"),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change(encoded)
    for duplicate in (
        copy.deepcopy(encoded),
        copy.copy(encoded),
        pickle.loads(pickle.dumps(encoded)),
    ):
        assert type(duplicate) is dict and duplicate == encoded
        duplicate["version"] = 2  # a copy may change


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.text(max_size=6)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    plain=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
    encoded_keys=st.lists(st.text(max_size=8), max_size=3),
    content=st.dictionaries(st.text(max_size=4), json_values, max_size=3),
)
def test_canonical_json_reuses_encoded_texts_exactly(plain, encoded_keys, content):
    value = dict(plain)
    for key in encoded_keys:
        value[key] = EncodedStateDict(content, reference(content))
    assert canonical_json(value) == reference(value)
    assert manifest_checksum(value) == manifest_checksum(json.loads(json.dumps(value)))


def test_a_manifest_holding_an_encoded_state_dict_is_sealed_as_it_reads_back(tmp_path):
    runner = fcb.Runner(fcb.chain(fcb.EarlyStopping("val_loss"), fcb.ModelCheckpoint("val_loss")))
    runner.check({"val_loss": 1.0}, step=0)
    manifest = {
        "format": "fcb.manifest",
        "version": 1,
        "storage": "torch",
        "event_step": 0,
        "slots": {},
        "files": {},
        "archive": [],
        "resume": None,
        "callbacks": runner.encoded_state_dict(),
    }
    sealed = seal(dict(manifest))
    plain = seal(json.loads(json.dumps(manifest)))
    assert sealed["checksum"] == plain["checksum"]
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path)["callbacks"] == manifest["callbacks"]


number = st.one_of(
    st.booleans(),
    st.integers(-(2**33), 2**33),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(number, st.lists(number, max_size=4)), max_size=8),
    keys=st.data(),
)
def test_a_filled_template_is_the_canonical_json_of_the_values_in_place(values, keys):
    names = keys.draw(
        st.lists(st.text(max_size=5), min_size=len(values), max_size=len(values), unique=True)
    )
    texts = {name: canonical_object({"value": MARK, "x": "1"}) for name in names}
    parts = template(canonical_object(texts))
    in_key_order = [values[names.index(name)] for name in sorted(names)]
    expected = {name: {"value": value, "x": 1} for name, value in zip(names, values, strict=True)}
    assert fill(parts, in_key_order) == reference(expected)


def test_a_template_refuses_what_it_cannot_fill():
    parts = template(canonical_object({"a": MARK}))
    assert fill(parts, [[[1]]]) is None  # nested deeper than a flat list
    assert fill(parts, ["1,2"]) is None  # a string
    assert fill(parts, [{"b": 1}]) is None  # an object
    assert fill(parts, [1, 2]) is None  # more values than places
    with pytest.raises(ValueError):
        fill(parts, [float("nan")])
