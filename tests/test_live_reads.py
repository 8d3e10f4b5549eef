"""Reading a run while another process writes it: `fcb inspect`, `fcb.torch.load_checkpoint`,
resuming into another directory, `fcb.orbax.restore`. Every read takes one consistent
snapshot (manifest first, read again when a commit raced it): none may fail or report
corruption, however the reads and commits interleave.

Run as a script, this file is the writer: it trains until a stop file appears.
    python tests/test_live_reads.py torch|orbax DIR STOPFILE
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
READ_SECONDS = float(os.environ.get("FCB_LIVE_READ_SECONDS", "8"))
MAX_EPOCHS = 20000


# -- the writers (subprocesses) ----------------------------------------------------------------


def torch_writer(dirpath, stop):
    import torch
    import torch_training

    import fcb
    import fcb.torch

    chain = fcb.chain(  # no early stopping: the run lasts until the test stops it
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(1, 3)),
    )
    (x, y), (x_val, y_val) = torch_training.data()
    model, optimizer = torch_training.model_and_optimizer()
    adapter = fcb.torch.TorchAdapter(chain, model=model, optimizer=optimizer, dirpath=dirpath)
    adapter.on_fit_start()
    for epoch in range(MAX_EPOCHS):
        if os.path.exists(stop):
            break
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        with torch.no_grad():  # noisy, so the best and the tolerance slots move now and then
            val = torch.nn.functional.mse_loss(model(x_val), y_val) * (1 + 0.3 * torch.rand(()))
        adapter.on_validation_end({"val_loss": val}, step=epoch)
    adapter.on_fit_end()
    print(json.dumps({"epochs": epoch}), flush=True)


def orbax_writer(dirpath, stop):
    import jax.numpy as jnp
    import numpy as np

    import fcb
    import fcb.orbax

    chain = fcb.chain(
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(1,)),
    )
    rng = np.random.default_rng(0)
    adapter = fcb.orbax.OrbaxAdapter(chain, dirpath)
    adapter.on_fit_start()
    for epoch in range(MAX_EPOCHS):
        if os.path.exists(stop):
            break
        state = {"w": jnp.full((64, 64), float(epoch)), "b": jnp.full((64,), float(epoch))}
        adapter.on_validation_end({"val_loss": float(rng.random())}, step=epoch, state=state)
    adapter.on_fit_end()
    print(json.dumps({"epochs": epoch}), flush=True)


# -- the readers ---------------------------------------------------------------------------------


def start_writer(kind, tmp_path):
    dirpath, stop = tmp_path / "live", tmp_path / "stop"
    root = os.path.dirname(HERE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, HERE]), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, __file__, kind, str(dirpath), str(stop)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    while not (dirpath / "manifest.json").exists():  # the first commit
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer committed nothing"
        time.sleep(0.05)
    return process, dirpath, stop


def stop_writer(process, stop):
    stop.write_text("stop")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])["epochs"]


def inspect(dirpath):
    from fcb import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["inspect", str(dirpath)])
    if code != 0:
        raise AssertionError(f"fcb inspect exited {code}: {err.getvalue().strip()}")


class CountedSleep:
    """`time` for fcb._host.live: counts the back-offs, i.e. reads a commit raced."""

    def __init__(self):
        self.count = 0

    def sleep(self, seconds):
        self.count += 1
        time.sleep(seconds)


@pytest.fixture
def retries(monkeypatch):
    counted = CountedSleep()
    try:
        from fcb._host import live
    except ImportError:  # an fcb that reads no snapshot: nothing to count
        return counted
    monkeypatch.setattr(live, "time", counted)
    return counted


def read_round_robin(readers, retries, seconds=READ_SECONDS):
    """Call each reader in turn for `seconds`; return {reader: (attempted, failures,
    retries)}."""
    counts = {name: [0, [], 0] for name in readers}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, read in readers.items():
            counts[name][0] += 1
            before = retries.count
            try:
                read()
            except Exception as error:  # every failure is counted, of any type
                counts[name][1].append(f"{type(error).__name__}: {error}")
            counts[name][2] += retries.count - before
    return counts


def report(kind, counts, epochs):
    lines = [f"{kind} writer: {epochs} checks written while reading"]
    for name, (attempted, failures, raced) in counts.items():
        lines.append(
            f"  {name}: {attempted} reads, {len(failures)} failed, {raced} read again after "
            f"a commit raced them"
        )
        lines += [f"    {failure[:300]}" for failure in sorted(set(failures))[:5]]
    print("\n".join(lines))
    return "\n".join(lines)


def test_reading_a_torch_run_being_written(tmp_path, retries):
    torch = pytest.importorskip("torch")
    import torch_training

    import fcb
    import fcb.torch

    process, live, stop = start_writer("torch", tmp_path)
    chain = fcb.chain(
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(1, 3)),
    )
    runner = fcb.Runner(chain)  # one compiled dispatch for every resume
    resumes = iter(range(10**6))

    def load(slot):
        payload = fcb.torch.load_checkpoint(live / f"{slot}.pt")
        assert set(payload["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    def resume():
        model, optimizer = torch_training.model_and_optimizer()
        other = tmp_path / f"resumed-{next(resumes)}"
        adapter = fcb.torch.TorchAdapter(
            chain, model=model, optimizer=optimizer, dirpath=str(other), resume_from=str(live)
        )
        adapter.runner = runner
        adapter.runner.state = chain.init()
        adapter.on_fit_start()
        adapter.on_exception()
        # the copy is exactly the resume point read, and loads on its own
        payload = fcb.torch.load_checkpoint(other / "last.pt")
        assert payload["fcb"]["step"] == adapter.resumed_step
        assert torch.equal(payload["model"]["0.weight"], model.state_dict()["0.weight"])

    try:
        counts = read_round_robin({
            "fcb inspect": lambda: inspect(live),
            "load_checkpoint(last.pt)": lambda: load("last"),
            "load_checkpoint(best_model.pt)": lambda: load("best_model"),
            "resume into another directory": resume,
        }, retries)
    finally:
        epochs = stop_writer(process, stop)
    text = report("torch", counts, epochs)
    assert epochs >= 20, text  # the run was written all along
    assert all(attempted >= 5 for attempted, _, _ in counts.values()), text
    assert not any(failures for _, failures, _ in counts.values()), text


def test_reading_an_orbax_run_being_written(tmp_path, retries):
    pytest.importorskip("orbax.checkpoint")
    import numpy as np

    import fcb
    import fcb.orbax

    process, live, stop = start_writer("orbax", tmp_path)

    def restore(slot):
        state = fcb.orbax.restore(live, slot)
        w, b = np.asarray(state["w"]), np.asarray(state["b"])
        # one step's arrays, whole: every entry holds that step's number
        assert w.shape == (64, 64) and (w == w[0, 0]).all() and (b == w[0, 0]).all()

    try:
        counts = read_round_robin({
            "fcb inspect": lambda: inspect(live),
            "fcb.orbax.restore(last)": lambda: restore("last"),
            "fcb.orbax.restore(best_model)": lambda: restore("best_model"),
        }, retries)
    finally:
        epochs = stop_writer(process, stop)
    text = report("orbax", counts, epochs)
    assert epochs >= 10, text
    assert all(attempted >= 5 for attempted, _, _ in counts.values()), text
    assert not any(failures for _, failures, _ in counts.values()), text


# -- a commit at the worst moment of each read (deterministic) ----------------------------------


class Writer:
    """A Torch run in this process whose every commit deletes the previous `last` step."""

    def __init__(self, dirpath):
        import torch

        import fcb
        import fcb.torch

        self.adapter = fcb.torch.TorchAdapter(
            fcb.ModelCheckpoint("val_loss", save_last=True), model=torch.nn.Linear(2, 1),
            dirpath=str(dirpath),
        )
        self.commits = 0
        for _ in range(3):
            self.commit()

    def commit(self):
        self.commits += 1  # a worse value each time: `best_model` stays, `last` moves
        self.adapter.on_validation_end({"val_loss": float(self.commits)})

    def before(self, function, times=1):
        """`function`, with a commit before each of its first `times` calls."""

        def raced(*args, **kwargs):
            if raced.left:
                raced.left -= 1
                self.commit()
            return function(*args, **kwargs)

        raced.left = times
        return raced


def test_each_torch_reader_reads_again_when_a_commit_deletes_what_it_reads(
    tmp_path, monkeypatch, retries
):
    import torch

    import fcb
    import fcb.torch
    from fcb.cli import _inspect
    from fcb.torch import _load, _payload

    writer = Writer(tmp_path / "live")
    live = tmp_path / "live"
    try:
        # load_checkpoint: the manifest read, then `last` deleted before the file is opened
        monkeypatch.setattr(_load, "open_listed", writer.before(_load.open_listed))
        assert fcb.torch.load_checkpoint(live / "last.pt")["fcb"]["step"] == 3
        # resume into another directory: the resume point deleted before it is opened
        monkeypatch.setattr(_payload, "open_listed", writer.before(_payload.open_listed))
        resumed = fcb.torch.TorchAdapter(
            fcb.ModelCheckpoint("val_loss", save_last=True), model=torch.nn.Linear(2, 1),
            dirpath=str(tmp_path / "resumed"), resume_from=str(live),
        )
        resumed.on_fit_start()
        resumed.on_exception()
        assert resumed.resumed_step == 4  # the snapshot read, not the stale manifest's step
        assert fcb.torch.load_checkpoint(tmp_path / "resumed" / "last.pt")["fcb"]["step"] == 4
        # fcb inspect: a listed file deleted while the files are checked
        monkeypatch.setattr(
            _inspect, "_check_torch_file", writer.before(_inspect._check_torch_file)
        )
        inspect(live)
    finally:
        writer.adapter.on_exception()
    assert writer.commits == 6 and retries.count >= 3


def test_orbax_restore_reads_again_when_a_commit_deletes_the_step_it_reads(
    tmp_path, monkeypatch, retries
):
    import jax.numpy as jnp

    import fcb
    import fcb.orbax
    from fcb.orbax import _restore

    adapter = fcb.orbax.OrbaxAdapter(
        fcb.ModelCheckpoint("val_loss", save_last=True), str(tmp_path), background=False
    )
    steps = iter(range(100))

    def commit():
        step = next(steps)
        adapter.on_validation_end({"val_loss": float(step)}, step=step, state={
            "w": jnp.full((3,), float(step))
        })

    for _ in range(3):
        commit()
    read_step = _restore.read_step

    def raced(*args, **kwargs):
        if raced.left:
            raced.left -= 1
            commit()  # step 2, the one being read, is deleted
        return read_step(*args, **kwargs)

    raced.left = 1
    monkeypatch.setattr(_restore, "read_step", raced)
    try:
        assert fcb.orbax.restore(tmp_path, "last")["w"].tolist() == [3.0, 3.0, 3.0]
    finally:
        adapter.on_fit_end()
    assert retries.count == 1


# -- "being written", not "corrupt" ------------------------------------------------------------


def test_the_lock_holder_is_found_without_taking_the_lock(tmp_path):
    import fcb
    import fcb.torch
    from fcb._host.live import writer_pid

    adapter = fcb.torch.TorchAdapter(fcb.ModelCheckpoint(save_last=True), dirpath=str(tmp_path))
    adapter.on_fit_start()
    try:
        assert writer_pid(str(tmp_path)) == os.getpid()
        # nothing committed yet: being written, not "not an fcb run"
        with pytest.raises(
            fcb.DirectoryInUseError,
            match=rf"{tmp_path} is being written \(process {os.getpid()} holds its lock\): it "
            r"has committed no checkpoint yet",
        ):
            fcb.torch.load_checkpoint(tmp_path / "last.pt")
    finally:
        adapter.on_exception()
    assert writer_pid(str(tmp_path)) is None


def test_a_run_that_commits_during_every_read_is_being_written(tmp_path, monkeypatch):
    import torch

    import fcb
    import fcb.torch
    from fcb import cli
    from fcb._host import live

    adapter = fcb.torch.TorchAdapter(
        fcb.ModelCheckpoint(save_last=True), model=torch.nn.Linear(1, 1), dirpath=str(tmp_path)
    )
    adapter.on_validation_end({"val_loss": 1.0})
    ticks = iter(range(10**6))
    monkeypatch.setattr(live, "stamp", lambda directory: next(ticks))  # a commit every time
    no_wait = CountedSleep()
    no_wait.sleep = lambda seconds: None
    monkeypatch.setattr(live, "time", no_wait)
    expected = (
        rf"{tmp_path} is being written \(process {os.getpid()} holds its lock\): it committed "
        r"a new checkpoint during each of 60 attempts to read it, so no consistent checkpoint "
        r"could be read\. Read it again, or after the run; its files are intact\."
    )
    try:
        with pytest.raises(fcb.DirectoryInUseError, match=expected):
            fcb.torch.load_checkpoint(tmp_path / "last.pt")
        # a Torch file whose checksum matches is read right whatever was committed since:
        # `fcb inspect` reports the snapshot, and that it is being written
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["inspect", str(tmp_path)]) == 0
        assert f"being written by process {os.getpid()})" in out.getvalue().splitlines()[0]
    finally:
        adapter.on_exception()


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    kind, dirpath, stop = sys.argv[1:4]
    {"torch": torch_writer, "orbax": orbax_writer}[kind](dirpath, stop)
