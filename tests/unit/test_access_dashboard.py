"""The dashboard's reads (warehouse/access.py): the panel, a vital's chart series with the patient's
thresholds, the glucose profile — each scoped to the care team and audited once.

dr-a cares for p1 (blood pressure, a stage-2 alert, a lowered severe threshold) and p2 (two days of CGM
every 15 minutes); dr-b for p3.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from core.settings import Settings
from transforms.vocab import CGM_LOINC
from warehouse import patient_days, registry
from warehouse.access import AccessDenied, ClinicianSession
from warehouse.alerts import refresh_alerts
from warehouse.audit import AuditLog
from warehouse.db import clinical
from warehouse.serving import publish_snapshot

H = timedelta(hours=1)


@pytest.fixture
def ward(settings: Settings, insert_reading) -> Settings:
    now = datetime.now(UTC).replace(microsecond=0)
    with clinical(settings) as con:
        registry.upsert_patient(con, "p1", mrn="MRN-1", time_zone="America/Chicago", conditions=["hypertension"])
        registry.upsert_patient(con, "p2", mrn="MRN-2", time_zone="UTC", conditions=["diabetes"])
        registry.upsert_patient(con, "p3", mrn="MRN-3")
        registry.add_clinician(con, "dr-a")
        registry.add_clinician(con, "dr-b")
        for clinician, patient in (("dr-a", "p1"), ("dr-a", "p2"), ("dr-b", "p3")):
            registry.assign(con, clinician, patient)
        registry.set_threshold(con, "p1", "bp_severe.systolic", 170, "dr-a")
        for n in range(4):
            insert_reading(con, "p1", "blood_pressure", 120 + 10 * n, now - (4 - n) * H, diastolic=85)
        start = (now - timedelta(days=2)).replace(minute=0, second=0)  # on the hour: 4 readings an hour
        for k in range(2 * 96):
            insert_reading(con, "p2", "blood_glucose", 60 if k % 96 < 8 else 140, start + k * timedelta(minutes=15),
                           rollup=False)
        con.execute("UPDATE readings SET source = 'cgm', loinc = ? WHERE patient_id = 'p2'", [CGM_LOINC])
        patient_days.rebuild(con, ["p2"])
        insert_reading(con, "p3", "heart_rate", 70, now - H)
        refresh_alerts(con)
        publish_snapshot(settings, con)
    return settings


def last_record(s: Settings) -> dict:
    return AuditLog(s).records()[-1]


def test_the_panel_holds_what_triage_weighs_for_the_care_team_only(ward):
    rows = {r["patient_id"]: r for r in ClinicianSession(ward, "dr-a", via="web").panel()}
    assert set(rows) == {"p1", "p2"}
    assert [a["rule"] for a in rows["p1"]["alerts"]] == ["bp_stage2"]
    assert rows["p1"]["glucose"] is None and rows["p2"]["glucose"]["cgm_readings"] == 2 * 96
    assert rows["p2"]["glucose_before"] is None  # nothing in the 14 days before
    assert rows["p1"]["billing"]["patient_id"] == "p1" and rows["p1"]["last_reading_at"] is not None
    r = last_record(ward)
    assert (r["actor"], r["action"], r["patients"], r["rows"], r["query"]["via"]) == (
        "dr-a", "panel", ["p1", "p2"], 2, "web")


def test_a_vital_series_carries_local_times_and_the_patients_own_thresholds(ward):
    series = ClinicianSession(ward, "dr-a").vital_series("p1", "blood_pressure")
    assert [r["value"] for r in series["readings"]] == [120, 130, 140, 150]
    first = series["readings"][0]
    assert first["measured_local"] == first["measured_at"].astimezone(ZoneInfo("America/Chicago")).replace(
        tzinfo=None)
    assert series["thresholds"] == {"bp_severe.systolic": 170, "bp_severe.diastolic": 120,
                                    "bp_stage2.systolic": 140, "bp_stage2.diastolic": 90}
    r = last_record(ward)
    assert (r["action"], r["patients"], r["rows"], r["query"]["metric"]) == ("chart", ["p1"], 4, "blood_pressure")
    with pytest.raises(KeyError):
        ClinicianSession(ward, "dr-a").vital_series("p1", "not_a_metric")


@pytest.mark.parametrize("call", [lambda s: s.vital_series("p3", "heart_rate"),
                                  lambda s: s.glucose_profile("p3")])
def test_charts_of_another_teams_patient_are_refused_and_audited(ward, call):
    with pytest.raises(AccessDenied):
        call(ClinicianSession(ward, "dr-a"))
    r = last_record(ward)
    assert (r["actor"], r["action"], r["patients"], r["outcome"]) == ("dr-a", "chart", ["p3"],
                                                                      "denied: not on care team")


def test_the_glucose_profile_has_percentiles_for_each_hour_of_the_day(ward):
    profile = ClinicianSession(ward, "dr-a").glucose_profile("p2")
    hours = {h["hour"]: h for h in profile["hours"]}
    assert len(hours) == 24 and all(h["readings"] == 8 for h in hours.values())
    assert [len(h["percentiles"]) for h in hours.values()] == [5] * 24
    lows = [h for h in hours.values() if h["percentiles"][2] == 60]
    assert len(lows) == 2  # each day's first two hours of readings run low
    assert profile["thresholds"]["glucose_level1_low.mg_dl"] == 70
    assert last_record(ward)["rows"] == 2 * 96


def test_the_patient_view_summarises_glucose_only_from_the_last_14_days(ward, insert_reading):
    """The view's CGM summary covers its 14-day window: a wearer gets it, a patient with no glucose gets none,
    and one whose last glucose reading is older than the window gets none either."""
    with clinical(ward) as con:
        insert_reading(con, "p1", "blood_glucose", 150, datetime.now(UTC) - timedelta(days=20))
        publish_snapshot(ward, con)
    session = ClinicianSession(ward, "dr-a")
    assert session.patient("p2")["glucose"]["cgm_readings"] == 2 * 96
    assert session.patient("p1")["glucose"] is None
    assert [r["metric"] for r in session.patient("p1")["latest"]] == ["blood_glucose", "blood_pressure"]
    assert ClinicianSession(ward, "dr-b").patient("p3")["glucose"] is None
