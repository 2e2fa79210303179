"""The per-patient-day rollup the load keeps (warehouse/patient_days.py) against the full scans it replaced.

What a biller and a clinician rely on: billing codes, the panel's last reading and 30-day counts, the daily and
latest vitals are the same answers the previous full-scan SQL gave on the same readings — across DST days,
patients with and without a registered zone, zone changes, manual readings and readings loaded in several
batches — and the rollup always equals a recount from readings.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from core.settings import Settings
from warehouse.access import PATIENTS_SQL
from warehouse.db import clinical
from warehouse.patient_days import note_loaded, rebuild, refresh_zones
from warehouse.registry import upsert_patient

# The previous release's SQL (full scans of readings through stg_readings): the oracle.
OLD_BILLING = """
CREATE OR REPLACE TEMP VIEW old_billing_calendar AS
WITH anchors AS (
    SELECT r.patient_id, min(r.local_date) AS first_date, max(r.local_date) AS last_date,
           CAST(now() AT TIME ZONE coalesce(any_value(p.time_zone), 'UTC') AS DATE) AS today
    FROM billing_device_readings r LEFT JOIN patients p ON p.patient_id = r.patient_id
    GROUP BY r.patient_id
), numbered AS (
    SELECT patient_id, first_date, today,
           unnest(range(0, greatest(today - first_date, last_date - first_date, 0) // 30 + 1)) AS period_no
    FROM anchors
)
SELECT patient_id, CAST(period_no AS INTEGER) AS period_no,
       first_date + CAST(30 * period_no AS INTEGER) AS period_start,
       first_date + CAST(30 * period_no + 29 AS INTEGER) AS period_end, first_date, today
FROM numbered;
CREATE OR REPLACE TEMP VIEW old_billing_days AS
SELECT c.patient_id, c.period_no, c.period_start, c.period_end, r.local_date,
       list_sort(list(r.reading_id)) AS reading_ids, CAST(count(*) AS INTEGER) AS readings
FROM billing_device_readings r
JOIN old_billing_calendar c ON c.patient_id = r.patient_id AND r.local_date BETWEEN c.period_start AND c.period_end
GROUP BY c.patient_id, c.period_no, c.period_start, c.period_end, r.local_date;
CREATE OR REPLACE TEMP VIEW old_billing_periods AS
WITH counted AS (
    SELECT c.patient_id, c.period_no, c.period_start, c.period_end, c.today,
           CAST(count(d.local_date) AS INTEGER) AS days_with_data,
           CAST(coalesce(sum(d.readings), 0) AS INTEGER) AS readings,
           CAST(count(d.local_date) FILTER (WHERE d.local_date >= c.today) AS INTEGER) AS days_from_today,
           c.today BETWEEN c.period_start AND c.period_end AS is_current
    FROM old_billing_calendar c
    LEFT JOIN old_billing_days d ON d.patient_id = c.patient_id AND d.period_no = c.period_no
    GROUP BY c.patient_id, c.period_no, c.period_start, c.period_end, c.today
), remaining AS (
    SELECT *, CASE WHEN is_current THEN CAST(period_end - today + 1 - days_from_today AS INTEGER) END AS days_left
    FROM counted
)
SELECT patient_id, period_no, period_start, period_end, days_with_data, readings,
       CASE WHEN days_with_data >= 16 THEN '99454' WHEN days_with_data >= 2 THEN '99445' END AS device_code,
       is_current, days_left, CASE WHEN is_current THEN greatest(16 - days_with_data, 0) END AS days_needed_99454,
       coalesce(is_current AND days_with_data < 16 AND days_with_data + days_left >= 16, false) AS at_risk_99454
FROM remaining;
CREATE OR REPLACE TEMP VIEW old_latest_vitals AS
WITH latest AS (
    SELECT patient_id, metric, value, diastolic, unit, measured_at, utc_offset_min, device_id,
           count(*) OVER (PARTITION BY patient_id, metric) AS readings_total
    FROM readings
    QUALIFY row_number() OVER (PARTITION BY patient_id, metric ORDER BY measured_at DESC, reading_id) = 1
)
SELECT patient_id, metric, value, diastolic, unit, measured_at, measured_local, device_id, readings_total
FROM with_local_time('latest');
CREATE OR REPLACE TEMP VIEW old_daily_vitals AS
SELECT patient_id, metric, local_date, unit,
       count(*) AS readings, min(value) AS min_value, avg(value) AS mean_value, max(value) AS max_value,
       avg(diastolic) AS mean_diastolic
FROM stg_readings
GROUP BY ALL;
"""

OLD_PATIENTS = """
SELECT p.patient_id, p.mrn, p.given_name, p.family_name, p.birth_date, p.time_zone,
       p.conditions, max(r.measured_at) AS last_reading_at,
       count(DISTINCT r.reading_id) FILTER (r.measured_at >= now() - INTERVAL 30 DAY) AS readings_30d,
       (SELECT count(*) FROM alerts a WHERE a.patient_id = p.patient_id AND a.resolved_at IS NULL) AS open_alerts
FROM patients p LEFT JOIN readings r USING (patient_id)
WHERE list_contains(?, p.patient_id)
GROUP BY ALL ORDER BY p.patient_id"""

ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe", None, "America/Chicago", "Asia/Kolkata",
         None, "America/Los_Angeles"]
# Instants where a zone above changes its offset in 2026 (US, EU, Lord Howe's half hour), and the windows the
# panel and trends start at: readings crowd around each.
DST = [datetime(2026, 3, 8, 7, tzinfo=UTC), datetime(2026, 3, 29, 1, tzinfo=UTC),
       datetime(2026, 4, 4, 15, tzinfo=UTC), datetime(2026, 10, 3, 15, 30, tzinfo=UTC),
       datetime(2026, 10, 25, 1, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC)]
METRICS = [("heart_rate", "/min", "8867-4"), ("blood_pressure", "mm[Hg]", "85354-9"),
           ("body_weight", "kg", "29463-7"), ("blood_glucose", "mg/dL", "41653-7")]
_ids = itertools.count()


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with clinical(Settings(home=tmp_path / "var")) as c:
        yield c


def random_readings(rng: random.Random, now: datetime, patients: list[str], n: int) -> list[tuple]:
    """Readings over the last ~300 days, a third of them within hours of a DST change or a window start;
    some share an instant (ties for the latest reading), some are manual, a few carry an unusual unit."""
    anchors = [*DST, *(now - timedelta(days=d) for d in (7, 14, 30))]
    rows = []
    for _ in range(n):
        pid = rng.choice(patients)
        if rng.random() < 0.35:
            at = rng.choice(anchors) + timedelta(seconds=rng.randint(-10 * 3600, 10 * 3600))
        else:
            at = now - timedelta(seconds=rng.randint(60, 300 * 86400))
        at = at.replace(microsecond=rng.choice([0, 0, 0, rng.randint(0, 999_999)]))
        if rng.random() < 0.05 and rows:  # the same instant as an earlier reading of another device
            at = rng.choice(rows)[9]
        metric, unit, loinc = rng.choice(METRICS)
        if rng.random() < 0.03:
            unit = "[lb_av]" if metric == "body_weight" else unit
        value = round(rng.uniform(40, 200), 1)
        diastolic = round(rng.uniform(50, 110), 1) if metric == "blood_pressure" else None
        n_id = next(_ids)
        rows.append((f"r-{n_id:07d}", pid, f"dev-{rng.randint(1, 3)}", metric, loinc, value, diastolic, unit,
                     rng.choice([-300, -240, 0, 60, 330, 600]), at, rng.random() < 0.1, n_id))
    return rows


def load(con: duckdb.DuckDBPyConnection, rows: list[tuple]) -> None:
    """Insert one batch into readings and add it to the rollup, in one transaction, as the load does."""
    con.execute("BEGIN TRANSACTION")
    con.executemany("""
        INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, diastolic, unit, unit_sent,
                              utc_offset_min, measured_at, manual, received_at, loaded_at, msg_id, segment,
                              record_no, item_no)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), now(), 'm', 'seg', ?, 0)""",
        [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[7], r[8], r[9], r[10], r[11]) for r in rows])
    con.execute("CREATE OR REPLACE TEMP TABLE _batch AS SELECT unnest(?::VARCHAR[]) AS reading_id",
                [[r[0] for r in rows]])
    note_loaded(con, "(SELECT * FROM readings WHERE reading_id IN (SELECT reading_id FROM _batch))")
    con.execute("COMMIT")


def normalised(value: Any) -> Any:
    """Floats to 9 significant digits (sums of the same readings in another order differ in the last bits);
    lists and structs element-wise."""
    if isinstance(value, float):
        return float(f"{value:.9g}") if math.isfinite(value) else value
    if isinstance(value, list | tuple):
        return type(value)(normalised(v) for v in value)
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    return value


def table(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[tuple]:
    return [normalised(r) for r in con.execute(sql, params or []).fetchall()]


def rollup(con: duckdb.DuckDBPyConnection, source: str) -> list[tuple]:
    """A rollup's rows in key order, each reading's instants sorted (their order in the list is load order)."""
    return table(con, f"SELECT * REPLACE (list_sort(at_us) AS at_us) FROM {source} "
                      "ORDER BY patient_id, local_date, metric, unit")


def latest(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    """The latest rows the load keeps, and the same folded afresh from the stored days."""
    return [table(con, f"SELECT * FROM {source} ORDER BY patient_id, metric")
            for source in ("patient_latest", "patient_latest_of('patient_days')")]


def assert_same_answers(con: duckdb.DuckDBPyConnection, patients: list[str]) -> None:
    assert rollup(con, "patient_days") == rollup(con, "patient_days_of('readings')")
    kept, folded = latest(con)
    assert kept == folded
    assert table(con, "SELECT * FROM billing_periods ORDER BY ALL") == \
        table(con, "SELECT * FROM old_billing_periods ORDER BY ALL")
    some = patients[::3]
    assert table(con, "SELECT * FROM billing_periods_for(?) ORDER BY ALL", [some]) == \
        table(con, "SELECT * FROM old_billing_periods WHERE list_contains(?, patient_id) ORDER BY ALL", [some])
    assert table(con, "SELECT * FROM billing_days ORDER BY ALL") == \
        table(con, "SELECT * FROM old_billing_days ORDER BY ALL")
    assert table(con, "SELECT * FROM mart_daily_vitals ORDER BY ALL") == \
        table(con, "SELECT * FROM old_daily_vitals ORDER BY ALL")
    assert table(con, "SELECT * FROM mart_latest_vitals ORDER BY ALL") == \
        table(con, "SELECT * FROM old_latest_vitals ORDER BY ALL")
    assert table(con, PATIENTS_SQL, [patients]) == table(con, OLD_PATIENTS, [patients])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_loads_answer_as_the_full_scans_did(con: duckdb.DuckDBPyConnection, seed: int) -> None:
    rng = random.Random(seed)
    now = con.execute("SELECT now()").fetchone()[0]
    patients = [f"p-{i}" for i in range(len(ZONES))]
    for pid, zone in zip(patients, ZONES, strict=True):
        upsert_patient(con, pid, time_zone=zone)
    con.execute(OLD_BILLING)
    batches = [random_readings(rng, now, patients, rng.randint(50, 400)) for _ in range(5)]
    for i, batch in enumerate(batches):
        load(con, batch)
        assert_same_answers(con, patients)
        if i == 1:  # a patient moves: the registry recounts their days in the new zone at once
            upsert_patient(con, patients[0], time_zone="Pacific/Chatham")
            assert_same_answers(con, patients)
        if i == 2:  # a zone set by other means than the registry: the next load recounts it
            con.execute("UPDATE patients SET time_zone = 'Europe/Berlin' WHERE patient_id = ?", [patients[3]])
    # After the loads (and the zone changes they applied) the stored rollup is a full recount.
    refresh_zones(con)
    assert rollup(con, "patient_days") == rollup(con, "patient_days_of('readings')")
    stored = rollup(con, "patient_days")
    assert sum(r[4] for r in stored) == con.execute("SELECT count(*) FROM readings").fetchone()[0]
    rebuild(con)
    assert rollup(con, "patient_days") == stored
    assert_same_answers(con, patients)
    # The panel's window starts inside some of these days: the part of them it counts came from their instants.
    assert con.execute("""SELECT count(*) FROM patient_days WHERE first_at < now() - INTERVAL 30 DAY
                          AND last_at >= now() - INTERVAL 30 DAY""").fetchone()[0] > 0


def test_a_zone_change_moves_the_days_at_once(con: duckdb.DuckDBPyConnection) -> None:
    """A Chicago patient's 23:30 local reading is 04:30Z the next UTC day: its day moves with the zone."""
    upsert_patient(con, "p-1", time_zone="America/Chicago")
    at = datetime(2026, 6, 2, 4, 30, tzinfo=UTC)  # 23:30 on 1 June in Chicago, 06:30 on 2 June in Berlin
    load(con, [("r-z1", "p-1", "dev-1", "heart_rate", "8867-4", 70.0, None, "/min", -300, at, False, 1)])
    assert con.execute("SELECT local_date FROM patient_days").fetchall() == [(datetime(2026, 6, 1).date(),)]
    upsert_patient(con, "p-1", time_zone="Europe/Berlin")
    assert con.execute("SELECT local_date, readings FROM patient_days").fetchall() == \
        [(datetime(2026, 6, 2).date(), 1)]
    assert con.execute("SELECT time_zone FROM patient_day_zones").fetchall() == [("Europe/Berlin",)]


def test_a_zone_changed_behind_the_registry_is_recounted_by_the_next_load(con: duckdb.DuckDBPyConnection) -> None:
    upsert_patient(con, "p-1", time_zone="America/Chicago")
    at = datetime(2026, 6, 2, 4, 30, tzinfo=UTC)
    load(con, [("r-z1", "p-1", "dev-1", "heart_rate", "8867-4", 70.0, None, "/min", -300, at, False, 1)])
    con.execute("UPDATE patients SET time_zone = 'Europe/Berlin'")
    load(con, [("r-z2", "p-1", "dev-1", "heart_rate", "8867-4", 80.0, None, "/min", 60, at, False, 2)])
    # Recounted in Berlin, with the new batch's reading added once.
    assert con.execute("SELECT local_date, readings FROM patient_days").fetchall() == \
        [(datetime(2026, 6, 2).date(), 2)]
    assert con.execute("SELECT time_zone FROM patient_day_zones").fetchall() == [("Europe/Berlin",)]


def test_rebuild_of_some_patients_leaves_the_others(con: duckdb.DuckDBPyConnection) -> None:
    """After readings change outside the load (an erasure), recounting those patients is enough."""
    now = con.execute("SELECT now()").fetchone()[0]
    for pid in ("p-1", "p-2"):
        upsert_patient(con, pid, time_zone="America/New_York")
    load(con, random_readings(random.Random(5), now, ["p-1", "p-2"], 200))
    before = rollup(con, "(SELECT * FROM patient_days WHERE patient_id = 'p-2')")
    con.execute("DELETE FROM readings WHERE patient_id = 'p-1'")
    rebuild(con, ["p-1"])
    assert con.execute("SELECT count(*) FROM patient_days WHERE patient_id = 'p-1'").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM patient_day_zones WHERE patient_id = 'p-1'").fetchone()[0] == 0
    assert rollup(con, "(SELECT * FROM patient_days WHERE patient_id = 'p-2')") == before
    assert rollup(con, "patient_days") == rollup(con, "patient_days_of('readings')")
    assert con.execute("SELECT count(*) FROM patient_latest WHERE patient_id = 'p-1'").fetchone()[0] == 0
    kept, folded = latest(con)
    assert kept == folded


OLD_BILLING_TIME = """
SELECT i.patient_id,
       CAST(date_trunc('month', i.occurred_at AT TIME ZONE coalesce(p.time_zone, 'UTC')) AS DATE) AS month,
       CAST(sum(i.minutes) AS INTEGER) AS minutes,
       CAST(count(*) FILTER (WHERE i.interactive) AS INTEGER) AS interactive_count
FROM interactions i LEFT JOIN patients p ON p.patient_id = i.patient_id
GROUP BY ALL ORDER BY ALL"""


@pytest.mark.parametrize("seed", [1, 2])
def test_logged_time_falls_in_the_same_patient_local_months(con: duckdb.DuckDBPyConnection, seed: int) -> None:
    """Management time per patient-local month (zone months as UTC ranges) equals the zone lookup per entry,
    around every month's midnight in every zone."""
    rng = random.Random(seed)
    patients = [f"p-{i}" for i in range(len(ZONES))]
    for pid, zone in zip(patients, ZONES, strict=True):
        upsert_patient(con, pid, time_zone=zone)
    rows = []
    for _ in range(600):
        month = datetime(2026, rng.randint(1, 12), 1, tzinfo=UTC)
        at = month + timedelta(seconds=rng.randint(-16 * 3600, 16 * 3600))  # near midnight somewhere
        if rng.random() < 0.3:
            at = rng.choice(DST) + timedelta(seconds=rng.randint(-3600, 3600))
        rows.append((rng.choice(patients), rng.randint(1, 30), rng.random() < 0.5, at))
    con.executemany("INSERT INTO interactions (patient_id, clinician_id, minutes, interactive, occurred_at) "
                    "VALUES (?, 'c-1', ?, ?, ?)", rows)
    assert table(con, "SELECT patient_id, month, minutes, interactive_count FROM billing_time ORDER BY ALL") == \
        table(con, OLD_BILLING_TIME)
