"""Normalise: payload items -> canonical candidate rows (UCUM units, LOINC codes, UTC instants, reading ids)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from core.landing import LandedRecord
from transforms.normalise import (
    CANDIDATE_COLUMNS,
    EventRow,
    StructuralReject,
    candidate,
    normalise_records,
    number,
    reading_id,
)
from transforms.vocab import BP_COMPONENT_LOINC, GLUCOSE_MG_DL_PER_MMOL_L, LB_AV_IN_KG, METRICS

RECEIVED = datetime(2026, 11, 27, 13, 5, tzinfo=UTC)
VITALS = "rpm/v1/devices/dev-1/vitals"


def cand(item: dict[str, Any], device_id: str = "dev-1", received_at: datetime = RECEIVED) -> dict[str, Any]:
    return candidate(item, device_id=device_id, segment="seg-a", record_no=3, item_no=1,
                     received_at=received_at)


def reading(**fields: Any) -> dict[str, Any]:
    item = {"msg_id": "m-1", "metric": "heart_rate", "value": 72, "unit": "/min",
            "measured_at": "2026-11-27T08:00:00-05:00"}
    item.update(fields)
    return {k: v for k, v in item.items() if v is not None}


# --- units --------------------------------------------------------------------------------------------

def test_vocabulary_constants_are_the_defined_factors() -> None:
    assert GLUCOSE_MG_DL_PER_MMOL_L == 18.0156   # molar mass of glucose 180.156 g/mol
    assert LB_AV_IN_KG == 0.45359237             # avoirdupois pound, exact by definition


@pytest.mark.parametrize(("metric", "unit", "sent", "canonical_unit", "expected"), [
    ("body_temperature", "[degF]", 212, "Cel", 100.0),
    ("body_temperature", "[degF]", 32, "Cel", 0.0),
    ("body_temperature", "[degF]", 98.6, "Cel", 37.0),
    ("body_temperature", "[degF]", -40, "Cel", -40.0),
    ("body_temperature", "Cel", 36.6, "Cel", 36.6),
    ("body_weight", "[lb_av]", 100, "kg", 45.359237),
    ("body_weight", "[lb_av]", 176, "kg", 79.83225712),
    ("body_weight", "kg", 80.5, "kg", 80.5),
    ("blood_glucose", "mmol/L", 5.5, "mg/dL", 99.0858),
    ("blood_glucose", "mmol/L", 7.8, "mg/dL", 140.52168),
    ("blood_glucose", "mmol/L", 1, "mg/dL", 18.0156),
    ("blood_glucose", "mg/dL", 99, "mg/dL", 99.0),
    ("heart_rate", "/min", 72, "/min", 72.0),
    ("spo2", "%", 97, "%", 97.0),
    ("respiratory_rate", "/min", 16, "/min", 16.0),
])
def test_values_are_converted_to_the_canonical_ucum_unit(metric: str, unit: str, sent: float,
                                                          canonical_unit: str, expected: float) -> None:
    row = cand(reading(metric=metric, unit=unit, value=sent, source="meter"))
    assert row["canonical_unit"] == canonical_unit
    assert row["value"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert row["value_sent"] == sent  # the value as sent is kept next to the canonical one
    assert row["unit"] == unit


def test_blood_pressure_carries_systolic_as_value_and_diastolic_separately() -> None:
    row = cand(reading(metric="blood_pressure", unit="mm[Hg]", value=None,
                       values={"systolic": 128, "diastolic": 82}))
    assert (row["value_sent"], row["diastolic_sent"]) == (128.0, 82.0)
    assert (row["value"], row["diastolic"]) == (128.0, 82.0)
    assert row["canonical_unit"] == "mm[Hg]"
    assert BP_COMPONENT_LOINC == {"systolic": "8480-6", "diastolic": "8462-4"}


def test_non_bp_metrics_have_no_diastolic() -> None:
    row = cand(reading(values={"systolic": 1, "diastolic": 2}))
    assert row["diastolic_sent"] is None and row["diastolic"] is None


def test_unit_not_accepted_for_the_metric_leaves_no_canonical_value() -> None:
    row = cand(reading(unit="bpm"))
    assert row["value_sent"] == 72.0
    assert row["value"] is None
    assert row["unit_key"] == "heart_rate|bpm"


def test_unknown_metric_has_no_code_unit_or_value() -> None:
    row = cand(reading(metric="cholesterol", unit="mg/dL", value=180))
    assert row["metric"] == "cholesterol"
    assert (row["loinc"], row["canonical_unit"], row["value"]) == (None, None, None)
    assert row["value_sent"] == 180.0


# --- LOINC ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("item", "loinc"), [
    (reading(metric="blood_pressure", values={"systolic": 120, "diastolic": 80}, unit="mm[Hg]"), "85354-9"),
    (reading(metric="heart_rate", value=72, unit="/min"), "8867-4"),
    (reading(metric="spo2", value=97, unit="%"), "59408-5"),
    (reading(metric="respiratory_rate", value=16, unit="/min"), "9279-1"),
    (reading(metric="body_temperature", value=37, unit="Cel"), "8310-5"),
    (reading(metric="body_weight", value=80, unit="kg"), "29463-7"),
    (reading(metric="blood_glucose", value=99, unit="mg/dL", source="meter"), "41653-7"),
    (reading(metric="blood_glucose", value=99, unit="mg/dL", source="cgm"), "99504-3"),  # interstitial
], ids=["bp", "hr", "spo2", "rr", "temp", "weight", "glucose-meter", "glucose-cgm"])
def test_each_metric_is_coded_with_its_loinc(item: dict[str, Any], loinc: str) -> None:
    assert cand(item)["loinc"] == loinc


def test_every_metric_of_the_vocabulary_has_a_loinc_test() -> None:
    covered = {"blood_pressure", "heart_rate", "spo2", "respiratory_rate", "body_temperature",
               "body_weight", "blood_glucose"}
    assert set(METRICS) == covered


def test_glucose_source_is_kept() -> None:
    assert cand(reading(metric="blood_glucose", unit="mg/dL", source="cgm"))["source"] == "cgm"


# --- time and reading id ----------------------------------------------------------------------------------

def test_reading_id_is_deterministic() -> None:
    t = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)
    assert reading_id("dev-1", "heart_rate", t) == reading_id("dev-1", "heart_rate", t)
    assert len(reading_id("dev-1", "heart_rate", t)) == 32


def test_reading_id_is_the_same_instant_whatever_the_offset() -> None:
    utc = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)
    new_york = datetime(2026, 11, 27, 8, 0, tzinfo=timezone(timedelta(hours=-5)))
    kolkata = datetime(2026, 11, 27, 18, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert reading_id("dev-1", "heart_rate", utc) == reading_id("dev-1", "heart_rate", new_york)
    assert reading_id("dev-1", "heart_rate", utc) == reading_id("dev-1", "heart_rate", kolkata)


def test_candidates_of_one_instant_sent_with_two_offsets_share_their_reading_id() -> None:
    a = cand(reading(measured_at="2026-11-27T08:00:00-05:00"))
    b = cand(reading(measured_at="2026-11-27T13:00:00Z", value=80, msg_id="m-2"))
    assert a["reading_id"] == b["reading_id"]
    assert a["reading_id"] == reading_id("dev-1", "heart_rate", datetime(2026, 11, 27, 13, tzinfo=UTC))


@pytest.mark.parametrize(("device", "metric", "when"), [
    ("dev-2", "heart_rate", datetime(2026, 11, 27, 13, 0, tzinfo=UTC)),
    ("dev-1", "spo2", datetime(2026, 11, 27, 13, 0, tzinfo=UTC)),
    ("dev-1", "heart_rate", datetime(2026, 11, 27, 13, 0, 1, tzinfo=UTC)),
    ("dev-1", "heart_rate", datetime(2026, 11, 27, 13, 0, 0, 1, tzinfo=UTC)),
], ids=["device", "metric", "second", "microsecond"])
def test_reading_id_differs_for_another_device_metric_or_instant(device: str, metric: str,
                                                                  when: datetime) -> None:
    base = reading_id("dev-1", "heart_rate", datetime(2026, 11, 27, 13, 0, tzinfo=UTC))
    assert reading_id(device, metric, when) != base


@pytest.mark.parametrize(("sent", "offset_min"), [
    ("2026-11-27T08:00:00-05:00", -300),
    ("2026-11-27T13:00:00Z", 0),
    ("2026-11-27T13:00:00z", 0),
    ("2026-11-27T18:30:00+05:30", 330),
    ("2026-11-27T09:30:00-03:30", -210),
    ("2026-11-27 08:00:00-05:00", -300),
    ("2026-11-27T08:00:00.250-05:00", -300),
])
def test_measured_at_is_stored_in_utc_with_the_device_offset(sent: str, offset_min: int) -> None:
    row = cand(reading(measured_at=sent))
    assert row["utc_offset_min"] == offset_min
    assert row["has_time"] is True
    assert row["measured_at"].utcoffset() == timedelta(0)
    assert row["measured_at"].replace(microsecond=0) == datetime(2026, 11, 27, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize("sent", [
    "2026-11-27T08:00:00",            # local time without offset: ambiguous
    "2026-11-27T08:00:00.123",
    "2026-11-27",
    "2026-11-27T08:00:00+0500",       # offset without colon is not RFC 3339
    "2026-02-30T08:00:00Z",           # no such day
    "2026-11-27T25:00:00Z",
    "yesterday",
    "",
    1764248400,                       # epoch seconds are not RFC 3339
    None,
])
def test_measured_at_without_a_usable_offset_is_null(sent: Any) -> None:
    row = cand(reading(measured_at=sent))  # None: the field is missing
    assert row["measured_at"] is None
    assert row["utc_offset_min"] is None
    assert row["has_time"] is False
    assert row["reading_id"] is None
    assert row["seconds_ahead"] is None


def test_seconds_ahead_is_measured_minus_received() -> None:
    row = cand(reading(measured_at="2026-11-27T13:06:00Z"))
    assert row["seconds_ahead"] == 60.0
    assert cand(reading(measured_at="2026-11-27T13:00:00Z"))["seconds_ahead"] == -300.0


# --- numbers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, False, "72", "", None, 10**400, -(10**400), [72], {"v": 72}],
                         ids=["true", "false", "string", "empty", "null", "huge-int", "huge-neg", "list", "obj"])
def test_non_numbers_become_null_values(value: Any) -> None:
    item = reading()
    item["value"] = value
    row = cand(item)
    assert row["value_sent"] is None
    assert row["value"] is None


@pytest.mark.parametrize(("literal", "detail"), [
    ("NaN", "NaN/Infinity literal at byte 106: not a JSON number"),
    ("Infinity", "NaN/Infinity literal at byte 106: not a JSON number"),
    ("-Infinity", "NaN/Infinity literal at byte 106: not a JSON number"),
    ("1e400", "number out of range (beyond a double, or an integer of more than 4,300 digits)"),
])
def test_non_finite_json_numbers_make_the_message_unreadable(literal: str, detail: str) -> None:
    """Not JSON (NaN, Infinity) or no double (1e400): the device sent no number, and the message says so
    as a whole (core/payload.py), rather than one field of it quietly turning null."""
    payload = ('{"msg_id": "m-1", "metric": "heart_rate", "unit": "/min", '
               f'"measured_at": "2026-11-27T13:00:00Z", "value": {literal}}}').encode()
    [row] = normalise_records("seg", [LandedRecord(0, VITALS, RECEIVED, payload, None)])
    assert isinstance(row, StructuralReject)
    assert (row.reason, row.detail, row.raw) == ("not_json", detail, payload)


def test_number_accepts_finite_ints_and_floats() -> None:
    assert number(72) == 72.0
    assert number(-0.5) == -0.5
    assert number(10**300) == 1e300
    assert number(10**400) is None
    assert number(float("nan")) is None
    assert number(True) is None


def test_bp_with_non_numeric_diastolic_keeps_systolic() -> None:
    row = cand(reading(metric="blood_pressure", unit="mm[Hg]", values={"systolic": 120, "diastolic": "80"}))
    assert row["value_sent"] == 120.0
    assert row["diastolic_sent"] is None and row["diastolic"] is None


# --- other fields ------------------------------------------------------------------------------------------

def test_fields_outside_the_contract_are_preserved_in_extra() -> None:
    row = cand(reading(battery=81, firmware="2.1.0", flags={"manual": True}))
    assert json.loads(row["extra"]) == {"battery": 81, "firmware": "2.1.0", "flags": {"manual": True}}


def test_extra_text_that_only_looks_like_a_surrogate_escape_is_kept_as_sent() -> None:
    """A backslash then "ud800" is text (a Windows path, an escaped log line), not an escape: stored as sent."""
    sent = {"note": "C:\\ud800\\data", "path": "\\udc00", "both": "\\\U0001f600"}
    row = cand(reading(**sent))
    assert json.loads(row["extra"]) == sent


@pytest.mark.parametrize(("manual", "expected"), [(True, True), (False, False), ("true", False), (1, False),
                                                  (None, False)])
def test_only_json_true_marks_a_manual_entry(manual: Any, expected: bool) -> None:
    row = cand(reading(manual=manual))
    assert row["manual"] is expected
    assert row["extra"] is None  # "manual" is a contract field, not an extra


def test_extra_is_null_when_only_contract_fields_are_sent() -> None:
    assert cand(reading(source="meter"))["extra"] is None


@pytest.mark.parametrize(("msg_id", "expected"), [
    ("m-1", "m-1"), (17, "17"), ("", None), ("x" * 129, None), ("x" * 128, "x" * 128), (True, None),
    (1.5, None), (None, None),
])
def test_msg_id_is_a_short_text_label(msg_id: Any, expected: str | None) -> None:
    item = reading()
    item["msg_id"] = msg_id
    assert cand(item)["msg_id"] == expected


def test_candidate_has_exactly_the_staged_columns_and_keeps_the_raw_item() -> None:
    item = reading(battery=80)
    before = copy.deepcopy(item)
    row = cand(item)
    assert list(row) == CANDIDATE_COLUMNS
    assert item == before  # input never mutated
    assert json.loads(row["raw"]) == item
    assert row["row_key"] == "seg-a:3:1"
    assert (row["segment"], row["record_no"], row["item_no"], row["device_id"]) == ("seg-a", 3, 1, "dev-1")
    assert row["received_at"] == RECEIVED


# --- whole segments ---------------------------------------------------------------------------------------

def _rec(n: int, payload: bytes | dict, topic: str = VITALS) -> LandedRecord:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return LandedRecord(n=n, topic=topic, received_at=RECEIVED + timedelta(seconds=n), payload=raw, mark=None)


def test_normalise_records_yields_rows_and_structural_rejects_keyed_segment_record_item() -> None:
    records = [
        _rec(0, reading()),
        _rec(1, b"{not json"),
        _rec(2, {"readings": [reading(msg_id="a"), 7, reading(msg_id="c", metric="spo2", unit="%", value=97)]}),
        _rec(3, {"battery": 80}, topic="rpm/v1/devices/dev-1/status"),
        _rec(4, reading(), topic="rpm/v1/devices/+/vitals"),
        _rec(7, b"\xff"),  # record numbers come from the landing file, not from position
    ]
    out = list(normalise_records("seg-a", records))
    assert [o["row_key"] if isinstance(o, dict) else o.row_key for o in out] == [
        "seg-a:0:0", "seg-a:1:0", "seg-a:2:0", "seg-a:2:1", "seg-a:2:2", "seg-a:3:0", "seg-a:4:0", "seg-a:7:0"]

    rejects = {o.row_key: o for o in out if isinstance(o, StructuralReject)}
    assert {k: r.reason for k, r in rejects.items()} == {
        "seg-a:1:0": "not_json", "seg-a:2:1": "reading_not_an_object",
        "seg-a:4:0": "unknown_topic", "seg-a:7:0": "not_utf8"}
    status = next(o for o in out if isinstance(o, EventRow))  # device status feeds the telehealth stream
    assert (status["row_key"], status["event"], status["channel"]) == ("seg-a:3:0", "device_status", "status")
    assert rejects["seg-a:1:0"].raw == b"{not json"        # raw bytes kept for replay
    assert rejects["seg-a:7:0"].raw == b"\xff"
    assert rejects["seg-a:2:1"].raw == b"7"
    assert rejects["seg-a:2:1"].detail == "int"
    assert rejects["seg-a:1:0"].device_id == "dev-1"
    assert rejects["seg-a:4:0"].device_id is None
    assert rejects["seg-a:2:1"].received_at == RECEIVED + timedelta(seconds=2)
    assert (rejects["seg-a:2:1"].segment, rejects["seg-a:2:1"].record_no, rejects["seg-a:2:1"].item_no) == (
        "seg-a", 2, 1)

    rows = [o for o in out if isinstance(o, dict) and not isinstance(o, EventRow)]
    assert [r["msg_id"] for r in rows] == ["m-1", "a", "c"]
    assert all(r["device_id"] == "dev-1" for r in rows)
    assert rows[2]["received_at"] == RECEIVED + timedelta(seconds=2)
