"""RPM billing eligibility (CY2026): device-supply codes per 30-day period, management codes per month, flags.

What a biller relies on: a code appears only when the rule is met, on patient-local days of device-transmitted
data, once per period; every counted day traces back to its reading ids; a report covers only the patients
asked for. Dates are fixed except where the rule is about "today" (the current period).
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import duckdb
import pytest

from core.settings import Settings
from warehouse.billing import billing_evidence, billing_report, practice_month, write_csv
from warehouse.db import clinical
from warehouse.patient_days import note_loaded

START = date(2026, 3, 1)
_ids = itertools.count()


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with clinical(Settings(home=tmp_path / "var")) as c:
        yield c


def add_patient(con: duckdb.DuckDBPyConnection, patient_id: str, time_zone: str | None = "UTC") -> None:
    con.execute("INSERT INTO patients (patient_id, time_zone) VALUES (?, ?)", [patient_id, time_zone])


def add_reading(con: duckdb.DuckDBPyConnection, patient_id: str, measured_at: datetime, *, offset_min: int = 0,
                manual: bool = False, device_id: str = "dev-a", reading_id: str | None = None) -> str:
    """Insert one canonical reading measured at ``measured_at`` (UTC) by a device at ``offset_min``."""
    n = next(_ids)
    reading_id = reading_id or f"r-{n:06d}"
    con.execute("""
        INSERT INTO readings (reading_id, patient_id, device_id, metric, loinc, value, unit, unit_sent,
                              measured_at, utc_offset_min, received_at, loaded_at, msg_id, segment, record_no,
                              item_no, manual)
        VALUES (?, ?, ?, 'heart_rate', '8867-4', 72, '/min', '/min', ?, ?, ?, ?, ?, 'seg-1', ?, 0, ?)""",
        [reading_id, patient_id, device_id, measured_at, offset_min, measured_at, measured_at, f"m-{n}", n,
         manual])
    note_loaded(con, f"(SELECT * FROM readings WHERE reading_id = '{reading_id}')")  # as the load does
    return reading_id


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), tzinfo=UTC)


def add_days(con: duckdb.DuckDBPyConnection, patient_id: str, start: date, n: int, **kw) -> list[str]:
    """One reading at noon UTC (offset 0) on each of ``n`` consecutive days from ``start``."""
    return [add_reading(con, patient_id, noon(start + timedelta(days=i)), **kw) for i in range(n)]


def add_interaction(con: duckdb.DuckDBPyConnection, patient_id: str, minutes: int, occurred_at: datetime,
                    interactive: bool = True) -> None:
    con.execute("INSERT INTO interactions (patient_id, clinician_id, minutes, interactive, occurred_at) "
                "VALUES (?, 'c-1', ?, ?, ?)", [patient_id, minutes, interactive, occurred_at])


def period(con: duckdb.DuckDBPyConnection, patient_id: str, period_no: int = 0) -> dict:
    cur = con.execute("SELECT * FROM billing_periods WHERE patient_id = ? AND period_no = ?",
                      [patient_id, period_no])
    row = cur.fetchone()
    assert row is not None, f"no period {period_no} for {patient_id}"
    return dict(zip([d[0] for d in cur.description], row, strict=True))


def today(con: duckdb.DuckDBPyConnection) -> date:
    """Today's UTC date as the warehouse sees it (the same clock the views use)."""
    return con.execute("SELECT CAST(now() AT TIME ZONE 'UTC' AS DATE)").fetchone()[0]


# --- device supply: 99454 / 99445 -------------------------------------------------------------------------


@pytest.mark.parametrize(("days", "code"), [(30, "99454"), (16, "99454"), (15, "99445"), (2, "99445"),
                                            (1, None)])
def test_device_code_by_distinct_days(con, days, code):
    add_patient(con, "p1")
    add_days(con, "p1", START, days)
    p = period(con, "p1")
    assert (p["period_start"], p["period_end"]) == (START, date(2026, 3, 30))
    assert p["days_with_data"] == days
    assert p["device_code"] == code


def test_manual_entries_never_count(con):
    add_patient(con, "p1")
    add_days(con, "p1", START, 15)
    add_days(con, "p1", START + timedelta(days=15), 3, manual=True)  # would make 18 days if they counted
    add_days(con, "p1", START, 15, manual=True)                       # same days again, by hand
    p = period(con, "p1")
    assert (p["days_with_data"], p["device_code"]) == (15, "99445")

    add_patient(con, "manual-only")
    add_days(con, "manual-only", START, 20, manual=True)
    assert con.execute("SELECT count(*) FROM billing_periods WHERE patient_id = 'manual-only'").fetchone()[0] == 0
    assert billing_report(con, "2026-03", ["manual-only"], practice_tz="UTC")[0]["device_codes"] == []


def test_two_devices_same_day_count_one_day_and_one_code(con):
    add_patient(con, "p1")
    add_days(con, "p1", START, 16, device_id="bp-cuff")
    add_days(con, "p1", START, 16, device_id="scale")
    rows = con.execute("SELECT period_no, days_with_data, device_code FROM billing_periods "
                       "WHERE patient_id = 'p1' AND period_no = 0").fetchall()
    assert rows == [(0, 16, "99454")]
    assert {d["readings"] for d in billing_evidence(con, "p1", 0)} == {2}
    assert billing_report(con, "2026-03", ["p1"], practice_tz="UTC")[0]["device_codes"] == ["99454"]


def test_without_a_registered_zone_the_day_is_the_device_local_date(con):
    add_patient(con, "p1", None)
    # 03:00Z on 2 March at UTC-5 is 22:00 on 1 March: the patient's day, not the UTC one.
    add_reading(con, "p1", datetime(2026, 3, 2, 3, 0, tzinfo=UTC), offset_min=-300)
    # 23:30Z on 2 March at UTC+1 is 00:30 on 3 March.
    add_reading(con, "p1", datetime(2026, 3, 2, 23, 30, tzinfo=UTC), offset_min=60)
    p = period(con, "p1")
    assert p["period_start"] == date(2026, 3, 1)
    assert [d["local_date"] for d in billing_evidence(con, "p1", 0)] == ["2026-03-01", "2026-03-03"]
    assert (p["days_with_data"], p["device_code"]) == (2, "99445")


def test_a_registered_zone_decides_the_day_whatever_offset_the_device_sent(con):
    """A Chicago patient whose device stamps UTC (`Z`): 01:30 and 23:30 on 2 March at home arrive as 07:30Z
    on 2 March and 05:30Z on 3 March. One home day: no 99445 (regression: two UTC days billed it)."""
    add_patient(con, "chi", "America/Chicago")
    add_reading(con, "chi", datetime(2026, 3, 2, 7, 30, tzinfo=UTC), offset_min=0)
    add_reading(con, "chi", datetime(2026, 3, 3, 5, 30, tzinfo=UTC), offset_min=0)
    p = period(con, "chi")
    assert [d["local_date"] for d in billing_evidence(con, "chi", 0)] == ["2026-03-02"]
    assert (p["period_start"], p["days_with_data"], p["device_code"]) == (date(2026, 3, 2), 1, None)
    # The daily summary is the same home day.
    assert con.execute("SELECT local_date, readings FROM mart_daily_vitals WHERE patient_id = 'chi'"
                       ).fetchall() == [(date(2026, 3, 2), 2)]


def test_local_time_follows_the_registered_zone_across_dst(con):
    """On the days New York changes its clocks the offset changes within the day: each reading gets the
    offset in force at its instant (2026: EST -> EDT at 07:00Z on 8 March, back at 06:00Z on 1 November)."""
    add_patient(con, "ny", "America/New_York")
    local = {
        datetime(2026, 3, 8, 6, 30, tzinfo=UTC): datetime(2026, 3, 8, 1, 30),    # EST, before the change
        datetime(2026, 3, 8, 7, 30, tzinfo=UTC): datetime(2026, 3, 8, 3, 30),    # EDT, after it
        datetime(2026, 3, 9, 3, 30, tzinfo=UTC): datetime(2026, 3, 8, 23, 30),   # EDT, the next UTC day
        datetime(2026, 7, 1, 16, 0, tzinfo=UTC): datetime(2026, 7, 1, 12, 0),    # a whole summer day
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC): datetime(2026, 11, 1, 1, 30),  # EDT: 01:30 the first time
        datetime(2026, 11, 1, 6, 30, tzinfo=UTC): datetime(2026, 11, 1, 1, 30),  # EST: 01:30 again
    }
    for at in local:
        add_reading(con, "ny", at, offset_min=0)  # a device on UTC
    got = dict(con.execute("SELECT measured_at, measured_local FROM stg_readings WHERE patient_id = 'ny'"
                           ).fetchall())
    assert got == local


def test_second_period_starts_30_days_after_first_local_date(con):
    add_patient(con, "p1")
    first = date(2026, 1, 10)
    add_reading(con, "p1", noon(first))
    add_reading(con, "p1", noon(first + timedelta(days=29)))  # last day of period 0
    add_reading(con, "p1", noon(first + timedelta(days=30)))  # first day of period 1
    p0, p1 = period(con, "p1", 0), period(con, "p1", 1)
    assert (p0["period_start"], p0["period_end"]) == (date(2026, 1, 10), date(2026, 2, 8))
    assert (p1["period_start"], p1["period_end"]) == (date(2026, 2, 9), date(2026, 3, 10))
    assert (p0["days_with_data"], p1["days_with_data"]) == (2, 1)
    # Periods run back to back up to and including the current one, exactly one of them current.
    last = con.execute("SELECT max(period_no), count(*) FILTER (WHERE is_current) FROM billing_periods "
                       "WHERE patient_id = 'p1'").fetchone()
    assert last == ((today(con) - first).days // 30, 1)


# --- treatment management: 99470 / 99457 / 99458 ----------------------------------------------------------


@pytest.mark.parametrize(("minutes", "codes"), [
    (9, []), (10, ["99470"]), (19, ["99470"]), (20, ["99457"]), (39, ["99457"]), (40, ["99457", "99458"]),
    (59, ["99457", "99458"]), (60, ["99457", "99458", "99458"]),
])
def test_management_codes_by_monthly_minutes(con, minutes, codes):
    add_patient(con, "p1")
    first = minutes // 2
    add_interaction(con, "p1", first, datetime(2026, 3, 5, 15, tzinfo=UTC), interactive=True)
    add_interaction(con, "p1", minutes - first, datetime(2026, 3, 20, 15, tzinfo=UTC), interactive=False)
    rows = con.execute("SELECT month, minutes, interactive_count, codes FROM billing_time "
                       "WHERE patient_id = 'p1'").fetchall()
    assert rows == [(date(2026, 3, 1), minutes, 1, codes)]
    assert billing_report(con, "2026-03", ["p1"], practice_tz="UTC")[0]["management_codes"] == codes


def test_management_month_is_the_patient_local_month(con):
    add_patient(con, "ny", "America/New_York")
    add_patient(con, "utc", None)  # no time zone: UTC
    for pid in ("ny", "utc"):
        # 02:00Z on 1 April is still 31 March in New York.
        add_interaction(con, pid, 20, datetime(2026, 4, 1, 2, tzinfo=UTC))
    months = dict(con.execute("SELECT patient_id, month FROM billing_time").fetchall())
    assert months == {"ny": date(2026, 3, 1), "utc": date(2026, 4, 1)}


def test_default_month_is_the_practice_month_not_utc(con):
    # 02:00Z on 1 April is the evening of 31 March in Chicago: a report run then is March's, not April's.
    evening = datetime(2026, 4, 1, 2, tzinfo=UTC)
    assert (practice_month("America/Chicago", evening), practice_month("UTC", evening)) == ("2026-03", "2026-04")
    add_patient(con, "p1")
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11: a day apart
        assert billing_report(con, None, ["p1"], practice_tz=zone)[0]["month"] == practice_month(zone)


def test_no_interactive_communication_no_code_and_flag(con):
    add_patient(con, "p1")
    add_interaction(con, "p1", 45, datetime(2026, 3, 5, 15, tzinfo=UTC), interactive=False)
    row = billing_report(con, "2026-03", ["p1"], practice_tz="UTC")[0]
    assert (row["management_minutes"], row["interactive_count"], row["management_codes"]) == (45, 0, [])
    assert row["flags"] == ["needs_interactive_communication"]


def test_near_99457_flag(con):
    add_patient(con, "p1")
    add_interaction(con, "p1", 16, datetime(2026, 3, 5, 15, tzinfo=UTC))
    add_patient(con, "p2")
    add_interaction(con, "p2", 14, datetime(2026, 3, 5, 15, tzinfo=UTC))
    p1, p2 = billing_report(con, "2026-03", ["p1", "p2"], practice_tz="UTC")
    assert (p1["management_codes"], p1["flags"]) == (["99470"], ["near_99457: 4 more minutes"])
    assert (p2["management_codes"], p2["flags"]) == (["99470"], [])


# --- flags on the current period ----------------------------------------------------------------------------


@pytest.mark.parametrize(("past_days", "with_today", "flag"), [
    (6, False, "at_risk_99454: needs 10 more days in 10 days left"),  # 6 + 10 = 16: still reachable
    (5, False, None),                                                  # 5 + 10 = 15: out of reach
    (6, True, "at_risk_99454: needs 9 more days in 9 days left"),     # today counted, not left
    (16, False, None),                                                 # already earned
])
def test_at_risk_99454(con, past_days, with_today, flag):
    add_patient(con, "p1")
    start = today(con) - timedelta(days=20)  # day 21 of 30: today and 9 more days left
    add_days(con, "p1", start, past_days)
    if with_today:
        add_reading(con, "p1", datetime.combine(today(con), time(0, 1), tzinfo=UTC))
    p = period(con, "p1")
    assert p["is_current"] and p["period_start"] == start
    assert p["days_left"] == (9 if with_today else 10)
    assert p["at_risk_99454"] == (flag is not None)

    # The current month (the practice's, here UTC's) reports the current period.
    row = billing_report(con, None, ["p1"], practice_tz="UTC")[0]
    assert row["period_no"] == 0 and row["is_current"]
    assert row["flags"] == ([flag] if flag else [])


# --- reporting ----------------------------------------------------------------------------------------------


def test_billing_evidence_lists_the_reading_ids_of_each_counted_day(con):
    add_patient(con, "p1", "America/Chicago")
    day1 = [add_reading(con, "p1", datetime(2026, 3, 1, 14, tzinfo=UTC), offset_min=-360, reading_id="r-b"),
            add_reading(con, "p1", datetime(2026, 3, 2, 5, tzinfo=UTC), offset_min=-360, reading_id="r-a",
                        device_id="scale")]  # 23:00 local on 1 March
    day2 = [add_reading(con, "p1", datetime(2026, 3, 2, 14, tzinfo=UTC), offset_min=-360, reading_id="r-c")]
    add_reading(con, "p1", datetime(2026, 3, 2, 15, tzinfo=UTC), offset_min=-360, manual=True, reading_id="r-m")
    add_reading(con, "p1", datetime(2026, 3, 3, 15, tzinfo=UTC), offset_min=-360, manual=True, reading_id="r-n")
    evidence = billing_evidence(con, "p1", 0)
    assert [(e["local_date"], e["reading_ids"], e["readings"]) for e in evidence] == [
        ("2026-03-01", sorted(day1), 2), ("2026-03-02", day2, 1)]
    assert {(e["period_start"], e["period_end"]) for e in evidence} == {("2026-03-01", "2026-03-30")}
    assert billing_report(con, "2026-03", ["p1"], practice_tz="UTC")[0]["reading_ids_count"] == 3
    assert billing_evidence(con, "p1", 1) == []


def test_report_covers_periods_ending_in_the_month(con):
    add_patient(con, "p1")
    # Period 0 is 31 Jan - 1 Mar, period 1 is 2 - 31 Mar: both end in March.
    add_days(con, "p1", date(2026, 1, 31), 16)
    add_days(con, "p1", date(2026, 3, 2), 3)
    march = billing_report(con, "2026-03", ["p1"], practice_tz="UTC")[0]
    assert [(p["period_no"], p["device_code"]) for p in march["periods"]] == [(0, "99454"), (1, "99445")]
    assert march["device_codes"] == ["99454", "99445"]
    assert (march["period_no"], march["period_start"], march["period_end"]) == (1, "2026-03-02", "2026-03-31")
    assert billing_report(con, "2026-02", ["p1"], practice_tz="UTC")[0]["periods"] == []
    with pytest.raises(ValueError, match="YYYY-MM"):
        billing_report(con, "March", ["p1"], practice_tz="UTC")


def test_report_returns_only_the_requested_patients(con):
    for pid in ("a", "b", "c"):
        add_patient(con, pid)
        add_days(con, pid, START, 16)
        add_interaction(con, pid, 25, datetime(2026, 3, 5, 15, tzinfo=UTC))
    rows = billing_report(con, "2026-03", ["c", "a"], practice_tz="UTC")
    assert [r["patient_id"] for r in rows] == ["c", "a"]
    assert all(r["codes"] == ["99454", "99457"] for r in rows)
    # Ids are parameters, never SQL: a hostile id matches nothing and leaks no one.
    hostile = billing_report(con, "2026-03", ["x' OR '1'='1"], practice_tz="UTC")
    assert [(r["patient_id"], r["periods"], r["codes"]) for r in hostile] == [("x' OR '1'='1", [], [])]
    assert billing_report(con, "2026-03", [], practice_tz="UTC") == []


def test_write_csv_round_trips(con, tmp_path):
    add_patient(con, "p1")
    add_days(con, "p1", START, 16)
    add_interaction(con, "p1", 60, datetime(2026, 3, 5, 15, tzinfo=UTC))
    add_patient(con, "p2")
    add_days(con, "p2", START, 3)
    add_interaction(con, "p2", 17, datetime(2026, 3, 5, 15, tzinfo=UTC), interactive=False)
    rows = billing_report(con, "2026-03", ["p1", "p2"], practice_tz="UTC")
    path = write_csv(rows, tmp_path / "billing.csv")
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["patient_id"] for r in back] == ["p1", "p2"]
    assert back[0]["codes"] == "99454;99457;99458;99458"
    assert back[0]["flags"] == ""
    assert (back[0]["period_start"], back[0]["days_with_data"]) == ("2026-03-01", "16")
    assert back[1]["codes"] == "99445"
    assert back[1]["flags"] == "near_99457: 3 more minutes | needs_interactive_communication"
    assert back[1]["reading_ids_count"] == "3"


def test_views_survive_reconnect(tmp_path):
    s = Settings(home=tmp_path / "var")
    with clinical(s) as c:
        add_patient(c, "p1")
        add_days(c, "p1", START, 2)
    with clinical(s) as c:  # every migration, 040_billing.sql included, runs again on connect
        assert period(c, "p1")["device_code"] == "99445"
