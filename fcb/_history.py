"""Metric histories on disk: the `history.jsonl` adapters append to, and CSV / JSONL readers.

Never used by the pure core: `fcb.replay` calls `read_rows` only when it is handed a path.

`history.jsonl` holds one JSON object per line:

- a check: `{"step": 12, "metrics": {"val_loss": 0.41, ...}, "lr": [0.005], "events": [...],
  "stop": null}` (`stop` is the stop message at the check that stopped the run);
- the end of a run: `{"step": 31, "summary": {...}}`, the callbacks' `finalize` scalars
  after the run's last check (`step`); readers of checks skip it (it has no `metrics`);
- a slot's checkpoint evaluated after training (`evaluate_checkpoints`): `{"step": 7,
  "evaluated": "best.val_loss", "results": {...}, "log": {...}}` (`step`: the step whose
  weights were evaluated); readers of checks skip it too.

Non-finite numbers are spelled `"nan"`, `"inf"` and `"-inf"` (strict JSON). Lines are
appended and flushed one at a time, so a killed run leaves at most a torn last line, which
readers ignore. A line damaged otherwise (a disk error, an edit) is skipped with a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from ._files import atomic_write
from ._host.manifest import json_metrics, json_value
from ._host.rundir import HISTORY_NAME as HISTORY_NAME, find_history as find_history
from ._state_dict import NON_FINITE, decode_number as decode_number, is_check

logger = logging.getLogger("fcb")


def _line(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()


class HistoryLog:
    """Appends one line per check to `{directory}/history.jsonl`."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, HISTORY_NAME)

    def start(
        self, resumed_step: int | None, source: str | None = None,
        resumed_line: Mapping[str, Any] | None = None,
    ) -> None:
        """A new run starts an empty history; a resumed run keeps the checks up to its step
        (read from `source`, the resumed run's history, when it lives elsewhere), and gets
        back the resume point's own line (`resumed_line`, from the manifest) when a kill
        after its commit kept it from being appended."""
        kept = []
        if resumed_step is not None:
            for record in read_records(source or self.path, decode=False):
                if "metrics" in record and record.get("step", -1) <= resumed_step:
                    kept.append(record)
            if resumed_line is not None and resumed_line.get("step") == resumed_step and not (
                kept and kept[-1].get("step") == resumed_step
            ):
                kept.append(dict(resumed_line))
        data = b"".join(_line(r) for r in kept)
        atomic_write(self.path, lambda f: f.write(data))

    def append(self, record: Mapping[str, Any]) -> None:
        # Append mode writes each line at the end even if another reader has the file open;
        # one write + flush per line keeps a kill from leaving more than one torn line.
        with open(self.path, "ab") as f:
            f.write(_line(record))
            f.flush()


def check_record(
    step: int,
    metrics: Mapping[str, float],
    *,
    lr: list[float] | None = None,
    events: list[str] | None = None,
    stop: str | None = None,
) -> dict[str, Any]:
    """One check as a history line (JSON-safe)."""
    return {
        "step": int(step),
        "metrics": json_metrics(metrics),
        "lr": None if lr is None else [json_value(x) for x in lr],
        "events": sorted(events or []),
        "stop": stop or None,
    }


def read_records(path: str, *, decode: bool = True) -> list[dict[str, Any]]:
    """Every complete line of a history file (non-finite numbers decoded unless
    `decode=False`). A torn last line (a killed run's) is ignored; a damaged line elsewhere
    (not JSON, not an object, a check without an integer step or numeric metrics) is skipped
    with one warning (logger `fcb`) naming the lines: the history is not the authority, the
    manifest is, so the rest of it is still worth reading (a resumed run rewrites it without
    the damaged lines)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    damaged: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if number == len(lines):  # no newline after it: the line a kill tore
                break
            damaged.append((number, f"not JSON ({error})"))
            continue
        problem = _damage(record)
        if problem:
            damaged.append((number, problem))
            continue
        records.append(_decode(record) if decode else record)
    if damaged:
        shown = "; ".join(f"line {n}: {why}" for n, why in damaged[:3])
        logger.warning(
            "fcb: %s has %d damaged line%s, skipped (%s%s); the other %d records are read. The "
            "history is a record of the checks, not the authority (manifest.json is): a "
            "resumed run rewrites it without them.",
            path,
            len(damaged),
            "" if len(damaged) == 1 else "s",
            shown,
            "; ..." if len(damaged) > 3 else "",
            len(records),
        )
    return records


_NUMBERS = ("metrics", "summary", "results", "log")
"""The entries of a history line that map names to numbers."""


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        return value in NON_FINITE
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _damage(record: Any) -> str:
    """What is wrong with one parsed history line ("" when nothing)."""
    if not isinstance(record, dict):
        return f"not a JSON object: {json.dumps(record)[:60]}"
    for key in _NUMBERS:
        if key in record:
            values = record[key]
            if not isinstance(values, dict) or not all(_is_number(v) for v in values.values()):
                return f"`{key}` is not a mapping of numbers: {json.dumps(values)[:60]}"
    if "metrics" in record:
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            return f"`step` is not an integer >= 0: {json.dumps(step)[:60]}"
    return ""


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    for key in _NUMBERS:
        if isinstance(out.get(key), dict):
            out[key] = {k: decode_number(v) for k, v in out[key].items()}
    if isinstance(out.get("lr"), list):
        out["lr"] = [decode_number(v) for v in out["lr"]]
    return out


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-check rows of a history file: CSV (header row), JSONL, or a run directory.

    Empty CSV cells are missing values (Lightning's CSVLogger leaves the validation columns
    empty on training rows). Values stay as read; `fcb.replay` converts the columns it needs.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = find_history(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} is a directory without {HISTORY_NAME}; pass a CSV or JSONL history, or "
                f"a run directory recorded with history=True."
            )
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    if path.endswith((".jsonl", ".ndjson")):
        rows = []
        for record in read_records(path):
            if not is_check(record):
                continue
            if isinstance(record.get("metrics"), dict):
                rows.append({"step": record.get("step"), **record["metrics"]})
            else:
                rows.append(record)
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path} is empty: a CSV history needs a header row of metric names.")
        return [
            {k.strip(): v for k, v in row.items() if k is not None and v not in ("", None)}
            for row in reader
        ]
