"""Every script in examples/ runs to completion (on tiny data) and prints its results."""

import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


def _optax_counts_the_reductions_that_changed_the_rate(out):
    changed = [
        (before, after)
        for before, after in re.findall(r"plateau: lr (\S+) -> (\S+)", out)
        if before != after
    ]
    reported = int(re.search(r"(\d+) learning-rate reductions", out).group(1))
    assert reported == len(changed) > 0, out


def _lightning_counts_epochs_as_its_slot_table(out):
    stopped = int(re.search(r"stopped after epoch (\d+)", out).group(1))
    last = next(line for line in out.splitlines() if line.startswith("last "))
    assert int(last.split()[1]) == stopped, out
    assert re.search(r"^slot\s+epoch\s+val_loss", out, re.MULTILINE), out
    loaded = re.search(
        r"loaded best\.val_loss\.ckpt: val_loss ([\d.]+) \(the slot records ([\d.]+)\)", out
    )
    assert loaded and loaded.group(1) == loaded.group(2), out


CHECKS = {
    "reduce_lr_on_plateau_optax.py": _optax_counts_the_reductions_that_changed_the_rate,
    "lightning_trainer.py": _lightning_counts_epochs_as_its_slot_table,
}
"""What some examples' output must show, beyond running."""


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), f"{script.name} printed nothing"
    if script.name in CHECKS:
        CHECKS[script.name](result.stdout)
