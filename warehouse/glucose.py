"""Glucose summary of one patient over a window: the international consensus CGM metrics and their targets.

Sources: Battelino T et al., "Clinical Targets for Continuous Glucose Monitoring Data Interpretation:
Recommendations From the International Consensus on Time in Range", Diabetes Care 2019;42:1593-1603; and
Bergenstal RM et al., "Glucose Management Indicator (GMI)", Diabetes Care 2018;41:2275-2280.
Time in ranges is the share of *CGM readings* in each band (they are evenly spaced, so this is the share of
time); the two lower bands nest (<70 includes <54) and so do the two upper ones (>180 includes >250).
The metrics, GMI included, are CGM metrics: they are given only when the window holds sufficient CGM data
(>= 14 days, >= 70 % of the possible readings), never from meter readings — a GMI from a few fingersticks
would read like an A1C and mean nothing. Otherwise the summary says "insufficient CGM data" and why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from transforms.vocab import CGM_LOINC

# Glycaemic bands in mg/dL (consensus 2019): in range is 70-180 inclusive; level 1 / level 2 hypoglycaemia
# are <70 / <54, level 1 / level 2 hyperglycaemia are >180 / >250.
RANGE_LOW_MG_DL = 70.0
RANGE_HIGH_MG_DL = 180.0
VERY_LOW_MG_DL = 54.0
VERY_HIGH_MG_DL = 250.0

# GMI (%) = 3.31 + 0.02392 x mean glucose in mg/dL (Bergenstal 2018): the A1C-like estimate from CGM.
GMI_INTERCEPT = 3.31
GMI_SLOPE_PER_MG_DL = 0.02392

# Consensus targets for most adults with type 1 or type 2 diabetes (older or high-risk adults have looser
# ones: TIR > 50 %, TBR<70 < 1 %; pregnancy uses 63-140 mg/dL). Glycaemic variability: %CV <= 36 %.
TARGET_TIR_MIN = 70.0               # > 70 % of readings in 70-180
TARGET_TBR_70_MAX = 4.0             # < 4 % below 70 (includes below 54)
TARGET_TBR_54_MAX = 1.0             # < 1 % below 54
TARGET_TAR_180_MAX = 25.0           # < 25 % above 180 (includes above 250)
TARGET_TAR_250_MAX = 5.0            # < 5 % above 250
TARGET_CV_MAX = 36.0                # <= 36 %
# Sufficient data: >= 70 % of the possible CGM readings over >= 14 days.
TARGET_EXPECTED_READINGS_MIN = 70.0
SUFFICIENT_DAYS = 14
INSUFFICIENT = "insufficient CGM data"

TARGETS: dict[str, tuple[str, float]] = {
    "tir_70_180": (">", TARGET_TIR_MIN),
    "tbr_below_70": ("<", TARGET_TBR_70_MAX),
    "tbr_below_54": ("<", TARGET_TBR_54_MAX),
    "tar_above_180": ("<", TARGET_TAR_180_MAX),
    "tar_above_250": ("<", TARGET_TAR_250_MAX),
    "cv_percent": ("<=", TARGET_CV_MAX),
    "percent_expected_readings": (">=", TARGET_EXPECTED_READINGS_MIN),
}
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}

# One pass over the window's readings. A reading without a source is classified by its LOINC (the CGM code,
# else a meter). Every metric is of the CGM readings only. The sampling interval is the median gap between
# consecutive CGM readings (gaps of zero, two devices reporting the same instant, say nothing about the
# interval); cgm_days counts the window's days (back from its end) with a CGM reading.
_SUMMARY_SQL = """
WITH w AS (
    SELECT value, epoch(measured_at) AS t,
           coalesce(source, CASE WHEN loinc = $cgm_loinc THEN 'cgm' ELSE 'meter' END) = 'cgm' AS cgm
    FROM readings
    WHERE patient_id = $patient_id AND metric = 'blood_glucose'
      AND measured_at > $start AND measured_at <= $end
),
cgm_gaps AS (
    SELECT t - lag(t) OVER (ORDER BY t) AS gap_s FROM w WHERE cgm
)
SELECT
    count(*)                                                                             AS n,
    count(*) FILTER (WHERE cgm)                                                          AS n_cgm,
    count(*) FILTER (WHERE NOT cgm)                                                      AS n_meter,
    count(DISTINCT floor((epoch($end) - t) / 86400)) FILTER (WHERE cgm)                  AS cgm_days,
    avg(value) FILTER (WHERE cgm)                                                        AS mean,
    stddev_pop(value) FILTER (WHERE cgm)                                                 AS sd,
    100.0 * count(*) FILTER (WHERE cgm AND value >= $low AND value <= $high) / nullif(n_cgm, 0) AS tir,
    100.0 * count(*) FILTER (WHERE cgm AND value < $low) / nullif(n_cgm, 0)              AS tbr_70,
    100.0 * count(*) FILTER (WHERE cgm AND value < $very_low) / nullif(n_cgm, 0)         AS tbr_54,
    100.0 * count(*) FILTER (WHERE cgm AND value > $high) / nullif(n_cgm, 0)             AS tar_180,
    100.0 * count(*) FILTER (WHERE cgm AND value > $very_high) / nullif(n_cgm, 0)        AS tar_250,
    (SELECT median(gap_s) FROM cgm_gaps WHERE gap_s > 0)                                 AS interval_s
FROM w
"""


def glucose_summary(con: duckdb.DuckDBPyConnection, patient_id: str, days: int = SUFFICIENT_DAYS,
                    end: datetime | None = None) -> dict[str, Any] | None:
    """Consensus CGM metrics of ``patient_id`` over the ``days`` before ``end`` (default now); None if the
    window holds no glucose reading.

    The window is (end - days, end]; a naive ``end`` is UTC. ``percent_expected_readings`` (CGM wear) counts
    CGM readings against window minutes / sampling interval (capped at 100); None without CGM data. Only
    when the data are sufficient (``sufficient_data``: >= 14 days, >= 70 % wear) are the glycaemic metrics
    (mean, SD, GMI, CV, time in ranges) given and judged against their targets, percentages rounded to 2
    decimals and judged unrounded; otherwise they are None, ``status`` is "insufficient CGM data" and
    ``insufficient_reason`` says what is missing. ``cv_percent`` uses the population SD.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, not {days}")
    end = end or datetime.now(UTC)
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    start = end - timedelta(days=days)
    row = con.execute(_SUMMARY_SQL, {
        "cgm_loinc": CGM_LOINC, "patient_id": patient_id, "start": start, "end": end,
        "low": RANGE_LOW_MG_DL, "high": RANGE_HIGH_MG_DL, "very_low": VERY_LOW_MG_DL,
        "very_high": VERY_HIGH_MG_DL,
    }).fetchone()
    assert row is not None  # an aggregate always returns one row
    n, n_cgm, n_meter, cgm_days, mean, sd, tir, tbr_70, tbr_54, tar_180, tar_250, interval_s = row
    if not n:
        return None

    percent_expected = None
    interval_min = None
    if n_cgm and interval_s:
        interval_min = interval_s / 60.0
        expected = days * 24 * 60 / interval_min
        percent_expected = min(100.0, 100.0 * n_cgm / expected)
    reason = _insufficiency(n_cgm, n_meter, days, cgm_days, percent_expected)
    summary: dict[str, Any] = {
        "patient_id": patient_id,
        "readings": n,
        "cgm_readings": n_cgm,
        "meter_readings": n_meter,
        "source": "cgm" if not n_meter else "meter" if not n_cgm else "mixed",
        "start": start,
        "end": end,
        "days": days,
        "cgm_days": cgm_days,
        "sampling_interval_min": _round(interval_min),
        "percent_expected_readings": _round(percent_expected),
        "sufficient_data": reason is None,
        "status": "ok" if reason is None else INSUFFICIENT,
        "insufficient_reason": reason,
        **dict.fromkeys(("mean_mg_dl", "sd_mg_dl", "gmi_percent", "cv_percent", "tir_70_180", "tbr_below_70",
                         "tbr_below_54", "tar_above_180", "tar_above_250")),
        # Without sufficient data only the wear itself is judged (it is what falls short).
        "targets_met": {} if percent_expected is None else {
            "percent_expected_readings": percent_expected >= TARGET_EXPECTED_READINGS_MIN},
    }
    if reason is not None:
        return summary

    cv = 100.0 * sd / mean if mean else None
    values: dict[str, float | None] = {
        "tir_70_180": tir, "tbr_below_70": tbr_70, "tbr_below_54": tbr_54, "tar_above_180": tar_180,
        "tar_above_250": tar_250, "cv_percent": cv, "percent_expected_readings": percent_expected,
    }
    summary |= {
        "mean_mg_dl": round(mean, 1),
        "sd_mg_dl": round(sd, 1),
        "gmi_percent": round(GMI_INTERCEPT + GMI_SLOPE_PER_MG_DL * mean, 2),
        "cv_percent": _round(cv),
        "tir_70_180": _round(tir),
        "tbr_below_70": _round(tbr_70),
        "tbr_below_54": _round(tbr_54),
        "tar_above_180": _round(tar_180),
        "tar_above_250": _round(tar_250),
        "targets_met": {name: _OPS[op](values[name], limit)  # type: ignore[arg-type]
                        for name, (op, limit) in TARGETS.items() if values[name] is not None},
    }
    return summary


def _insufficiency(n_cgm: int, n_meter: int, days: int, cgm_days: int,
                   percent_expected: float | None) -> str | None:
    """Why the window's CGM data fall short of the consensus (>= 14 days, >= 70 % wear); None if they do not."""
    if not n_cgm:
        return f"no CGM readings in the window ({n_meter} meter readings)"
    if percent_expected is None:
        return "too few CGM readings to tell the sensor's interval"
    if days < SUFFICIENT_DAYS:
        return f"a {days}-day window: the consensus needs >= {SUFFICIENT_DAYS} days"
    if percent_expected < TARGET_EXPECTED_READINGS_MIN:
        return (f"CGM worn {percent_expected:.0f} % of the window (readings on {cgm_days} of {days} days): the "
                f"consensus needs >= {TARGET_EXPECTED_READINGS_MIN:g} %")
    return None


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
