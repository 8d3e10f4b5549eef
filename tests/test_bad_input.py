"""Every wrong input gets a clear error naming the field or key, the value, and the fix."""

from __future__ import annotations

import copy
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb

KEY = "val_loss"
ES = "EarlyStopping: "


def _es(**kwargs):
    return lambda: fcb.EarlyStopping(KEY, **kwargs)


def _check(metrics, *, jit=False, **kwargs):
    def call():
        es = fcb.EarlyStopping(KEY, **kwargs)

        def fn(state, metrics):
            return es(state, metrics, step=0)

        return (jax.jit(fn) if jit else fn)(es.init(), metrics)

    return call


def _saved(callback=None, state=None):
    """A state dict of an EarlyStopping after two checks, as read back from JSON."""
    callback = fcb.EarlyStopping(KEY, patience=2) if callback is None else callback
    if state is None:
        state = callback.init()
        for step, value in enumerate([1.0, 2.0]):
            state, _ = callback(state, {KEY: value}, step=step)
    return json.loads(json.dumps(fcb.state_dict(state, callback)))


def _load(edit=None, saved=None, into=None):
    def call():
        d = copy.deepcopy(_saved() if saved is None else saved())
        if edit is not None:
            edit(d)
        return fcb.load_state_dict(fcb.EarlyStopping(KEY, patience=2) if into is None else into, d)

    return call


def _set_leaf(path, **fields):
    def edit(d):
        d["state"]["leaves"][path].update(fields)

    return edit


def _drop_leaf(path):
    def edit(d):
        del d["state"]["leaves"][path]

    return edit


def _set(key, value):
    def edit(d):
        d[key] = value

    return edit


def _batched_saved():
    stacked = jax.vmap(lambda p: fcb.EarlyStopping(KEY, patience=p))(jnp.arange(4))
    return _saved(stacked, jax.vmap(lambda c: c.init())(stacked))


def _chain_saved():
    chained = fcb.chain(fcb.EarlyStopping(KEY))
    return _saved(chained, chained.init())


def _chain_state_without_callback():
    return json.loads(json.dumps(fcb.state_dict(fcb.chain(fcb.EarlyStopping(KEY)).init())))


class _Other(fcb.Callback):
    pass


CASES = [
    # --- configuration ---
    ("bad mode", _es(mode="minimum"), fcb.ConfigError,
     r"^EarlyStopping: `mode` must be 'min' or 'max', got mode = 'minimum'\.$"),
    ("mode None", _es(mode=None), fcb.ConfigError,
     r"`mode` must be 'min' or 'max', got mode = None"),
    ("negative patience", _es(patience=-1), fcb.ConfigError,
     r"`patience` must be an integer >= 0, got patience = -1\."),
    ("fractional patience", _es(patience=2.5), fcb.ConfigError,
     r"`patience` must be an integer, got patience = 2\.5\."),
    ("bool patience", _es(patience=True), fcb.ConfigError,
     r"`patience` must be an integer, got patience = True\."),
    ("string patience", _es(patience="3"), fcb.ConfigError,
     r"`patience` must be a number, got patience = '3'\."),
    ("None patience", _es(patience=None), fcb.ConfigError,
     r"`patience` must be a number, got patience = None\."),
    ("NaN patience", _es(patience=math.nan), fcb.ConfigError,
     r"`patience` must be an integer, got patience = nan"),
    ("negative patience in a sweep", _es(patience=np.asarray([1, -2])), fcb.ConfigError,
     r"`patience` must be an integer >= 0, got patience = array\(\[ 1, -2\]\)"),
    ("list patience", _es(patience=[1, 2]), fcb.ConfigError,
     r"^EarlyStopping: `patience` must be an integer, got patience = \[1, 2\]\. To try several "
     r"values, build a batch of configurations with fcb\.grid\(fcb\.EarlyStopping, "
     r"patience=\[1, 2\]\) and run it with fcb\.replay\.$"),
    ("tuple min_delta", _es(min_delta=(0.1, 0.2)), fcb.ConfigError,
     r"`min_delta` must be a real number, got min_delta = \(0\.1, 0\.2\)\. To try several"),
    ("list threshold", _es(stopping_threshold=[0.5]), fcb.ConfigError,
     r"`stopping_threshold` must be a real number, got stopping_threshold = \[0\.5\]"),
    ("negative min_delta", _es(min_delta=-0.1), fcb.ConfigError,
     r"`min_delta` must be a finite number >= 0\.0, got min_delta = -0\.1\. The sign is set by "
     r"`mode`; pass the absolute margin\."),
    ("NaN min_delta", _es(min_delta=math.nan), fcb.ConfigError,
     r"`min_delta` must be a finite number >= 0\.0, got min_delta = nan\."),
    ("infinite min_delta", _es(min_delta=math.inf), fcb.ConfigError,
     r"`min_delta` must be a finite number .*got min_delta = inf"),
    ("NaN stopping_threshold", _es(stopping_threshold=math.nan), fcb.ConfigError,
     r"`stopping_threshold` must be a number \(not NaN\), got stopping_threshold = nan\."),
    ("NaN divergence_threshold", _es(divergence_threshold=math.nan), fcb.ConfigError,
     r"`divergence_threshold` must be a number \(not NaN\), got divergence_threshold = nan\."),
    ("NaN baseline", _es(baseline=math.nan), fcb.ConfigError,
     r"`baseline` must be a number \(not NaN\), got baseline = nan\."),
    ("string threshold", _es(stopping_threshold="0.5"), fcb.ConfigError,
     r"`stopping_threshold` must be a number, got stopping_threshold = '0\.5'\."),
    ("empty monitor", lambda: fcb.EarlyStopping(""), fcb.ConfigError,
     r"`monitor` must be a non-empty metric name \(str\), got monitor = ''\."),
    ("non-string monitor", lambda: fcb.EarlyStopping(3), fcb.ConfigError,
     r"`monitor` must be a non-empty metric name \(str\), got monitor = 3\."),
    ("negative start_from_step", _es(start_from_step=-1), fcb.ConfigError,
     r"`start_from_step` must be an integer >= 0, got start_from_step = -1\."),
    ("abstract Callback", fcb.Callback, TypeError, r"fcb\.Callback is abstract"),
    # --- metrics ---
    ("unknown key", _check({"val_acc": 0.5, "loss": 1.0}), fcb.MissingMetricError,
     r"^EarlyStopping: the monitored metric 'val_loss' is not in the metrics of this check; "
     r"available keys: \['loss', 'val_acc'\]\. .*pass strict=False"),
    ("unknown key under jit", _check({"loss": 1.0}, jit=True), fcb.MissingMetricError,
     r"available keys: \['loss'\]"),
    ("no metrics at all", _check({}), fcb.MissingMetricError, r"available keys: \[\]"),
    ("string metric", _check({KEY: "0.5"}), fcb.MetricTypeError,
     r"metric 'val_loss' must be a real scalar, got str: '0\.5'\. Log a number"),
    ("None metric", _check({KEY: None}), fcb.MetricTypeError,
     r"metric 'val_loss' must be a real scalar, got NoneType: None\."),
    ("None metric with strict=False", _check({KEY: None}, strict=False), fcb.MetricTypeError,
     r"metric 'val_loss' must be a real scalar, got NoneType"),
    ("non-scalar metric", _check({KEY: np.zeros(3)}), fcb.MetricShapeError,
     r"metric 'val_loss' must be a scalar, got shape \(3,\)\. Reduce it first"),
    ("non-scalar metric under jit", _check({KEY: jnp.zeros((2, 2))}, jit=True),
     fcb.MetricShapeError, r"metric 'val_loss' must be a scalar, got shape \(2, 2\)"),
    ("empty metric", _check({KEY: np.zeros(0)}), fcb.MetricShapeError, r"got shape \(0,\)"),
    ("complex metric", _check({KEY: np.complex64(1 + 2j)}), fcb.MetricTypeError,
     r"metric 'val_loss' must be a real scalar, got dtype complex64"),
    ("metrics not a mapping", _check([("val_loss", 0.5)]), fcb.MetricTypeError,
     r"metrics must be a mapping from name to scalar, got list: .*Pass a dict"),
    ("metrics a bare number", _check(0.5), fcb.MetricTypeError,
     r"metrics must be a mapping from name to scalar, got float: 0\.5"),
    # --- state dicts ---
    ("another callback type", _load(saved=_chain_saved), fcb.StateDictError,
     r"the state dict belongs to a Chain callback and cannot be loaded into EarlyStopping"),
    ("into another callback type", _load(into=_Other()), fcb.StateDictError,
     r"^_Other: the state dict belongs to a EarlyStopping callback"),
    ("another state structure", _load(saved=_chain_state_without_callback), fcb.StateDictError,
     r"the saved state has structure '\(EarlyStoppingState\)', this callback's state has "
     r"'EarlyStoppingState'"),
    ("wrong shape leaf", _load(_set_leaf(".best", shape=[3], value=[1.0, 2.0, 3.0])),
     fcb.StateDictError, r"\.best: shape \(3,\), expected \(\)"),
    ("batched into unbatched", _load(saved=_batched_saved), fcb.StateDictError,
     r"\.best: shape \(4,\), expected \(\)"),
    ("wrong dtype leaf", _load(_set_leaf(".best_step", dtype="float32")), fcb.StateDictError,
     r"\.best_step: dtype float32, expected int32"),
    ("undecodable value", _load(_set_leaf(".best", value="banana")), fcb.StateDictError,
     r"\.best: value 'banana' is not float32"),
    ("wrong format version", _load(_set("version", 2)), fcb.StateDictError,
     r"the state dict has format version 2; this fcb reads version 1\."),
    ("missing leaf", _load(_drop_leaf(".wait_count")), fcb.StateDictError,
     r"the state dict does not fit this callback: missing leaf \.wait_count"),
    ("every mismatch listed",
     _load(lambda d: (_drop_leaf(".wait_count")(d), _set_leaf(".best_step", dtype="int64")(d))),
     fcb.StateDictError, r"missing leaf \.wait_count; \.best_step: dtype int64, expected int32"),
    ("unexpected leaf", _load(lambda d: d["state"]["leaves"].update(
        {".extra": {"dtype": "int32", "shape": [], "value": 0}})), fcb.StateDictError,
     r"unexpected leaf \.extra"),
    ("not a state dict", lambda: fcb.load_state_dict(fcb.EarlyStopping(KEY), {"best": 1.0}),
     fcb.StateDictError,
     r"expected a dict made by fcb\.state_dict \(with format 'fcb\.state_dict'\), got dict with "
     r"format None\."),
    ("a list", lambda: fcb.load_state_dict(fcb.EarlyStopping(KEY), [1.0]), fcb.StateDictError,
     r"expected a dict made by fcb\.state_dict .*got list\."),
    ("no state", _load(lambda d: d.pop("state")), fcb.StateDictError,
     r"the state dict has no 'state' with 'leaves'"),
    ("state_dict with swapped arguments",
     lambda: fcb.state_dict(fcb.EarlyStopping(KEY), fcb.EarlyStopping(KEY).init()),
     fcb.StateDictError,
     r"^fcb\.state_dict: the arguments are swapped \(got the callback EarlyStopping as state and "
     r"an EarlyStoppingState as callback\); the call is fcb\.state_dict\(state, callback\)\.$"),
    ("state_dict of a callback", lambda: fcb.state_dict(fcb.EarlyStopping(KEY)),
     fcb.StateDictError,
     r"got the callback EarlyStopping as state and None as callback; the call is "
     r"fcb\.state_dict\(state, callback\)\. Pass the callback's state"),
    ("load_state_dict with swapped arguments",
     lambda: fcb.load_state_dict(_saved(), fcb.EarlyStopping(KEY)), fcb.StateDictError,
     r"^fcb\.load_state_dict: the arguments are swapped \(got a state dict as callback and the "
     r"callback EarlyStopping as state_dict\); the call is "
     r"fcb\.load_state_dict\(callback, state_dict\)\.$"),
    ("alpha and window", _es(alpha=0.5, window=3), fcb.ConfigError,
     r"pass at most one of `alpha` \(exponential moving average\) and `window` \(window mean\), "
     r"got alpha = 0\.5 and window = 3\."),
    ("alpha above 1", _es(alpha=1.5), fcb.ConfigError,
     r"`alpha` must be a number in \(0, 1\], got alpha = 1\.5\. alpha is the weight of the "
     r"newest value"),
    ("alpha 0", _es(alpha=0), fcb.ConfigError, r"`alpha` must be a finite number > 0\.0"),
    ("window 0", _es(window=0), fcb.ConfigError,
     r"`window` must be an integer >= 1 \(the number of recent values averaged\), got "
     r"window = 0\."),
    ("array window", _es(window=np.asarray([2, 3])), fcb.ConfigError,
     r"`window` must be an integer >= 1 .* build one callback \(or one fcb\.grid\) per window"),
    ("bad threshold_mode", _es(threshold_mode="relative"), fcb.ConfigError,
     r"^EarlyStopping: `threshold_mode` must be 'abs' or 'rel', got "
     r"threshold_mode = 'relative'\.$"),
    # --- composition ---
    ("chain of a non-callback", lambda: fcb.chain(fcb.EarlyStopping(KEY), 3), fcb.ConfigError,
     r"fcb\.chain: callback 1 \(int\) must be an fcb\.Callback, got int: 3\."),
    ("named_chain of a non-callback", lambda: fcb.named_chain(es="EarlyStopping"),
     fcb.ConfigError, r"fcb\.named_chain: 'es' \(str\) must be an fcb\.Callback"),
    ("named_chain name with '/'", lambda: fcb.named_chain(**{"val/es": fcb.EarlyStopping(KEY)}),
     fcb.ConfigError, r"fcb\.named_chain: name 'val/es' must not contain '/'\."),
    ("duplicate event names", lambda: fcb.chain(fcb.EarlyStopping(KEY), fcb.EarlyStopping("b")),
     fcb.ConfigError, r"the event name 'early_stopping/improved' is emitted by both"),
    ("all_of of one callback", lambda: fcb.all_of(fcb.EarlyStopping(KEY)), fcb.ConfigError,
     r"fcb\.all_of: give at least two callbacks \(every one must hold to stop\), got 1\."),
    ("all_of of a non-callback", lambda: fcb.all_of(fcb.EarlyStopping(KEY), "x"),
     fcb.ConfigError, r"fcb\.all_of: callback 1 \(str\) must be an fcb\.Callback"),
]


@pytest.mark.parametrize(("build", "error", "match"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: fcb.ReduceLROnPlateau(KEY, patience=[1, 2]), "patience"),
        (lambda: fcb.ReduceLROnPlateau(KEY, factor=[0.1, 0.5]), "factor"),
        (lambda: fcb.ModelCheckpoint(KEY, every_n=[1, 2]), "every_n"),
        (lambda: fcb.BestCheckpoint(KEY, every_n=(1, 2)), "every_n"),
        (lambda: fcb.BestCheckpoint(KEY, min_delta=[0.0, 0.1]), "min_delta"),
        (lambda: fcb.VRAMDrift(max_drift_bytes=[1, 2]), "max_drift_bytes"),
    ],
)
def test_a_list_option_fails_when_the_callback_is_built(build, field):
    """A list used to build a batched callback whose first check failed in the adapter
    (`bool(actions.stop)` of two values: a raw ValueError)."""
    with pytest.raises(fcb.ConfigError, match=rf"`{field}` must be .*, got {field} = [\[(]"):
        build()


def test_arrays_still_build_a_batch():
    es = fcb.EarlyStopping(KEY, patience=np.asarray([1, 2]))
    assert es.patience.shape == (2,)
    assert len(fcb.grid(fcb.EarlyStopping, patience=[1, 2])) == 2


def test_config_errors_name_the_owner():
    for name, build, error, _ in CASES:
        composition = ("chain", "event", "all_of")
        if error is fcb.ConfigError and not any(word in name for word in composition):
            with pytest.raises(error, match=f"^{ES}"):
                build()


@pytest.mark.parametrize(
    ("error", "base"),
    [
        (fcb.ConfigError, ValueError),
        (fcb.MetricTypeError, TypeError),
        (fcb.MetricShapeError, ValueError),
        (fcb.MissingMetricError, KeyError),
        (fcb.StateDictError, ValueError),
        (fcb.ConfigChangedWarning, UserWarning),
    ],
)
def test_error_types_extend_the_builtin_ones(error, base):
    assert issubclass(error, base)
    assert error.__module__ == "fcb"


def test_missing_metric_message_is_not_quoted():
    # KeyError would print repr(message); the message must read as written
    with pytest.raises(fcb.MissingMetricError) as info:
        _check({"loss": 1.0})()
    assert str(info.value).startswith("EarlyStopping: the monitored metric 'val_loss'")
