"""The `fcb` command's own behaviour: --version, a --help that imports no JAX, a closed pipe,
and one clear line for each input mistake."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fcb
import fcb._replay
from fcb import cli
from fcb.cli import _replay


def _command():
    return [sys.executable, "-m", "fcb.cli"]


def _fresh_python(code):
    """`code` run by a new interpreter (nothing imported yet): its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *argv):
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def history(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("step,val_loss\n0,1.0\n1,0.5\n2,0.6\n3,0.7\n4,0.8\n")
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fcb {fcb.__version__}"


def test_help_imports_neither_jax_nor_numpy():
    probe = (
        "import sys\n"
        "from fcb.cli.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'numpy', 'torch'}))\n"
    )
    out = _fresh_python(probe)
    assert "replay" in out and out.strip().endswith("[]"), out[-300:]


def test_a_closed_pipe_ends_quietly(history):
    # a reader that stops after the first line, as `| head -1` does
    process = subprocess.Popen(
        [*_command(), "replay", str(history), "--monitor", "val_loss", "--patience", "1:400",
         "--rows", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == "", err


def test_library_errors_carry_one_prefix(history, capsys):
    line = _error(capsys, "replay", str(history), "--monitor", "val_loss", "--steps", "epoch")
    assert line.startswith("fcb replay: error: ") and "fcb.replay:" not in line, line


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("30:1", "the range 30:1 runs backwards"), ("1:9:0", "step of the range 1:9:0 must be > 0")],
)
def test_bad_ranges_are_named(spec, fragment):
    with pytest.raises(cli.UsageError, match=fragment):
        _replay._parse_values("--patience", spec, integer=True)


def test_reversed_range_on_the_command_line(history, capsys):
    line = _error(capsys, "replay", str(history), "--monitor", "val_loss", "--patience", "30:1")
    assert "runs backwards" in line and "write 1:30" in line, line


def test_negative_rows_are_rejected(history, capsys):
    line = _error(capsys, "replay", str(history), "--monitor", "val_loss", "--rows", "-1")
    assert "--rows must be >= 0" in line and "-1" in line, line


@pytest.mark.parametrize("name", ["missing/sweep.png", "sweep.pngx"])
def test_a_bad_plot_path_is_rejected_before_the_replay_runs(
    name, history, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("matplotlib")
    ran = []
    monkeypatch.setattr(fcb._replay, "replay", lambda *a, **k: ran.append(1))
    line = _error(capsys, "replay", str(history), "--monitor", "val_loss", "--plot",
                  str(tmp_path / name))
    assert ran == [] and "--plot" in line, line


@pytest.mark.parametrize(
    ("content", "name"),
    [('{"val_loss": [1, 2]}\n', "h.json"), ("hello world\n", "notes.txt"), ("", "empty.jsonl"),
     (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "image.png")],
)
def test_a_file_that_is_not_a_history_says_so(content, name, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    line = _error(capsys, "replay", str(path), "--monitor", "val_loss")
    assert f"{path} is not a metric history" in line, line
    assert "available keys: []" not in line


def test_step_is_not_listed_as_a_metric(history, capsys):
    line = _error(capsys, "replay", str(history), "--monitor", "loss")
    assert "recorded metrics: ['val_loss']" in line, line


def test_plot_and_inspect_word_a_missing_path_alike(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    plot = _error(capsys, "plot", missing, "-o", str(tmp_path / "p.png"))
    inspect = _error(capsys, "inspect", missing)
    replay = _error(capsys, "replay", missing, "--monitor", "val_loss")
    for line in (plot, inspect, replay):
        assert f"{missing} does not exist; pass a" in line, line


def test_the_replay_table_says_the_history_ended(history, capsys):
    code, out, _ = _run(capsys, "replay", str(history), "--monitor", "val_loss",
                        "--patience", "2,9")
    assert code == 0
    stopped, ran_out = out.splitlines()[2:4]
    assert stopped.split()[:5] == ["0", "2", "0", "3", "patience"]
    assert ran_out.split()[:6] == ["1", "9", "0", ">", "4", "history"]
    assert "never" not in out


def test_install_hints_work_outside_a_checkout(monkeypatch, tmp_path):
    from fcb.cli import _common

    monkeypatch.setattr(_common, "__file__", str(tmp_path / "site-packages/fcb/cli/_common.py"))
    assert _common._install_hint("torch") == "pip install 'fcb[torch]'"
    checkout = tmp_path / "src"
    (checkout / "fcb" / "cli").mkdir(parents=True)
    (checkout / "constraints.txt").write_text("torch==2.13.0\n")
    monkeypatch.setattr(_common, "__file__", str(checkout / "fcb" / "cli" / "_common.py"))
    hint = _common._install_hint("torch")
    assert hint.startswith("pip install 'fcb[torch]'")
    assert f"-c {os.path.normpath(checkout / 'constraints.txt')}" in hint


def test_every_public_name_is_imported_on_first_use():
    # `import fcb` imports no JAX, so each public name resolves through `fcb._PUBLIC_MODULES`
    assert set(fcb._PUBLIC_MODULES) == set(fcb.__all__)
    probe = (
        "import sys, fcb\n"
        "assert 'jax' not in sys.modules\n"
        "from fcb import *\n"
        "assert all(getattr(fcb, name) is not None for name in fcb.__all__)\n"
        "assert fcb.EarlyStopping.__module__ == 'fcb._early_stopping'\n"
        "print('ok')\n"
    )
    assert _fresh_python(probe).strip() == "ok"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fcb.Nope  # noqa: B018
