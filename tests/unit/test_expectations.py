"""The clinical readings suite, run on a passing batch and on one failing batch per rule.

Frames are built the way the pipeline builds them (transforms/stage.py, then expectations/gate.py reading
``stg_candidates`` back): candidate rows from ``transforms.normalise.candidate``, a ``patient_id`` column,
and UTC datetimes. Each failing batch is the valid rows plus one row that breaks exactly one rule.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest

from expectations.clinical import DERIVED_SQL, rules, validate
from transforms.normalise import CANDIDATE_COLUMNS, candidate
from transforms.vocab import METRICS, kind_metric

RECEIVED = datetime(2026, 11, 27, 13, 5, tzinfo=UTC)
MEASURED = RECEIVED - timedelta(minutes=5)
SKEW_S = 300
PATIENT = "pat-1"
FAIL_KEY = "seg:99:0"
NOT_ENROLLED = object()  # marker: the row's device had no enrollment at the measured time
KIND_OF = {"blood_pressure": "bp", "heart_rate": "ox", "spo2": "ox", "respiratory_rate": "ox",
           "body_temperature": "thermo", "body_weight": "scale", "blood_glucose": "glu"}
NO_DEVICE = "<not in the registry>"  # marker: the sending device is unknown (its kind is null)

# rule -> (kind of valid reading, fields that break exactly that rule).
FAILING: dict[str, tuple[str, dict[str, Any]]] = {
    "msg_id_present": ("heart_rate", {"msg_id": None}),
    "optional_fields_typed": ("heart_rate", {"manual": "true"}),   # a string, not a boolean
    "metric_present": ("heart_rate", {"metric": None}),
    "metric_known": ("heart_rate", {"metric": "cholesterol"}),
    "unit_accepted_for_metric": ("heart_rate", {"unit": "bpm"}),
    "value_is_number": ("heart_rate", {"value": "72"}),
    "diastolic_is_number": ("blood_pressure", {"values": {"systolic": 120}}),
    "measured_at_rfc3339_with_offset": ("heart_rate", {"measured_at": "2026-11-27T13:00:00"}),
    "measured_not_in_future": ("heart_rate", {"measured_at": RECEIVED + timedelta(seconds=SKEW_S + 1)}),
    "device_enrolled_at_measured_time": ("heart_rate", {"patient": NOT_ENROLLED}),
    "glucose_source_known": ("blood_glucose", {"source": "strip"}),
    "metric_measurable_by_device_kind": ("blood_glucose", {"device_kind": "bp"}),  # a cuff sending glucose
    "plausible_diastolic": ("blood_pressure", {"values": {"systolic": 120, "diastolic": 10}}),
    "systolic_above_diastolic": ("blood_pressure", {"values": {"systolic": 80, "diastolic": 95}}),
    "plausible_blood_pressure": ("blood_pressure", {"values": {"systolic": 320, "diastolic": 90}}),
    "plausible_heart_rate": ("heart_rate", {"value": 301}),
    "plausible_spo2": ("spo2", {"value": 101}),
    "plausible_respiratory_rate": ("respiratory_rate", {"value": 3}),
    "plausible_body_temperature": ("body_temperature", {"value": 120}),   # 120 [degF] = 48.9 Cel
    "plausible_body_weight": ("body_weight", {"value": 900}),             # 900 [lb_av] = 408.2 kg
    "plausible_blood_glucose": ("blood_glucose", {"value": 60}),          # 60 mmol/L = 1080.9 mg/dL
}

VALID_KINDS = ["blood_pressure", "heart_rate", "spo2", "respiratory_rate", "body_temperature", "body_weight",
               "blood_glucose", "cgm_glucose"]


def build_frame(rows: list[tuple[str, dict[str, Any], object]]) -> pd.DataFrame:
    """(row_key, item, patient_id) -> the DataFrame the gate validates; the sending device is of the kind that
    measures the item's metric unless the item names another (``device_kind``, taken out of the payload)."""
    cands, kinds = [], []
    for row_key, item, _ in rows:
        segment, record_no, item_no = row_key.split(":")
        item = dict(item)
        kind = item.pop("device_kind", KIND_OF.get(item.get("metric"), "hub"))
        kinds.append(None if kind == NO_DEVICE else kind)
        cands.append(candidate(item, device_id="dev-1", segment=segment, record_no=int(record_no),
                               item_no=int(item_no), received_at=RECEIVED))
    df = pd.DataFrame(cands, columns=CANDIDATE_COLUMNS).drop(columns=["raw"])  # gate excludes raw
    df["device_kind"] = kinds
    df["patient_id"] = [None if p is NOT_ENROLLED else p for _, _, p in rows]
    df["measured_at"] = pd.to_datetime(df["measured_at"], utc=True)
    df["received_at"] = pd.to_datetime(df["received_at"], utc=True)
    return df


@pytest.fixture
def valid_rows(make_reading: Callable[..., dict[str, Any]]) -> list[tuple[str, dict[str, Any], object]]:
    return [(f"seg:{i}:0", make_reading(kind, measured_at=MEASURED), PATIENT) for i, kind in enumerate(VALID_KINDS)]


def test_every_rule_has_a_failing_batch() -> None:
    """A rule added to the suite without a failing-batch case here fails this test."""
    names = [r.name for r in rules(SKEW_S)]
    assert len(names) == len(set(names)), "rule names must be unique: they are the quarantine reasons"
    assert set(FAILING) == set(names)


def test_empty_batch_has_no_failures() -> None:
    assert validate(build_frame([]), SKEW_S) == {}


def test_passing_batch_of_every_metric_has_no_failures(valid_rows) -> None:
    frame = build_frame(valid_rows)
    assert set(frame["metric"]) == set(METRICS)
    assert set(frame.loc[frame["metric"] == "blood_glucose", "source"]) == {"meter", "cgm"}
    assert "mmol/L" in set(frame["unit"])
    assert validate(frame, SKEW_S) == {}


@pytest.mark.parametrize("rule", sorted(FAILING))
def test_failing_batch_names_the_rule_and_only_the_failing_row(rule: str, valid_rows, make_reading) -> None:
    kind, fields = FAILING[rule]
    fields = dict(fields)
    patient = fields.pop("patient", PATIENT)
    fields.setdefault("measured_at", MEASURED)
    bad = make_reading(kind, **fields)

    failures = validate(build_frame([*valid_rows, (FAIL_KEY, bad, patient)]), SKEW_S)

    assert FAIL_KEY in failures, f"{rule}: the failing batch passed silently"
    assert rule in failures[FAIL_KEY]
    assert failures == {FAIL_KEY: [rule]}, "valid rows reported, or the row broke more than this rule"


def test_a_row_is_reported_with_every_rule_it_broke(valid_rows, make_reading) -> None:
    bad = make_reading("heart_rate", msg_id=None, value="seventy", measured_at="2026-11-27 13:00")
    failures = validate(build_frame([*valid_rows, (FAIL_KEY, bad, PATIENT)]), SKEW_S)
    assert failures == {FAIL_KEY: ["msg_id_present", "value_is_number", "measured_at_rfc3339_with_offset"]}


def test_plausible_bounds_are_inclusive(make_reading) -> None:
    at = {"measured_at": MEASURED}
    edge = [
        make_reading("heart_rate", value=20, **at), make_reading("heart_rate", value=300, **at),
        make_reading("spo2", value=100, **at), make_reading("spo2", value=50, **at),
        make_reading("respiratory_rate", value=4, **at), make_reading("body_temperature", unit="Cel", value=45, **at),
        make_reading("body_weight", unit="kg", value=2, **at),
        make_reading("blood_glucose", unit="mg/dL", value=1000, **at),
        make_reading("blood_pressure", values={"systolic": 300, "diastolic": 200}, **at),
        make_reading("blood_pressure", values={"systolic": 50, "diastolic": 20}, **at),
    ]
    assert validate(build_frame([(f"seg:{i}:0", it, PATIENT) for i, it in enumerate(edge)]), SKEW_S) == {}


def test_future_skew_is_the_configured_tolerance(make_reading) -> None:
    ahead = make_reading("heart_rate", measured_at=RECEIVED + timedelta(seconds=200))
    frame = build_frame([(FAIL_KEY, ahead, PATIENT)])
    assert validate(frame, 300) == {}
    assert validate(frame, 100) == {FAIL_KEY: ["measured_not_in_future"]}


def test_unenrolled_device_without_a_time_is_only_reported_for_the_time(make_reading) -> None:
    """No measured time means no enrollment lookup: the row is quarantined for its time, not twice."""
    bad = make_reading("heart_rate", measured_at="2026-11-27T13:00:00")
    assert validate(build_frame([(FAIL_KEY, bad, NOT_ENROLLED)]), SKEW_S) == {
        FAIL_KEY: ["measured_at_rfc3339_with_offset"]}


def test_glucose_without_a_source_is_accepted_as_contract_v1_allows(valid_rows, make_reading) -> None:
    """Contract v1 makes ``source`` optional (most meters send none); only an unknown source is refused."""
    plain = make_reading("blood_glucose", source=None, measured_at=MEASURED)
    assert "source" not in plain
    assert validate(build_frame([*valid_rows, (FAIL_KEY, plain, PATIENT)]), SKEW_S) == {}
    watch = make_reading("blood_glucose", source="watch", measured_at=MEASURED)
    assert validate(build_frame([*valid_rows, (FAIL_KEY, watch, PATIENT)]), SKEW_S) == {
        FAIL_KEY: ["glucose_source_known"]}


@pytest.mark.parametrize(("metric", "kind"), [("blood_glucose", "bp"), ("spo2", "scale"), ("blood_pressure", "glu"),
                                            ("heart_rate", "app"), ("body_weight", "")])
def test_a_metric_its_device_kind_cannot_measure_is_quarantined(metric, kind, valid_rows, make_reading) -> None:
    """A cuff sending glucose, a scale sending SpO2, an app, or a device registered without a kind."""
    bad = make_reading(metric, measured_at=MEASURED, device_kind=kind)
    assert validate(build_frame([*valid_rows, (FAIL_KEY, bad, PATIENT)]), SKEW_S) == {
        FAIL_KEY: ["metric_measurable_by_device_kind"]}


def test_an_unknown_device_is_reported_for_its_enrollment_only(make_reading) -> None:
    bad = make_reading("heart_rate", measured_at=MEASURED, device_kind=NO_DEVICE)
    assert validate(build_frame([(FAIL_KEY, bad, NOT_ENROLLED)]), SKEW_S) == {
        FAIL_KEY: ["device_enrolled_at_measured_time"]}


def test_a_hub_may_relay_every_vital(valid_rows, make_reading) -> None:
    rows = [(f"seg:{i}:0", {**item, "device_kind": "hub"}, p) for i, (_, item, p) in enumerate(valid_rows)]
    assert validate(build_frame(rows), SKEW_S) == {}


def test_a_rule_that_cannot_be_evaluated_raises_instead_of_passing(valid_rows) -> None:
    frame = build_frame(valid_rows).drop(columns=["patient_id"])
    with pytest.raises(RuntimeError, match="device_enrolled_at_measured_time"):
        validate(frame, SKEW_S)


def test_each_condition_judged_apart_decides_what_gx_row_conditions_decide(valid_rows, make_reading,
                                                                         gx_row_conditions) -> None:
    """run_suite hands GX each row condition's rows with the rule unconditional: on a batch mixing every
    metric, every failing case, rows failing several rules and unknown devices, the verdicts are GX's own."""
    rows = list(valid_rows)
    for n, (kind, fields) in enumerate(FAILING.values()):
        fields = dict(fields)
        patient = fields.pop("patient", PATIENT)
        fields.setdefault("measured_at", MEASURED)
        rows.append((f"bad:{n}:0", make_reading(kind, **fields), patient))
    rows.append(("multi:0:0", make_reading("blood_pressure", msg_id=None, values={"systolic": 80, "diastolic": 10},
                                           measured_at=MEASURED, device_kind="scale"), NOT_ENROLLED))
    rows.append(("nodev:0:0", make_reading("spo2", value=30, measured_at=MEASURED, device_kind=NO_DEVICE),
                 NOT_ENROLLED))
    frame = build_frame(rows)
    frame = frame.assign(metric_is_known=frame["metric"].isin(list(METRICS)),
                         device_known=frame["device_kind"].notna(),
                         kind_metric=[kind_metric(k, m) for k, m in zip(frame["device_kind"], frame["metric"],
                                                                       strict=True)])
    assert set(DERIVED_SQL) <= set(frame.columns)

    expected = gx_row_conditions(frame, rules(SKEW_S))
    assert len(expected) == len(FAILING) + 2, "every failing case fails under GX's own row conditions"
    assert validate(frame, SKEW_S) == expected


def test_a_batch_without_rows_for_a_condition_still_judges_the_rest(make_reading) -> None:
    """A chunk of heart rates only: the blood-pressure and glucose rules have no rows to judge, and the heart
    rate's own range still applies."""
    rows = [(f"seg:{i}:0", make_reading("heart_rate", value=60 + i, measured_at=MEASURED), PATIENT)
            for i in range(5)]
    rows.append((FAIL_KEY, make_reading("heart_rate", value=400, measured_at=MEASURED), PATIENT))
    assert validate(build_frame(rows), SKEW_S) == {FAIL_KEY: ["plausible_heart_rate"]}


def test_a_rule_with_no_rows_to_judge_still_needs_its_column(make_reading) -> None:
    """No blood pressure in the batch, and no diastolic column: the rule cannot be evaluated — it must not
    pass because no row happened to meet its condition."""
    frame = build_frame([("seg:0:0", make_reading("heart_rate", measured_at=MEASURED), PATIENT)])
    with pytest.raises(RuntimeError, match="plausible_diastolic"):
        validate(frame.drop(columns=["diastolic"]), SKEW_S)


def test_a_row_condition_that_cannot_be_evaluated_raises(valid_rows) -> None:
    frame = build_frame(valid_rows).drop(columns=["has_time"])  # the enrollment rule's condition column
    with pytest.raises(RuntimeError, match="device_enrolled_at_measured_time"):
        validate(frame, SKEW_S)
