"""The clinical readings suite: what a reading must satisfy before it may reach a clinician's chart.

Each rule is one Great Expectations expectation, named (``meta.rule``) for what it protects. Validation runs
on a pandas DataFrame of candidate rows (GX cannot validate DuckDB over SQLAlchemy) with
``result_format=COMPLETE`` keyed by ``row_key``, so every failing row comes back with every rule it broke —
that list is what goes to quarantine. Only row keys are read from the result; the values GX echoes back
(PHI) are never stored or logged.
"""

from __future__ import annotations

from typing import Any

from expectations.suite import Rule, run_suite
from transforms.vocab import (
    ACCEPTED_UNIT_KEYS,
    DIASTOLIC_PLAUSIBLE,
    GLUCOSE_SOURCES,
    MEASURABLE_KIND_METRICS,
    METRICS,
    kind_metric,
)

SUITE_NAME = "clinical_readings"


def _bp(cond: str = "") -> str:
    return 'metric=="blood_pressure"' + cond


def rules(future_skew_s: int) -> list[Rule]:
    """The suite as reviewable data: rule name, what it protects, GX expectation and its arguments."""
    r = [
        Rule("msg_id_present", "devices must label each message so retries can be traced",
             "ExpectColumnValuesToNotBeNull", {"column": "msg_id"}),
        Rule("optional_fields_typed", "a mistyped optional field (\"manual\": \"true\") must not be dropped "
             "silently: it would change billing or coding", "ExpectColumnValuesToBeNull", {"column": "mistyped"}),
        Rule("metric_present", "a reading must say what was measured",
             "ExpectColumnValuesToNotBeNull", {"column": "metric"}),
        Rule("metric_known", "only vitals of contract v1 reach the chart",
             "ExpectColumnValuesToBeInSet", {"column": "metric", "value_set": sorted(METRICS)}),
        Rule("unit_accepted_for_metric", "a value is only meaningful in a unit we can convert exactly",
             "ExpectColumnValuesToBeInSet",
             {"column": "unit_key", "value_set": ACCEPTED_UNIT_KEYS,
              "row_condition": "metric_is_known==True", "condition_parser": "pandas"}),
        Rule("value_is_number", "the value must be a finite JSON number (not text, NaN or Infinity)",
             "ExpectColumnValuesToNotBeNull", {"column": "value_sent"}),
        Rule("diastolic_is_number", "a blood pressure needs both systolic and diastolic numbers",
             "ExpectColumnValuesToNotBeNull",
             {"column": "diastolic_sent", "row_condition": _bp(), "condition_parser": "pandas"}),
        Rule("measured_at_rfc3339_with_offset", "a time without its UTC offset cannot be placed on a day",
             "ExpectColumnValuesToNotBeNull", {"column": "measured_at"}),
        Rule("measured_not_in_future", "a device clock running ahead must not write tomorrow's vitals",
             "ExpectColumnValuesToBeBetween", {"column": "seconds_ahead", "max_value": future_skew_s}),
        Rule("device_enrolled_at_measured_time",
             "a reading belongs to the patient the device was enrolled to when it was measured",
             "ExpectColumnValuesToNotBeNull",
             {"column": "patient_id", "row_condition": "has_time==True", "condition_parser": "pandas"}),
        Rule("metric_measurable_by_device_kind",
             "a device reports only what its kind measures (transforms/vocab.py SOURCE_KINDS): a cuff's glucose "
             "or a scale's SpO2 must not reach a chart, count for billing or raise an alert",
             "ExpectColumnValuesToBeInSet",
             {"column": "kind_metric", "value_set": MEASURABLE_KIND_METRICS,  # unknown devices: enrollment rule
              "row_condition": "metric_is_known==True and device_known==True", "condition_parser": "pandas"}),
        Rule("glucose_source_known", "meter and CGM glucose are coded differently",
             "ExpectColumnValuesToBeInSet",
             {"column": "source", "value_set": list(GLUCOSE_SOURCES),
              "row_condition": 'metric=="blood_glucose"', "condition_parser": "pandas"}),
        Rule("plausible_diastolic", "physiologically possible diastolic pressure (mm[Hg])",
             "ExpectColumnValuesToBeBetween",
             {"column": "diastolic", "min_value": DIASTOLIC_PLAUSIBLE[0], "max_value": DIASTOLIC_PLAUSIBLE[1],
              "row_condition": _bp(), "condition_parser": "pandas"}),
        Rule("systolic_above_diastolic", "systolic below diastolic means swapped or corrupt values",
             "ExpectColumnPairValuesAToBeGreaterThanB",
             {"column_A": "value", "column_B": "diastolic", "ignore_row_if": "either_value_is_missing",
              "row_condition": _bp(), "condition_parser": "pandas"}),
    ]
    for m in METRICS.values():
        lo, hi = m.plausible
        r.append(Rule(f"plausible_{m.name}", f"physiologically possible {m.name} ({m.canonical_unit})",
                      "ExpectColumnValuesToBeBetween",
                      {"column": "value", "min_value": lo, "max_value": hi,
                       "row_condition": f'metric=="{m.name}"', "condition_parser": "pandas"}))
    return r


# The derived columns the rules read, in SQL over a staged row and its ``device_kind`` (as kind_metric()
# builds them), so the quality gate fetches them ready instead of building them row by row in Python.
DERIVED_SQL = {
    "metric_is_known": "coalesce(metric IN (" + ", ".join(f"'{m}'" for m in sorted(METRICS)) + "), false)",
    "device_known": "device_kind IS NOT NULL",
    "kind_metric": "coalesce(device_kind, 'None') || '|' || coalesce(metric, 'None')",
}


def validate(df: Any, future_skew_s: int) -> dict[str, list[str]]:
    """Rules each failing row broke, by row key. Raises if GX could not evaluate a rule (never passes).

    ``df`` holds the staged columns the rules read plus ``device_kind``: the registry's kind of the sending
    device, "" for a registered device without one, null for a device the registry does not know (whose
    readings fail device_enrolled_at_measured_time instead). The columns of DERIVED_SQL are built here unless
    ``df`` already has them (the quality gate fetches them from DuckDB)."""
    if df.empty:
        return {}
    frame = df if set(DERIVED_SQL) <= set(df.columns) else df.assign(
        metric_is_known=df["metric"].isin(list(METRICS)), device_known=df["device_kind"].notna(),
        kind_metric=[kind_metric(k, m) for k, m in zip(df["device_kind"], df["metric"], strict=True)])
    return run_suite(frame, f"{SUITE_NAME}_{future_skew_s}", rules(future_skew_s))
