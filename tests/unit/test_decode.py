"""Payload contract v1: a landed message is one reading, a batch of readings, or a named structural reject."""

from __future__ import annotations

import json
import math

import pytest

from core.payload import parse_json_object
from transforms.decode import MAX_BATCH, decode_message

VITALS = "rpm/v1/devices/bp-001/vitals"
READING = {"msg_id": "m-1", "metric": "heart_rate", "value": 72, "unit": "/min",
           "measured_at": "2026-11-27T08:00:00-05:00"}


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_single_reading_is_one_item_of_the_topic_device() -> None:
    msg = decode_message(VITALS, _json(READING))
    assert msg.reason is None
    assert msg.device_id == "bp-001"
    assert msg.items == [READING]


def test_batch_yields_every_reading_in_order() -> None:
    readings = [dict(READING, msg_id=f"m-{i}") for i in range(3)]
    msg = decode_message(VITALS, _json({"readings": readings}))
    assert msg.reason is None
    assert msg.device_id == "bp-001"
    assert msg.items == readings


def test_batch_items_are_passed_on_unjudged() -> None:
    """Whether an item is an object is normalise's concern (one reject per item, not per message)."""
    msg = decode_message(VITALS, _json({"readings": [READING, 7, "x"]}))
    assert msg.reason is None
    assert msg.items == [READING, 7, "x"]


def test_batch_of_exactly_max_batch_is_accepted() -> None:
    msg = decode_message(VITALS, _json({"readings": [{}] * MAX_BATCH}))
    assert msg.reason is None
    assert len(msg.items) == MAX_BATCH


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe{}", "not_utf8"),
    (b'{"metric": "heart_rate", "unit": "\xe9"}', "not_utf8"),  # latin-1 byte inside otherwise valid JSON
    (b"", "not_json"),
    (b"hello", "not_json"),
    (b'{"metric": "heart_rate", "value": 7', "not_json"),     # truncated
    (b'{"metric": "heart_rate"} trailing', "not_json"),
    (b"[" * 100_000 + b"]" * 100_000, "not_json"),           # 100k deep: must not crash the decoder
    (b"[" * 100_000, "not_json"),                            # 100k deep and truncated
    (b"{\"a\":" * 40_000 + b"1" + b"}" * 40_000, "not_json"),  # 40k deep: still under the payload limit
    (b"[]", "not_a_json_object"),
    (b"[{}]", "not_a_json_object"),
    (b"42", "not_a_json_object"),
    (b'"text"', "not_a_json_object"),
    (b"null", "not_a_json_object"),
    (b"NaN", "not_a_json_object"),
    (b'{"readings": {"metric": "heart_rate"}}', "readings_not_a_list"),
    (b'{"readings": null}', "readings_not_a_list"),
    (b'{"readings": "[]"}', "readings_not_a_list"),
    (b'{"readings": []}', "empty_batch"),
])
def test_unreadable_payloads_are_named(payload: bytes, reason: str) -> None:
    msg = decode_message(VITALS, payload)
    assert msg.reason == reason
    assert msg.items == []
    assert msg.device_id == "bp-001"  # the reject still belongs to the device that sent it


def test_batch_larger_than_max_batch_is_rejected_whole() -> None:
    msg = decode_message(VITALS, _json({"readings": [{}] * (MAX_BATCH + 1)}))
    assert msg.reason == "batch_too_large"
    assert msg.items == []
    assert str(MAX_BATCH + 1) in msg.detail


def test_not_utf8_detail_names_the_offending_byte() -> None:
    msg = decode_message(VITALS, b'{"a": "\xff"}')
    assert msg.reason == "not_utf8"
    assert "byte 7" in msg.detail


def test_unknown_topic_is_rejected_without_reading_the_payload() -> None:
    msg = decode_message("rpm/v1/devices/+/vitals", _json(READING))
    assert msg.reason == "unknown_topic"
    assert msg.device_id is None
    assert msg.items == []


def test_status_and_app_event_channels_decode_for_the_telehealth_stream() -> None:
    msg = decode_message("rpm/v1/devices/bp-001/status", _json({"battery_pct": 80}))
    assert (msg.reason, msg.device_id, msg.channel, msg.items) == (None, "bp-001", "status", [{"battery_pct": 80}])
    app = decode_message("rpm/v1/apps/app-7/events", _json({"events": [{"event": "survey_completed"}] * 2}))
    assert (app.reason, app.device_id, app.channel, len(app.items)) == (None, "app-7", "events", 2)
    # A vitals-style batch key on the events channel is not an events batch: it is one (odd) event.
    odd = decode_message("rpm/v1/apps/app-7/events", _json({"readings": []}))
    assert odd.items == [{"readings": []}]
    assert decode_message("rpm/v1/apps/app-7/vitals", _json(READING)).reason == "unknown_topic"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_do_not_become_floats(literal: str) -> None:
    msg = decode_message(VITALS, f'{{"metric": "heart_rate", "value": {literal}}}'.encode())
    assert msg.reason is None
    value = msg.items[0]["value"]
    assert not isinstance(value, float)
    assert value == literal


def test_parse_json_object_returns_the_document() -> None:
    doc, reason, detail = parse_json_object(_json(READING))
    assert (doc, reason, detail) == (READING, None, "")


def test_overflowing_exponent_is_left_for_the_number_rule() -> None:
    """1e400 is valid JSON (it parses to inf); normalise's number() is what refuses it."""
    doc, reason, _ = parse_json_object(b'{"value": 1e400}')
    assert reason is None
    assert doc is not None and math.isinf(doc["value"])
