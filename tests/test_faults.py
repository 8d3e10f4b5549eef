"""Disk faults injected at every file operation of a checkpoint commit.

A commit is: the step file (temporary name, writes, fsync, rename, directory fsync), then
`manifest.json` (the same steps; its rename is the commit point), then the slot names (hard
link to a temporary name, rename over the name), the removal of names no slot uses, a
directory fsync, and the deletion of step files no slot holds. `FaultyDisk` records those
operations for one check, then replays the check once per operation with that operation
failing (ENOSPC, EIO) or with the whole directory deleted just before it.

What must hold (documented in docs/reliability.md):

- before the commit point: `fcb.CheckpointWriteError` naming the file; the manifest on disk,
  the callbacks' state and every previous checkpoint are exactly as before the check; no
  temporary file is left; the check can be retried.
- between the manifest's rename and its directory fsync: the same error (the rename may not
  be durable); the manifest on disk is the old or the new one, both complete.
- after the commit point: the check happened (the manifest says so), so it is not an error:
  a warning names the file, every listed file is complete, and the next commit or the next
  open re-points the names and deletes what is left.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import logging
import os
import re
import shutil

import pytest
import torch

import fcb
import fcb.torch
from fcb import _files
from fcb._host import store as _store

CHAIN = fcb.chain(
    fcb.EarlyStopping("val_loss", patience=100),
    fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True),
    fcb.BestCheckpoint("val_loss", tolerances=(1,)),
)
# Step 2 is a new best after a worse step 1: its check writes step 2, re-points best_model,
# last and best.val_loss, keeps the tolerance slot on step 0 and deletes step 1.
VALUES = [1.0, 2.0, 0.5, 0.4]
FAULTY = 2
ERRNOS = [errno.ENOSPC, errno.EIO]
# One compiled dispatch for every scenario: compiling the chain again for each adapter would
# cost about a second per scenario, and the scenarios differ only in the disk.
RUNNER = fcb.Runner(CHAIN)


def new_adapter(dirpath, **kwargs):
    torch.manual_seed(0)
    adapter = fcb.torch.TorchAdapter(
        CHAIN, model=torch.nn.Linear(4, 1), dirpath=str(dirpath), **kwargs
    )
    RUNNER.state = CHAIN.init()
    adapter.runner = RUNNER
    return adapter


def check(adapter, step):
    return adapter.on_validation_end({"val_loss": VALUES[step]}, step=step)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def temporaries(dirpath):
    return [
        os.path.join(root, name)
        for root, _, names in os.walk(dirpath)
        for name in names
        if name.startswith(_files.TMP_PREFIX)
    ]


def assert_complete(dirpath):
    """The manifest on disk lists only complete files, and each slot loads its step."""
    manifest = fcb.torch.read_manifest(os.path.join(dirpath, "manifest.json"))
    for relative, record in manifest["files"].items():
        _files.verify(os.path.join(dirpath, relative), record)
    for name, slot in manifest["slots"].items():
        payload = fcb.torch.load_checkpoint(os.path.join(dirpath, slot["link"]))
        assert payload["fcb"]["step"] == slot["step"], name
    return manifest


def assert_tidy(dirpath):
    """Exactly the listed step files are on disk, every name is a link to its slot's step."""
    manifest = assert_complete(dirpath)
    steps = sorted(f"steps/{n}" for n in os.listdir(os.path.join(dirpath, "steps")))
    assert steps == sorted(manifest["files"])
    for slot in manifest["slots"].values():
        assert os.path.samefile(
            os.path.join(dirpath, slot["link"]), os.path.join(dirpath, slot["file"])
        )
    assert not temporaries(dirpath)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The fault-free run: the manifest after the faulty check, the final manifest, the
    callbacks' state after the faulty check, and the names on disk at the end."""
    dirpath = tmp_path_factory.mktemp("reference")
    adapter = new_adapter(dirpath)
    adapter.on_fit_start()
    for step in range(FAULTY + 1):
        check(adapter, step)
    after_faulty = read_json(dirpath / "manifest.json")
    state = adapter.state_dict()
    for step in range(FAULTY + 1, len(VALUES)):
        check(adapter, step)
    adapter.on_fit_end()
    assert_tidy(str(dirpath))
    return {
        "after_faulty": after_faulty,
        "state": state,
        "final": read_json(dirpath / "manifest.json"),
        "names": sorted(os.listdir(dirpath)),
    }


class FaultyDisk:
    """Wraps the file operations the store uses (`open` as `_files` sees it, the checked
    writer's `write`, `os.fsync`, `os.replace`, `os.link`, `os.unlink`, `os.open`). Only
    calls on paths under `root` are counted, so torch's and JAX's own file use is left alone.

    `arm(point, action)` makes the operation `point` (op, file label, occurrence) raise or
    run `action` first; `trace` lists every operation seen since the last `reset`.
    """

    def __init__(self, monkeypatch, root):
        self.root = os.path.realpath(root)
        self.trace: list[tuple[str, str]] = []
        self.point: tuple[str, str, int] | None = None
        self.action = None
        self.fired = False
        self.read_only = False
        self.commit_done = False
        self.commit_index: int | None = None
        self.commit_end: int | None = None
        real_open = builtins.open
        monkeypatch.setattr(
            _files, "open", self._wrap("open", real_open, lambda a, k: a[0]), raising=False
        )
        real_write = _files.ChecksumWriter.write
        monkeypatch.setattr(
            _files.ChecksumWriter, "write",
            self._wrap("write", real_write, lambda a, k: a[0].raw.name),
        )
        for name, path_of in [
            ("fsync", lambda a, k: os.readlink(f"/proc/self/fd/{a[0]}")),
            ("replace", lambda a, k: a[1]),
            ("link", lambda a, k: a[1]),
            ("unlink", lambda a, k: a[0]),
            ("open_dir", lambda a, k: a[0]),
        ]:
            attribute = "open" if name == "open_dir" else name
            monkeypatch.setattr(os, attribute, self._wrap(name, getattr(os, attribute), path_of))
        real_json = _store.atomic_write_json

        def write_manifest(*args, **kwargs):  # marks the end of the manifest's commit
            result = real_json(*args, **kwargs)
            self.commit_end = len(self.trace)
            return result

        monkeypatch.setattr(_store, "atomic_write_json", write_manifest)

    def label(self, path):
        path = os.path.realpath(os.fspath(path))
        if not path.startswith(self.root):
            return None
        # relative to the run directory (a child of root), so that a trace recorded in one
        # run directory names the same operations in another
        parts = os.path.relpath(path, self.root).split(os.sep)[1:]
        return re.sub(r"\.fcb-tmp-[0-9a-f]+-", "tmp:", "/".join(parts) or ".")

    def _wrap(self, op, real, path_of):
        def wrapper(*args, **kwargs):
            try:
                label = self.label(path_of(args, kwargs))
            except (OSError, IndexError, AttributeError, TypeError):
                label = None
            if label is not None:
                if op == "open_dir" and args[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    op_name = "open_lock"
                else:
                    op_name = op
                self.trace.append((op_name, label))
                if op_name == "replace" and label == "manifest.json":
                    self.commit_index = len(self.trace) - 1
                occurrence = self.trace.count((op_name, label))
                if self.read_only and self._mutates(op_name, args):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), args[0])
                if not self.fired and self.point == (op_name, label, occurrence):
                    self.fired = True
                    if isinstance(self.action, int) and op_name == "write":
                        return self._failing_write(real, args, self.action)
                    if isinstance(self.action, int):
                        raise OSError(self.action, os.strerror(self.action))
                    self.action()
            return real(*args, **kwargs)

        return wrapper

    @staticmethod
    def _failing_write(real, args, code):
        """The disk error comes from the file underneath, as a full disk would raise it."""

        class Full:
            def write(self, data):
                raise OSError(code, os.strerror(code))

        writer = args[0]
        raw, writer.raw = writer.raw, Full()
        try:
            return real(*args)
        finally:
            writer.raw = raw

    @staticmethod
    def _mutates(op, args):
        if op == "open":
            mode = args[1] if len(args) > 1 else "r"
            return any(c in mode for c in "wax+")
        return op in ("write", "replace", "link", "unlink", "open_lock")

    def reset(self):
        self.trace, self.point, self.action, self.fired = [], None, None, False
        self.commit_index = self.commit_end = None

    def arm(self, point, action):
        self.reset()
        self.point, self.action = point, action

    def points(self):
        """Every operation of the recorded trace as (op, label, occurrence); of the many
        writes of one file, only the middle one (a partial file exists by then)."""
        seen: dict[tuple[str, str], int] = {}
        writes: dict[str, int] = {}
        for op, label in self.trace:
            if op == "write":
                writes[label] = writes.get(label, 0) + 1
        points, phases = [], []
        for index, (op, label) in enumerate(self.trace):
            seen[(op, label)] = occurrence = seen.get((op, label), 0) + 1
            if op == "write" and occurrence != (writes[label] + 1) // 2:
                continue
            points.append((op, label, occurrence))
            if index <= self.commit_index:
                phases.append("before")
            elif index < self.commit_end:
                phases.append("sync")
            else:
                phases.append("after")
        return points, phases


@pytest.fixture
def disk(monkeypatch, tmp_path):
    return FaultyDisk(monkeypatch, tmp_path)


def recorded_points(tmp_path, disk):
    """Run the checks up to the faulty one, recording the faulty check's operations."""
    adapter = new_adapter(tmp_path / "record")
    adapter.on_fit_start()
    for step in range(FAULTY):
        check(adapter, step)
    disk.reset()
    check(adapter, FAULTY)
    points, phases = disk.points()  # the check's own operations (not the close's)
    adapter.on_fit_end()
    disk.reset()
    return points, phases


def file_of(label):
    """The final file an operation belongs to (a temporary name stands for its target)."""
    return label.replace("tmp:", "")


def run_fault(tmp_path, disk, caplog, point, phase, action, reference, name):
    """Fail one operation of the faulty check; check every promise; continue the run."""
    dirpath = str(tmp_path / name)
    adapter = new_adapter(dirpath)
    adapter.on_fit_start()
    for step in range(FAULTY):
        check(adapter, step)
    before_manifest = read_json(os.path.join(dirpath, "manifest.json"))
    before_state = adapter.state_dict()
    caplog.clear()
    disk.arm(point, action)
    if phase == "after":
        with caplog.at_level(logging.WARNING, logger="fcb"):
            check(adapter, FAULTY)
        disk.point = None
        assert disk.fired
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(file_of(point[1]).split("/")[-1] in w for w in warnings), warnings
        # The check happened: the manifest and the callbacks' state both say so.
        assert read_json(os.path.join(dirpath, "manifest.json")) == reference["after_faulty"]
        assert adapter.state_dict() == reference["state"]
        assert_complete(dirpath)
    else:
        with pytest.raises(fcb.CheckpointWriteError) as info:
            check(adapter, FAULTY)
        disk.point = None
        assert disk.fired
        message = str(info.value)
        target = file_of(point[1]) if point[1] != "." else "manifest.json"
        assert os.path.basename(target) in message, message
        on_disk = read_json(os.path.join(dirpath, "manifest.json"))
        if phase == "before":
            assert on_disk == before_manifest
            for slot_name, slot in on_disk["slots"].items():  # the previous slots load
                payload = fcb.torch.load_checkpoint(os.path.join(dirpath, slot["link"]))
                assert payload["fcb"]["step"] == slot["step"], slot_name
        else:  # renamed, perhaps not durable: either manifest is complete
            assert on_disk in (before_manifest, reference["after_faulty"])
        assert adapter.state_dict() == before_state  # the failed check did not happen
        assert not temporaries(dirpath)
        assert_complete(dirpath)
        check(adapter, FAULTY)  # the disk is back: retrying the check works
        assert read_json(os.path.join(dirpath, "manifest.json")) == reference["after_faulty"]
    for step in range(FAULTY + 1, len(VALUES)):
        check(adapter, step)
    adapter.on_fit_end()
    # The next commit repaired every name and deleted what was left: as the fault-free run.
    assert read_json(os.path.join(dirpath, "manifest.json")) == reference["final"]
    assert sorted(os.listdir(dirpath)) == reference["names"]
    assert_tidy(dirpath)
    return phase


def test_fault_at_every_operation_of_a_commit(tmp_path, disk, caplog, reference):
    points, phases = recorded_points(tmp_path, disk)
    ops = {op for op, _, _ in points}
    # The trace covers every kind of step the commit takes, before and after the commit point.
    assert {"open", "write", "fsync", "replace", "open_dir", "link", "unlink"} <= ops, points
    assert {"before", "sync", "after"} == set(phases)
    outcomes: dict[str, int] = {}
    for code in ERRNOS:
        for n, (point, phase) in enumerate(zip(points, phases)):
            run_fault(
                tmp_path, disk, caplog, point, phase, code, reference,
                f"{errno.errorcode[code]}-{n}",
            )
            outcomes[phase] = outcomes.get(phase, 0) + 1
    print(f"faults injected: {len(points) * len(ERRNOS)} ({len(points)} operations x "
          f"{len(ERRNOS)} errnos), outcomes by phase: {json.dumps(outcomes)}")


def test_directory_deleted_mid_commit(tmp_path, disk, caplog):
    """The run directory removed at the first operation of each phase of a commit: a clear
    error at this check (before the commit point) or at the next one that writes."""
    points, phases = recorded_points(tmp_path, disk)
    firsts = [points[phases.index(p)] for p in ("before", "sync", "after")]
    for n, (point, phase) in enumerate(zip(firsts, ("before", "sync", "after"))):
        dirpath = str(tmp_path / f"deleted-{n}")
        adapter = new_adapter(dirpath)
        adapter.on_fit_start()
        for step in range(FAULTY):
            check(adapter, step)
        disk.arm(point, lambda d=dirpath: shutil.rmtree(d))
        if phase == "after":
            with caplog.at_level(logging.WARNING, logger="fcb"):
                check(adapter, FAULTY)
            assert any(dirpath in r.getMessage() for r in caplog.records)
            with pytest.raises(fcb.CheckpointWriteError, match="No such file or directory"):
                check(adapter, FAULTY + 1)  # a new best: the next write fails clearly
        else:
            with pytest.raises(
                fcb.CheckpointWriteError, match=r"could not write .*No such file or directory"
            ):
                check(adapter, FAULTY)
        assert disk.fired
        disk.reset()
        adapter.on_exception()
        # Nothing is left to resume from, and resuming says so; a new run starts cleanly.
        resumed = new_adapter(dirpath, resume_from=dirpath)
        with pytest.raises(fcb.CheckpointCorruptError, match=r"holds no fcb checkpoint"):
            resumed.on_fit_start()
        resumed.on_exception()
        again = new_adapter(dirpath)
        again.on_fit_start()
        check(again, 0)
        again.on_fit_end()
        assert_tidy(dirpath)


def test_directory_deleted_between_checks(tmp_path):
    dirpath = str(tmp_path / "run")
    adapter = new_adapter(dirpath)
    adapter.on_fit_start()
    check(adapter, 0)
    shutil.rmtree(dirpath)
    # Checked before anything is written: a directory created again (by another run, or by
    # the write itself) must never receive this run's steps.
    with pytest.raises(
        fcb.CheckpointWriteError,
        match=r"the run directory .*/run was deleted while this adapter was writing to it \(No "
        r"such file or directory\)",
    ):
        check(adapter, 1)
    assert not os.path.exists(dirpath)
    adapter.on_exception()


@contextlib.contextmanager
def read_only(dirpath, disk):
    """Make `dirpath` read-only. As root, permission bits do not stop writes, so the faulty
    disk raises EROFS at every operation that would change the directory instead, and
    `os.access` reports it unwritable, as a read-only mount would."""
    if os.geteuid() != 0:
        modes = {p: os.stat(p).st_mode for p in (dirpath, os.path.join(dirpath, "steps"))}
        for path in modes:
            os.chmod(path, 0o555)
        try:
            yield
        finally:
            for path, mode in modes.items():
                os.chmod(path, mode)
        return
    real_access = os.access
    disk.read_only = True
    os.access = lambda path, mode, *a, **k: (  # undone below, and by monkeypatch
        False
        if mode & os.W_OK and disk.label(path) is not None
        else real_access(path, mode, *a, **k)
    )
    try:
        yield
    finally:
        os.access = real_access
        disk.read_only = False


def test_read_only_directory_at_open_and_mid_run(tmp_path, disk, reference):
    dirpath = str(tmp_path / "run")
    adapter = new_adapter(dirpath)
    adapter.on_fit_start()
    for step in range(FAULTY):
        check(adapter, step)
    before = read_json(os.path.join(dirpath, "manifest.json"))
    with read_only(dirpath, disk):
        with pytest.raises(fcb.CheckpointWriteError, match=r"could not write .*step-00000002"):
            check(adapter, FAULTY)
        assert read_json(os.path.join(dirpath, "manifest.json")) == before
        assert_complete(dirpath)
        adapter.on_exception()
        reopened = new_adapter(dirpath, resume_from=dirpath)
        with pytest.raises(
            fcb.CheckpointWriteError,
            match=rf"checkpoint directory {re.escape(dirpath)} is not writable\. Pass a "
            r"writable dirpath",
        ):
            reopened.on_fit_start()
    # Writable again: resume and finish as the fault-free run.
    resumed = new_adapter(dirpath, resume_from=dirpath)
    resumed.on_fit_start()
    assert resumed.resumed_step == FAULTY - 1
    for step in range(FAULTY, len(VALUES)):
        check(resumed, step)
    resumed.on_fit_end()
    assert read_json(os.path.join(dirpath, "manifest.json")) == reference["final"]
    assert_tidy(dirpath)


def test_stale_name_that_cannot_be_removed_is_retried_and_never_serves_old_data(
    tmp_path, disk, caplog
):
    """A slot that stops being used keeps its name until the unlink works; deletion of
    step files that fail is retried at the next commit."""
    store = fcb.torch.CheckpointStore(str(tmp_path / "store"))
    store.open()

    def commit(step, slots):
        relative = store.step_file(step, None)
        store.write(relative, step, None, {"step": step})
        store.commit(
            event_step=step,
            slots={name: (s, 1.0, None) for name, s in slots.items()},
            archive=[],
            callbacks=None,
            resume=False,
        )

    commit(0, {"a": 0, "b": 0})
    disk.arm(("unlink", "b.pt", 1), errno.EIO)
    with caplog.at_level(logging.WARNING, logger="fcb"):
        commit(1, {"a": 1})
    assert disk.fired and any("b.pt" in r.getMessage() for r in caplog.records)
    disk.arm(("unlink", "steps/step-00000001.pt", 1), errno.EIO)
    with caplog.at_level(logging.WARNING, logger="fcb"):
        commit(2, {"a": 2})
    assert disk.fired and any("step-00000001.pt" in r.getMessage() for r in caplog.records)
    assert os.path.exists(store.path("steps/step-00000001.pt"))
    disk.reset()
    commit(3, {"a": 3})  # retried: the step file no manifest lists is gone now
    assert sorted(os.listdir(store.path("steps"))) == ["step-00000003.pt"]
    store.close()
    with pytest.raises(fcb.CheckpointCorruptError, match=r"b\.pt is not listed"):
        fcb.torch.load_checkpoint(store.path("b.pt"))


def test_failed_name_refresh_removes_the_stale_name(tmp_path, disk, caplog):
    """When a slot's name cannot be re-pointed, the old name is removed rather than left
    serving another step's checkpoint; load_checkpoint still finds the slot's file."""
    store = fcb.torch.CheckpointStore(str(tmp_path / "store"))
    store.open()
    for step in range(2):
        if step == 1:
            disk.arm(("link", "tmp:best.pt", 1), errno.ENOSPC)
        store.write(store.step_file(step, None), step, None, {"step": step})
        with caplog.at_level(logging.WARNING, logger="fcb"):
            store.commit(
                event_step=step, slots={"best": (step, 1.0, None)}, archive=[], callbacks=None,
                resume=False,
            )
    assert disk.fired
    assert not os.path.exists(store.path("best.pt"))
    assert any("best.pt" in r.getMessage() for r in caplog.records)
    store.close()
    assert fcb.torch.load_checkpoint(store.path("best.pt"))["step"] == 1
    store.open()  # the next open restores the name
    assert os.path.samefile(store.path("best.pt"), store.path("steps/step-00000001.pt"))
    store.close()


def test_failing_deletion_during_open_repair_is_not_fatal(tmp_path, disk, caplog):
    """A crash left an orphan step file; the repair at open cannot delete it (EIO): the run
    opens (the orphan is not listed, so it is never loaded) and the next commit (here the
    resume's own) deletes it."""
    dirpath = str(tmp_path / "run")
    adapter = new_adapter(dirpath)
    adapter.on_fit_start()
    check(adapter, 0)
    adapter.on_fit_end()
    orphan = os.path.join(dirpath, "steps", "step-00000007.pt")
    shutil.copy(os.path.join(dirpath, "steps", "step-00000000.pt"), orphan)
    disk.arm(("unlink", "steps/step-00000007.pt", 1), errno.EIO)
    resumed = new_adapter(dirpath, resume_from=dirpath)
    with caplog.at_level(logging.WARNING, logger="fcb"):
        resumed.on_fit_start()
    assert disk.fired
    assert any("step-00000007.pt" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(orphan)
    check(resumed, 1)
    resumed.on_fit_end()
    assert_tidy(dirpath)


def test_background_writer_fault_after_commit_is_not_an_error(tmp_path, disk, caplog):
    dirpath = str(tmp_path / "run")
    adapter = new_adapter(dirpath, background=True)
    adapter.on_fit_start()
    check(adapter, 0)
    adapter.wait()
    disk.arm(("link", "tmp:last.pt", 1), errno.EIO)
    with caplog.at_level(logging.WARNING, logger="fcb"):
        check(adapter, 1)
        adapter.wait()  # no error: the manifest committed the check
    assert disk.fired
    check(adapter, 2)
    adapter.on_fit_end()
    assert_tidy(dirpath)


def test_manifest_never_lists_a_partial_file(tmp_path, disk):
    """At every operation of a commit, the manifest then on disk lists only complete
    files (checked from inside the operation, where a kill would leave it)."""
    points, _ = recorded_points(tmp_path, disk)
    seen = []
    for n, point in enumerate(points):
        dirpath = str(tmp_path / f"run{n}")
        adapter = new_adapter(dirpath)
        adapter.on_fit_start()
        for step in range(FAULTY):
            check(adapter, step)
        disk.arm(point, lambda d=dirpath: seen.append(assert_complete(d)["event_step"]))
        check(adapter, FAULTY)
        assert disk.fired
        adapter.on_fit_end()
    assert len(seen) == len(points) and set(seen) == {FAULTY - 1, FAULTY}
