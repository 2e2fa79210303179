"""Vectorised decode + normalise of ordinary vitals messages, in DuckDB: the same candidate rows as
``transforms.normalise`` (the reference), without a Python loop per reading.

The reference spends ~35 µs of Python per reading (profiled: BENCHMARKS.md); this path parses and
normalises whole chunks inside DuckDB. It only *claims* messages on which DuckDB's JSON reader and Python's
``json`` provably agree; everything else — unreadable or unusual payloads, escapes (so lone surrogates),
NaN literals, duplicate keys, extra fields, batches holding non-objects, years outside 1000..8999, times
centuries from their receipt — goes through the reference path unchanged. ``tests/unit/test_fastpath.py``
checks both paths give identical rows on ordinary, hostile and fuzzed messages.

Claiming happens twice: ``precheck`` (Python, per message, a few C-level byte scans) and ``hand_back``
(SQL, per item, the shape of the parsed document); a message with any item handed back goes whole. Rows
differ from the reference only in ``raw``: JSON equal to the item (the message bytes exactly as sent for a
single reading) rather than Python's re-serialisation.
"""

from __future__ import annotations

import re

from transforms.decode import MAX_BATCH
from transforms.normalise import CONTRACT_FIELDS
from transforms.vocab import CGM_LOINC, METRICS

# Printable ASCII without backslash: no escapes (so no lone surrogates, no escaped keys) and nothing on
# which two JSON parsers may differ (control characters, invalid UTF-8, a byte-order mark).
_UNSAFE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")
_MAX_BRACKETS = 200  # Python's json raises RecursionError near 1,000 levels; DuckDB's reader does not
# JSON's non-standard NaN/Infinity literals where a value starts (after ':', ',' or '['); the same word inside
# a string ("msg_id": "Infinity") is preceded by a quote and stays on the fast path. A string that itself
# holds ': NaN' only costs a trip through the reference path.
_NON_FINITE = re.compile(rb"[:,\[]\s*-?(?:NaN|Infinity)")


def precheck(payload: bytes, max_payload_bytes: int) -> str | None:
    """The payload as text if it may take the fast path, else None (the reference path decides)."""
    if (len(payload) > max_payload_bytes or payload[:1] != b"{" or _UNSAFE.search(payload)
            or _NON_FINITE.search(payload)
            or payload.count(b"{") + payload.count(b"[") > _MAX_BRACKETS):
        return None
    return payload.decode("ascii")


def _sql_text(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _sql_list(values) -> str:
    return "[" + ", ".join(_sql_text(v) for v in sorted(values)) + "]"


def _conversions() -> str:
    """VALUES rows (metric, unit, subtract, multiply, divide) from the vocabulary (doubles parsed from their
    Python repr, so SQL and Python convert with the very same constants)."""
    rows = []
    for m in METRICS.values():
        for unit, conv in m.units.items():
            terms = ", ".join(f"'{x!r}'::DOUBLE" for x in (conv.subtract, conv.multiply, conv.divide))
            rows.append(f"({_sql_text(m.name)}, {_sql_text(unit)}, {terms})")
    return ",\n        ".join(rows)


def _known() -> str:
    return ",\n        ".join(f"({_sql_text(m.name)}, {_sql_text(m.canonical_unit)}, {_sql_text(m.loinc)})"
                               for m in METRICS.values())


# The contract fields of an item: s_<field> (its text: a string unescaped, a number as written, an object as
# JSON; NULL when absent) and t_<field> (its JSON type; 'NULL' for a JSON null).
_FIELDS = ("msg_id", "metric", "unit", "value", "values", "measured_at", "source", "manual")
_TS = r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?(Z|([+-])(\d{2}):(\d{2}))$"
_RFC3339_ANY = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"


# msgs(i, segment, record_no, device_id, received_at, payload, batch) -> one row per item of every message
# DuckDB can read: a single reading is the payload itself; a batch's items are the elements of "readings".
# ``batch`` is precheck's guess (the text "readings" occurs); a guess the document does not bear out, or a
# batch that is not a list of 1..MAX_BATCH objects, is handed back (the reference names the reject).
ITEMS = f"""
CREATE OR REPLACE TEMP TABLE _fp_items AS
SELECT i, payload::JSON AS item, 0 AS item_no, false AS is_batch, true AS shape_ok
FROM msgs WHERE NOT batch AND json_valid(payload)
UNION ALL
SELECT i, unnest(l) AS item, generate_subscripts(l, 1) - 1 AS item_no, true,
       len(l) BETWEEN 1 AND {MAX_BATCH} AND len(k) = len(list_distinct(k))
FROM (SELECT i, json_extract(payload, '$.readings[*]') AS l, json_keys(payload) AS k
      FROM msgs WHERE batch AND json_valid(payload) AND json_type(payload, '$.readings') = 'ARRAY')
"""

_PATHS = "[" + ", ".join(f"'$.{k}'" for k in _FIELDS) + "]"
_BP_PATHS = "['$.systolic', '$.diastolic']"
_NUMBER = "('BIGINT', 'UBIGINT', 'DOUBLE')"


# Every item's candidate columns plus ``hand_back``: whether its message must go to the reference path
# (extra or duplicate keys — the reference keeps extras as JSON text and lets the last duplicate win —, a
# values object with duplicate keys, numbers so big that a unit conversion could overflow (DuckDB raises
# where Python gives inf), integer msg_ids beyond 64 bits (DuckDB reads them as DOUBLE, Python keeps the
# digits), RFC 3339 times the strict pattern does not cover (lower-case t/z, a space, 7-9 fraction digits) or
# outside years 1000..8999, and batch items that are not objects).
ROWS = f"""
CREATE OR REPLACE TEMP TABLE _fp_rows AS
WITH conv(metric, unit, sub, mul, div) AS (VALUES
        {_conversions()}
), known(metric, canonical_unit, loinc) AS (VALUES
        {_known()}
), fields AS (
    -- each document is parsed a handful of times: field types and field texts come back as lists
    SELECT i, item_no, is_batch, shape_ok, item, json_type(item) = 'OBJECT' AS is_obj, json_keys(item) AS keys,
           json_type(item, {_PATHS}) AS t, json_extract_string(item, {_PATHS}) AS s
    FROM _fp_items
), typed AS (
    SELECT i, item_no, is_batch, shape_ok AND is_obj AS shape_ok, item, keys,
           {", ".join(f"s[{n + 1}] AS s_{k}, t[{n + 1}] AS t_{k}" for n, k in enumerate(_FIELDS))}
    FROM fields
), parsed AS (
    SELECT *,
           CASE WHEN t_metric = 'VARCHAR' THEN s_metric END AS metric,
           CASE WHEN t_unit = 'VARCHAR' THEN s_unit END AS unit,
           CASE WHEN t_source = 'VARCHAR' THEN s_source END AS source,
           CASE WHEN t_measured_at = 'VARCHAR' THEN s_measured_at END AS ts,
           CASE WHEN t_value IN {_NUMBER} THEN s_value::DOUBLE END AS num_value,
           CASE WHEN t_values = 'OBJECT' THEN json_type(s_values, {_BP_PATHS}) END AS bp_t,
           CASE WHEN t_values = 'OBJECT' THEN json_extract_string(s_values, {_BP_PATHS}) END AS bp_s,
           CASE WHEN t_values = 'OBJECT' THEN json_keys(s_values) END AS values_keys
    FROM typed
), numbers AS (
    SELECT *,
           CASE WHEN bp_t[1] IN {_NUMBER} THEN bp_s[1]::DOUBLE END AS num_sys,
           CASE WHEN bp_t[2] IN {_NUMBER} THEN bp_s[2]::DOUBLE END AS num_dia,
           regexp_full_match(ts, '{_TS}') AS ts_strict
    FROM parsed
), timed AS (
    SELECT *,
           coalesce(ts_strict AND TRY_CAST(ts[12:13] AS INTEGER) < 24 AND TRY_CAST(ts[15:16] AS INTEGER) < 60
                    AND TRY_CAST(ts[18:19] AS INTEGER) < 60 AND TRY_CAST(ts[1:4] AS INTEGER) BETWEEN 1000 AND 8999
                    AND (ts[-1:] = 'Z' OR (TRY_CAST(ts[-5:-4] AS INTEGER) < 24 AND TRY_CAST(ts[-2:] AS INTEGER) < 60))
                    AND TRY_CAST(ts[1:10] AS DATE) IS NOT NULL, false) AS time_ok,
           CASE WHEN metric = 'blood_pressure' THEN num_sys ELSE num_value END AS value_raw,
           CASE WHEN metric = 'blood_pressure' THEN num_dia END AS diastolic_raw
    FROM numbers
), measured AS (
    SELECT *,
           CASE WHEN isfinite(value_raw) THEN value_raw END AS value_sent,
           CASE WHEN isfinite(diastolic_raw) THEN diastolic_raw END AS diastolic_sent,
           CASE WHEN time_ok THEN ts::TIMESTAMPTZ END AS measured_at,
           CASE WHEN NOT time_ok THEN NULL WHEN ts[-1:] = 'Z' THEN 0
                ELSE (CASE ts[-6:-6] WHEN '-' THEN -1 ELSE 1 END) * (TRY_CAST(ts[-5:-4] AS INTEGER) * 60 + TRY_CAST(ts[-2:] AS INTEGER))
           END AS utc_offset_min,
           NOT shape_ok
           OR NOT list_has_all({_sql_list(CONTRACT_FIELDS)}, keys)
           OR len(keys) <> len(list_distinct(keys))
           OR len(values_keys) <> len(list_distinct(values_keys))
           OR t_msg_id = 'DOUBLE'
           OR abs(coalesce(num_value, 0)) > 1e300 OR abs(coalesce(num_sys, 0)) > 1e300
           OR abs(coalesce(num_dia, 0)) > 1e300
           OR (NOT coalesce(ts_strict, false) AND regexp_full_match(ts, '{_RFC3339_ANY}'))
           OR (ts_strict AND TRY_CAST(ts[1:4] AS INTEGER) NOT BETWEEN 1000 AND 8999) AS hand_back
    FROM timed
)
SELECT m.i, m.item_no, m.hand_back, m.msg_id, m.metric, m.unit,
       coalesce(m.metric, 'None') || '|' || coalesce(m.unit, 'None') AS unit_key,
       m.value_sent, m.diastolic_sent,
       (m.value_sent - c.sub) * c.mul / c.div AS value,
       (m.diastolic_sent - c.sub) * c.mul / c.div AS diastolic,
       k.canonical_unit,
       CASE WHEN m.metric = 'blood_glucose' AND m.source = 'cgm' THEN '{CGM_LOINC}' ELSE k.loinc END AS loinc,
       m.source, m.measured_at, m.utc_offset_min, m.measured_at IS NOT NULL AS has_time,
       CASE WHEN m.is_batch THEN m.item::VARCHAR::BLOB END AS item_raw,
       coalesce(m.t_manual = 'BOOLEAN' AND m.s_manual = 'true', false) AS manual,
       nullif(concat_ws(',', CASE WHEN m.t_manual NOT IN ('NULL', 'BOOLEAN') THEN 'manual' END,
                             CASE WHEN m.t_source NOT IN ('NULL', 'VARCHAR') THEN 'source' END), '') AS mistyped
FROM (SELECT *, CASE WHEN t_msg_id IN ('VARCHAR', 'BIGINT', 'UBIGINT') AND length(s_msg_id) BETWEEN 1 AND 128
                     THEN s_msg_id END AS msg_id FROM measured) m
LEFT JOIN known k ON k.metric = m.metric
LEFT JOIN conv c ON c.metric = m.metric AND c.unit = m.unit
"""

# Messages the reference path must decode: unreadable for DuckDB, not the shape precheck guessed, or with
# any item handed back. Every item of a message takes the same path.
BACK = """
CREATE OR REPLACE TEMP TABLE _fp_back AS
SELECT i FROM msgs WHERE i NOT IN (SELECT i FROM _fp_items)
UNION
SELECT i FROM _fp_rows WHERE hand_back
UNION
-- seconds_ahead: Python divides exact integers; a double holds the microseconds exactly only below 2^53
SELECT i FROM _fp_rows JOIN msgs USING (i)
WHERE abs(epoch_us(measured_at) - epoch_us(received_at)) >= 9007199254740992
"""

CANDIDATES = """
SELECT msgs.segment || ':' || msgs.record_no || ':' || r.item_no AS row_key,
       msgs.segment, msgs.record_no, r.item_no, msgs.device_id, r.msg_id, r.metric, r.unit, r.unit_key,
       r.value_sent, r.diastolic_sent, r.value, r.diastolic, r.canonical_unit, r.loinc, r.source, r.measured_at,
       r.utc_offset_min, r.has_time, msgs.received_at,
       (epoch_us(r.measured_at) - epoch_us(msgs.received_at))::DOUBLE / 1000000 AS seconds_ahead,
       CASE WHEN r.metric <> '' AND r.measured_at IS NOT NULL
            THEN sha256(msgs.device_id || '|' || r.metric || '|'
                        || strftime(r.measured_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%f') || '+00:00')[1:32]
       END AS reading_id,
       NULL::VARCHAR AS extra, coalesce(r.item_raw, msgs.payload::BLOB) AS raw, r.manual, r.mistyped
FROM _fp_rows r JOIN msgs USING (i)
WHERE r.i NOT IN (SELECT i FROM _fp_back)
"""

