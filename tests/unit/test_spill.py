"""Temporary files of several processes under one warehouse (warehouse/db.py ``spill_dir``).

A process that spills (a large report, sort or join under ``RPM_WAREHOUSE_MEMORY_LIMIT``) must not stop a
clinician's read in another process: with one shared ``warehouse/tmp`` the reader's connection failed
("Existing temporary files found ... temp_file_encryption"), and two spilling instances would have written
files of the same names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
        [theirs] = [p for p in tmp.iterdir() if p.name.startswith(f"{spiller.pid}-")]

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


def test_folders_of_dead_processes_are_swept_and_others_kept(settings: Settings, tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tmp = Path(settings.warehouse_dir) / "tmp"
    tmp.mkdir(parents=True)
    dead = tmp / f"{gone.pid}-0123456789ab"
    dead.mkdir()
    (dead / "duckdb_temp_storage_DEFAULT-0.tmp").write_bytes(b"x" * 4096)
    alive = tmp / f"{os.getpid()}-0123456789ab"
    alive.mkdir()
    outside = tmp_path / "not-ours"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    planted = tmp / "1-0123456789ab"  # a symlink named like a dead process's folder: never followed
    planted.symlink_to(outside)
    other = tmp / "notes"
    other.mkdir()

    mine = spill_dir(settings)

    assert not dead.exists()
    assert alive.is_dir() and other.is_dir()
    assert (outside / "keep").read_text() == "kept"
    assert mine.parent == tmp and mine.name.startswith(f"{os.getpid()}-") and not mine.exists()
    assert spill_dir(settings) != mine  # a folder per connection, also within one process
