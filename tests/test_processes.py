"""The multi-process rules of `fcb._host.processes`, over collectives of threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fcb import CheckpointWriteError, ConfigError
from fcb._host.processes import INLINE_BYTES, INLINE_METRICS, ProcessGroup, reduce_rows


class ThreadCollectives:
    """`count` processes as threads: an all-gather over a shared table and a barrier."""

    def __init__(self, shared: dict, index: int):
        self.shared, self.index, self.count = shared, index, shared["count"]

    def all_gather_words(self, words: np.ndarray) -> np.ndarray:
        table, barrier = self.shared["table"], self.shared["barrier"]
        table[self.index] = np.asarray(words, np.uint32).copy()
        barrier.wait()
        rows = np.stack([table[i] for i in range(self.count)])
        self.shared["gathers"][self.index] += 1
        barrier.wait()  # every process has read the table before it is written again
        return rows

    def barrier(self, name: str) -> None:
        self.shared["barrier"].wait()


def run_processes(count, body):
    """`body(group)` on `count` thread processes; their results, or their exceptions."""
    shared = {"count": count, "table": {}, "barrier": threading.Barrier(count),
              "gathers": [0] * count}
    results: list = [None] * count

    def run(index):
        group = ProcessGroup(ThreadCollectives(shared, index), kind="rank")
        try:
            results[index] = body(group)
        except BaseException as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, shared["gathers"]


texts = st.one_of(st.none(), st.text(max_size=2 * INLINE_BYTES))


@settings(max_examples=40, deadline=None)
@given(st.lists(texts, min_size=2, max_size=3))
def test_gather_text_returns_every_process_text_in_one_collective_when_short(sent):
    results, gathers = run_processes(len(sent), lambda group: group.gather_text(sent[group.index]))
    assert all(result == sent for result in results)
    longest = max(len((t or "").encode()) for t in sent)
    assert gathers == [1 if longest <= INLINE_BYTES else 2] * len(sent)


def test_gather_results_agrees_on_a_failure_of_one_process_in_the_same_collective():
    def body(group):
        error = CheckpointWriteError("disk full") if group.index == 1 else None
        return group.gather_results(None if error else f"sums of {group.index}", error)

    results, gathers = run_processes(2, body)
    assert isinstance(results[0], CheckpointWriteError)
    assert "another rank (rank 1: CheckpointWriteError: disk full)" in str(results[0])
    assert isinstance(results[1], CheckpointWriteError) and "disk full" in str(results[1])
    assert gathers == [1, 1]

    results, _ = run_processes(2, lambda group: group.gather_results(f"r{group.index}", None))
    assert results == [["r0", "r1"], ["r0", "r1"]]


def test_gather_results_in_one_process_returns_its_result_or_raises_its_error():
    group = ProcessGroup()
    assert group.gather_results("only", None) == ["only"]
    with pytest.raises(CheckpointWriteError, match="mine"):
        group.gather_results(None, CheckpointWriteError("mine"))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 40), st.sampled_from(["mean", "sum", "max", "min"]), st.data())
def test_metrics_reduce_in_one_collective_up_to_inline_metrics(count, reduction, data):
    finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
    row = st.lists(finite, min_size=count, max_size=count)
    values = data.draw(st.lists(row, min_size=2, max_size=2))
    keys = [f"m{i:02d}" for i in range(count)]

    def body(group):
        return group.reduce_metrics("test", dict(zip(keys, values[group.index])), reduction)

    results, gathers = run_processes(2, body)
    rows = np.asarray(values, np.float64).reshape(2, count)
    with np.errstate(all="ignore"):
        expected = dict(zip(keys, reduce_rows(rows, reduction).tolist()))
    assert results == [expected, expected]
    assert gathers == [1 if count <= INLINE_METRICS else 2] * 2


def test_metrics_with_different_keys_are_a_config_error_on_every_process():
    def body(group):
        return group.reduce_metrics("test", {"val_loss" if group.index else "loss": 1.0}, "mean")

    results, _ = run_processes(2, body)
    assert all(isinstance(r, ConfigError) and "different metric keys" in str(r) for r in results)


def test_a_stop_is_agreed_in_the_collective_that_agrees_on_errors():
    def body(group):
        (stopped,) = group.agree_on_error(None, group.index == 1)
        return group.agreed_stop(stopped, group.index == 1, "patience ran out")

    results, gathers = run_processes(2, body)
    assert results == [(True, "another rank stopped"), (True, "patience ran out")]
    assert gathers == [1, 1]
