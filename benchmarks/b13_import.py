"""B13: what `import fcb` adds to `import jax`, in fresh processes.

Each repeat starts three fresh interpreters, alternately, and times inside each (the
interpreter's own start-up is not counted): `import jax`; `import jax` then `import fcb`;
and the same with one public name used (`fcb.EarlyStopping`), which imports the core.
`fcb/__init__.py` resolves its public names on first use, so `import fcb` alone loads
almost nothing.

Run: python benchmarks/b13_import.py [--quick]
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, cli, interleaved, median

TARGET = 0.3  # seconds over `import jax`

_TIMED = """
import time
start = time.perf_counter()
import jax
after_jax = time.perf_counter()
{more}
end = time.perf_counter()
print(after_jax - start, end - after_jax)
"""


def fresh(more: str) -> tuple[float, float]:
    """(`import jax`, what `more` adds after it), timed in a fresh interpreter."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _TIMED.format(more=more)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.split()
    return float(out[0]), float(out[1])


def run(quick: bool = False) -> list[Row]:
    repeats = 2 if quick else 9
    seen: dict[str, list[tuple[float, float]]] = {"jax": [], "fcb": [], "used": []}
    programs = {"jax": "", "fcb": "import fcb", "used": "import fcb\nfcb.EarlyStopping"}

    def subject(name: str):
        def measure() -> float:
            seen[name].append(fresh(programs[name]))
            return seen[name][-1][1]

        return measure

    interleaved({name: subject(name) for name in programs}, repeats=repeats, warmup=1)
    jax_alone = median([a for a, _ in seen["jax"][-repeats:]])
    added = median([b for _, b in seen["fcb"][-repeats:]])
    used = median([b for _, b in seen["used"][-repeats:]])
    return [
        Row(
            id="B13",
            what="`import fcb` after `import jax`, in a fresh process: the time it adds "
            f"(median of {repeats} fresh processes each, timed inside the process)",
            fcb=f"+{added:.3f} s",
            peer=f"{jax_alone:.3f} s (import jax)",
            ratio=(jax_alone + added) / jax_alone,
            target=f"<= +{TARGET} s",
            met=added <= TARGET,
            note=f"with a public name used (`fcb.EarlyStopping`: the core imported) +{used:.3f} s",
        )
    ]


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
