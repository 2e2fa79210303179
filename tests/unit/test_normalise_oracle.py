"""The production decoder gives exactly the reference normaliser's rows, for every message.

transforms/normalise.py (Python reads each item once, DuckDB computes times, conversions, codes and ids in
bulk) replaced a per-row Python normaliser, kept as the oracle in tests/oracle/. Every message here goes
through both — ordinary device traffic, hostile and unusual payloads, fuzzed messages on every channel — and
must come out the same: candidate rows column for column, event rows, structural rejects. Two documented
latitudes: ``raw`` of a single-reading message is the message as sent (JSON-equal to the oracle's
re-serialisation, non-finite numbers compared as their literals), and ``seconds_ahead`` more than 2**53 µs
(285 years) from its receipt may differ from Python's division in the last place.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from core.landing import LandedRecord
from tests.oracle.normalise import normalise_records as oracle_records
from tests.unit.test_fuzz_decoder import (
    FUZZ,
    RECEIVED,
    SEGMENT,
    encode,
    messages,
    reading_like,
    valid_readings,
)
from transforms.normalise import CANDIDATE_COLUMNS, EventRow, StructuralReject, normalise_records

DIFF_FUZZ = settings(FUZZ, max_examples=150)
TOPIC = "rpm/v1/devices/bp-7/vitals"
T = "2026-11-27T07:31:00.250-05:00"

ORDINARY: list[Any] = [
    {"msg_id": "a", "metric": "blood_pressure", "unit": "mm[Hg]", "measured_at": T,
     "values": {"systolic": 128, "diastolic": 82}},
    {"msg_id": 17, "metric": "heart_rate", "unit": "/min", "value": 71, "measured_at": "2026-11-27T12:31:00Z"},
    {"msg_id": "c", "metric": "spo2", "unit": "%", "value": 96.5, "measured_at": "2026-11-27T12:31:00+05:30"},
    {"msg_id": "d", "metric": "body_temperature", "unit": "[degF]", "value": 99.1, "measured_at": T},
    {"msg_id": "e", "metric": "body_weight", "unit": "[lb_av]", "value": 181.4, "measured_at": T, "manual": True},
    {"msg_id": "f", "metric": "blood_glucose", "unit": "mmol/L", "value": 6.2, "measured_at": T, "source": "meter"},
    {"readings": [{"msg_id": f"g{i}", "metric": "blood_glucose", "unit": "mg/dL", "value": 100 + i,
                   "source": "cgm", "measured_at": f"2026-11-27T0{i}:00:00.123456-05:00"} for i in range(6)]},
    # Wrong, but ordinary: the suite quarantines these, the decoder only has to read them the same way.
    {"msg_id": "h", "metric": "heart_rate", "unit": "/min", "value": "71", "measured_at": T},
    {"msg_id": "i", "metric": "heart_rate", "unit": "bpm", "value": 71, "measured_at": "2026-11-27T07:31:00"},
    {"msg_id": "j", "metric": "pulse", "value": True, "measured_at": "2026-02-30T07:31:00Z"},
    {"msg_id": "", "metric": "spo2", "unit": "%", "value": None, "measured_at": "2026-11-27T24:00:00Z"},
    {"metric": "blood_pressure", "unit": "mm[Hg]", "values": [120, 80], "measured_at": "2026-11-27T07:61:00Z"},
    {"msg_id": "k" * 129, "metric": "spo2", "unit": "%", "value": -0.0, "measured_at": "2026-11-27T07:31:00+24:00"},
    {"msg_id": False, "metric": 5, "unit": {}, "value": 1e300, "manual": "yes", "source": 3, "measured_at": 7},
    {"msg_id": "l", "metric": "blood_pressure", "unit": "mm[Hg]", "measured_at": T, "values": {"systolic": 120}},
    {"msg_id": -12, "metric": "body_weight", "unit": "kg", "value": 2**63, "measured_at": "1999-12-31T23:59:59.5Z"},
]
# What a parser or a calendar may disagree on: every one must still come out as the oracle says.
UNUSUAL: list[bytes] = [
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2026-11-27t07:31:00z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2026-11-27 07:31:00.123456789Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "0999-11-27T07:31:00Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "value": 98, "measured_at": "2026-11-27T07:31:00Z"}',
    b'{"msg_id": "x", "metric": "blood_pressure", "unit": "mm[Hg]", "measured_at": "2026-11-27T07:31:00Z", '
    b'"values": {"systolic": 1, "systolic": 130, "diastolic": 80}}',
    b'{"msg_id": 123456789012345678901234567890, "metric": "spo2", "unit": "%", "value": 97}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 1e400, "measured_at": "2026-11-27T07:31:00Z"}',
    b'{"msg_id": "x", "metric": "blood_glucose", "unit": "mmol/L", "value": 1e308, "measured_at": "2026-11-27T07:31:00Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": NaN}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "device_model": "OX-2"}',
    b'{"msg_id": "x", "metric": "spo\\u0032", "unit": "%", "value": 97}',
    b'{"msg_id": "x", "metric": "readings", "unit": "%", "value": 97}',
    b'{"readings": [{"msg_id": "x", "metric": "spo2"}, 7]}',
    b'{"readings": [], "x": 1}', b'{"readings": null}', b'{"readings": "all"}',
    b'{"readings": [{"metric": "spo2"}], "readings": [{"metric": "heart_rate"}]}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97', b'{}', b'{"a": [[[[[[[[1]]]]]]]]}',
    b'{"msg_id": -0, "metric": "spo2", "unit": "%", "value": -0, "measured_at": "2026-11-27T07:31:00Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "manual": null, "source": null}',
    # Python's fromisoformat adds offset minutes past 59 to the hours; the instant must stay inside years 1..9999
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2026-11-27T07:31:00+05:60"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2026-11-27T07:31:00-00:99"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "0001-01-01T00:00:00+01:00"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "0001-01-01T00:00:00-01:00"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "9999-12-31T23:59:59-01:00"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2024-02-29T23:59:59.9999999Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2023-02-29T00:00:00Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2026-11-27T07:31:60Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "0000-01-01T00:00:00Z"}',
    b'{"msg_id": "x", "metric": "spo2", "unit": "\\ud800", "value": 97, "measured_at": "2026-11-27T07:31:00.5z"}',
    b'{"msg_id": "\\udc00x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "2026-11-27T07:31:00\\ud800"}',
    '{"msg_id": "x", "metric": "spo2", "unit": "%", "value": 97, "measured_at": "２０２６-11-27T07:31:00Z"}'.encode(),
]


def records(payloads: list[bytes], topic: str = TOPIC) -> list[LandedRecord]:
    return [LandedRecord(n, topic, RECEIVED, p, None) for n, p in enumerate(payloads)]


def _literal(v: Any) -> Any:
    """JSON with non-finite numbers as their literal text (NaN, Infinity), so raw texts compare as JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _literal(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_literal(x) for x in v]
    return v


def same_json(a: bytes, b: bytes) -> bool:
    return _literal(json.loads(a, parse_constant=str)) == _literal(json.loads(b, parse_constant=str))


def assert_same(recs: list[LandedRecord]) -> None:
    want = list(oracle_records(SEGMENT, recs))
    got = list(normalise_records(SEGMENT, recs))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g).__name__ == type(w).__name__
        if isinstance(g, StructuralReject):
            assert vars(g) == vars(w)
        elif isinstance(g, EventRow):
            assert dict(g) == dict(w)
        else:
            assert list(g) == CANDIDATE_COLUMNS == list(w)
            for col in CANDIDATE_COLUMNS:
                gv, wv = g[col], w[col]
                if col == "raw":
                    assert same_json(gv, wv), (w["row_key"], gv, wv)
                elif col == "seconds_ahead" and wv is not None and abs(wv) >= 2**53 / 1e6:
                    assert math.isclose(gv, wv, rel_tol=2**-52), (w["row_key"], gv, wv)
                else:
                    assert gv == wv, (w["row_key"], col, wv, gv)
                    # the oracle keeps a NaN literal's text as core.payload.NonFinite, a str: stored as text
                    assert type(gv) is (str if isinstance(wv, str) else type(wv)) or wv is None, (w["row_key"], col)
                    if isinstance(wv, float):
                        assert math.copysign(1, gv) == math.copysign(1, wv), (w["row_key"], col)


def test_ordinary_messages_give_the_oracles_rows() -> None:
    recs = records([json.dumps(doc).encode() for doc in ORDINARY])
    assert_same(recs)
    assert len(list(normalise_records(SEGMENT, recs))) == len(ORDINARY) + 5  # the CGM batch is six items


def test_unusual_messages_give_the_oracles_rows() -> None:
    assert_same(records(UNUSUAL))


def test_status_and_app_events_and_unreadable_messages_give_the_oracles_rows() -> None:
    status = [b'{"msg_id": "s", "reported_at": "2026-11-27T08:00:00Z", "battery_pct": 64, "firmware": "2"}',
              b'{"statuses": [{"msg_id": "s", "reported_at": "2026-11-27T08:00:00Z", "uptime_s": 1}, 3]}']
    events = [b'{"msg_id": "a", "event": "education_completed", "occurred_at": "2026-11-27T19:02:00-05:00", '
              b'"module": "salt", "minutes": 12}', b'{"events": "no"}']
    assert_same(records(status, "rpm/v1/devices/bp-7/status"))
    assert_same(records(events, "rpm/v1/apps/app-1/events"))
    assert_same(records([b"\xff", b"[1]", b"{}"], "rpm/v1/devices/bp-7/vitals/x"))


@DIFF_FUZZ
@given(st.lists(st.one_of(valid_readings().map(lambda r: r[0]), reading_like,
                          st.lists(reading_like, min_size=1, max_size=4).map(lambda rs: {"readings": rs})),
                min_size=1, max_size=8),
       st.booleans())
def test_fuzzed_readings_give_the_oracles_rows(docs: list[Any], ascii_only: bool) -> None:
    payloads = [encode(d) if ascii_only else json.dumps(d, ensure_ascii=False, allow_nan=True).encode()
                for d in docs]
    assert_same(records(payloads))


@DIFF_FUZZ
@given(st.lists(messages(), min_size=1, max_size=6))
def test_fuzzed_messages_on_every_channel_give_the_oracles_rows(msgs: list[tuple[str, Any]]) -> None:
    recs = [LandedRecord(n, topic, RECEIVED, encode(doc), None) for n, (topic, doc) in enumerate(msgs)]
    for rec in recs:  # the oracle reads one message at a time as the stage did
        assert_same([rec])
