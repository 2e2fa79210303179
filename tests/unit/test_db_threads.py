"""Threads of one process sharing the clinical warehouse (warehouse/db.py): they take turns, never fail.

DuckDB refuses a second in-process instance attaching a file another instance of the process attaches for
writing ("Unique file handle conflict"). The clinician service answers requests on threads: two nurses
acknowledging alerts or logging time at the same moment must both be written (the hostile review's F8: 7 of
8 simultaneous time entries got a 500).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.settings import Settings
from warehouse import db
from warehouse.db import WarehouseBusy, clinical
from warehouse.serving import serving

THREADS = 8


def at_once(n: int, work: Callable[[int], object]) -> list[object]:
    """``work(i)`` on ``n`` threads released together; every result, or the first exception raised."""
    barrier = threading.Barrier(n)

    def run(i: int) -> object:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


@pytest.fixture
def warehouse(settings: Settings) -> Settings:
    with clinical(settings) as con:
        con.execute("CREATE TABLE notes (n INTEGER)")
    return settings


def test_simultaneous_writers_of_one_process_all_write(warehouse):
    def write(i: int) -> int:
        with clinical(warehouse) as con:
            con.execute("INSERT INTO notes VALUES (?)", [i])
            return i

    assert at_once(THREADS, write) == list(range(THREADS))
    with clinical(warehouse, read_only=True) as con:
        assert sorted(r[0] for r in con.execute("SELECT n FROM notes").fetchall()) == list(range(THREADS))


def test_a_read_of_the_live_file_waits_for_a_writer_thread(warehouse):
    """Before the first snapshot, serving() reads the clinical file itself: it waits for the writer."""
    writing, done = threading.Event(), threading.Event()

    def writer() -> None:
        with clinical(warehouse) as con:
            con.execute("INSERT INTO notes VALUES (1)")
            writing.set()
            done.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert writing.wait(10)

    def read() -> int:
        with serving(warehouse) as con:
            return con.execute("SELECT count(*) FROM notes").fetchone()[0]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read)
        assert not pending.done()
        done.set()
        assert pending.result(timeout=30) == 1
    t.join()


def test_a_writer_held_past_the_wait_is_a_busy_warehouse_not_a_crash(warehouse, monkeypatch):
    monkeypatch.setattr(db, "LOCK_WAIT_S", 0.2)
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with clinical(warehouse):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)
    try:
        with pytest.raises(WarehouseBusy, match="try again"), clinical(warehouse):
            pass
    finally:
        release.set()
        t.join()
    with clinical(warehouse) as con:  # and the next turn is there as soon as it is free
        assert con.execute("SELECT count(*) FROM notes").fetchone() == (0,)
