"""Payload contract v1: a landed message is one reading, a batch of readings, or a named structural reject."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.payload import MAX_DEPTH, depth, parse_json_object
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
    (b"NaN", "not_json"),                                     # not JSON at all (core/payload.py)
    (b'{"metric": "heart_rate", "value": 72,}', "not_json"),  # a trailing comma
    (b'{"metric": "heart_rate", "unit": "\\ud800"}', "not_json"),  # a lone surrogate escape
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
def test_nan_and_infinity_literals_make_the_message_not_json(literal: str) -> None:
    msg = decode_message(VITALS, f'{{"metric": "heart_rate", "value": {literal}}}'.encode())
    assert (msg.reason, msg.detail, msg.items) == ("not_json", "NaN/Infinity literal at byte 34: not a JSON number", [])


def test_parse_json_object_returns_the_document() -> None:
    doc, reason, detail = parse_json_object(_json(READING))
    assert (doc, reason, detail) == (READING, None, "")


def test_overflowing_numbers_make_the_message_not_json() -> None:
    """1e400 has no double (Python's json made it inf); an integer past 4,300 digits no exact reading."""
    for payload in (b'{"value": 1e400}', b'{"value": -1e400}', b'{"value": ' + b"9" * 4301 + b"}"):
        doc, reason, detail = parse_json_object(payload)
        assert (doc, reason) == (None, "not_json") and detail.startswith("number out of range"), detail


def test_big_integers_and_duplicate_keys_read_as_pythons_json_reads_them() -> None:
    doc, _, _ = parse_json_object(b'{"a": 123456789012345678901234567890, "v": 1, "v": 2}')
    assert doc == {"a": 123456789012345678901234567890, "v": 2}  # the last of a repeated key


def test_a_truncated_payload_is_not_blamed_on_text_that_looks_like_a_surrogate_escape() -> None:
    """`"C:\\ud800"` is a backslash and text, which the payload may hold; what is wrong here is the end."""
    doc, reason, detail = parse_json_object(b'{"note": "C:\\\\ud800", "unit": "abc')
    assert (doc, reason) == (None, "not_json") and "surrogate" not in detail, detail


def test_lone_surrogate_escapes_are_named() -> None:
    for text in (b'"\\ud800"', b'"\\udc00x"', b'"\\ud800\\u0041"'):
        doc, reason, detail = parse_json_object(b'{"unit": ' + text + b"}")
        assert (doc, reason, detail) == (None, "not_json", "lone UTF-16 surrogate escape: not Unicode text"), text
    doc, _, _ = parse_json_object(b'{"unit": "\\ud83d\\ude00"}')  # a pair is one character
    assert doc == {"unit": "\U0001f600"}


def _at_stack_depth(frames: int, call: Any) -> Any:
    return call() if frames == 0 else _at_stack_depth(frames - 1, call)


def test_nesting_is_limited_by_the_contract_not_by_the_callers_stack() -> None:
    """MAX_DEPTH arrays and objects are read, one more is not — at any stack depth a task may call from, and
    what was read can be written again (raw, extra) a few frames deeper."""
    def nested(levels: int) -> bytes:  # the top-level object is one level
        return b'{"x":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"

    for stack in (0, 300):
        doc, reason, _ = _at_stack_depth(stack, lambda: parse_json_object(nested(MAX_DEPTH)))
        assert reason is None and depth(doc) == MAX_DEPTH
        assert _at_stack_depth(stack + 50, lambda: json.dumps(doc))  # noqa: B023 - called at once
        assert _at_stack_depth(stack, lambda: parse_json_object(nested(MAX_DEPTH + 1))) == (
            None, "not_json", "nested too deeply")


def test_a_full_batch_holds_many_brackets_and_is_read() -> None:
    items = [{"metric": "blood_pressure", "values": {"systolic": 120, "diastolic": 80}}] * MAX_BATCH
    doc, reason, _ = parse_json_object(_json({"readings": items}))
    assert reason is None and doc is not None and len(doc["readings"]) == MAX_BATCH
