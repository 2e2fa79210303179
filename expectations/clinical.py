"""The clinical readings suite: what a reading must satisfy before it may reach a clinician's chart.

Each rule is one Great Expectations expectation, named (``meta.rule``) for what it protects. Validation runs
on a pandas DataFrame of candidate rows (GX cannot validate DuckDB over SQLAlchemy) with
``result_format=COMPLETE`` keyed by ``row_key``, so every failing row comes back with every rule it broke —
that list is what goes to quarantine. Only row keys are read from the result; the values GX echoes back
(PHI) are never stored or logged.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from typing import Any

from transforms.vocab import ACCEPTED_UNIT_KEYS, DIASTOLIC_PLAUSIBLE, GLUCOSE_SOURCES, METRICS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no usage statistics leave the machine

SUITE_NAME = "clinical_readings"
INDEX_COLUMN = "row_key"


@dataclass(frozen=True)
class Rule:
    name: str
    protects: str
    expectation: str
    kwargs: dict[str, Any]


def _bp(cond: str = "") -> str:
    return 'metric=="blood_pressure"' + cond


def rules(future_skew_s: int) -> list[Rule]:
    """The suite as reviewable data: rule name, what it protects, GX expectation and its arguments."""
    r = [
        Rule("msg_id_present", "devices must label each message so retries can be traced",
             "ExpectColumnValuesToNotBeNull", {"column": "msg_id"}),
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


@cache
def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = ctx.data_sources.add_pandas("rpm").add_dataframe_asset("candidate_readings")
    asset.add_batch_definition_whole_dataframe("batch")
    return ctx


@cache
def build_suite(future_skew_s: int) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=f"{SUITE_NAME}_{future_skew_s}")
    for rule in rules(future_skew_s):
        cls = getattr(gxe, rule.expectation)
        suite.add_expectation(cls(**rule.kwargs, meta={"rule": rule.name, "protects": rule.protects}))
    return _context().suites.add(suite)


def validate(df: Any, future_skew_s: int) -> dict[str, list[str]]:
    """Rules each failing row broke, by row key. Raises if GX could not evaluate a rule (never passes)."""
    if df.empty:
        return {}
    frame = df.assign(metric_is_known=df["metric"].isin(list(METRICS)))
    batch = (_context().data_sources.get("rpm").get_asset("candidate_readings")
             .get_batch_definition("batch").get_batch(batch_parameters={"dataframe": frame}))
    result = batch.validate(build_suite(future_skew_s), result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": [INDEX_COLUMN],
        "return_unexpected_index_query": False, "partial_unexpected_count": 0,
    })
    failures: dict[str, list[str]] = defaultdict(list)
    for r in result.results:
        rule = r.expectation_config.meta["rule"]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"validation rule {rule} could not be evaluated: "
                               f"{r.exception_info.get('exception_message')}")
        if r.success:
            continue
        ids = r.result.get("unexpected_index_list")
        if ids is None:
            raise RuntimeError(f"validation rule {rule} failed without naming the failing rows")
        for entry in ids:
            failures[entry[INDEX_COLUMN]].append(rule)
    return dict(failures)
