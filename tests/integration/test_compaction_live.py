"""A compaction (rpm_daily's) while `rpm pipeline run` runs and a clinician reads, on a real stack: the
compaction holds the warehouse (paused mid-copy, as a long one at 50M would be), the run's writes wait for it,
the clinician's summary keeps answering from the published snapshot, a patient's zone changes between the
loads; at the end every reading is loaded once, the rollup equals a rebuild and the summary counts the new
readings in the patient's new local days."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.settings import Settings
from rpmctl.tools.publish import wait_until
from tests.conftest import RPM, rpm, rpm_json, user_env
from tests.integration.test_poison_and_replay import add_device, hr_batch, publish, readings
from warehouse.db import clinical

pytestmark = pytest.mark.integration

CHILD = """
import os, pathlib, sys
from core.settings import Settings
from warehouse.compaction import compact
marker = pathlib.Path(sys.argv[1])
def progress(step):
    if step == "readings 1/2":
        (marker / "reached").touch()
        os.read(os.open(marker / "pipe", os.O_RDONLY), 1)  # blocks until the test writes to the pipe
compact(Settings.from_env(), chunk_readings=10, progress=progress)
"""


def test_compaction_during_a_pipeline_run_and_a_clinician_read(stack: Settings, tmp_path: Path):
    s = stack
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=30)
    pw = {p: add_device(s, f"bp-{p}", p, since=start - timedelta(days=1)) for p in ("pt-a", "pt-b")}
    for p in pw:
        publish(s, f"bp-{p}", pw[p], [hr_batch(f"bp-{p}", f"{p}-1", start, 8)])
    rpm(s, "pipeline", "run")
    before = {r["patient_id"]: r for r in rpm_json(s, "summary")}
    assert before["pt-a"]["readings"] == before["pt-b"]["readings"] == 8

    rpm(s, "patients", "add", "pt-a", "--tz", "Pacific/Kiritimati")  # +14:00: its local days move
    moved = {r["patient_id"]: r for r in rpm_json(s, "summary")}
    assert moved["pt-b"] == before["pt-b"] and moved["pt-a"]["last_local"] != before["pt-a"]["last_local"]
    for p in pw:
        publish(s, f"bp-{p}", pw[p], [hr_batch(f"bp-{p}", f"{p}-2", start + timedelta(hours=12), 8)])

    marker = tmp_path / "marker"
    marker.mkdir()
    os.mkfifo(marker / "pipe")
    env = user_env(s)
    compaction = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)], env=env,
                                  cwd=Path(__file__).resolve().parents[2])
    try:
        wait_until(lambda: (marker / "reached").exists() or compaction.poll() is not None, 60,
                   what="the compaction to hold the warehouse mid-copy")
        assert compaction.poll() is None, "the compaction ended early"
        run = subprocess.Popen([RPM, "pipeline", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        during = {r["patient_id"]: r for r in rpm_json(s, "summary")}  # the snapshot answers meanwhile
        assert during == moved
        assert run.poll() is None  # the run waits for the warehouse
    finally:
        with open(marker / "pipe", "wb") as pipe:
            pipe.write(b"g")
        assert compaction.wait(120) == 0
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0 and re.match(r"rpm_pipeline \S+: success", out), out + err

    expected = {(p, f"bp-{p}", f"{p}-{k}-{i}") for p in pw for k in (1, 2) for i in range(8)}
    assert readings(s) == expected
    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True and (acc["received"], acc["loaded"]) == (32, 32)
    with clinical(s, read_only=True) as con:
        rollup, rebuilt = (con.execute(f"SELECT * REPLACE (list_sort(at_us) AS at_us) FROM {source} ORDER BY ALL"
                                       ).fetchall() for source in ("patient_days", "patient_days_of('readings')"))
        assert rollup == rebuilt  # the instants of a day are a set: their list order is the merge's
        days_a = con.execute("SELECT count(DISTINCT local_date) FROM stg_readings WHERE patient_id = 'pt-a'"
                             ).fetchone()[0]
    after = {r["patient_id"]: r for r in rpm_json(s, "summary")}
    assert after["pt-a"]["readings"] == after["pt-b"]["readings"] == 16
    assert after["pt-a"]["days_with_readings"] == days_a
