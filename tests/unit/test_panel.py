"""The panel's triage (service/panel.py) and the dashboard's charts (service/charts.py), without a service."""

from __future__ import annotations

import base64
import hashlib
import re
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta

import pytest

from service import charts
from service.panel import build_panel, counts, triage

NOW = datetime(2026, 12, 6, 18, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def patient(pid: str, *, alerts: list[tuple[str, int]] = (), silent_h: float = 2, tir: float | None = None,
            tir_before: float | None = None, tbr70: float = 0.0, tbr54: float = 0.0, days: int = 20,
            days_left: int = 10, minutes: int = 25, interactive: int = 1, family: str = "Doe") -> dict:
    glucose = None if tir is None else {"cgm_readings": 1300, "tir_70_180": tir, "tbr_below_70": tbr70,
                                        "tbr_below_54": tbr54}
    before = None if tir_before is None else {"cgm_readings": 1300, "tir_70_180": tir_before}
    return {"patient_id": pid, "given_name": "A", "family_name": family, "conditions": ["hypertension"],
            "last_reading_at": NOW - timedelta(hours=silent_h),
            "alerts": [{"rule": rule, "severity": sev, "opened_at": NOW - timedelta(hours=n + 1)}
                       for n, (rule, sev) in enumerate(alerts)],
            "glucose": glucose, "glucose_before": before,
            "billing": {"days_with_data": days, "management_minutes": minutes, "interactive_count": interactive,
                        "periods": [{"is_current": True, "days_with_data": days, "days_left": days_left}]}}


def test_each_patient_lands_in_its_most_urgent_category_in_the_tide_order():
    rows = [
        patient("on-track"),
        patient("billing", days=8, days_left=20),
        patient("tir-drop", tir=70, tir_before=90),
        patient("low", tir=80, tbr70=6.0, tir_before=82),
        patient("silent-30h", silent_h=30, alerts=[("no_data_24h", 3)]),
        patient("silent-80h", silent_h=80, alerts=[("no_data_72h", 2), ("no_data_24h", 3)]),
        patient("watch", alerts=[("bp_stage2", 3)]),
        patient("urgent", alerts=[("bp_severe", 1), ("bp_stage2", 3)], silent_h=80, days=3),
    ]
    placed = build_panel(rows, now=NOW)
    assert [(p.patient["patient_id"], p.category.key) for p in placed] == [
        ("urgent", "alert-1"), ("watch", "alert-3"), ("silent-80h", "no-data-72h"), ("silent-30h", "no-data-24h"),
        ("low", "glucose-low"), ("tir-drop", "glucose-tir-drop"), ("billing", "billing"), ("on-track", "on-track")]
    urgent = placed[0]
    assert "no data 72 h" in urgent.flags and "99454 at risk" not in urgent.flags  # 3 + 10 < 16: out of reach
    assert "99454 out of reach" in urgent.flags
    assert counts(placed) == {"alerts": 2, "no-data": 2, "glucose": 2, "billing": 1, "on-track": 1}


def test_the_no_data_rules_are_not_counted_as_clinical_alerts():
    row = triage(patient("p", silent_h=30, alerts=[("no_data_24h", 3)]), NOW)
    assert row.clinical_alerts == [] and row.category.key == "no-data-24h"


@pytest.mark.parametrize(("minutes", "interactive", "days", "todo"), [
    (25, 1, 20, False), (19, 1, 20, True), (25, 0, 20, True), (25, 1, 15, True)])
def test_billing_is_to_do_until_16_device_days_and_20_minutes_with_a_call(minutes, interactive, days, todo):
    row = triage(patient("p", minutes=minutes, interactive=interactive, days=days), NOW)
    assert (row.category.key == "billing") is todo


def test_glucose_flags_need_cgm_data_and_insufficient_data_flags_nothing():
    insufficient = patient("p")
    insufficient["glucose"] = {"cgm_readings": 200, "tir_70_180": None, "tbr_below_70": None,
                               "tbr_below_54": None}
    assert triage(insufficient, NOW).category.key == "on-track"
    assert triage(patient("p", tir=85, tbr54=1.5), NOW).category.key == "glucose-low"
    assert triage(patient("p", tir=80, tir_before=94), NOW).category.key == "on-track"  # -14 points only


def test_filters_and_sorts():
    rows = [patient("b", family="Zed", minutes=5), patient("a", family="Ames", silent_h=100),
            patient("c", family="Moss", alerts=[("fever", 2)])]
    assert [p.patient["patient_id"] for p in build_panel(rows, sort="name", now=NOW)] == ["a", "c", "b"]
    assert [p.patient["patient_id"] for p in build_panel(rows, sort="minutes", now=NOW)] == ["b", "a", "c"]
    assert [p.patient["patient_id"] for p in build_panel(rows, group="billing", now=NOW)] == ["b"]
    assert build_panel(rows, condition="copd", now=NOW) == []


def _readings(n: int, start: datetime, step: timedelta, value: float = 130.0) -> list[dict]:
    return [{"measured_at": start + k * step, "measured_local": (start + k * step).replace(tzinfo=None),
             "value": value + k % 7, "diastolic": 80.0, "unit": "mm[Hg]", "source": None} for k in range(n)]


def test_a_vital_chart_is_static_svg_with_its_thresholds_shaded_and_one_dot_per_value():
    start = datetime(2026, 11, 20, 7, 30, tzinfo=UTC)
    series = {"metric": "blood_pressure", "readings": _readings(30, start, timedelta(hours=12)),
              "thresholds": {"bp_stage2.systolic": 140.0, "bp_severe.systolic": 180.0,
                             "bp_stage2.diastolic": 90.0, "bp_severe.diastolic": 120.0}}
    chart = charts.vital_chart(series, date(2026, 11, 7), date(2026, 12, 6))
    root = ET.fromstring(chart.svg)
    assert chart.points == 60 == len([c for c in root.iter(f"{SVG}circle") if "dot" in c.get("class", "")])
    assert list(root.iter(f"{SVG}script")) == []
    assert all("style" not in el.attrib for el in root.iter())
    bands = [r.get("class") for r in root.iter(f"{SVG}rect") if "band" in (r.get("class") or "")]
    assert bands == ["band warning", "band severe"]
    (style,) = [s.text or "" for s in root.iter(f"{SVG}style")]
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert chart.csp.startswith("default-src 'none'; ") and f"'sha256-{digest}'" in chart.csp
    assert root.get("role") == "img" and "Blood pressure" in root.get("aria-label", "")


def test_a_dense_series_is_drawn_as_each_days_lowest_mean_and_highest():
    start = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)
    series = {"metric": "blood_glucose", "readings": _readings(7 * 96, start, timedelta(minutes=15)),
              "thresholds": {}}
    chart = charts.vital_chart(series, date(2026, 11, 7), date(2026, 12, 6))
    assert chart.points == 3 * 7
    assert re.findall(r"Daily (highest|mean|lowest)", chart.svg)[:3] == ["highest", "mean", "lowest"]


def test_the_glucose_profile_and_time_in_ranges():
    hours = [{"hour": h, "readings": 56, "percentiles": [60.0, 90.0, 120.0, 150.0, 200.0]} for h in range(24)]
    profile = charts.glucose_profile_chart({"hours": hours, "days": 14}, {})
    assert profile.points == 24  # the median's
    tir = charts.time_in_ranges_chart({"tbr_below_54": 1.0, "tbr_below_70": 5.0, "tir_70_180": 80.0,
                                       "tar_above_180": 15.0, "tar_above_250": 3.0})
    root = ET.fromstring(tir.svg)
    legends = [t.text for t in root.iter(f"{SVG}text") if t.text and "%" in t.text and ":" in t.text]
    assert legends == ["Very low < 54: 1 %", "Low 54–69: 4 %", "In range 70–180: 80 %", "High 181–250: 12 %",
                       "Very high > 250: 3 %"]
