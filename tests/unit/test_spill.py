"""Temporary files of several processes under one warehouse (warehouse/db.py ``spill_dir``).

A process that spills (a large report, sort or join under ``RPM_WAREHOUSE_MEMORY_LIMIT``) must not stop a
clinician's read in another process: with one shared ``warehouse/tmp`` the reader's connection failed
("Existing temporary files found ... temp_file_encryption"), and two spilling instances would have written
files of the same names.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from core.settings import Settings
from warehouse.db import clinical, one_row, spill_dir

# A separate process that spills into its own folder, says so, and holds its files until told to finish.
SPILLER = textwrap.dedent("""
    import os, sys
    from core.settings import Settings
    from warehouse.db import open_clinical
    s = Settings(home=sys.argv[1], warehouse_memory_limit="64MB")
    con = open_clinical(s, read_only=True)  # as a serving-snapshot reader or a report would
    con.execute("CREATE TEMP TABLE big AS SELECT range AS i, md5(range::VARCHAR) AS s FROM range(2000000)")
    print(sum(len(fs) for _, _, fs in os.walk(os.path.join(s.warehouse_dir, "tmp"))), flush=True)
    sys.stdin.readline()
    print(con.execute("SELECT count(DISTINCT s) FROM big").fetchone()[0], flush=True)
    con.close()
""")


def test_a_read_opens_while_another_process_has_spilled(settings: Settings) -> None:
    with clinical(settings):  # the warehouse exists, migrated
        pass
    tmp = Path(settings.warehouse_dir) / "tmp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    spiller = subprocess.Popen([sys.executable, "-c", SPILLER, str(settings.home)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert spiller.stdout is not None and spiller.stdin is not None
        assert int(spiller.stdout.readline()) > 0, "the other process did not spill: the test proves nothing"
        [theirs] = [p for p in tmp.iterdir() if p.is_dir() and p.name.startswith(f"{spiller.pid}-")]

        with clinical(settings, read_only=True) as con:  # failed here with one shared folder
            assert one_row(con.execute("SELECT count(*) FROM readings")) == (0,)

        spiller.stdin.write("\n")
        spiller.stdin.flush()
        assert int(spiller.stdout.readline()) == 2_000_000  # its spilled rows read back intact
        assert spiller.wait(timeout=60) == 0
    finally:
        spiller.kill()
        spiller.wait()
    assert not theirs.exists()  # DuckDB removes the folder it made when the connection closes


def test_what_is_not_a_spill_folder_of_ours_is_left_alone(settings: Settings, tmp_path: Path) -> None:
    """Only a folder named <pid>-<owner>-<connection> whose owner lock is free is swept (the killed-process test
    below); anything else under tmp stays, and a symlink is never followed."""
    tmp = Path(settings.warehouse_dir) / "tmp"
    tmp.mkdir(parents=True)
    outside = tmp_path / "not-ours"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    planted = tmp / "1-0123456789ab-0123456789ab"  # a symlink named like a dead process's folder
    planted.symlink_to(outside, target_is_directory=True)
    others = [tmp / "notes", tmp / "1-0123456789ab"]
    for folder in others:
        folder.mkdir()

    mine = spill_dir(settings)

    assert planted.is_symlink() and (outside / "keep").read_text() == "kept"
    assert all(folder.is_dir() for folder in others)
    assert mine.parent == tmp and mine.name.startswith(f"{os.getpid()}-") and not mine.exists()
    assert spill_dir(settings) != mine  # a folder per connection, also within one process


def _spiller(home: Path, argv: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([*(argv or []), sys.executable, "-c", SPILLER, str(home)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(spiller: subprocess.Popen) -> tuple[str, str]:
    assert spiller.stdin is not None
    try:
        return spiller.communicate("\n", timeout=120)
    finally:
        spiller.kill()
        spiller.wait()


def _can_unshare_pids() -> bool:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


def test_a_live_spiller_in_another_pid_namespace_keeps_its_folder(settings: Settings) -> None:
    """docker-compose runs the scheduler, the clinician service and the CLI in containers of one account on one
    volume, each in its own PID namespace: a live process's pid there is absent here (or another's). Its spill
    folder was swept as a dead process's, and its query failed ("Could not remove file ... No such file")."""
    if shutil.which("unshare") is None or not _can_unshare_pids():
        pytest.skip("needs a new PID namespace (unshare --pid: root or user namespaces)")
    with clinical(settings):
        pass
    tmp = Path(settings.warehouse_dir) / "tmp"
    # In its own PID namespace the spiller gets a pid past 30000 there (ns_last_pid), one no process has here.
    inner = 'echo 30000 > /proc/sys/kernel/ns_last_pid; "$0" "$@"; exit $?'
    spiller = _spiller(settings.home, ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", inner])
    try:
        assert spiller.stdout is not None
        assert int(spiller.stdout.readline()) > 0, "the other process did not spill: the test proves nothing"
        [theirs] = [p for p in tmp.iterdir() if p.is_dir()]
        assert not psutil.pid_exists(int(theirs.name.split("-")[0])), "its pid is taken here: proves nothing"

        spill_dir(settings)  # every open of the warehouse sweeps

        assert theirs.is_dir()
    finally:
        out, err = _finish(spiller)
    assert out.split() == ["2000000"], err  # its spilled rows read back intact


def test_the_folder_and_lock_of_a_killed_process_are_swept(settings: Settings) -> None:
    with clinical(settings):
        pass
    tmp = Path(settings.warehouse_dir) / "tmp"
    spiller = _spiller(settings.home)
    try:
        assert spiller.stdout is not None
        assert int(spiller.stdout.readline()) > 0, "the other process did not spill: the test proves nothing"
        theirs = [p for p in tmp.iterdir() if p.name.startswith(f"{spiller.pid}-")]
        assert {p.suffix for p in theirs} == {"", ".lock"}  # its folder and its owner lock

        spill_dir(settings)
        assert all(p.exists() for p in theirs), "a live process's folder was swept"

        spiller.send_signal(signal.SIGKILL)  # no close: DuckDB leaves the folder behind
        spiller.wait(timeout=30)
        spill_dir(settings)
    finally:
        spiller.kill()
        spiller.wait()
    assert not any(p.exists() for p in theirs)
    assert all(p.name.startswith(f"{os.getpid()}-") for p in tmp.iterdir())  # only this process's lock is left


def test_a_planted_lock_symlink_or_unwritable_tmp_stops_nothing(settings: Settings, tmp_path: Path) -> None:
    with clinical(settings):
        pass
    tmp = Path(settings.warehouse_dir) / "tmp"
    outside = tmp_path / "victim"
    outside.write_text("kept")
    (tmp / "4242-0123456789ab.lock").symlink_to(outside)  # named like an owner lock
    guarded = tmp / "4242-0123456789ab-0123456789ab"
    guarded.mkdir()
    spill_dir(settings)
    assert guarded.is_dir() and outside.read_text() == "kept"  # a lock it cannot take guards its folder

    shutil.rmtree(tmp)
    tmp.write_text("not a folder")  # a read that fits in memory must not fail for it
    with clinical(settings, read_only=True) as con:
        assert one_row(con.execute("SELECT count(*) FROM readings")) == (0,)


def test_a_process_with_two_warehouses_holds_an_owner_lock_in_each(tmp_path: Path) -> None:
    """A folder's owner lock must sit beside it: one under another warehouse would leave it judged dead."""
    first, second = Settings(home=tmp_path / "a"), Settings(home=tmp_path / "b")
    mine = [spill_dir(first), spill_dir(second)]
    for folder in mine:
        owner = folder.name.rsplit("-", 1)[0]
        assert (folder.parent / f"{owner}.lock").is_file()
