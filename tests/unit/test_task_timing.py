"""What each DAG task records about itself: its wall time and its own peak memory, never mixed into its data.

Several tasks can share one process (`rpm pipeline run` runs the whole DAG in one), so a task's peak must be
its own: the high-water mark is reset when the task starts. The ops team reads these to find which stage
needs memory (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes

from pipeline.tasks import TIMING_KEYS, timed

MIB = 1024 * 1024


def _allocate(mib: int) -> dict[str, int]:
    block = bytearray(mib * MIB)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    return {"rule_a": 3}


def test_a_task_reports_its_own_peak_memory_not_an_earlier_tasks() -> None:
    big = timed("task", lambda: _allocate(300))
    small = timed("task", lambda: _allocate(10))

    assert big["rule_a"] == 3 and big["seconds"] >= 0
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 200  # the 300 MiB task's peak is not carried over


def test_timing_keys_are_what_timed_adds() -> None:
    out = timed("task", lambda: {"loaded": 1})
    assert set(out) - {"loaded"} == set(TIMING_KEYS)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _fragment_heap(mib: int) -> dict:
    """Many small heap blocks freed between blocks still in use (fragmentation, as a task's leftovers
    leave it): glibc keeps such pages for reuse unless told to trim."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4096) for _ in range(mib * 256)]
    for b in blocks:
        ctypes.memset(b, 1, 4096)  # resident
    for i, b in enumerate(blocks):
        if i % 64 == 63:
            _PINNED.append(b)  # still in use: the freed pages around it are not at the heap's top
        else:
            libc.free(b)
    return {"freed_mib": mib}


_PINNED: list[int] = []


def test_memory_a_task_freed_is_returned_before_the_next_task() -> None:
    """Under `rpm pipeline run` every task shares one process: what a task freed must not stay resident and
    become the next task's starting point."""
    before = _rss_mb()
    out = timed("task", lambda: _fragment_heap(200))
    after = _rss_mb()

    assert out["peak_rss_mb"] - before > 150  # the task really held the memory
    assert after - before < 50                # and it is back with the OS once the task is done


def _garbage_cycle(mib: int) -> dict:
    """Memory only reachable through a reference cycle (what pandas and GX objects leave): freed by the
    cycle collector, whenever it next runs."""
    a: dict = {"block": bytearray(mib * MIB)}
    a["block"][::4096] = b"x" * len(a["block"][::4096])
    a["self"] = a
    return {"freed_mib": mib}


def test_garbage_a_task_left_in_reference_cycles_is_collected_before_the_next_task() -> None:
    before = _rss_mb()
    out = timed("task", lambda: _garbage_cycle(200))
    after = _rss_mb()

    assert out["peak_rss_mb"] - before > 150
    assert after - before < 50
