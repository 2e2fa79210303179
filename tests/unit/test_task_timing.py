"""What each DAG task records about itself: its wall time and its own peak memory, never mixed into its data.

Several tasks can share one process (`rpm pipeline run` runs the whole DAG in one), so a task's peak must be
its own: the high-water mark is reset when the task starts. The ops team reads these to find which stage
needs memory (BENCHMARKS.md).
"""

from __future__ import annotations

from warehouse.ops import TIMING_KEYS, timed

MIB = 1024 * 1024


def _allocate(mib: int) -> dict[str, int]:
    block = bytearray(mib * MIB)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    return {"rule_a": 3}


def test_a_task_reports_its_own_peak_memory_not_an_earlier_tasks() -> None:
    big = timed(_allocate, 300)
    small = timed(_allocate, 10)

    assert big["rule_a"] == 3 and big["seconds"] >= 0
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 200  # the 300 MiB task's peak is not carried over


def test_timing_keys_are_what_timed_adds() -> None:
    out = timed(lambda: {"loaded": 1})
    assert set(out) - {"loaded"} == set(TIMING_KEYS)
