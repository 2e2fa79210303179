"""The bulk (DuckDB) decode path gives exactly the reference normaliser's rows for every message it claims.

transforms/fastpath.py re-implements contract v1 in SQL for speed; transforms/normalise.py is the reference.
Each message here goes through both: a message the bulk path keeps must yield the same rows column for column
(``raw`` only JSON-equal), and ordinary device traffic must actually stay on the bulk path — otherwise the
speed-up would silently vanish. Unusual messages may be handed back; they then take the reference path.
"""

from __future__ import annotations

import json
import math
from typing import Any

import duckdb
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from core.landing import LandedRecord
from pipeline.stage import Decoded, bulk_candidates
from tests.unit.test_fuzz_decoder import FUZZ, RECEIVED, SEGMENT, encode, reading_like, valid_readings
from transforms import fastpath
from transforms.normalise import CANDIDATE_COLUMNS, normalise_records

FAST_FUZZ = settings(FUZZ, max_examples=120)  # each example opens a DuckDB connection
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
# Not ordinary: each may take either path, but must never come out different.
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
]


def records(payloads: list[bytes]) -> list[LandedRecord]:
    return [LandedRecord(n, TOPIC, RECEIVED, p, None) for n, p in enumerate(payloads)]


# stg_candidates' column types: both paths are compared as the stage stores them.
TYPES = {"record_no": "INTEGER", "item_no": "INTEGER", "value_sent": "DOUBLE", "diastolic_sent": "DOUBLE",
         "value": "DOUBLE", "diastolic": "DOUBLE", "measured_at": "TIMESTAMPTZ", "utc_offset_min": "INTEGER",
         "has_time": "BOOLEAN", "received_at": "TIMESTAMPTZ", "seconds_ahead": "DOUBLE", "raw": "BLOB",
         "manual": "BOOLEAN"}
DDL = ", ".join(f"{c} {TYPES.get(c, 'VARCHAR')}" for c in CANDIDATE_COLUMNS)


def both_paths(recs: list[LandedRecord]) -> tuple[dict[str, tuple], dict[str, tuple], set[int]]:
    """(bulk rows, reference rows) by row key, and the record numbers the bulk path kept."""
    decoded = Decoded()
    for rec in recs:
        decoded.add(SEGMENT, rec, 256 * 1024)
    ref = pd.DataFrame([row for rec in recs for row in normalise_records(SEGMENT, [rec]) if isinstance(row, dict)],
                       columns=CANDIDATE_COLUMNS)
    cols = ", ".join(CANDIDATE_COLUMNS)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE TABLE bulk ({DDL}); CREATE TABLE ref ({DDL})")
        kept: set[int] = set()
        if decoded.fast_records:
            back = bulk_candidates(con, decoded)
            con.execute(f"INSERT INTO bulk SELECT {cols} FROM ({fastpath.CANDIDATES})")
            kept = {r.n for r in decoded.fast_records} - {rec.n for _, rec in back}
        if len(ref):
            con.register("ref_frame", ref)
            con.execute(f"INSERT INTO ref SELECT {cols} FROM ref_frame")
        rows = {name: {r[0]: r for r in con.execute(f"SELECT {cols} FROM {name}").fetchall()}
                for name in ("bulk", "ref")}
    return rows["bulk"], rows["ref"], kept


def assert_identical(bulk: dict[str, tuple], ref: dict[str, tuple], kept: set[int]) -> None:
    ref = {k: r for k, r in ref.items() if r[CANDIDATE_COLUMNS.index("record_no")] in kept}
    assert sorted(bulk) == sorted(ref)
    raw = CANDIDATE_COLUMNS.index("raw")
    for key, want in ref.items():
        got = bulk[key]
        assert json.loads(got[raw]) == json.loads(want[raw]), key
        for col, g, w in zip(CANDIDATE_COLUMNS, got, want, strict=True):
            if col != "raw":
                assert g == w and (not isinstance(w, float) or math.copysign(1, g) == math.copysign(1, w)), \
                    (key, col, w, g)


def test_ordinary_messages_stay_on_the_bulk_path_with_identical_rows() -> None:
    recs = records([json.dumps(doc).encode() for doc in ORDINARY])
    bulk, ref, kept = both_paths(recs)
    assert kept == {r.n for r in recs}, "an ordinary message left the bulk path"
    assert len(bulk) == len(ORDINARY) + 5  # the CGM batch is six items
    assert_identical(bulk, ref, kept)


def test_unusual_messages_come_out_the_same_whichever_path_they_take() -> None:
    recs = records(UNUSUAL)
    bulk, ref, kept = both_paths(recs)
    assert_identical(bulk, ref, kept)
    # Those the SQL cannot read exactly like Python are handed back, not guessed at.
    for n in (0, 1, 2, 3, 4, 5, 8, 9, 10, 12, 13, 14, 15, 16, 17):
        assert n not in kept, UNUSUAL[n]


@FAST_FUZZ
@given(st.lists(st.one_of(valid_readings().map(lambda r: r[0]), reading_like,
                          st.lists(reading_like, min_size=1, max_size=4).map(lambda rs: {"readings": rs})),
                min_size=1, max_size=8),
       st.booleans())
def test_fuzzed_readings_come_out_the_same(docs: list[Any], ascii_only: bool) -> None:
    payloads = [encode(d) if ascii_only else json.dumps(d, ensure_ascii=False, allow_nan=True).encode()
                for d in docs]
    bulk, ref, kept = both_paths(records(payloads))
    assert_identical(bulk, ref, kept)


@FAST_FUZZ
@given(st.lists(valid_readings().map(lambda r: r[0]), min_size=1, max_size=8))
def test_valid_readings_stay_on_the_bulk_path(docs: list[Any]) -> None:
    recs = records([json.dumps(d).encode() for d in docs])
    bulk, ref, kept = both_paths(recs)
    assert kept == {r.n for r in recs}
    assert_identical(bulk, ref, kept)
