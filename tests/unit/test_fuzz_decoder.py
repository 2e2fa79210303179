"""Property-based tests of the pure decoder: whatever a source publishes, decoding accounts for it.

The invariant behind ``received = loaded + quarantined + duplicates``, at the decoder: every landed message
yields max(1, items) outputs — a candidate row, an event row, or a structural reject with a reason — each keyed
``segment:record:item``, and nothing raises (a raise in ``decode_normalise`` fails the whole batch, so one bad
message would hold every other reading back). Reproducible: a fixed seed, no example database.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.landing import LandedRecord
from core.payload import parse_json_object
from core.topics import parse_topic
from ingest.service import quick_mark
from transforms.decode import BATCH_KEYS, MAX_BATCH, decode_message
from transforms.events import APP_EVENTS, EVENT_COLUMNS, EVENT_FIELDS, MODALITIES
from transforms.normalise import CANDIDATE_COLUMNS, EventRow, StructuralReject, normalise_records
from transforms.vocab import (
    ACCEPTED_UNIT_KEYS,
    DIASTOLIC_PLAUSIBLE,
    GLUCOSE_MG_DL_PER_MMOL_L,
    LB_AV_IN_KG,
    METRICS,
)

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
RECEIVED = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
SEGMENT = "rpm-ingest-1-20261127T120000000000-000001"

# Reasons a whole message (or one batch item) can be rejected with before validation.
STRUCTURAL_REASONS = {
    "unknown_topic", "not_utf8", "not_json", "not_a_json_object", "empty_batch", "batch_too_large",
    "readings_not_a_list", "statuses_not_a_list", "events_not_a_list", "reading_not_an_object",
    "event_not_an_object",
}
# What the ingest service marks at the door: the message-level reasons it can know without the batch rules.
DOOR_REASONS = {"unknown_topic", "not_utf8", "not_json", "not_a_json_object", "payload_too_large"}

# --- strategies --------------------------------------------------------------------------------------------
# Text with control characters, bidi overrides, BOMs, astral emoji and SQL; Hypothesis's own alphabet already
# reaches every plane. Lone surrogates are not in it (they cannot be UTF-8): see the pinned bug tests below.
nasty_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.sampled_from("\x00\x07\x1b\x7f\u200b\u202e\ufeff💉٢'\";-{}[]\\/"), max_size=12),
    st.sampled_from(["'; DROP TABLE readings; --", "NaN", "Infinity", "1e999", "", "null", "true",
                     "2026-02-30T08:00:00-05:00", "2026-11-27T07:31:00", "2999-01-01T00:00:00Z"]),
)
huge_ints = st.one_of(st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
                      st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1, 2**1024]))
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(allow_nan=True, allow_infinity=True),
                    nasty_text)
json_docs = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(nasty_text, inner, max_size=5)),
    max_leaves=25,
)

valid_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
contract_topics = st.one_of(
    st.builds(lambda d, ch: f"rpm/v1/devices/{d}/{ch}", valid_ids, st.sampled_from(["vitals", "status"])),
    st.builds(lambda a: f"rpm/v1/apps/{a}/events", valid_ids),
)
# Almost a contract topic: an id outside the safe alphabet, an extra level, a trailing newline, another version.
messy_topics = st.one_of(
    st.text(max_size=60),
    st.builds(lambda d, ch: f"rpm/v1/devices/{d}/{ch}", st.text(min_size=1, max_size=12),
              st.sampled_from(["vitals", "status", "events", "vitals/x", "vitals\n"])),
    st.sampled_from(["", "rpm/v1/devices//vitals", "rpm/v1/apps/a1/status", "rpm/v2/devices/d1/vitals",
                     "rpm/v1/devices/d1/events", "rpm/v1/apps/a1/events/", "rpm/v1/devices/-d1/vitals"]),
)
topics = st.one_of(contract_topics, messy_topics)

# Offsets a real device can carry: whole minutes strictly inside +-24 h (RFC 3339 has no seconds in it).
offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda m: timezone(timedelta(minutes=m)))
# Years 2..9998: the first and last day of the calendar are pinned separately (test_calendar_edge_...).
instants = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31),
                        timezones=st.just(UTC))
rfc3339 = st.builds(lambda ts, tz: ts.astimezone(tz).isoformat(), instants, offsets)
field_values = st.one_of(scalars, json_docs, rfc3339)
labels = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=20)

# Canonical -> unit as sent: the inverse of each accepted unit's conversion (independent of transforms.vocab).
TO_UNIT: dict[str, Callable[[float], float]] = {
    "mm[Hg]": lambda v: v, "/min": lambda v: v, "%": lambda v: v, "Cel": lambda v: v, "kg": lambda v: v,
    "mg/dL": lambda v: v, "[degF]": lambda c: c * 9.0 / 5.0 + 32.0, "[lb_av]": lambda kg: kg / LB_AV_IN_KG,
    "mmol/L": lambda mg: mg / GLUCOSE_MG_DL_PER_MMOL_L,
}
METRIC_UNITS = sorted((m.name, u) for m in METRICS.values() for u in m.units)


@st.composite
def valid_readings(draw: st.DrawFn) -> tuple[dict[str, Any], float, float | None]:
    """(item, canonical value, canonical diastolic) for a reading inside the plausible range."""
    name, unit = draw(st.sampled_from(METRIC_UNITS))
    lo, hi = METRICS[name].plausible
    canonical = draw(st.floats(min_value=lo, max_value=hi))
    when = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                             timezones=st.just(UTC))).astimezone(draw(offsets))
    item: dict[str, Any] = {"msg_id": draw(labels), "metric": name, "unit": unit, "measured_at": when.isoformat()}
    diastolic = None
    if name == "blood_pressure":
        lo_dia, hi_dia = DIASTOLIC_PLAUSIBLE
        diastolic = draw(st.floats(min_value=lo_dia, max_value=min(hi_dia, canonical)))
        item["values"] = {"systolic": TO_UNIT[unit](canonical), "diastolic": TO_UNIT[unit](diastolic)}
    else:
        item["value"] = TO_UNIT[unit](canonical)
    if name == "blood_glucose":
        item["source"] = draw(st.sampled_from(["meter", "cgm"]))
    return item, canonical, diastolic


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    """An app event or a device status a source would send (the channel decides which one is on contract)."""
    when = draw(rfc3339)
    return {"msg_id": draw(labels), "event": draw(st.sampled_from([*APP_EVENTS, "device_status"])),
            "occurred_at": when, "reported_at": when, "module": draw(labels),
            "minutes": draw(st.integers(min_value=0, max_value=600)), "appointment_id": draw(labels),
            "modality": draw(st.sampled_from(MODALITIES)), "survey": draw(labels),
            "battery_pct": draw(st.floats(min_value=0, max_value=100)), "firmware": draw(labels),
            "signal_dbm": draw(st.integers(min_value=-150, max_value=0)),
            "uptime_s": draw(st.integers(min_value=0, max_value=10**9))}


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid item with some fields dropped or replaced by garbage: fuzzing next to the contract's edges."""
    item = dict(draw(valid))
    for key in draw(st.lists(st.sampled_from(sorted({*item, "values", "extra\x00"})), max_size=4, unique=True)):
        if draw(st.booleans()):
            item.pop(key, None)
        else:
            item[key] = draw(field_values)
    return item


reading_like = st.one_of(valid_readings().map(lambda r: r[0]), mutated(valid_readings().map(lambda r: r[0])),
                         st.dictionaries(st.sampled_from(["msg_id", "metric", "measured_at", "value", "values",
                                                          "unit", "source", "manual"]), field_values))
event_like = st.one_of(valid_events(), mutated(valid_events()),
                       st.dictionaries(st.sampled_from(sorted(EVENT_FIELDS)), field_values))
item_like = st.one_of(reading_like, event_like, json_docs)
documents = st.one_of(
    json_docs, reading_like, event_like,
    st.builds(lambda key, items: {key: items}, st.sampled_from(sorted(BATCH_KEYS.values())),
              st.one_of(st.lists(item_like, max_size=6), json_docs)),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, Any]:
    """(topic, document): mostly items shaped for the topic's channel, single or batched, else anything."""
    topic = draw(messy_topics if draw(st.sampled_from((False, False, False, True))) else contract_topics)
    parsed = parse_topic(topic)
    channel = parsed.channel if parsed else draw(st.sampled_from(sorted(BATCH_KEYS)))
    item = reading_like if channel == "vitals" else event_like
    key = BATCH_KEYS[channel]
    doc = draw(st.one_of(
        item, item,
        st.lists(st.one_of(item, item, json_docs), max_size=6).map(lambda items: {key: items}),
        json_docs.map(lambda v: {key: v}),
        documents,
    ))
    return topic, doc


def encode(doc: Any) -> bytes:
    """As a careless device library sends it: NaN and Infinity as JSON's non-standard literals."""
    return json.dumps(doc, allow_nan=True).encode()


# --- the oracle and the invariants ------------------------------------------------------------------------
def expected_outputs(topic: str, payload: bytes) -> int:
    """How many outputs contract v1 says a message has: one per batch item, else exactly one."""
    parsed = parse_topic(topic)
    if parsed is None:
        return 1
    doc, _, _ = parse_json_object(payload)  # the contract's JSON (strict: no NaN/Infinity literals)
    key = BATCH_KEYS[parsed.channel]
    if doc is None or key not in doc:
        return 1
    batch = doc[key]
    return len(batch) if isinstance(batch, list) and 0 < len(batch) <= MAX_BATCH else 1


def normalise_one(topic: str, payload: bytes, n: int = 0) -> list[Any]:
    return list(normalise_records(SEGMENT, [LandedRecord(n, topic, RECEIVED, payload, None)]))


def finite_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isfinite(v))


def assert_accounted(topic: str, payload: bytes, outputs: list[Any], n: int = 0) -> None:
    """Every item of the message is one output keyed segment:record:item, of the kind its channel allows."""
    assert len(outputs) == expected_outputs(topic, payload) >= 1
    assert [o.row_key if isinstance(o, StructuralReject) else o["row_key"] for o in outputs] == [
        f"{SEGMENT}:{n}:{i}" for i in range(len(outputs))]
    parsed = parse_topic(topic)
    channel = parsed.channel if parsed else None
    for out in outputs:
        if isinstance(out, StructuralReject):
            assert out.reason in STRUCTURAL_REASONS, out.reason
            assert (out.segment, out.record_no) == (SEGMENT, n) and isinstance(out.raw, bytes)
            assert len(out.detail) <= 200
        elif isinstance(out, EventRow):
            assert channel in ("status", "events")
            assert list(out) == EVENT_COLUMNS
            assert all(finite_or_none(out[c]) for c in ("minutes", "battery_pct", "signal_dbm", "uptime_s"))
            assert isinstance(out["raw"], bytes)
        else:
            assert channel == "vitals"
            assert list(out) == CANDIDATE_COLUMNS
            # NaN, Infinity and overflowing numbers never pass as a value (value itself may overflow to inf
            # in conversion — e.g. 1e307 mmol/L — which the plausibility rule then quarantines).
            assert finite_or_none(out["value_sent"]) and finite_or_none(out["diastolic_sent"])
            assert out["value"] is None or not math.isnan(out["value"])
            assert isinstance(out["raw"], bytes)
    if len(outputs) > 1 or not isinstance(outputs[0], StructuralReject) or outputs[0].item_no != 0:
        return
    if outputs[0].reason in DOOR_REASONS:  # a whole-message reject keeps the exact bytes that arrived
        assert outputs[0].raw == payload


# --- properties -------------------------------------------------------------------------------------------
@FUZZ
@given(topic=topics, payload=st.binary(max_size=300))
def test_any_topic_and_bytes_are_accounted_and_never_raise(topic: str, payload: bytes) -> None:
    assert_accounted(topic, payload, normalise_one(topic, payload))


@FUZZ
@given(message=messages())
def test_any_json_document_is_accounted_and_never_raises(message: tuple[str, Any]) -> None:
    topic, doc = message
    payload = encode(doc)
    assert_accounted(topic, payload, normalise_one(topic, payload))


@FUZZ
@given(messages=st.lists(st.one_of(messages().map(lambda m: (m[0], encode(m[1]))),
                                  st.tuples(topics, st.binary(max_size=80))), min_size=1, max_size=6),
       first=st.integers(min_value=0, max_value=2**31 - 10))
def test_a_segment_of_messages_is_accounted_record_by_record(messages: list[tuple[str, bytes]],
                                                             first: int) -> None:
    records = [LandedRecord(first + i, t, RECEIVED, p, None) for i, (t, p) in enumerate(messages)]
    outputs = list(normalise_records(SEGMENT, records))
    assert len(outputs) == sum(expected_outputs(t, p) for t, p in messages)
    by_record: dict[int, list[Any]] = {}
    for out in outputs:
        n = out.record_no if isinstance(out, StructuralReject) else out["record_no"]
        by_record.setdefault(n, []).append(out)
    assert list(by_record) == [r.n for r in records]  # in landing order, none skipped
    for rec in records:
        assert_accounted(rec.topic, rec.payload, by_record[rec.n], rec.n)


@FUZZ
@given(message=st.one_of(st.tuples(topics, st.binary(max_size=300)),
                         messages().map(lambda m: (m[0], encode(m[1])))))
def test_quick_mark_never_raises_and_agrees_with_the_decoder(message: tuple[str, bytes]) -> None:
    topic, payload = message
    mark = quick_mark(topic, payload)  # same default size limit as the decoder
    assert mark == door_mark(topic, payload)


def door_mark(topic: str, payload: bytes) -> str | None:
    """What the door check must say: the decoder's message-level reason, except that a payload shaped like a
    JSON object (``{`` … ``}`` around JSON whitespace) is not parsed at the door — the pipeline parses every
    payload once and quarantines one that is not JSON after all."""
    reason = decode_message(topic, payload).reason
    if reason not in DOOR_REASONS:
        return None
    body = payload.strip(b" \t\r\n")
    if reason == "not_json" and body[:1] == b"{" and body[-1:] == b"}":
        return None
    return reason


@pytest.mark.parametrize("payload", [b'{"a":1,}', b' {"metric": NaN-ish} ', b"{\n}x}", b"[1]", b'"{}"', b"{"])
def test_the_door_leaves_object_shaped_payloads_to_the_pipeline(payload: bytes) -> None:
    topic = "rpm/v1/devices/d1/vitals"
    assert quick_mark(topic, payload) == door_mark(topic, payload)
    shaped = payload.strip()[:1] == b"{" and payload.strip()[-1:] == b"}"
    assert (quick_mark(topic, payload) is None) == shaped  # never-JSON outside the braces is marked at once


@pytest.mark.parametrize("payload", [  # all under the 256 KiB payload limit, far past the parser's depth
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"readings":' + b"[" * 100_000,
    b'{"msg_id":"m","metric":"heart_rate","value":72,"unit":"/min","x":' + b"[" * 100_000 + b"]" * 100_000
    + b"}",
], ids=["arrays", "objects", "batch", "inside-a-reading"])
def test_deeply_nested_json_is_a_reason_not_a_crash(payload: bytes) -> None:
    topic = "rpm/v1/devices/d1/vitals"
    outputs = normalise_one(topic, payload)
    assert len(outputs) == 1 and isinstance(outputs[0], StructuralReject)
    assert (outputs[0].reason, outputs[0].detail) == ("not_json", "nested too deeply")
    assert quick_mark(topic, payload) == door_mark(topic, payload)  # object-shaped ones: the pipeline's call


@pytest.mark.parametrize("depth", [1, 100, 500, 900, 990, 1000, 1010, 2000])
@pytest.mark.parametrize("topic", ["rpm/v1/devices/d1/vitals", "rpm/v1/devices/d1/status",
                                   "rpm/v1/apps/a1/events"])
def test_nesting_around_the_interpreter_limit_is_read_or_refused_never_raised(topic: str, depth: int) -> None:
    """Decoding and re-encoding the item (raw, extra) must agree on what is too deep."""
    payload = b'{"msg_id":"m","extra":' + b"[" * depth + b"]" * depth + b"}"
    for stack in (0, 200):  # also called deep inside a task runner's stack
        outputs = _at_stack_depth(stack, lambda: normalise_one(topic, payload))
        assert_accounted(topic, payload, outputs)


def _at_stack_depth(frames: int, call: Callable[[], Any]) -> Any:
    return call() if frames == 0 else _at_stack_depth(frames - 1, call)


# --- round trips of valid readings ------------------------------------------------------------------------
@FUZZ
@given(reading=valid_readings())
def test_plausible_readings_normalise_to_the_same_canonical_value(reading) -> None:
    item, canonical, diastolic = reading
    [row] = normalise_one("rpm/v1/devices/d1/vitals", encode(item))
    spec = METRICS[item["metric"]]
    lo, hi = spec.plausible
    assert row["unit_key"] in ACCEPTED_UNIT_KEYS and row["canonical_unit"] == spec.canonical_unit
    assert row["value"] == pytest.approx(canonical, rel=1e-12, abs=1e-9)
    assert lo - 1e-9 <= row["value"] <= hi + 1e-9
    if diastolic is not None:
        assert row["diastolic"] == pytest.approx(diastolic, rel=1e-12, abs=1e-9)
    # ... and back to the unit as sent: degF -> Cel -> degF, lb -> kg -> lb, mmol/L -> mg/dL -> mmol/L.
    assert TO_UNIT[item["unit"]](row["value"]) == pytest.approx(row["value_sent"], rel=1e-12, abs=1e-9)
    sent = datetime.fromisoformat(item["measured_at"])
    assert row["measured_at"] == sent and row["measured_at"].tzinfo == UTC
    assert row["utc_offset_min"] == sent.utcoffset().total_seconds() // 60  # type: ignore[union-attr]
    assert row["has_time"] and row["reading_id"] and row["extra"] is None


@FUZZ
@given(reading=valid_readings(), other=offsets)
def test_the_same_instant_in_another_offset_is_the_same_reading(reading, other) -> None:
    """The idempotency key is the UTC instant: a device that changes time zone still deduplicates."""
    item, _, _ = reading
    moved = dict(item, measured_at=datetime.fromisoformat(item["measured_at"]).astimezone(other).isoformat())
    [a] = normalise_one("rpm/v1/devices/d1/vitals", encode(item))
    [b] = normalise_one("rpm/v1/devices/d1/vitals", encode(moved))
    assert a["reading_id"] == b["reading_id"] and a["measured_at"] == b["measured_at"]


@FUZZ
@given(fahrenheit=st.floats(min_value=77.0, max_value=113.0))
def test_fahrenheit_to_celsius_and_back(fahrenheit: float) -> None:
    item = {"msg_id": "t", "metric": "body_temperature", "unit": "[degF]", "value": fahrenheit,
            "measured_at": "2026-11-27T07:31:00-05:00"}
    [row] = normalise_one("rpm/v1/devices/d1/vitals", encode(item))
    assert 25.0 - 1e-9 <= row["value"] <= 45.0 + 1e-9
    assert row["value"] * 9.0 / 5.0 + 32.0 == pytest.approx(fahrenheit, rel=1e-12)


# --- pinned bugs: one landed message makes normalise_records raise ----------------------------------------
# Both are valid JSON the broker accepts and quick_mark passes (so they are landed and acked); the raise then
# fails decode_normalise for the whole batch, on every retry and every later run.
TOPICS = {"vitals": "rpm/v1/devices/d1/vitals", "status": "rpm/v1/devices/d1/status",
          "events": "rpm/v1/apps/a1/events"}


@pytest.mark.parametrize(("channel", "field"), [
    ("vitals", "msg_id"), ("vitals", "unit"), ("vitals", "cuff"), ("status", "firmware"), ("events", "module"),
])
def test_lone_surrogate_escape_is_a_reason_not_a_crash(channel: str, field: str) -> None:
    """BUG: '\\ud800' is a valid JSON escape but not encodable text; building ``raw`` with
    ``json.dumps(item, ensure_ascii=False).encode()`` raises UnicodeEncodeError (normalise.candidate,
    events.event_candidate)."""
    payload = b'{"msg_id":"m","metric":"heart_rate","value":72,"unit":"/min","event":"survey_completed",' \
              b'"measured_at":"2026-11-27T07:31:00-05:00","occurred_at":"2026-11-27T07:31:00-05:00",' \
              b'"reported_at":"2026-11-27T07:31:00-05:00","firmware":"1",' \
              + f'"{field}":"'.encode() + b'\\ud800"}'
    assert quick_mark(TOPICS[channel], payload) is None  # landed as readable JSON
    assert_accounted(TOPICS[channel], payload, normalise_one(TOPICS[channel], payload))


@pytest.mark.parametrize(("channel", "field", "when"), [
    ("vitals", "measured_at", "0001-01-01T00:00:00+01:00"),
    ("vitals", "measured_at", "9999-12-31T23:59:59-01:00"),
    ("events", "occurred_at", "0001-01-01T00:30:00+05:30"),
    ("events", "scheduled_for", "9999-12-31T23:00:00-02:00"),
    ("status", "reported_at", "0001-01-01T00:00:00+14:00"),
])
def test_calendar_edge_timestamp_is_a_reason_not_a_crash(channel: str, field: str, when: str) -> None:
    """BUG: an RFC 3339 time whose UTC instant falls outside year 1..9999 passes parse_time, then
    ``.astimezone(UTC)`` raises OverflowError (normalise.candidate / reading_id, events.event_candidate)."""
    item = {"msg_id": "m", "metric": "heart_rate", "value": 72, "unit": "/min", "event": "appointment_attended",
            "appointment_id": "a", "modality": "video", "firmware": "1",
            "measured_at": "2026-11-27T07:31:00-05:00", "occurred_at": "2026-11-27T07:31:00-05:00",
            "reported_at": "2026-11-27T07:31:00-05:00", field: when}
    payload = encode(item)
    assert quick_mark(TOPICS[channel], payload) is None
    assert_accounted(TOPICS[channel], payload, normalise_one(TOPICS[channel], payload))
