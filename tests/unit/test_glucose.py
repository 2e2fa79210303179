"""Consensus CGM metrics (Battelino 2019) over a tmp warehouse with readings inserted directly.

The reference day: one CGM reading every 15 minutes (96), with a known count in each band and the band
edges themselves (54, 70, 180, 250) placed where the consensus puts them; the reference fortnight is 14 of
them, the least data the consensus computes metrics from.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from core.settings import Settings
from rpmctl.views.clinician import render_glucose
from warehouse.db import clinical
from warehouse.glucose import INSUFFICIENT, glucose_summary

END = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)

# 2 below 54 | 4 in 54-69 (54 itself is not "below 54") | 72 in 70-180 inclusive | 12 in 181-250 (250 is not
# "above 250") | 6 above 250.
BAND_DAY = [50] * 2 + [54] + [60] * 3 + [70, 180] + [120] * 70 + [250] + [200] * 11 + [300] * 6


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with clinical(Settings(home=tmp_path / "var")) as c:
        yield c


def insert(con: duckdb.DuckDBPyConnection, patient_id: str, readings: list[tuple[datetime, float]], *,
           source: str | None = "cgm", metric: str = "blood_glucose", prefix: str = "r") -> None:
    """Glucose readings (instant, mg/dL) with every NOT NULL column of ``readings`` filled."""
    loinc = {"cgm": "99504-3", "meter": "41653-7"}.get(source or "", "8867-4")
    unit = "mg/dL" if metric == "blood_glucose" else "/min"
    at = [t for t, _ in readings]
    rows = pd.DataFrame({
        "reading_id": [f"{prefix}-{patient_id}-{i}" for i in range(len(readings))], "patient_id": patient_id,
        "device_id": "dev-1", "metric": metric, "loinc": loinc, "value": [float(v) for _, v in readings],
        "unit": unit, "unit_sent": unit, "source": source, "measured_at": at, "utc_offset_min": -300,
        "received_at": at, "loaded_at": at, "msg_id": [f"m-{prefix}-{i}" for i in range(len(readings))],
        "segment": "seg-1", "record_no": 0, "item_no": range(len(readings))})
    con.register("new_readings", rows)  # one set-based insert: executemany costs ms per row
    con.execute(f"INSERT INTO readings ({', '.join(rows.columns)}) SELECT * FROM new_readings")
    con.unregister("new_readings")


def every(minutes: int, values: list[float], end: datetime = END) -> list[tuple[datetime, float]]:
    """``values`` at ``minutes`` spacing, the last one at ``end``."""
    return [(end - timedelta(minutes=minutes * i), v) for i, v in enumerate(reversed(values))]


METRICS = ("mean_mg_dl", "sd_mg_dl", "gmi_percent", "cv_percent", "tir_70_180", "tbr_below_70", "tbr_below_54",
           "tar_above_180", "tar_above_250")


def test_band_fortnight_percentages_gmi_and_cv(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "pat-1", every(15, BAND_DAY * 14))
    g = glucose_summary(con, "pat-1", end=END)
    assert g is not None
    assert (g["readings"], g["source"], g["start"], g["end"]) == (14 * 96, "cgm", END - timedelta(days=14), END)
    assert (g["sufficient_data"], g["status"], g["insufficient_reason"], g["cgm_days"]) == (True, "ok", None, 14)
    # Hand-computed: 2/96, 6/96, 72/96, 18/96, 6/96.
    assert g["tbr_below_54"] == 2.08
    assert g["tbr_below_70"] == 6.25      # includes the two below 54
    assert g["tir_70_180"] == 75.0
    assert g["tar_above_180"] == 18.75    # includes the six above 250
    assert g["tar_above_250"] == 6.25
    assert g["tbr_below_70"] + g["tir_70_180"] + g["tar_above_180"] == 100.0
    # sum 13234 / 96 = 137.854..; GMI 3.31 + 0.02392 x 137.854 = 6.6075; population SD 54.2135 -> CV 39.33 %.
    assert g["mean_mg_dl"] == 137.9
    assert g["gmi_percent"] == 6.61
    assert g["sd_mg_dl"] == round(statistics.pstdev(BAND_DAY), 1) == 54.2
    cv = 100 * statistics.pstdev(BAND_DAY) / statistics.fmean(BAND_DAY)
    assert g["cv_percent"] == round(cv, 2) == 39.33
    # Every 15 min for 14 days is all the readings the window can hold.
    assert (g["sampling_interval_min"], g["percent_expected_readings"]) == (15.0, 100.0)
    assert g["targets_met"] == {"tir_70_180": True, "tbr_below_70": False, "tbr_below_54": False,
                                "tar_above_180": True, "tar_above_250": False, "cv_percent": False,
                                "percent_expected_readings": True}


def test_a_complete_day_is_insufficient_whatever_its_wear(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "pat-1", every(15, BAND_DAY))
    g = glucose_summary(con, "pat-1", days=1, end=END)
    assert g is not None and g["percent_expected_readings"] == 100.0
    assert (g["sufficient_data"], g["status"]) == (False, INSUFFICIENT)
    assert g["insufficient_reason"] == "a 1-day window: the consensus needs >= 14 days"
    assert all(g[m] is None for m in METRICS)


def test_one_day_in_a_14_day_window_is_insufficient(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "pat-1", every(15, BAND_DAY))
    g = glucose_summary(con, "pat-1", end=END)
    assert g is not None and g["days"] == 14
    assert g["percent_expected_readings"] == round(100 * 96 / (14 * 96), 2) == 7.14
    assert (g["sufficient_data"], g["status"], g["cgm_days"]) == (False, INSUFFICIENT, 1)
    assert g["insufficient_reason"] == ("CGM worn 7 % of the window (readings on 1 of 14 days): the consensus "
                                        "needs >= 70 %")
    # No GMI, no time in ranges, no verdict on them from one day: only the wear is judged.
    assert all(g[m] is None for m in METRICS)
    assert g["targets_met"] == {"percent_expected_readings": False}


@pytest.mark.parametrize(("keep_of_4", "sufficient"), [(3, True), (2, False)])
def test_sufficient_data_needs_70_percent_of_14_days(con: duckdb.DuckDBPyConnection, keep_of_4: int,
                                                     sufficient: bool) -> None:
    # 14 days every 15 min = 1344 slots; keep 3 of 4 (75 %) or 2 of 4 (50 %): most gaps stay 15 min, so the
    # inferred sampling interval does too.
    slots = [(END - timedelta(minutes=15 * i), 110.0) for i in range(14 * 96)]
    kept = [s for i, s in enumerate(slots) if i % 4 < keep_of_4]
    insert(con, "pat-1", kept)
    g = glucose_summary(con, "pat-1", end=END)
    assert g is not None
    assert g["sufficient_data"] is sufficient
    assert (g["gmi_percent"] is not None) is sufficient
    if sufficient:
        assert (g["sampling_interval_min"], g["percent_expected_readings"]) == (15.0, 75.0)
        assert all(g["targets_met"].values())


def test_meter_readings_give_no_gmi_and_no_time_in_range(con: duckdb.DuckDBPyConnection) -> None:
    """Regression: one fingerstick of 190 mg/dL gave a GMI of 7.9 % and 0 % in range."""
    insert(con, "one", [(END - timedelta(hours=1), 190.0)], source="meter")
    fingersticks = [(END - timedelta(days=d, hours=h), v) for d in range(14) for h, v in
                    [(1, 95.0), (6, 160.0), (11, 190.0), (16, 65.0)]]
    insert(con, "many", fingersticks, source="meter")
    for patient_id, n in (("one", 1), ("many", 56)):
        g = glucose_summary(con, patient_id, end=END)
        assert g is not None
        assert (g["readings"], g["meter_readings"], g["source"]) == (n, n, "meter")
        assert (g["sufficient_data"], g["status"]) == (False, INSUFFICIENT)
        assert g["insufficient_reason"] == f"no CGM readings in the window ({n} meter readings)"
        assert all(g[m] is None for m in METRICS)
        assert g["percent_expected_readings"] is None and g["sampling_interval_min"] is None
        assert g["targets_met"] == {}


def test_metrics_are_of_the_cgm_readings_only(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "pat-1", every(15, BAND_DAY * 14))
    insert(con, "pat-1", [(END - timedelta(minutes=7), 40.0)], source="meter", prefix="fs")
    g = glucose_summary(con, "pat-1", end=END)
    assert g is not None
    assert (g["readings"], g["cgm_readings"], g["meter_readings"], g["source"]) == (1345, 1344, 1, "mixed")
    assert (g["sampling_interval_min"], g["percent_expected_readings"]) == (15.0, 100.0)
    # The fingerstick at 40 would add a reading below 54 and move the mean: it does neither.
    assert (g["tbr_below_54"], g["tir_70_180"], g["mean_mg_dl"]) == (2.08, 75.0, 137.9)


def test_window_excludes_older_later_other_patients_and_metrics(con: duckdb.DuckDBPyConnection) -> None:
    start = END - timedelta(days=14)
    insert(con, "pat-1", [(END, 100.0), (start + timedelta(seconds=1), 200.0)])
    outside = [start, END - timedelta(days=20), END + timedelta(seconds=1)]  # the window is (start, end]
    insert(con, "pat-1", [(at, 40.0) for at in outside], prefix="out")
    insert(con, "pat-2", [(END, 40.0)])
    insert(con, "pat-1", [(END, 40.0)], source=None, metric="heart_rate", prefix="hr")
    g = glucose_summary(con, "pat-1", end=END)
    assert g is not None
    assert (g["readings"], g["cgm_readings"], g["cgm_days"]) == (2, 2, 2)


def test_end_defaults_to_now(con: duckdb.DuckDBPyConnection) -> None:
    now = datetime.now(UTC)
    insert(con, "pat-1", [(now - timedelta(hours=1), 100.0), (now - timedelta(days=15), 300.0)])
    g = glucose_summary(con, "pat-1")
    assert g is not None and g["readings"] == 1
    assert now <= g["end"] <= datetime.now(UTC)


def test_no_glucose_readings_is_none(con: duckdb.DuckDBPyConnection) -> None:
    assert glucose_summary(con, "pat-1", end=END) is None
    insert(con, "pat-1", [(END, 72.0)], source=None, metric="heart_rate")
    insert(con, "pat-1", [(END - timedelta(days=30), 100.0)], prefix="old")
    assert glucose_summary(con, "pat-1", end=END) is None


def test_render_aligns_values_and_shows_verdicts(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "pat-1", every(15, BAND_DAY * 14))
    text = render_glucose(glucose_summary(con, "pat-1", end=END))
    lines = text.splitlines()
    assert "1344 readings (cgm)" in lines[0]
    tir = next(line for line in lines if line.lstrip().startswith("TIR 70-180"))
    assert "75.0" in tir and "target > 70" in tir and tir.endswith("met")
    assert next(line for line in lines if "TBR <54" in line).endswith("NOT MET")
    # Values right-aligned in one column, units after them.
    for line in lines[1:-1]:
        float(line[20:27])
        assert line[27] == " " and line[28:].split()[0] in {"%", "mg/dL"}
    assert render_glucose(None) == "glucose: no readings in the window"


def test_render_says_insufficient_cgm_data_instead_of_metrics(con: duckdb.DuckDBPyConnection) -> None:
    insert(con, "pat-1", every(15, BAND_DAY))
    text = render_glucose(glucose_summary(con, "pat-1", end=END))
    assert "insufficient CGM data: CGM worn 7 % of the window" in text
    assert "readings captured" in text and "NOT MET" in text
    assert not any(label in text for label in ("GMI", "TIR", "mean"))
