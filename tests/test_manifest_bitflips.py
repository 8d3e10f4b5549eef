"""The manifest is checked before anything acts on it.

- Every manifest fcb writes is sealed with a checksum of its content: single-bit flips of a
  real run's manifest are detected (`fcb.CheckpointCorruptError`) or harmless (the manifest
  reads as the same table), never read as another slot table.
- Every entry is checked against the manifest's schema first, so a hand edit (even one sealed
  again, or of a manifest written before manifests were sealed) is named precisely: slots as
  a list, missing or null records, huge or mistyped numbers, a state dict that is not one.
  Every reader (`read_manifest`, opening the directory, resuming, `load_checkpoint`,
  `fcb.orbax.restore`, `fcb inspect`) raises `fcb.CheckpointCorruptError`, never a raw
  `KeyError` or `TypeError`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import random
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fcb
import fcb.torch
from fcb._host import manifest as _manifest
from fcb._host.manifest import read_manifest, write_manifest

FLIPS = 400
SEED = 15


def torch_chain():
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=100),
        fcb.ModelCheckpoint("val_loss", save_top_k=-1, save_last=True),  # archives every step
        fcb.BestCheckpoint("val_loss", tolerances=(1,)),
    )


def torch_adapter(dirpath, **kwargs):
    torch.manual_seed(0)
    return fcb.torch.TorchAdapter(
        torch_chain(), model=torch.nn.Linear(4, 2), dirpath=str(dirpath), **kwargs
    )


def torch_run(dirpath):
    adapter = torch_adapter(dirpath)
    adapter.on_fit_start()
    for step, value in enumerate([1.0, 0.8, 1.2, 0.9, 1.1]):
        adapter.on_validation_end({"val_loss": value}, step=step)
    adapter.on_fit_end()


def orbax_chain():
    return fcb.chain(
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(1,), model_names=["head"]),
    )


def orbax_run(dirpath):
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("orbax.checkpoint")
    import fcb.orbax

    adapter = fcb.orbax.OrbaxAdapter(orbax_chain(), dirpath, background=False)
    adapter.on_fit_start()
    for step, value in enumerate([1.0, 0.8, float("nan"), 0.9]):
        state = {"model": {"head": jnp.full((3,), step, jnp.float32)}, "opt_state": ()}
        adapter.on_validation_end({"val_loss": value}, step=step, state=state)
    adapter.on_fit_end()


@pytest.fixture(scope="module", params=["torch", "orbax"])
def written(request, tmp_path_factory):
    """A real run's directory and its storage."""
    dirpath = tmp_path_factory.mktemp(request.param)
    (torch_run if request.param == "torch" else orbax_run)(dirpath)
    return dirpath, request.param


@pytest.fixture(scope="module")
def torch_written(tmp_path_factory):
    dirpath = tmp_path_factory.mktemp("torch_run")
    torch_run(dirpath)
    return dirpath


@pytest.fixture(scope="module")
def orbax_written(tmp_path_factory):
    dirpath = tmp_path_factory.mktemp("orbax_run")
    orbax_run(dirpath)
    return dirpath


def copy_run(source, tmp_path):
    """A private copy of a run, Torch slot names hard-linked to their steps again."""
    dirpath = tmp_path / "run"
    shutil.copytree(source, dirpath)
    for slot in raw(dirpath)["slots"].values():
        if "link" in slot:
            os.unlink(dirpath / slot["link"])
            os.link(dirpath / slot["file"], dirpath / slot["link"])
    return dirpath


def raw(dirpath):
    return json.loads((dirpath / "manifest.json").read_text())


def inspect(dirpath):
    """`fcb inspect DIR`: the exit code and what it printed on stderr."""
    from fcb import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["inspect", str(dirpath)])
    return code, err.getvalue()


# --- single-bit flips -------------------------------------------------------------------------


def test_single_bit_flips_are_detected_or_harmless(written, tmp_path):
    source, storage = written
    data = (source / "manifest.json").read_bytes()
    original = read_manifest(source, storage)
    path = tmp_path / "manifest.json"
    rng = random.Random(SEED)
    counts: collections.Counter[str] = collections.Counter()
    undetected, raw_errors = [], []
    for _ in range(FLIPS):
        bit = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        try:
            # either storage: a flip must be caught by the manifest itself, not only
            # because the reader expected another adapter's run
            got = read_manifest(path, storage=None)
        except fcb.CheckpointCorruptError as error:
            counts["detected"] += 1
            counts["by the checksum"] += "changed after fcb wrote it" in str(error)
            continue
        except Exception as error:
            counts["raw error"] += 1
            raw_errors.append(f"byte {bit // 8}: {type(error).__name__}: {error}")
            continue
        if got == original:
            counts["harmless"] += 1
        else:
            counts["undetected"] += 1
            changed = sorted(k for k in set(got) | set(original) if got.get(k) != original.get(k))
            undetected.append(f"byte {bit // 8} ({data[bit // 8:bit // 8 + 1]!r}): {changed}")
            counts["slot table"] += bool({"slots", "resume", "files"} & set(changed))
    print(
        f"{storage} manifest ({len(data)} bytes), {FLIPS} single-bit flips: "
        f"{counts['detected']} detected ({counts['by the checksum']} by the checksum), "
        f"{counts['harmless']} harmless, {counts['undetected']} undetected "
        f"({counts['slot table']} of them changing the slots, the resume point or the file "
        f"table), {counts['raw error']} raw errors"
    )
    for line in undetected[:10] + raw_errors[:10]:
        print("  ", line)
    assert not raw_errors, raw_errors
    assert counts["undetected"] == 0, undetected
    assert counts["detected"] + counts["harmless"] == FLIPS


# --- the seal -----------------------------------------------------------------------------------


def test_every_manifest_written_is_sealed_and_formatting_does_not_matter(written, tmp_path):
    source, storage = written
    m = raw(source)
    assert m["checksum"] == _manifest.manifest_checksum(m)
    assert m["checksum"].startswith("sha256:") and len(m["checksum"]) == 7 + 64
    # the same content in another layout (no indent, other key order) still matches
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(dict(reversed(list(m.items())))))
    assert read_manifest(path, storage) == m


def test_a_manifest_without_a_checksum_still_reads(written, tmp_path):
    """Manifests written before manifests were sealed have no checksum field."""
    source, storage = written
    m = raw(source)
    del m["checksum"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(m))
    assert read_manifest(path, storage) == m
    m["chucksum"] = "sha256:0"  # the field's name damaged: not a manifest fcb wrote
    path.write_text(json.dumps(m))
    with pytest.raises(
        fcb.CheckpointCorruptError, match=r"has no 'checksum' and an entry 'chucksum' that fcb"
    ):
        read_manifest(path, storage)


def test_an_edit_that_is_not_sealed_again_is_refused_by_every_reader(torch_written, tmp_path):
    """A slot's step changed, the step still listed: only the checksum can tell."""
    run = copy_run(torch_written, tmp_path)
    m = raw(run)
    m["slots"]["best_model"].update(step=3, file="steps/step-00000003.pt")  # archived, listed
    (run / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True))
    message = rf"{run}/manifest\.json changed after fcb wrote it: its content does not match"
    before = sorted(os.listdir(run / "steps"))
    for reader in (
        lambda: read_manifest(run),
        lambda: fcb.torch.load_checkpoint(run / "best_model.pt"),
        lambda: start(torch_adapter(run, resume_from=str(run))),
        lambda: start(torch_adapter(run)),  # a new run in the directory deletes nothing
    ):
        with pytest.raises(fcb.CheckpointCorruptError, match=message):
            reader()
    assert sorted(os.listdir(run / "steps")) == before
    code, err = inspect(run)
    assert code == 1 and "changed after fcb wrote it" in err and "Traceback" not in err
    # sealed again, the same edit reads (it names a step the run did write)
    write_manifest(run, m)
    assert read_manifest(run)["slots"]["best_model"]["step"] == 3


def start(adapter):
    try:
        adapter.on_fit_start()
    except BaseException:
        adapter.on_exception()
        raise
    adapter.on_fit_end()


# --- the schema ---------------------------------------------------------------------------------


def first_file(m):
    return sorted(m["files"])[0]


def edit_path(*keys, value=None, delete=False):
    """An edit setting (or deleting) the entry at `keys`; a key may be a function of the
    manifest (e.g. `first_file`)."""

    def edit(m):
        entry = m
        path = [key(m) if callable(key) else key for key in keys]
        for key in path[:-1]:
            entry = entry[key]
        if delete:
            del entry[path[-1]]
        else:
            entry[path[-1]] = value(m) if callable(value) else value

    return edit


FILE = r"files\['steps/step-00000000\.pt'\]"
TORCH_CASES = [
    # (id, edit, the message naming the entry)
    ("slots as a list", edit_path("slots", value=lambda m: list(m["slots"].values())),
     r"'slots' must be a JSON object, got list"),
    ("slot without link", edit_path("slots", "best_model", "link", delete=True),
     r"slots\['best_model'\] has no 'link'"),
    ("slot without step", edit_path("slots", "last", "step", delete=True),
     r"slots\['last'\] has no 'step'"),
    ("slot without file", edit_path("slots", "last", "file", delete=True),
     r"slots\['last'\] has no 'file'"),
    ("slot without value", edit_path("slots", "last", "value", delete=True),
     r"slots\['last'\] has no 'value'"),
    ("file record without crc32", edit_path("files", first_file, "crc32", delete=True),
     FILE + r" has no 'crc32'"),
    ("file record without size", edit_path("files", first_file, "size", delete=True),
     FILE + r" has no 'size'"),
    ("null slot", edit_path("slots", "best_model", value=None),
     r"slots\['best_model'\] must be a JSON object, got None"),
    ("null file record", edit_path("files", first_file, value=None),
     FILE + r" must be a JSON object, got None"),
    ("null resume slots", edit_path("resume", "slots", value=None),
     r"resume\['slots'\] must be a JSON object, got None"),
    ("null resume slot", edit_path("resume", "slots", "last", value=None),
     r"resume\['slots'\]\['last'\] must be a JSON object, got None"),
    ("null archive entry", edit_path("archive", 0, value=None),
     r"archive\[0\] is None, which is not a relative path"),
    ("null slot table", edit_path("slots", value=None), r"'slots' must be a JSON object"),
    ("huge step", edit_path("slots", "last", "step", value=2**64),
     r"slots\['last'\]\['step'\] must be a step number from 0 to 2\*\*31 - 1, got "
     r"18446744073709551616"),
    ("huge event step", edit_path("event_step", value=10**30),
     r"'event_step' must be a step number from -1 to 2\*\*31 - 1"),
    ("huge resume step", edit_path("resume", "step", value=2**31),
     r"resume\['step'\] must be a step number"),
    ("huge file step", edit_path("files", first_file, "step", value=-(2**63)),
     FILE + r"\['step'\] must be a step number"),
    ("huge size", edit_path("files", first_file, "size", value=2**70),
     FILE + r"\['size'\] must be a size in bytes from 0 to 2\*\*63 - 1, got "
     r"1180591620717411303424"),
    ("negative size", edit_path("files", first_file, "size", value=-1),
     FILE + r"\['size'\] must be a size in bytes"),
    ("crc32 beyond 32 bits", edit_path("files", first_file, "crc32", value=2**32),
     FILE + r"\['crc32'\] must be a CRC-32 from 0 to 2\*\*32 - 1, got 4294967296"),
    ("crc32 as a string", edit_path("files", first_file, "crc32", value="0x1234"),
     FILE + r"\['crc32'\] must be a CRC-32 .*got '0x1234'"),
    ("step as a string", edit_path("slots", "last", "step", value="4"),
     r"slots\['last'\]\['step'\] must be a step number .*got '4'"),
    ("step as a bool", edit_path("slots", "last", "step", value=True),
     r"slots\['last'\]\['step'\] must be a step number .*got True"),
    ("step as a float", edit_path("slots", "last", "step", value=4.0),
     r"slots\['last'\]\['step'\] must be a step number .*got 4\.0"),
    ("value as a list", edit_path("slots", "last", "value", value=[1.1]),
     r"slots\['last'\]\['value'\] must be a metric value \(a finite number, or one of "
     r"\('nan', 'inf', '-inf'\)\), got \[1\.1\]"),
    ("value beyond any float", edit_path("slots", "last", "value", value=10**400),
     r"slots\['last'\]\['value'\] must be a metric value .*got 1000"),
    ("value as a word", edit_path("slots", "last", "value", value="low"),
     r"slots\['last'\]\['value'\] must be a metric value"),
    ("value null", edit_path("resume", "slots", "last", "value", value=None),
     r"resume\['slots'\]\['last'\]\['value'\] must be a metric value .*got None"),
    ("kind as a number", edit_path("slots", "last", "kind", value=3),
     r"slots\['last'\]\['kind'\] must be one of \('best', 'top_k', 'last', 'tolerance'\), "
     r"got 3"),
    ("kind as a list", edit_path("slots", "last", "kind", value=["last"]),
     r"slots\['last'\]\['kind'\] must be one of"),
    ("link as a number", edit_path("slots", "last", "link", value=3),
     r"slots\['last'\]\['link'\] is 3, which is not a plain file name"),
    ("file as a list", edit_path("slots", "last", "file", value=["steps/step-00000004.pt"]),
     r"slots\['last'\]\['file'\] is \['steps/step-00000004\.pt'\], which is not a relative"),
    ("models as a string", edit_path("files", first_file, "models", value="head"),
     FILE + r"\['models'\] must be null \(every submodule\) or a list of submodule names, "
     r"got 'head'"),
    ("callbacks as a list", edit_path("callbacks", value=[]),
     r"'callbacks' must be null or the callbacks' state dict \(an object with format "
     r"'fcb\.state_dict', made by fcb\.state_dict\), got \[\]"),
    ("callbacks without a format", edit_path("callbacks", "format", delete=True),
     r"'callbacks' must be null or the callbacks' state dict .*got \{"),
    ("archive as an object", edit_path("archive", value={}),
     r"'archive' must be a JSON array, got dict"),
    ("archive entry not listed", edit_path("archive", 0, value="steps/step-00000099.pt"),
     r"archive\[0\] is 'steps/step-00000099\.pt', which the manifest's file table does not "
     r"list"),
    ("resume slot not listed", edit_path("resume", "slots", "last", "file",
                                         value="steps/step-00000099.pt"),
     r"resume\['slots'\]\['last'\] points at 'steps/step-00000099\.pt', which the "
     r"manifest's file table does not list"),
    ("resume as a list", edit_path("resume", value=[4]),
     r"'resume' must be null or an object with 'step', 'file' and 'slots', got \[4\]"),
    ("resume without slots", edit_path("resume", "slots", delete=True),
     r"'resume' must be null or an object with 'step', 'file' and 'slots'"),
    ("stop message as a number", edit_path("resume", "stop_message", value=1),
     r"resume\['stop_message'\] must be a string .*got 1"),
    ("version as a bool", edit_path("version", value=True),
     r"has manifest version True; this fcb reads version 1"),
    ("version as a string", edit_path("version", value="1"),
     r"has manifest version '1'; this fcb reads version 1"),
    ("storage as a list", edit_path("storage", value=["torch"]),
     r"'storage' must be the name of the fcb adapter that wrote the run \('torch' or "
     r"'orbax'\), got \['torch'\]"),
    ("no format", edit_path("format", delete=True), r"is not an fcb manifest"),
    ("not an object", lambda m: (m.clear(), m.update({"format": None})),
     r"is not an fcb manifest"),
]


def sealed_edit(run, edit):
    m = raw(run)
    edit(m)
    write_manifest(run, m)  # sealed: only the schema can catch the edit
    return m


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in TORCH_CASES], ids=[c[0] for c in TORCH_CASES]
)
def test_a_malformed_torch_manifest_is_refused_by_every_reader(
    torch_written, tmp_path, edit, message
):
    run = copy_run(torch_written, tmp_path)
    sealed_edit(run, edit)
    before = sorted(os.listdir(run)), sorted(os.listdir(run / "steps"))
    pattern = rf"{run}/manifest\.json:? .*{message}"
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        read_manifest(run)
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        fcb.torch.load_checkpoint(run / "last.pt")
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        start(torch_adapter(run, resume_from=str(run)))
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        start(torch_adapter(run))  # a new run in the directory
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        start(torch_adapter(tmp_path / "elsewhere", resume_from=str(run)))
    assert (sorted(os.listdir(run)), sorted(os.listdir(run / "steps"))) == before
    code, err = inspect(run)
    assert code == 1 and "Traceback" not in err and "manifest.json" in err, err


def test_a_malformed_manifest_without_a_checksum_is_refused_the_same(torch_written, tmp_path):
    """As fcb wrote them before manifests were sealed: the schema alone names the entry."""
    for _, edit, message in TORCH_CASES:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        m = raw(torch_written)
        edit(m)
        if isinstance(m, dict):
            m.pop("checksum", None)
        (run / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(fcb.CheckpointCorruptError, match=message):
            read_manifest(run)


RAW_CASES = [
    # (id, replace this text of the manifest, with this, message)
    ("integer too long to read", '"event_step":4', '"event_step":' + "7" * 5000,
     r"is not valid JSON \(an integer of 5000 digits\)"),
    ("NaN", '"event_step":4', '"event_step":NaN',
     r"is not valid JSON \(NaN is not strict JSON; fcb spells non-finite numbers"),
    ("number out of range", '"event_step":4', '"event_step":1e999',
     r"is not valid JSON \(the number '1e999' is out of range\)"),
    ("nested too deeply", '"archive":[', '"archive":' + "[" * 100_000,
     r"is not valid JSON \(nested too deeply\)"),
]


@pytest.mark.parametrize(
    ("old", "new", "message"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES]
)
def test_json_that_fcb_never_writes_is_refused(torch_written, tmp_path, old, new, message):
    run = copy_run(torch_written, tmp_path)
    text = (run / "manifest.json").read_text()
    assert old in text
    (run / "manifest.json").write_text(text.replace(old, new, 1))
    pattern = rf"{run}/manifest\.json {message}"
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        read_manifest(run)
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        fcb.torch.load_checkpoint(run / "last.pt")
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        start(torch_adapter(run, resume_from=str(run)))


ORBAX_FILE = r"files\['steps/1'\]"
ORBAX_CASES = [
    ("file record without models", edit_path("files", "steps/1", "models", delete=True),
     ORBAX_FILE + r" has no 'models'"),
    ("file record without step", edit_path("files", "steps/1", "step", delete=True),
     ORBAX_FILE + r" has no 'step'"),
    ("models as a string", edit_path("files", "steps/1", "models", value="head"),
     ORBAX_FILE + r"\['models'\] must be null \(every submodule\) or a list"),
    ("slot models as a number", edit_path("slots", "best.val_loss", "models", value=1),
     r"slots\['best\.val_loss'\]\['models'\] must be null"),
    ("slot models holding null", edit_path("slots", "best.val_loss", "models", value=[None]),
     r"slots\['best\.val_loss'\]\['models'\] must be null"),
    ("slot value as an object", edit_path("slots", "last", "value", value={}),
     r"slots\['last'\]\['value'\] must be a metric value"),
    ("null slot", edit_path("slots", "last", value=None),
     r"slots\['last'\] must be a JSON object, got None"),
    ("huge step", edit_path("files", "steps/1", "step", value=10**40),
     ORBAX_FILE + r"\['step'\] must be a step number"),
    ("slots as a list", edit_path("slots", value=lambda m: list(m["slots"])),
     r"'slots' must be a JSON object, got list"),
]


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in ORBAX_CASES], ids=[c[0] for c in ORBAX_CASES]
)
def test_a_malformed_orbax_manifest_is_refused_by_every_reader(
    orbax_written, tmp_path, edit, message
):
    import fcb.orbax

    run = copy_run(orbax_written, tmp_path)
    sealed_edit(run, edit)
    before = sorted(os.listdir(run / "steps"))
    pattern = rf"{run}/manifest\.json: .*{message}"
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        fcb.orbax.read_manifest(run)
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        fcb.orbax.restore(run, "last")
    for adapter in (
        fcb.orbax.OrbaxAdapter(orbax_chain(), run, resume_from=run, background=False),
        fcb.orbax.OrbaxAdapter(orbax_chain(), run, background=False),
    ):
        with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
            start(adapter)
    assert sorted(os.listdir(run / "steps")) == before
    code, err = inspect(run)
    assert code == 1 and "Traceback" not in err and "manifest.json" in err, err


_json_keys = st.one_of(st.text(max_size=3), st.integers(-3, 3), st.booleans(), st.none())
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4),
              st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
        st.dictionaries(_json_keys, inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.text(max_size=5), _json_values, max_size=4))
def test_the_seal_is_the_checksum_of_the_manifest_as_it_reads_back(body):
    """`seal` skips the JSON round trip when every key is a string; its checksum is always
    that of the manifest read back from its JSON (keys of other types, tuples included)."""
    from fcb._host.schema import seal

    try:
        text = json.dumps(body, allow_nan=False)
    except TypeError:  # keys JSON cannot order (e.g. None beside strings): not a manifest
        return
    try:
        expected = _manifest.manifest_checksum(json.loads(text))
    except TypeError:
        return
    assert seal(dict(body))["checksum"] == expected
