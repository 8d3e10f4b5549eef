"""Damaged run directories: truncated or altered checkpoints, hand-edited or foreign
manifests, stale temporary files.

Each damage is detected with a `fcb.CheckpointCorruptError` naming the file, by every reader
that would otherwise use the damaged bytes (`fcb.torch.load_checkpoint`, resuming, `fcb
inspect`), and the open of the directory (`CheckpointStore.open`, every adapter's start)
checks what it can without reading every checkpoint: each listed file is present with its
recorded size. Stale temporary files are removed at open. Nothing is deleted from a
directory whose manifest does not describe it, and a refused resume leaves the model as it
was (every file is checked before anything is restored).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil

import pytest
import torch

import fcb
import fcb.torch
from fcb import _files
from fcb._host import manifest as _manifest

CHAIN = fcb.chain(
    fcb.EarlyStopping("val_loss", patience=100),
    fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
    fcb.BestCheckpoint("val_loss", tolerances=(1,)),
)
VALUES = [1.0, 0.8, 1.2, 0.9, 1.1]
# After these checks: best_model = best.val_loss = step 1, best_model-top2 = step 3,
# the tolerance-1 slot froze on step 1 too, last (the resume point) = step 4.
RUNNER = fcb.Runner(CHAIN)  # one compiled dispatch for all cases (see test_faults.py)
HAS_CLI = importlib.util.find_spec("fcb.cli") is not None


def new_adapter(dirpath, seed=0, **kwargs):
    torch.manual_seed(seed)
    adapter = fcb.torch.TorchAdapter(
        CHAIN, model=torch.nn.Linear(64, 8), dirpath=str(dirpath), **kwargs
    )
    RUNNER.state = CHAIN.init()
    adapter.runner = RUNNER
    return adapter


def train(dirpath, seed=0, values=VALUES):
    adapter = new_adapter(dirpath, seed)
    adapter.on_fit_start()
    for step, value in enumerate(values):
        with torch.no_grad():  # different weights at every step, so every file differs
            adapter.model.weight.add_(0.01 * (step + 1))
        adapter.on_validation_end({"val_loss": value}, step=step)
    adapter.on_fit_end()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    dirpath = tmp_path_factory.mktemp("pristine")
    train(dirpath)
    other = tmp_path_factory.mktemp("other")
    train(other, seed=1)  # the same steps and sizes, other weights
    return dirpath, other


@pytest.fixture
def run(pristine, tmp_path):
    """A private copy of the pristine run, slot names hard-linked to their steps again."""
    dirpath = tmp_path / "run"
    shutil.copytree(pristine[0], dirpath)
    for slot in manifest(dirpath)["slots"].values():
        os.unlink(dirpath / slot["link"])
        os.link(dirpath / slot["file"], dirpath / slot["link"])
    return dirpath


def manifest(dirpath):
    with open(os.path.join(dirpath, "manifest.json")) as f:
        return json.load(f)


def write_manifest(dirpath, value):
    """Save a manifest edited by hand, sealed again (as fcb's writer seals every manifest):
    what fcb reads is then the edit itself, not a checksum mismatch."""
    _manifest.write_manifest(dirpath, value)


def slot_file(dirpath, slot):
    return os.path.join(dirpath, manifest(dirpath)["slots"][slot]["file"])


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def resume(dirpath):
    """Resume; on refusal check that the model was not touched (nothing loaded)."""
    adapter = new_adapter(dirpath, seed=7, resume_from=str(dirpath))
    untouched = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    try:
        adapter.on_fit_start()
    except BaseException:
        for name, value in adapter.model.state_dict().items():
            assert torch.equal(value, untouched[name]), name
        adapter.on_exception()
        raise
    adapter.on_fit_end()
    return adapter


def open_store(dirpath):
    store = fcb.torch.CheckpointStore(str(dirpath))
    try:
        store.open()
    finally:
        store.close()
    return store


def inspect(dirpath):
    """`fcb inspect DIR`: the exit code and what it printed on stderr."""
    from fcb import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["inspect", str(dirpath)])
    return code, err.getvalue()


def step_files(dirpath):
    return sorted(os.listdir(os.path.join(dirpath, "steps")))


# --- the pristine run passes every reader -----------------------------------------------


def test_pristine_run_passes_every_reader(run):
    for slot in manifest(run)["slots"].values():
        assert fcb.torch.load_checkpoint(run / slot["link"])["fcb"]["step"] == slot["step"]
    open_store(run)
    assert resume(run).resumed_step == len(VALUES) - 1
    if HAS_CLI:
        assert inspect(run)[0] == 0


# --- damaged step files ------------------------------------------------------------------

DAMAGE = {"truncated": truncate, "flipped byte": flip_byte}
MESSAGES = {
    "truncated": r"has \d+ bytes, the manifest records \d+ \(truncated or replaced\)",
    "flipped byte": r"does not match its recorded CRC-32 checksum \(its bytes changed\)",
}


@pytest.mark.parametrize("slot", ["last", "best_model-top2"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_step_file_is_refused_by_every_reader(run, damage, slot):
    """`last` is the resume point itself; `best_model-top2` is only kept by the resumed run
    (a resume must refuse it too, not carry it on until someone loads it)."""
    path = slot_file(run, slot)
    DAMAGE[damage](path)
    pattern = rf"{path}.*{MESSAGES[damage]}"
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        fcb.torch.load_checkpoint(run / f"{slot}.pt")
    if damage == "truncated":  # open checks sizes (a stat); checksums would read every byte
        at_open = rf"{path} has \d+ bytes, .*manifest\.json records \d+ \(truncated, replaced"
        with pytest.raises(fcb.CheckpointCorruptError, match=at_open):
            open_store(run)
        pattern = at_open  # resuming opens the directory first
    else:
        open_store(run)
    with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
        resume(run)
    if HAS_CLI:
        code, err = inspect(run)
        assert code == 1 and os.path.basename(path) in err, err
    assert step_files(run) == sorted(os.path.basename(f) for f in manifest(run)["files"])


def test_step_file_replaced_by_another_step_with_a_matching_record(run):
    """Someone copied another step's file over the resume point and fixed its record: the
    checksum passes, the step recorded inside the file does not."""
    m = manifest(run)
    target, other = slot_file(run, "last"), slot_file(run, "best_model")
    shutil.copy(other, target)
    m["files"][m["slots"]["last"]["file"]].update(_files.file_checksum(target))
    write_manifest(run, m)
    with pytest.raises(
        fcb.CheckpointCorruptError,
        match=rf"{target} holds step 1, the manifest records step 4 \(another step's file "
        r"copied over it, its record edited\?\)",
    ):
        fcb.torch.load_checkpoint(run / "last.pt")
    with pytest.raises(
        fcb.CheckpointCorruptError,
        match=rf"{target} is not the fcb checkpoint of step 4 that the manifest records "
        r"\(found 'fcb\.checkpoint' at step 1\)",
    ):
        resume(run)


def test_replaced_slot_name_is_not_loaded(run):
    """`best_model.pt` overwritten by another file: load_checkpoint follows the manifest to
    the slot's step file, and the next open makes the name a link to it again."""
    best = manifest(run)["slots"]["best_model"]
    os.unlink(run / "best_model.pt")
    shutil.copy(slot_file(run, "last"), run / "best_model.pt")
    assert fcb.torch.load_checkpoint(run / "best_model.pt")["fcb"]["step"] == best["step"]
    if HAS_CLI:
        code, err = inspect(run)
        assert code == 1 and "best_model.pt" in err, err
    open_store(run)
    assert os.path.samefile(run / "best_model.pt", run / best["file"])


# --- the manifest edited by hand -----------------------------------------------------------


def edit_slot_to_unlisted_file(m):
    m["slots"]["best_model"]["file"] = "steps/step-00000099.pt"


def edit_delete_listed_file(m, run):
    os.unlink(run / m["slots"]["best_model-top2"]["file"])
    os.unlink(run / "best_model-top2.pt")


def edit_wrong_size(m):
    m["files"][m["slots"]["best_model-top2"]["file"]]["size"] += 10


def edit_resume_to_unlisted_file(m):
    m["resume"]["file"] = "steps/step-00000042.pt"


def edit_version(m):
    m["version"] = 99


def edit_storage(m):
    m["storage"] = "orbax"


def edit_drop_files_table(m):
    del m["files"]


HAND_EDITS = [
    # (id, edit, message of load_checkpoint and resume, message at open if it differs)
    ("slot points at an unlisted file", edit_slot_to_unlisted_file,
     r"manifest\.json: slot 'best_model' points at 'steps/step-00000099\.pt', which the "
     r"manifest's file table does not list \(edited by hand, or from another run\?\)", None),
    ("listed file deleted", edit_delete_listed_file,
     r"step-00000003\.pt is missing \(the manifest records it\)",
     r"step-00000003\.pt is listed in .*manifest\.json but missing"),
    ("wrong size recorded", edit_wrong_size,
     r"step-00000003\.pt has \d+ bytes, the manifest records \d+",
     r"step-00000003\.pt has \d+ bytes, .*manifest\.json records \d+"),
    ("resume point at an unlisted file", edit_resume_to_unlisted_file,
     r"manifest\.json: the resume point needs steps/step-00000042\.pt, which its file table "
     r"does not list", None),
    ("other manifest version", edit_version,
     r"manifest\.json has manifest version 99; this fcb reads version 1", None),
    ("written by fcb.orbax", edit_storage,
     r"manifest\.json belongs to a run written by fcb\.orbax; open it with fcb\.orbax", None),
    ("no file table", edit_drop_files_table, r"manifest\.json has no 'files' table", None),
]


@pytest.mark.parametrize(
    ("edit", "message", "at_open"), [c[1:] for c in HAND_EDITS], ids=[c[0] for c in HAND_EDITS]
)
def test_hand_edited_manifest(run, edit, message, at_open):
    m = manifest(run)
    before = step_files(run)
    if edit is edit_delete_listed_file:
        edit(m, run)
        before = step_files(run)
    else:
        edit(m)
    write_manifest(run, m)
    # Resuming opens the directory first; then it reads the resume point.
    with pytest.raises(fcb.CheckpointCorruptError, match=at_open or message):
        resume(run)
    if edit is not edit_resume_to_unlisted_file:
        with pytest.raises(fcb.CheckpointCorruptError, match=message):
            fcb.torch.load_checkpoint(run / "best_model-top2.pt")
    if edit is edit_resume_to_unlisted_file:  # the slots are intact: the open is fine
        open_store(run)
    else:
        with pytest.raises(fcb.CheckpointCorruptError, match=at_open or message):
            open_store(run)
    assert step_files(run) == before  # nothing was deleted on the strength of a bad manifest
    if HAS_CLI and edit is not edit_resume_to_unlisted_file:
        assert inspect(run)[0] == 1


@pytest.mark.parametrize(
    "content", [b"", b'{"format": "fcb.manifest", "vers', b"\xff\xfe not json"],
    ids=["empty", "truncated", "binary"],
)
def test_unreadable_manifest(run, pristine, content):
    with open(run / "manifest.json", "wb") as f:
        f.write(content)
    pattern = rf"{run}/manifest\.json is not valid JSON"
    for reader in (resume, open_store, lambda d: fcb.torch.load_checkpoint(d / "last.pt")):
        with pytest.raises(fcb.CheckpointCorruptError, match=pattern):
            reader(run)
    assert step_files(run) == step_files(pristine[0])
    if HAS_CLI:
        assert inspect(run)[0] == 1


# --- a manifest from another run -----------------------------------------------------------


def test_manifest_from_another_run_with_the_same_steps(run, pristine):
    """Same step numbers and sizes, other weights: open cannot tell (it does not read the
    files), every reader of the bytes can; nothing is deleted."""
    shutil.copy(pristine[1] / "manifest.json", run / "manifest.json")
    before = step_files(run)
    open_store(run)
    assert step_files(run) == before
    with pytest.raises(
        fcb.CheckpointCorruptError, match=rf"{run}/steps/step-\d+\.pt does not match its recorded"
    ):
        resume(run)
    with pytest.raises(fcb.CheckpointCorruptError, match="does not match its recorded CRC-32"):
        fcb.torch.load_checkpoint(run / "last.pt")
    if HAS_CLI:
        assert inspect(run)[0] == 1


def test_manifest_from_another_run_with_other_steps(run, tmp_path):
    """The other run kept other steps: open refuses before deleting this run's files as
    orphans (they are not in the foreign manifest)."""
    other = tmp_path / "other"
    train(other, values=[1.0, 2.0, 3.0, 0.5, 0.4, 0.3])
    shutil.copy(other / "manifest.json", run / "manifest.json")
    before = step_files(run)
    with pytest.raises(fcb.CheckpointCorruptError, match=r"is listed in .* but missing"):
        open_store(run)
    with pytest.raises(fcb.CheckpointCorruptError, match=r"is listed in .* but missing"):
        resume(run)
    with pytest.raises(fcb.CheckpointCorruptError, match=r"step-0000000\d\.pt is missing"):
        fcb.torch.load_checkpoint(run / "best_model.pt")
    assert step_files(run) == before
    if HAS_CLI:
        assert inspect(run)[0] == 1


# --- stale temporary files ------------------------------------------------------------------


def test_stale_temporary_files_are_removed_at_open(run):
    stale = [
        run / f"{_files.TMP_PREFIX}0123456789ab-manifest.json",
        run / f"{_files.TMP_PREFIX}0123456789ab-last.pt",
        run / "steps" / f"{_files.TMP_PREFIX}0123456789ab-step-00000005.pt",
    ]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    before = manifest(run)
    adapter = resume(run)  # opens the directory: temporaries go, the resume is unaffected
    assert adapter.resumed_step == len(VALUES) - 1
    assert not [p for p in stale if p.exists()]
    assert manifest(run)["slots"] == before["slots"]
    assert step_files(run) == sorted(os.path.basename(f) for f in before["files"])


def test_orphan_step_file_from_a_crash_is_deleted_at_open_and_never_loaded(run):
    orphan = run / "steps" / "step-00000005.pt"
    shutil.copy(slot_file(run, "last"), orphan)
    with pytest.raises(fcb.CheckpointCorruptError, match=r"step-00000005\.pt is not listed"):
        fcb.torch.load_checkpoint(orphan)
    open_store(run)
    assert not orphan.exists()


# --- a new run in a directory that holds one -------------------------------------------------


def test_new_run_over_an_old_one_never_reuses_its_checkpoints(run, caplog):
    """With existing_run="start_over", a new run replaces the old one: its own step 0 is
    written (the old run's step 0 is not taken for it), the old run's names and files are
    gone, and the old manifest was replaced by an empty one before any new file was
    written, so a kill in between cannot leave a manifest whose record does not match its
    file."""
    old = manifest(run)
    seen = []
    original = fcb.torch.CheckpointStore.write

    def write(store, *args, **kwargs):  # the manifest on disk when the first file is written
        seen.append(manifest(store.directory))
        return original(store, *args, **kwargs)

    adapter = new_adapter(run, seed=3, existing_run="start_over")
    with caplog.at_level("WARNING", logger="fcb"):
        adapter.on_fit_start()
    assert any("a new run replaces it" in r.getMessage() for r in caplog.records)
    assert manifest(run)["files"] == {} and step_files(run) == []
    assert not [s["link"] for s in old["slots"].values() if (run / s["link"]).exists()]
    fcb.torch.CheckpointStore.write = write
    try:
        adapter.on_validation_end({"val_loss": 2.0}, step=0)
    finally:
        fcb.torch.CheckpointStore.write = original
    adapter.on_fit_end()
    assert seen[0]["files"] == {}
    payload = fcb.torch.load_checkpoint(run / "last.pt")
    assert torch.equal(payload["model"]["weight"], adapter.model.weight.detach())
    assert sorted(manifest(run)["slots"]) == [
        "best.val_loss", "best.val_loss.tolerance=1", "best_model", "last"
    ]


def test_slot_names_of_any_suffix_load_through_the_manifest(tmp_path):
    """Lightning's store names slots `best_model.ckpt`: load_checkpoint finds them too."""
    store = fcb.torch.CheckpointStore(str(tmp_path), suffix=".ckpt")
    store.open()
    store.write(store.step_file(3, None), 3, None, {"fcb": {"step": 3}, "weights": [1.0]})
    store.commit(event_step=3, slots={"best_model": (3, 0.5, None)}, archive=[],
                 callbacks=None, resume=False)
    store.close()
    assert fcb.torch.load_checkpoint(tmp_path / "best_model.ckpt")["weights"] == [1.0]


def test_resume_into_a_directory_holding_another_run_replaces_it(run, pristine, tmp_path):
    """Resuming run A into directory B, which holds run C, with existing_run="start_over":
    B ends with exactly A's resume point, none of C's files, names or archive."""
    target = tmp_path / "target"
    other = fcb.torch.TorchAdapter(  # keeps every step (an archive) under other names
        fcb.ModelCheckpoint("val_loss", save_top_k=-1, filename="other"),
        model=torch.nn.Linear(64, 8), dirpath=str(target),
    )
    for step, value in enumerate([3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2]):
        other.on_validation_end({"val_loss": value}, step=step)
    other.on_fit_end()
    assert manifest(target)["archive"]
    held = manifest(target)
    with pytest.raises(fcb.RunExistsError, match=r"would replace it"):  # never implicitly
        new_adapter(target, resume_from=str(run)).on_fit_start()
    assert manifest(target) == held
    adapter = new_adapter(target, resume_from=str(run), existing_run="start_over")
    adapter.on_fit_start()
    adapter.on_fit_end()
    resumed, source = manifest(target), manifest(run)
    assert resumed["slots"] == source["resume"]["slots"]
    assert resumed["archive"] == []
    assert sorted(resumed["files"]) == sorted(
        {slot["file"] for slot in source["resume"]["slots"].values()}
    )
    assert step_files(target) == sorted(os.path.basename(f) for f in resumed["files"])
    links = {slot["link"] for slot in resumed["slots"].values()}
    assert {n for n in os.listdir(target) if n.endswith(".pt")} == links
    for slot in resumed["slots"].values():
        assert fcb.torch.load_checkpoint(target / slot["link"])["fcb"]["step"] == slot["step"]
