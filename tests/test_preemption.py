"""Preemption, time limits, resume schedules and saves on an exception.

SIGTERM between validations: the process exits 0 within seconds with a resume point a batch
or two after the signal (not the previous validation), `fcb inspect` passes, and the resumed
run ends with the uninterrupted run's weights and slot table (Torch and orbax). The time limit
and the schedules run on a fake clock: exact steps, and replay reproduces the check-level
stop. `FCB_PREEMPT_TRIALS` sets the trials per framework (CI: 3).
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fcb
import fcb.orbax
import fcb.torch
from fcb import cli

SCRIPT = pathlib.Path(__file__).parent / "preemption_training.py"
TRIALS = int(os.environ.get("FCB_PREEMPT_TRIALS", "3"))
EPOCHS, BATCHES = 3, 30


def launch(dirpath, framework):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(dirpath), framework, "--epochs", str(EPOCHS),
         "--batches", str(BATCHES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def finish(process):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def manifest(dirpath):
    with open(os.path.join(dirpath, "manifest.json")) as f:
        return json.load(f)


def table(dirpath):
    return {name: slot["step"] for name, slot in manifest(dirpath)["slots"].items()}


@pytest.fixture(scope="module", params=["torch", "orbax"])
def reference(request, tmp_path_factory):
    dirpath = tmp_path_factory.mktemp(f"reference_{request.param}")
    result = finish(launch(dirpath, request.param))
    return request.param, result, table(dirpath)


def test_sigterm_between_validations_writes_a_resume_point_and_the_resumed_run_matches(
    reference, tmp_path
):
    framework, uninterrupted, slots = reference
    assert not uninterrupted["stopped"]
    rng = random.Random(f"{framework}-preempt")
    for trial in range(TRIALS):
        dirpath = tmp_path / f"trial{trial}"
        signal_after = rng.randrange(3, EPOCHS * BATCHES - 5)
        process = launch(dirpath, framework)
        seen = -1
        while seen < signal_after:
            line = process.stdout.readline()
            assert line, process.stderr.read()[-3000:]
            if line.startswith("batch "):
                seen = int(line.split()[1])
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        interrupted = finish(process)
        exit_seconds = time.monotonic() - sent
        assert interrupted["stopped"] and "received SIGTERM" in interrupted["message"]
        assert exit_seconds < 10, exit_seconds
        resume = manifest(dirpath)["resume"]["step"]
        # the batch the signal found, or the one after: not the previous validation
        assert seen <= resume <= seen + 3, (seen, resume)
        assert f"of step {resume} was written" in interrupted["message"]
        print(f"{framework} trial {trial}: SIGTERM after batch {seen}, resume point {resume}, "
              f"exit {exit_seconds:.2f} s after the signal")
        assert cli.main(["inspect", str(dirpath)]) == 0
        resumed = finish(launch(dirpath, framework))  # the same command, launched again
        assert resumed["resumed"] == resume and not resumed["stopped"]
        assert resumed["weights"] == uninterrupted["weights"]
        assert table(dirpath) == slots
        steps = sorted(os.listdir(dirpath / "steps"))
        assert len(steps) == len(set(slots.values())), steps  # the resume point is gone


# -- in one process: fake clocks, schedules, handlers ---------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def torch_adapter(dirpath, callbacks, **options):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    adapter = fcb.torch.TorchAdapter(callbacks, model=model, dirpath=str(dirpath),
                                     preempt_on=(), **options)
    return adapter, model


def chain(*extra):
    return fcb.chain(fcb.EarlyStopping("val_loss", patience=100),
                     fcb.ModelCheckpoint(save_last=True), *extra)


def test_time_limit_at_a_check_is_a_resume_point_replay_agrees_and_a_relaunch_trains_on(tmp_path):
    clock = Clock()
    adapter, _ = torch_adapter(tmp_path, chain(fcb.TimeLimit(max_seconds=50)), clock=clock,
                               history=True)
    adapter.on_fit_start()
    stopped_at = None
    for step in range(100):
        clock.now += 1.0
        if step % 10 == 9:
            adapter.on_validation_end({"val_loss": 1.0 / (step + 1)}, step=step)
        else:
            adapter.on_train_batch_end(step=step)
        if adapter.should_stop:
            stopped_at = step
            break
    # 50 s are reached at step 49, a check: it stops there, and it is the resume point
    assert stopped_at == 49 and "time limit was reached" in adapter.stop_message
    adapter.on_fit_end()
    assert manifest(tmp_path)["resume"]["step"] == 49
    assert manifest(tmp_path)["resume"]["stop_message"] == ""  # a relaunch trains on
    # replay over the recorded history stops at the same check
    result = fcb.replay(fcb.grid(fcb.TimeLimit, max_seconds=[50.0, 45.0, 1000.0]), tmp_path)
    assert result.stop_step.tolist() == [49, 49, -1]
    relaunch, _ = torch_adapter(tmp_path, chain(fcb.TimeLimit(max_seconds=50)), clock=Clock())
    relaunch.on_fit_start()
    assert relaunch.resumed_step == 49 and not relaunch.should_stop
    relaunch.on_fit_end()


def test_time_limit_between_checks_commits_at_the_next_hook(tmp_path):
    clock = Clock()
    adapter, _ = torch_adapter(tmp_path, chain(fcb.TimeLimit(max_seconds=25)), clock=clock)
    adapter.on_fit_start()
    for step in range(100):
        clock.now += 1.0
        if step % 10 == 9:
            adapter.on_validation_end({"val_loss": 1.0}, step=step)
        else:
            adapter.on_train_batch_end(step=step)
        if adapter.should_stop:
            break
    # reached at step 24 (a batch): captured there, committed and stopped at step 25
    assert step == 25 and "step 24" in adapter.stop_message
    adapter.on_fit_end()
    assert manifest(tmp_path)["resume"]["step"] == 24
    assert table(tmp_path) == {"best_model": 9, "last": 24}
    assert manifest(tmp_path)["slots"]["best_model"]["value"] == 1.0  # kept, not lost


def test_resume_every_steps_and_seconds_keep_one_rolling_resume_point(tmp_path):
    clock = Clock()
    adapter, _ = torch_adapter(
        tmp_path / "steps", chain(), resume_every_steps=7, clock=clock
    )
    adapter.on_fit_start()
    resume_points = []
    for step in range(30):
        if step % 10 == 9:
            adapter.on_validation_end({"val_loss": 1.0}, step=step)
        else:
            adapter.on_train_batch_end(step=step)
        adapter.wait()
        resume_points.append(adapter.store.latest_manifest["resume"]["step"]
                             if adapter.store.latest_manifest["resume"] else None)
    adapter.on_fit_end()
    # due at 6, 13, 20, 27 (7 after the last resume point; checks at 9, 19, 29 count too)
    assert resume_points == (
        [None] * 7 + [6] * 2 + [9] * 5 + [13] * 5 + [19] * 2 + [20] * 7 + [27, 29]
    )
    assert not adapter.should_stop
    assert len(os.listdir(tmp_path / "steps" / "steps")) == 2  # best and last: one rolling
    timed, _ = torch_adapter(tmp_path / "time", chain(), resume_every_seconds=5.0, clock=clock)
    timed.on_fit_start()
    committed = []
    for step in range(12):
        clock.now += 1.0
        timed.on_train_batch_end(step=step)
        timed.wait()
        resume = timed.store.latest_manifest["resume"]
        committed.append(None if resume is None else resume["step"])
    timed.on_fit_end()
    # due after 5 s at step 4, committed at step 5; due again 5 s after that commit
    assert committed == [None] * 5 + [4] * 6 + [10]


def test_signal_handlers_are_chained_and_put_back(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: calls.append(number))
    mine = signal.getsignal(signal.SIGUSR1)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        adapter = fcb.torch.TorchAdapter(chain(), dirpath=str(tmp_path),
                                         preempt_on=("SIGTERM", "SIGUSR1"))
        adapter.on_fit_start()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]  # the handler we replaced still runs
        adapter.on_train_batch_end(step=0)  # captured
        assert not adapter.should_stop
        adapter.on_train_batch_end(step=1)  # no check at step 0: committed, stopped
        assert adapter.should_stop and "received SIGUSR1" in adapter.stop_message
        adapter.on_fit_end()
        assert signal.getsignal(signal.SIGTERM) == sigterm
        assert signal.getsignal(signal.SIGUSR1) is mine
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1] * 2
        # an adapter dropped without closing: its handler passes the signal on
        abandoned = fcb.torch.TorchAdapter(chain(), dirpath=str(tmp_path / "b"),
                                           preempt_on=("SIGUSR1",))
        abandoned.on_fit_start()
        del abandoned
        import gc

        gc.collect()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1] * 3
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_before_a_check_stops_after_that_check(tmp_path):
    adapter = fcb.torch.TorchAdapter(chain(), dirpath=str(tmp_path))
    adapter.on_fit_start()
    try:
        adapter.on_train_batch_end(step=0)
        os.kill(os.getpid(), signal.SIGTERM)
        adapter.on_train_batch_end(step=1)  # captured, not yet committed
        assert not adapter.should_stop
        adapter.on_validation_end({"val_loss": 0.5}, step=1)  # the step's check comes first
        assert adapter.should_stop and "of step 1 was written" in adapter.stop_message
    finally:
        adapter.on_fit_end()
    assert manifest(tmp_path)["resume"]["step"] == 1 and table(tmp_path)["last"] == 1


def test_save_on_exception_commits_the_last_hook_but_never_after_a_failed_write(tmp_path):
    adapter, model = torch_adapter(tmp_path, chain(), save_on_exception=True)
    adapter.on_fit_start()
    adapter.on_validation_end({"val_loss": 1.0}, step=0)
    for step in (1, 2, 3):
        adapter.on_train_batch_end(step=step)
    adapter.on_exception(KeyboardInterrupt())
    assert manifest(tmp_path)["resume"]["step"] == 3
    payload = fcb.torch.load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(payload["model"]["weight"], model.weight.detach())
    relaunch, _ = torch_adapter(tmp_path, chain())
    relaunch.on_fit_start()
    assert relaunch.resumed_step == 3
    relaunch.on_train_batch_end(step=4)
    before = manifest(tmp_path)
    relaunch.save_on_exception = True
    relaunch.on_exception(fcb.CheckpointWriteError("the disk is full"))
    assert manifest(tmp_path) == before  # never on top of a failed write
    off, _ = torch_adapter(tmp_path, chain())  # default: off
    off.on_fit_start()
    off.on_train_batch_end(step=5)
    off.on_exception(KeyboardInterrupt())
    assert manifest(tmp_path) == before


def test_orbax_batch_hook_saves_the_given_state(tmp_path):
    adapter = fcb.orbax.OrbaxAdapter(chain(), tmp_path, background=False, preempt_on=(),
                                     resume_every_steps=2)
    adapter.on_fit_start()
    import jax.numpy as jnp

    for step in range(3):
        adapter.on_train_batch_end(step=step, state={"w": jnp.full(2, float(step))})
    adapter.on_fit_end()
    assert manifest(tmp_path)["resume"]["step"] == 1
    restored = fcb.orbax.restore(tmp_path, "last", like={"w": jnp.zeros(2)})
    assert np.asarray(restored["w"]).tolist() == [1.0, 1.0]


def test_bad_options_and_steps_are_named(tmp_path):
    for options, match in [
        ({"preempt_on": ("SIGNOPE",)}, r"preempt_on` must name signals.*SIGNOPE"),
        ({"preempt_on": ("SIGKILL",)}, r"cannot catch SIGKILL"),
        ({"resume_every_steps": 0}, r"resume_every_steps` must be a whole number > 0"),
        ({"resume_every_steps": 2.5}, r"resume_every_steps` must be a whole number"),
        ({"resume_every_seconds": -1}, r"resume_every_seconds` must be a number > 0"),
        ({"clock": 3}, r"clock` must be a function"),
        ({"save_on_exception": "yes"}, r"save_on_exception"),
    ]:
        with pytest.raises(fcb.ConfigError, match=match):
            fcb.torch.TorchAdapter(chain(), dirpath=str(tmp_path), **options)
    with pytest.raises(fcb.ConfigError, match=r"max_seconds"):
        fcb.TimeLimit(max_seconds=0)
    adapter = fcb.torch.TorchAdapter(chain(), dirpath=str(tmp_path), preempt_on=())
    adapter.on_fit_start()
    adapter.on_validation_end({"val_loss": 1.0}, step=5)
    with pytest.raises(fcb.ConfigError, match=r"on_train_batch_end: step 5 comes after step 5"):
        adapter.on_train_batch_end(step=5)
    with pytest.raises(fcb.ConfigError, match=r"step"):
        adapter.on_train_batch_end(step="6")
    adapter.on_fit_end()


def test_a_compiled_loop_stops_between_chunks_at_a_signal_and_a_time_limit(tmp_path):
    import jax
    import jax.numpy as jnp

    clock = Clock()
    callbacks = chain(fcb.TimeLimit(max_seconds=1e9))
    adapter = fcb.orbax.OrbaxAdapter(callbacks, tmp_path, background=False, clock=clock)
    adapter.on_fit_start()
    check = jax.jit(lambda state, metrics, step: callbacks(state, metrics, step=step))
    state = callbacks.init()
    try:
        for step in range(6):
            metrics = {"val_loss": jnp.float32(1.0 / (step + 1)),
                       "elapsed_seconds": jnp.float32(adapter.elapsed_seconds)}
            state, actions = check(state, metrics, step)
            if step == 3:  # the signal arrives while a chunk runs
                os.kill(os.getpid(), signal.SIGTERM)
            adapter.apply_actions(actions, step=step, callbacks_state=state,
                                  state={"w": jnp.full(2, float(step))}, metrics=metrics)
            if adapter.should_stop:
                break
    finally:
        adapter.on_fit_end()
    assert step == 3 and "received SIGTERM" in adapter.stop_message
    assert manifest(tmp_path)["resume"]["step"] == 3 and manifest(tmp_path)["resume"][
        "stop_message"] == ""


def test_a_handler_left_by_an_adapter_that_never_closed_lets_sigterm_end_the_process(tmp_path):
    script = (
        "import gc, os, signal, time, fcb, fcb.torch\n"
        f"a = fcb.torch.TorchAdapter(fcb.ModelCheckpoint(), dirpath={str(tmp_path)!r})\n"
        "a.on_fit_start()\n"
        "del a\n"
        "gc.collect()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(20)\n"
        "print('still running')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stderr[-2000:])
