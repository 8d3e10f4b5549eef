"""`fcb demo`: a failed or interrupted demo keeps what it should, it states its settings, and
its progress, summary and slot table count epochs as `fcb inspect` counts steps."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest

from fcb import cli
from fcb.cli import _demo

pytest.importorskip("torch")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize(("framework", "missing"), [("torch", "torch"), ("jax", "optax")])
def test_a_demo_that_cannot_run_keeps_the_previous_run(
    framework, missing, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "demo"
    code, _, err = _run(capsys, "demo", "--out", str(out), "--epochs", "2", "--quiet")
    assert code == 0, err
    before = _files(out)
    assert "manifest.json" in before and "history.jsonl" in before
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now fails
    monkeypatch.chdir(tmp_path)  # not in a checkout: the hint must not name constraints.txt
    code, _, err = _run(capsys, "demo", "--out", str(out), "--framework", framework)
    assert code == 2
    assert _files(out) == before  # nothing removed, nothing written
    assert f"fcb demo --framework {framework} needs" in err
    assert f"pip install 'fcb[{framework}]'" in err
    assert "-c constraints.txt" not in err


def test_an_interrupted_demo_says_what_it_kept(tmp_path, capsys, monkeypatch):
    calls = []
    text = _demo._progress_text

    def interrupt_at_the_third_check(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return text(*args)

    monkeypatch.setattr(_demo, "_progress_text", interrupt_at_the_third_check)
    out = tmp_path / "demo"
    code, _, err = _run(capsys, "demo", "--out", str(out), "--epochs", "10", "--quiet")
    assert code == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert "interrupted" in err and f"fcb inspect {out}" in err
    for name, slot in manifest["slots"].items():
        assert f"{name} (epoch {slot['step']})" in err, err
    assert manifest["slots"]["last"]["step"] == 2


def test_progress_summary_and_slot_tables_count_alike(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, progress = _run(capsys, "demo", "--out", str(out), "--epochs", "12")
    assert code == 0
    last_line = progress.strip().splitlines()[-1]
    shown_epoch = int(re.match(r"epoch\s+(\d+)", last_line).group(1))
    best_epoch = int(re.search(r"@ epoch (\d+)", last_line).group(1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert shown_epoch == manifest["slots"]["last"]["step"] == 11
    assert best_epoch == manifest["slots"]["best_model"]["step"]
    # the demo's slot table and fcb inspect's show the same numbers
    demo_rows = {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines()
                 if line.startswith(("best_model ", "last "))}
    assert demo_rows == {"best_model": best_epoch, "last": 11}
    code, inspected, _ = _run(capsys, "inspect", str(out))
    assert code == 0
    inspect_rows = {line.split()[0]: int(line.split()[1]) for line in inspected.splitlines()
                    if line.startswith(("best_model ", "last "))}
    assert inspect_rows == demo_rows
    assert "epoch" in stdout.splitlines()[stdout.splitlines().index("") + 1]  # table header


def test_the_summary_states_the_settings_and_marks_a_tolerance_stop_equal_to_the_real_one(
    monkeypatch,
):
    summary_module = sys.modules[_demo._demo_summary.__module__]
    slots = {
        "best_model": {"step": 31, "value": 0.4461, "file": "steps/31.pt", "kind": "best"},
        "last": {"step": 37, "value": 0.4475, "file": "steps/37.pt", "kind": "last"},
        "best.val_loss.tolerance=3": {"step": 22, "value": 0.449, "file": "steps/22.pt",
                                      "kind": "tolerance"},
        "best.val_loss.tolerance=6": {"step": 31, "value": 0.4461, "file": "steps/31.pt",
                                      "kind": "tolerance"},
    }
    manifest = {"slots": slots, "files": {s["file"]: {} for s in slots.values()}}
    monkeypatch.setattr(summary_module, "_read_manifest", lambda directory, storage: manifest)
    report = {
        "model": "MLP", "stop": "val_loss did not improve", "checks": 38, "last_step": 37,
        "written": None, "lr": (0.0005, 0.0005),
        "summary": {
            "best.val_loss.tolerance=3/stopped_step": 25.0,
            "best.val_loss.tolerance=3/best_step": 22.0,
            "best.val_loss.tolerance=3/best_value": 0.449,
            "best.val_loss.tolerance=6/stopped_step": 37.0,
            "best.val_loss.tolerance=6/best_step": 31.0,
            "best.val_loss.tolerance=6/best_value": 0.4461,
        },
    }
    out = io.StringIO()
    _demo._demo_summary(out, "runs/demo", "torch", report, 1.0)
    text = out.getvalue()
    assert "EarlyStopping(patience=10, min_delta=0.001)" in text
    assert "ReduceLROnPlateau(factor=0.5, patience=4)" in text
    assert "BestCheckpoint(tolerances=3, 6)" in text
    (three,) = [line for line in text.splitlines() if "patience=3," in line]
    (six,) = [line for line in text.splitlines() if "patience=6," in line]
    assert "after epoch 25" in three and "this run stopped at" not in three
    assert "after epoch 37 (the epoch this run stopped at)" in six
