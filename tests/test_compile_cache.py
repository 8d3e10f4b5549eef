"""Compile once per machine: the `fcb` command keeps JAX's compiled programs on disk, so a
second fresh process compiles nothing for the same work (`fcb._compile_cache`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

import fcb
from fcb import cli
from fcb._compile_cache import default_cache_dir, enable_compile_cache
from fcb.cli.__main__ import main as command_main

pytest.importorskip("torch")

_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)

# Runs the `fcb` command as the console script does, and writes how many programs XLA
# compiled: every compile request (JAX's backend-compile event, also recorded for a program
# loaded from the persistent cache) minus those the cache served; how many functions JAX
# traced and lowered; and how many programs and traced values fcb's own cache loaded.
_COUNTING_COMMAND = textwrap.dedent(
    """
    import atexit, json, sys
    import jax.monitoring as monitoring
    counts = {"requests": 0, "cache_hits": 0, "traced": 0, "lowered": 0, "fcb_hits": 0}
    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["requests"] += 1
        if event == "/jax/core/compile/jaxpr_trace_duration":
            counts["traced"] += 1
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            counts["lowered"] += 1
    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            counts["cache_hits"] += 1
        if event == "/fcb/program_cache/hits":
            counts["fcb_hits"] += 1
    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    out = sys.argv.pop(1)
    atexit.register(lambda: json.dump(counts, open(out, "w")))
    from fcb.cli.__main__ import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _environment(cache_home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "FCB_"))}
    env.update(XDG_CACHE_HOME=str(cache_home), JAX_PLATFORMS="cpu", **extra)
    return env


def _fcb_process(tmp_path, env, *argv, preamble=""):
    """Run `fcb ARGV` in a fresh process (after the code `preamble`): (stdout, programs
    compiled, programs loaded from JAX's cache, the counts)."""
    counts = tmp_path / f"counts-{len(list(tmp_path.iterdir()))}.json"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(preamble) + _COUNTING_COMMAND, str(counts), *argv],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(counts.read_text())
    return done.stdout, found["requests"] - found["cache_hits"], found["cache_hits"], found


@pytest.fixture(scope="module")
def demo_history(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--out", str(out), "--epochs", "8", "--quiet"]) == 0
    return str(out / "history.jsonl")


def test_a_warm_cache_process_compiles_nothing_for_the_demo_replay(demo_history, tmp_path):
    cache_home = tmp_path / "cache"
    work = tmp_path / "counts"
    work.mkdir()
    argv = ("replay", demo_history, "--monitor", "val_loss", "--patience", "1:5")
    cold_out, cold_compiled, cold_loaded, cold = _fcb_process(
        work, _environment(cache_home), *argv
    )
    assert cold_compiled > 0 and cold_loaded == 0 and cold["fcb_hits"] == 0
    cache_dir = cache_home / "fcb" / "jax-compile"
    assert len(list(cache_dir.glob("*-cache"))) >= cold_compiled
    # fcb's program cache: the replay's loop and the trace that finds its metric keys
    assert len(list((cache_dir / "fcb-programs").iterdir())) == 2
    warm_out, warm_compiled, warm_loaded, warm = _fcb_process(
        work, _environment(cache_home), *argv
    )
    # the replay's loop and its metric keys come from fcb's cache: the process traces,
    # lowers and compiles nothing, and asks JAX's cache for nothing
    assert cold["traced"] >= 2 and cold["lowered"] >= 1
    assert warm_compiled == 0 and warm_loaded == 0 and warm["fcb_hits"] == 2
    assert warm["traced"] == 0 and warm["lowered"] == 0
    assert warm_out == cold_out and "best val_loss" in warm_out
    # turned off: the next process compiles again and writes nothing to its cache directory
    off_home = tmp_path / "off"
    env = _environment(off_home, FCB_COMPILE_CACHE="0")
    off_out, off_compiled, off_loaded, _ = _fcb_process(work, env, *argv)
    assert off_compiled == cold_compiled and off_loaded == 0
    assert off_out == cold_out and not off_home.exists()


_REPLAY = ("--monitor", "val_loss", "--patience", "1:5")


def _programs(cache_home):
    return sorted((cache_home / "fcb" / "jax-compile" / "fcb-programs").glob("*.program"))


def test_a_program_jax_serves_is_used_and_not_stored(demo_history, tmp_path):
    # XLA:CPU cannot serialise again an executable its persistent cache served: the file
    # loads, then fails when run. A replay whose program file is gone gets that executable
    # from JAX's cache, runs it and stores nothing; every later process still runs.
    cache_home, work = tmp_path / "cache", tmp_path / "counts"
    work.mkdir()
    env = _environment(cache_home)
    cold_out, _, _, _ = _fcb_process(work, env, "replay", demo_history, *_REPLAY)
    [program] = _programs(cache_home)
    program.unlink()
    served_out, _, served_loaded, _ = _fcb_process(work, env, "replay", demo_history, *_REPLAY)
    assert served_loaded >= 1 and _programs(cache_home) == []
    after_out, _, _, _ = _fcb_process(work, env, "replay", demo_history, *_REPLAY)
    assert served_out == after_out == cold_out and "best val_loss" in cold_out


def test_a_new_key_for_the_same_program_stores_a_whole_one(demo_history, tmp_path):
    # A setting in fcb's key that does not change the program (here, how JAX filters
    # tracebacks): the lowered program is the same, but it is named after fcb's key, so
    # JAX's cache does not serve it and the executable stored is whole.
    cache_home, work = tmp_path / "cache", tmp_path / "counts"
    work.mkdir()
    cold_out, _, _, _ = _fcb_process(work, _environment(cache_home), "replay", demo_history,
                                     *_REPLAY)
    changed = _environment(cache_home, JAX_TRACEBACK_FILTERING="off")
    first_out, _, _, _ = _fcb_process(work, changed, "replay", demo_history, *_REPLAY)
    assert len(_programs(cache_home)) == 2
    warm_out, warm_compiled, _, warm = _fcb_process(work, changed, "replay", demo_history,
                                                    *_REPLAY)
    assert warm_compiled == 0 and warm["fcb_hits"] == 2 and warm["traced"] == 0
    assert warm_out == first_out == cold_out


_STORES_WHAT_JAX_SERVED = """
    import fcb._program_cache as program_cache
    compile_ = program_cache._compile
    program_cache._compile = lambda *args: (compile_(*args)[0], True)
"""


def test_a_stored_program_that_fails_to_run_is_deleted_and_the_replay_runs(
    demo_history, tmp_path
):
    cache_home, work = tmp_path / "cache", tmp_path / "counts"
    work.mkdir()
    env = _environment(cache_home)
    cold_out, _, _, _ = _fcb_process(work, env, "replay", demo_history, *_REPLAY)
    [program] = _programs(cache_home)
    program.unlink()
    # a file made from the executable JAX's cache served: it loads, then cannot run
    _fcb_process(work, env, "replay", demo_history, *_REPLAY, preamble=_STORES_WHAT_JAX_SERVED)
    assert _programs(cache_home) == [program]
    out, _, _, counts = _fcb_process(work, env, "replay", demo_history, *_REPLAY)
    assert counts["fcb_hits"] == 2  # the metric keys, and the program that then failed
    assert out == cold_out and _programs(cache_home) == []


@pytest.fixture
def restored_settings():
    saved = {name: getattr(jax.config, name) for name in _SETTINGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_enable_sets_the_cache_and_its_thresholds(tmp_path, monkeypatch, restored_settings):
    monkeypatch.delenv("FCB_COMPILE_CACHE", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    directory = tmp_path / "jax-cache"
    assert fcb.enable_compile_cache(directory) == str(directory)
    assert directory.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(directory)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1


def test_a_cache_the_user_configured_is_kept(tmp_path, monkeypatch, restored_settings):
    monkeypatch.delenv("FCB_COMPILE_CACHE", raising=False)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.5)
    assert enable_compile_cache() == str(tmp_path / "mine")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5


def test_the_default_directory_is_per_user(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == str(tmp_path / "fcb" / "jax-compile")


def test_turned_off_by_the_environment(tmp_path, monkeypatch, restored_settings):
    jax.config.update("jax_compilation_cache_dir", None)
    for value in ("0", "off", "False"):
        monkeypatch.setenv("FCB_COMPILE_CACHE", value)
        assert enable_compile_cache(tmp_path / "unused") is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (tmp_path / "unused").exists()


def test_a_value_it_does_not_understand_is_a_clear_error(monkeypatch, capsys, restored_settings):
    monkeypatch.setenv("FCB_COMPILE_CACHE", "sometimes")
    with pytest.raises(fcb.ConfigError, match=r"FCB_COMPILE_CACHE='sometimes'.*set it to 0"):
        enable_compile_cache()
    assert command_main(["inspect", "no/such/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FCB_COMPILE_CACHE='sometimes'" in err


def test_an_unwritable_path_is_a_clear_error(tmp_path, monkeypatch, restored_settings):
    monkeypatch.delenv("FCB_COMPILE_CACHE", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(fcb.ConfigError, match=r"cannot be created.*FCB_COMPILE_CACHE=0"):
        enable_compile_cache(blocker / "cache")


def test_import_fcb_changes_no_jax_setting():
    code = textwrap.dedent(
        f"""
        import jax
        names = {_SETTINGS!r}
        before = [getattr(jax.config, n) for n in names]
        import fcb, fcb.torch, fcb.cli
        fcb.EarlyStopping, fcb.replay, fcb.enable_compile_cache
        assert [getattr(jax.config, n) for n in names] == before, before
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
