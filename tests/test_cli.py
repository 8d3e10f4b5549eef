"""The `fcb` command: demo, inspect, replay, plot; one-line errors with exit code 2."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

import fcb
from fcb import cli
from fcb._history import read_records
from fcb.cli._replay import _parse_values

pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fcb"), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One Torch demo run, shared (read-only: copy it before damaging it)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    code = cli.main(["demo", "--out", str(out), "--epochs", "8", "--quiet"])
    assert code == 0
    return out


def _copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# -- demo ------------------------------------------------------------------------------------


def test_demo_writes_checkpoints_history_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, progress = _run(capsys, "demo", "--out", str(out), "--epochs", "5")
    assert code == 0
    # no terminal: plain lines; epochs count from 0, as the steps of the slot table do
    assert "epoch   4 of 0-4" in progress and "val_loss" in progress
    assert "fcb demo (torch)" in stdout
    assert "trained all 5 epochs without stopping" in stdout
    assert "slot" in stdout and "best_model" in stdout and "last" in stdout
    assert f"fcb inspect {out}" in stdout
    assert (out / "manifest.json").exists() and (out / "best_model.pt").exists()
    records = read_records(str(out / "history.jsonl"))
    assert [r["step"] for r in records if "metrics" in r] == [0, 1, 2, 3, 4]
    assert "summary" in records[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slots"]["last"]["step"] == 4

    # a second demo into the same directory replaces the first run
    code, stdout, _ = _run(capsys, "demo", "--out", str(out), "--epochs", "3", "--quiet")
    assert code == 0
    assert [r["step"] for r in read_records(str(out / "history.jsonl")) if "metrics" in r] == [
        0, 1, 2,
    ]


def test_demo_refuses_a_directory_holding_another_run(demo_run, tmp_path, capsys):
    run = _copy(demo_run, tmp_path)
    (run / "demo.json").unlink()
    code, _, err = _run(capsys, "demo", "--out", str(run), "--epochs", "2", "--quiet")
    assert code == 2
    _one_line_error(err, "already holds an fcb run that `fcb demo` did not write")


def test_demo_with_jax_and_orbax(tmp_path, capsys):
    pytest.importorskip("orbax.checkpoint")
    out = tmp_path / "jax"
    code, stdout, _ = _run(
        capsys, "demo", "--framework", "jax", "--out", str(out), "--epochs", "4", "--quiet"
    )
    assert code == 0, stdout
    assert "fcb demo (jax)" in stdout and "steps/3" in stdout
    code, stdout, _ = _run(capsys, "inspect", str(out))
    assert code == 0 and "fcb.orbax" in stdout and "match the manifest" in stdout
    code, _, _ = _run(capsys, "plot", str(out), "-o", str(tmp_path / "jax.png"))
    assert code == 0 and (tmp_path / "jax.png").stat().st_size > 10_000

    step_dir = out / "steps" / "3" / "state"
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    code, _, err = _run(capsys, "inspect", str(out))
    assert code == 1
    assert "steps/3 cannot be read back" in err and "Traceback" not in err


def _saved_lr(framework, out, slot):
    """The learning rate a checkpoint slot of a demo run holds: what a resumed run trains at."""
    if framework == "jax":
        import fcb.orbax

        restored = fcb.orbax.restore(str(out), slot)
        return float(restored["opt_state"]["hyperparams"]["learning_rate"])
    import torch

    import fcb.torch

    manifest = fcb.torch.read_manifest(str(out / "manifest.json"))
    payload = torch.load(out / manifest["slots"][slot]["file"], weights_only=True)
    return payload["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_demo_checkpoints_hold_the_learning_rate_after_the_cut(
    framework, tmp_path, capsys, caplog, monkeypatch
):
    """A check that lowers the learning rate and is saved keeps the lowered rate: a run
    resumed from it trains on at the rate of the uninterrupted run, not the old one."""
    if framework == "jax":
        pytest.importorskip("orbax.checkpoint")
    plateau = fcb.ReduceLROnPlateau

    def cut_at_every_check(monitor, **options):
        # no value improves on the best by 1e9: every check after the first cuts the rate
        return plateau(
            monitor, **{**options, "patience": 0, "threshold": 1e9, "threshold_mode": "abs"}
        )

    monkeypatch.setattr(fcb, "ReduceLROnPlateau", cut_at_every_check)
    out = tmp_path / framework
    with caplog.at_level(logging.WARNING, logger="fcb"):
        argv = ["demo", "--framework", framework, "--out", str(out), "--epochs", "3", "--quiet"]
        code, stdout, _ = _run(capsys, *argv)
    assert code == 0, stdout
    assert "learning rate 0.0005 -> 0.000125 (ReduceLROnPlateau)" in stdout
    # the rate training went on with after each check (cuts at checks 1 and 2)
    lrs = {r["step"]: r["lr"][0] for r in read_records(str(out / "history.jsonl")) if "lr" in r}
    assert lrs == pytest.approx({0: 5e-4, 1: 2.5e-4, 2: 1.25e-4}, rel=1e-6)
    slots = json.loads((out / "manifest.json").read_text())["slots"]
    assert {s["step"] for s in slots.values()} == {1, 2}  # last and best_model-top2
    for name, slot in slots.items():
        assert _saved_lr(framework, out, name) == pytest.approx(lrs[slot["step"]], rel=1e-6), name
    # and the adapter saw no state from before a cut (it warns about one)
    assert not [r for r in caplog.records if "learning rate" in r.getMessage()], caplog.text


# -- inspect ---------------------------------------------------------------------------------


def test_inspect_lists_slots_and_checks_files(demo_run, capsys):
    code, out, err = _run(capsys, "inspect", str(demo_run))
    assert code == 0, err
    header = out.splitlines()[1].split()
    assert header == ["slot", "step", "metric", "file", "size", "check"]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:8]}
    assert rows["last"][1] == "7" and rows["last"][-1] == "ok"
    assert "match the manifest" in out


def test_inspect_shows_the_slots_evaluated_after_training(tmp_path, capsys):
    import torch

    import fcb.torch

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)

    def mean_output(m):
        return {"out": float(m(x).mean())}

    child = fcb.EarlyStopping("best=val_loss/out", patience=5)
    callbacks = fcb.chain(
        fcb.BestCheckpoint("val_loss", tolerances=[1], callbacks=[child]),
        fcb.ModelCheckpoint(save_last=True),
    )
    adapter = fcb.torch.TorchAdapter(
        callbacks, model=model, dirpath=tmp_path, evaluate=mean_output, history=True
    )
    with adapter:
        for step, value in enumerate([0.5, 0.4, 0.6, 0.7, 0.3]):
            with torch.no_grad():
                model.bias.add_(1.0)
            adapter.on_validation_end({"val_loss": value}, step=step)
    evaluated = adapter.evaluate_checkpoints("all")
    code, out, err = _run(capsys, "inspect", str(tmp_path))
    assert code == 0, err
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("evaluated after")))
    assert lines[start + 1].split() == ["slot", "step", "results"]
    shown = {line.split()[0]: line.split() for line in lines[start + 2:start + 4]}
    for slot, result in evaluated.items():
        assert shown[slot][1] == str(result.step)
        assert shown[slot][2:] == ["out", f"{result.results['out']:.5g}"]
    assert {evaluated["best.val_loss"].step, evaluated["best.val_loss.tolerance=1"].step} == {4, 1}


def _step_file(run, slot="best_model"):
    manifest = json.loads((run / "manifest.json").read_text())
    return run / manifest["slots"][slot]["file"]


def test_inspect_finds_a_truncated_file(demo_run, tmp_path, capsys):
    run = _copy(demo_run, tmp_path)
    target = _step_file(run)
    with open(target, "r+b") as f:
        f.truncate(100)
    code, out, err = _run(capsys, "inspect", str(run))
    assert code == 1
    assert "CORRUPT" in out
    assert str(target) in err and "has 100 bytes, the manifest records" in err
    assert "Traceback" not in err


def test_inspect_finds_a_flipped_byte(demo_run, tmp_path, capsys):
    run = _copy(demo_run, tmp_path)
    target = _step_file(run, "last")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    code, _, err = _run(capsys, "inspect", str(run))
    assert code == 1
    _one_line_error(err, str(target), "CRC-32")


def test_inspect_finds_an_edited_manifest(demo_run, tmp_path, capsys):
    run = _copy(demo_run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    first = sorted(manifest["files"])[0]
    manifest["files"][first]["size"] += 1
    (run / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "inspect", str(run))
    assert code == 1
    # the manifest's checksum catches the edit before any file is checked against it
    _one_line_error(err, "manifest.json", "changed after fcb wrote it")

    manifest["slots"]["best_model"]["file"] = "steps/step-99999999.pt"
    (run / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "inspect", str(run))
    assert code == 1
    _one_line_error(err, "manifest.json", "slot 'best_model' points at 'steps/step-99999999.pt'")

    (run / "manifest.json").write_text("{not json")
    code, _, err = _run(capsys, "inspect", str(run))
    assert code == 1
    _one_line_error(err, "manifest.json is not valid JSON")


def test_inspect_finds_a_replaced_slot_file(demo_run, tmp_path, capsys):
    run = _copy(demo_run, tmp_path)
    (run / "best_model.pt").unlink()
    (run / "best_model.pt").write_bytes(b"not a checkpoint")
    code, _, err = _run(capsys, "inspect", str(run))
    assert code == 1
    _one_line_error(err, "best_model.pt is not the checkpoint of step")


def test_inspect_notes_a_missing_link(demo_run, tmp_path, capsys):
    run = _copy(demo_run, tmp_path)
    (run / "last.pt").unlink()
    code, out, _ = _run(capsys, "inspect", str(run))
    assert code == 0
    assert "note: last.pt is missing" in out


def test_inspect_passes_a_link_left_stale_by_an_interrupted_commit(demo_run, tmp_path, capsys):
    """A kill after the manifest commit and before the links: the name still points at the
    previous step file (not yet deleted); the manifest and its files are intact."""
    run = _copy(demo_run, tmp_path)
    previous = run / "steps" / "step-99999999.pt"
    previous.write_bytes((run / "best_model.pt").read_bytes())
    (run / "last.pt").unlink()
    os.link(previous, run / "last.pt")
    code, out, _ = _run(capsys, "inspect", str(run))
    assert code == 0
    assert "note: last.pt still names steps/step-99999999.pt (an interrupted commit)" in out


# -- replay ----------------------------------------------------------------------------------


def test_replay_of_the_demo_history_with_a_plot(demo_run, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    code, out, err = _run(
        capsys, "replay", str(demo_run / "history.jsonl"), "--monitor", "val_loss",
        "--patience", "1:4", "--min-delta", "0,1e-3", "--plot", str(png),
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "replay: 8 configurations x 8 checks; best = lowest val_loss"
    assert lines[1].split()[:3] == ["#", "patience", "min_delta"]
    assert "best val_loss:" in out
    assert png.stat().st_size > 10_000


def test_replay_of_a_csv_file(tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,train_loss,val_loss\n0,1.0,\n0,,0.5\n1,,0.4\n2,,0.45\n3,,0.46\n")
    code, out, _ = _run(
        capsys, "replay", str(path), "--monitor", "val_loss", "--patience", "1,2",
        "--steps", "epoch", "--sort", "checks",
    )
    assert code == 0
    assert out.splitlines()[2].split()[:5] == ["0", "1", "0", "2", "patience"]


@pytest.mark.parametrize(
    ("spec", "integer", "expected"),
    [
        ("1:5", True, [1, 2, 3, 4, 5]),
        ("1:10:3", True, [1, 4, 7, 10]),
        ("1,2,5:20:5", True, [1, 2, 5, 10, 15, 20]),
        ("0,1e-3", False, [0.0, 0.001]),
        ("0:0.003:0.001", False, [0.0, 0.001, 0.002, 0.003]),
    ],
)
def test_value_specs(spec, integer, expected):
    assert _parse_values("--x", spec, integer=integer) == expected


# -- plot ------------------------------------------------------------------------------------


def test_plot_of_a_run(demo_run, tmp_path, capsys):
    png = tmp_path / "run.png"
    code, out, err = _run(capsys, "plot", str(demo_run), "-o", str(png))
    assert code == 0, err
    assert out.strip() == f"plot: {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


# -- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        ([], ["required: COMMAND"]),
        (["train"], ["invalid choice: 'train'"]),
        (["demo", "--framework", "mxnet"], ["fcb demo: error:", "invalid choice: 'mxnet'"]),
        (["demo", "--epochs", "0"], ["--epochs must be >= 1"]),
        (["demo", "--epochs", "many"], ["invalid int value: 'many'"]),
        (["replay", "h.csv"], ["required: --monitor", "fcb replay --help"]),
        (["replay", "nope.csv", "--monitor", "val_loss"], ["nope.csv does not exist"]),
        (["inspect", "no/such/dir"], ["no/such/dir does not exist"]),
        (["plot", "."], ["required: -o/--output"]),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(argv, fragments, capsys):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    _one_line_error(err, *fragments)


def test_usage_errors_about_inputs(demo_run, tmp_path, capsys):
    history = str(demo_run / "history.jsonl")
    code, _, err = _run(capsys, "replay", history, "--monitor", "val_los")
    assert code == 2
    _one_line_error(err, "'val_los'", "recorded metrics", "'val_loss'")

    code, _, err = _run(capsys, "replay", history, "--monitor", "val_loss", "--patience", "a:b")
    assert code == 2
    _one_line_error(err, "--patience 'a:b'", "1:50")

    code, _, err = _run(capsys, "replay", history, "--monitor", "val_loss", "--patience=-1,2")
    assert code == 2
    _one_line_error(err, "`patience` must be an integer >= 0")

    code, _, err = _run(capsys, "inspect", str(tmp_path))
    assert code == 2
    _one_line_error(err, "has no manifest.json", "not an fcb run directory")

    code, _, err = _run(capsys, "plot", str(tmp_path), "-o", str(tmp_path / "x.png"))
    assert code == 2
    _one_line_error(err, "has no history.jsonl", "history=True")

    code, _, err = _run(capsys, "plot", str(demo_run), "-o", str(tmp_path / "x.png"),
                        "--metric", "acc")
    assert code == 2
    _one_line_error(err, "--metric 'acc'", "recorded metrics")

    code, _, err = _run(capsys, "plot", str(demo_run), "-o", str(tmp_path / "no" / "x.png"))
    assert code == 2
    _one_line_error(err, "does not exist")


def test_the_installed_command(demo_run, tmp_path):
    """Through a real process: the console script (or python -m fcb.cli)."""
    script = shutil.which("fcb", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "fcb.cli"]
    ok = subprocess.run(
        [*command, "inspect", str(demo_run)], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert "match the manifest" in ok.stdout
    bad = subprocess.run(
        [*command, "replay", str(tmp_path / "missing.csv"), "--monitor", "val_loss"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "missing.csv does not exist" in bad.stderr
