"""Reading items -> canonical candidate rows: UCUM canonical units, LOINC codes, UTC time, reading id.

Nothing is judged here: a field that is missing or of the wrong type becomes a null, and the validation
suite (expectations/) names the rule it breaks. The only output is data; the input is never mutated.

One implementation, in two halves that every item goes through. Python parses each message once, strictly
(core/payload.py: msgspec, in C; its docstring is the JSON contract — no NaN literals, no lone surrogates),
and reads a segment's items field by field into columns (``Items.read``: each field one C-level look-up and
one type test per item). DuckDB then does the per-row arithmetic in bulk (``CANDIDATES``): RFC 3339 times to
UTC instants, unit conversions, codes, reading ids. The per-row Python normaliser this replaced is kept as
the test oracle (tests/oracle/normalise.py); tests/unit/test_normalise_oracle.py checks both give identical
rows.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

from core.landing import LandedColumns, LandedRecord, from_us, to_us
from core.payload import MAX_PAYLOAD_BYTES, parse_json_object
from transforms.decode import BATCH_KEYS, decode_message
from transforms.vocab import CGM_LOINC, METRICS

# RFC 3339 date-time with a mandatory offset ("Z" or +hh:mm): local time without an offset is ambiguous.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
# "manual": true marks a reading keyed in by the patient rather than transmitted by the device.
CONTRACT_FIELDS = frozenset({"msg_id", "metric", "measured_at", "value", "values", "unit", "source", "manual"})

CANDIDATE_COLUMNS = [
    "row_key", "segment", "record_no", "item_no", "device_id", "msg_id", "metric", "unit", "unit_key",
    "value_sent", "diastolic_sent", "value", "diastolic", "canonical_unit", "loinc", "source", "measured_at",
    "utc_offset_min", "has_time", "received_at", "seconds_ahead", "reading_id", "extra", "raw", "manual",
    "mistyped",
]


@dataclass(frozen=True)
class StructuralReject:
    """A message (or batch item) that cannot even be read as a reading: straight to quarantine."""
    row_key: str
    segment: str
    record_no: int
    item_no: int
    device_id: str | None
    received_at: datetime
    reason: str
    detail: str
    raw: bytes


def number(v: Any) -> float | None:
    """A finite JSON number as float; strings, booleans, NaN/Infinity and overflowing values are not."""
    if type(v) is float:  # the common case first (bool is another type)
        return v if v - v == 0 else None  # inf - inf and nan - nan are nan (only from a caller: JSON has neither)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def parse_time(v: Any) -> datetime | None:
    if not isinstance(v, str) or not _RFC3339.fullmatch(v):
        return None
    try:
        ts = datetime.fromisoformat(v.replace("z", "Z"))
        ts.astimezone(UTC)  # an instant outside years 1-9999 in UTC (e.g. 0001-01-01T00:00+01:00)
    except (ValueError, OverflowError):
        return None
    return ts if ts.tzinfo is not None else None


def clean(v: str) -> str:
    """Text that is valid UTF-8: JSON may carry lone surrogates ("\\ud800"), which no store accepts.
    They become U+FFFD, so the value is still judged (and fails whatever rule needs the real text)."""
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        return v.encode("utf-8", "replace").decode("utf-8")


# JSON text's escapes that matter here, read left to right: an escaped backslash (so that a backslash and
# "ud800" after it stays text), a surrogate pair (one character), and a lone surrogate escape (6 characters).
_SURROGATE_ESCAPES = re.compile(r"\\\\|\\ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}|\\ud[89a-f][0-9a-f]{2}",
                                re.IGNORECASE)


def _lone_to_fffd(m: re.Match[str]) -> str:
    return "\\ufffd" if len(m.group()) == 6 else m.group()


def json_text(v: Any) -> str:
    """JSON text for a JSON column: ASCII escapes, lone surrogates replaced by U+FFFD (DuckDB's JSON type
    refuses them; ``raw`` keeps the original bytes). No recursion of ours: any depth json.dumps handles."""
    text = json.dumps(v, default=str)
    return _SURROGATE_ESCAPES.sub(_lone_to_fffd, text) if "\\u" in text else text


def text_field(item: dict[str, Any], key: str) -> str | None:
    v = item.get(key)
    return clean(v) if isinstance(v, str) else None


def _text(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str | int):
        s = clean(str(v))
        return s if 0 < len(s) <= 128 else None
    return None


def mistyped(item: dict[str, Any], checks: dict[str, Any]) -> str | None:
    """Optional fields that are present but of the wrong type ("manual" must be a boolean, ...): named, so
    the suite can quarantine the item instead of silently loading it without them."""
    bad = [k for k, ok in checks.items() if k in item and item[k] is not None and not ok(item[k])]
    return ",".join(bad) or None


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _is_number(v: Any) -> bool:
    return number(v) is not None


# What Python reads of each landed vitals message and of each of its items (the rest is computed by
# CANDIDATES). Message fields are kept once per message, not once per item: a CGM upload holds a dozen.
MESSAGE_COLUMNS = ["msg", "segment", "record_no", "device_id", "received_us", "payload", "batch"]
ITEM_COLUMNS = ["msg", "item_no", "msg_id", "metric", "unit", "source", "value_sent", "diastolic_sent",
                "measured_text", "manual", "mistyped", "extra", "raw"]
_NAN = float("nan")
_EXACT = 2**53
_BP = "blood_pressure"
_MISTYPED = {"manual": lambda v: isinstance(v, bool), "source": _is_text}


def _sent(v: Any) -> float:
    """number(), with NaN for null (the float column's null)."""
    if type(v) is int and -_EXACT < v < _EXACT:  # the common cases first: exact as a float
        return float(v)
    if type(v) is float and v - v == 0:
        return v
    f = number(v)
    return _NAN if f is None else f


def _pair(values: Any, key: str) -> float:
    return _sent(values.get(key)) if type(values) is dict else _NAN


class Items:
    """Vitals items of a chunk of messages, column by column: each item's fields as typed JSON gave them.

    ``read`` takes a segment's items at once and reads each field as a column (C-level look-ups, one
    comprehension per field): the only per-item Python of the decoder. The arithmetic happens in bulk in
    ``CANDIDATES``."""

    def __init__(self) -> None:
        self.messages: dict[str, list[Any]] = {c: [] for c in MESSAGE_COLUMNS}
        self.columns: dict[str, list[Any]] = {c: [] for c in ITEM_COLUMNS}

    def __len__(self) -> int:
        return len(self.columns["msg"])

    def message(self, segment: str, record_no: int, device_id: str, received_us: int, payload: bytes,
                batch: bool) -> int:
        """Register a landed vitals message; returns its number for ``read``. A single reading's raw is the
        message as sent (JSON-equal to the item); a batch item's is its own JSON (see ``read``)."""
        n = len(self.messages["msg"])
        self.messages_of(segment, [record_no], [device_id], [received_us], [payload], [batch])
        return n

    def messages_of(self, segment: str, record_no: list[int], device_id: list[str], received_us: list[int],
                    payload: list[bytes], batch: list[bool]) -> None:
        """Register a segment's landed vitals messages at once (numbered on from ``len(self.messages["msg"])``,
        in order: ``message`` for each, without its per-message Python)."""
        m = self.messages
        n = len(m["msg"])
        m["msg"] += range(n, n + len(record_no))
        m["segment"] += repeat(segment, len(record_no))
        for column, values in (("record_no", record_no), ("device_id", device_id), ("received_us", received_us),
                               ("payload", payload), ("batch", batch)):
            m[column] += values

    def read(self, items: list[dict[str, Any]], msgs: list[int], item_nos: list[int], raws: list[bool]) -> None:
        """Items (JSON objects) of registered messages ``msgs``, at positions ``item_nos``. ``raws``: build
        an item's JSON now (else its raw is the message's, or — the stage — built by ``item_raw`` only if it
        is quarantined)."""
        get, c = dict.get, self.columns

        def field(key: str) -> list[Any]:
            return list(map(get, items, repeat(key)))

        metric = [v if type(v) is str else None for v in field("metric")]
        sources = field("source")
        manuals = field("manual")
        c["msg"] += msgs
        c["item_no"] += item_nos
        c["msg_id"] += [v if type(v) is str and 0 < len(v) <= 128 else _text(v) for v in field("msg_id")]
        c["metric"] += metric
        c["unit"] += [v if type(v) is str else None for v in field("unit")]
        c["source"] += [v if type(v) is str else None for v in sources]
        values = field("values")
        c["value_sent"] += [_pair(s, "systolic") if m == _BP else _sent(v)
                            for m, v, s in zip(metric, field("value"), values, strict=True)]
        c["diastolic_sent"] += [_pair(s, "diastolic") if m == _BP else _NAN
                                for m, s in zip(metric, values, strict=True)]
        c["measured_text"] += [v if type(v) is str else None for v in field("measured_at")]
        c["manual"] += [v is True for v in manuals]
        c["mistyped"] += [None if (m is None or type(m) is bool) and (s is None or type(s) is str)
                          else mistyped(item, _MISTYPED) for m, s, item in zip(manuals, sources, items, strict=True)]
        within = CONTRACT_FIELDS.issuperset
        c["extra"] += [None if within(item) else json_text({k: v for k, v in item.items() if k not in CONTRACT_FIELDS})
                       for item in items]
        c["raw"] += [json.dumps(item, default=str).encode() if raw else None
                     for item, raw in zip(items, raws, strict=True)]

    def frames(self) -> tuple[Any, Any]:
        """(messages, items) as DataFrames DuckDB can scan (NaN is null in the float columns)."""
        import numpy as np
        import pandas as pd

        m, c = self.messages, self.columns
        messages = pd.DataFrame({
            "msg": np.array(m["msg"], dtype=np.int64), "segment": m["segment"],
            "record_no": np.array(m["record_no"], dtype=np.int64), "device_id": m["device_id"],
            "received_us": np.array(m["received_us"], dtype=np.int64),
            "payload": np.array(m["payload"], dtype=object), "batch": np.array(m["batch"], dtype=bool)},
            columns=MESSAGE_COLUMNS)
        items = pd.DataFrame({
            **{k: np.array(c[k], dtype=np.int64) for k in ("msg", "item_no")},
            **{k: c[k] for k in ("msg_id", "metric", "unit", "source", "measured_text", "mistyped", "extra")},
            **{k: np.array(c[k], dtype=np.float64) for k in ("value_sent", "diastolic_sent")},
            "manual": np.array(c["manual"], dtype=bool), "raw": np.array(c["raw"], dtype=object),
        }, columns=ITEM_COLUMNS)
        return messages, items


def _sql_text(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _conversions() -> str:
    """VALUES rows (metric, unit, canonical unit, LOINC, subtract, multiply, divide) from the vocabulary
    (doubles parsed from their Python repr, so a conversion is the vocabulary's, bit for bit)."""
    rows = []
    for m in METRICS.values():
        for unit, conv in m.units.items():
            terms = ", ".join(f"'{x!r}'::DOUBLE" for x in (conv.subtract, conv.multiply, conv.divide))
            rows.append(f"({_sql_text(m.name)}, {_sql_text(unit)}, {terms})")
    return ",\n        ".join(rows)


def _known() -> str:
    return ",\n        ".join(f"({_sql_text(m.name)}, {_sql_text(m.canonical_unit)}, {_sql_text(m.loinc)})"
                               for m in METRICS.values())


# UTC instants a Python datetime can hold (years 1..9999): a time whose instant falls outside has no UTC form.
_MIN_US = -62135596800_000_000
_MAX_US = 253402300799_999_999

# Candidate rows of an ``Items`` frame (``{items}``). Times follow Python's datetime.fromisoformat on what the
# RFC 3339 pattern admits: 't'/' ' for 'T', 'z' for 'Z', 1..9 fraction digits (microseconds truncated),
# calendar-valid dates of years 1..9999, hours < 24, minutes and seconds < 60 (no leap second), and an offset
# of any ±hh:mm strictly inside ±24 h (Python adds minutes past 59 to the hours: +05:60 is +06:00).
CANDIDATES = f"""
WITH conv(metric, unit, sub, mul, div) AS (VALUES
        {_conversions()}
), known(metric, canonical_unit, loinc) AS (VALUES
        {_known()}
), parts AS (
    SELECT i.*, m.segment, m.record_no, m.device_id, m.received_us, m.payload, m.batch, regexp_extract(measured_text,
           '^(\\d{{4}})-(\\d{{2}})-(\\d{{2}})[Tt ](\\d{{2}}):(\\d{{2}}):(\\d{{2}})(?:\\.(\\d{{1,9}}))?(?:([Zz])|([+-])(\\d{{2}}):(\\d{{2}}))$',
           ['y', 'mo', 'd', 'h', 'mi', 's', 'frac', 'z', 'sign', 'oh', 'om']) AS p
    FROM {{items}} i JOIN {{messages}} m ON m.msg = i.msg
), fields AS (
    -- no match: every group is '' (so NULL here)
    SELECT *, nullif(p.y, '')::INTEGER AS y, nullif(p.mo, '')::INTEGER AS mo, nullif(p.d, '')::INTEGER AS d,
           nullif(p.h, '')::INTEGER AS hh, nullif(p.mi, '')::INTEGER AS mi, nullif(p.s, '')::INTEGER AS ss,
           CASE WHEN p.frac = '' THEN 0 ELSE rpad(p.frac[1:6], 6, '0')::INTEGER END AS us,
           CASE WHEN p.z <> '' THEN 0
                WHEN p.sign = '-' THEN -(nullif(p.oh, '')::INTEGER * 60 + nullif(p.om, '')::INTEGER)
                ELSE nullif(p.oh, '')::INTEGER * 60 + nullif(p.om, '')::INTEGER END AS off_min
    FROM parts
), local AS (
    SELECT *,
           CASE WHEN y BETWEEN 1 AND 9999 AND hh < 24 AND mi < 60 AND ss < 60 AND abs(off_min) < 1440
                THEN epoch_us(try(make_date(y, mo, d))::TIMESTAMP) END AS day_us
    FROM fields
), instants AS (
    SELECT *, day_us + ((hh * 3600 + mi * 60 + ss)::BIGINT * 1000000 + us) - off_min::BIGINT * 60000000 AS utc_us
    FROM local
), timed AS (
    SELECT *, CASE WHEN utc_us BETWEEN {_MIN_US} AND {_MAX_US} THEN make_timestamp(utc_us) END AS utc_ts
    FROM instants
)
SELECT t.segment || ':' || t.record_no || ':' || t.item_no AS row_key,
       t.segment, t.record_no, t.item_no, t.device_id, t.msg_id, t.metric, t.unit,
       coalesce(t.metric, 'None') || '|' || coalesce(t.unit, 'None') AS unit_key,
       t.value_sent, t.diastolic_sent,
       (t.value_sent - c.sub) * c.mul / c.div AS value,
       (t.diastolic_sent - c.sub) * c.mul / c.div AS diastolic,
       k.canonical_unit,
       CASE WHEN t.metric = 'blood_glucose' AND t.source = 'cgm' THEN '{CGM_LOINC}' ELSE k.loinc END AS loinc,
       t.source, t.utc_ts AT TIME ZONE 'UTC' AS measured_at,  -- whatever the session's TimeZone
       CASE WHEN t.utc_ts IS NOT NULL THEN t.off_min END AS utc_offset_min,
       t.utc_ts IS NOT NULL AS has_time,
       make_timestamp(t.received_us) AT TIME ZONE 'UTC' AS received_at,
       -- exact below 2**53 µs (285 years); beyond, within one unit in the last place of Python's division
       CASE WHEN t.utc_ts IS NOT NULL THEN (t.utc_us - t.received_us)::DOUBLE / 1000000 END AS seconds_ahead,
       CASE WHEN t.metric <> '' AND t.utc_ts IS NOT NULL
            THEN sha256(t.device_id || '|' || t.metric || '|' || strftime(t.utc_ts, '%Y-%m-%dT%H:%M:%S.%f')
                        || '+00:00')[1:32]
       END AS reading_id,
       t.extra, CASE WHEN t.batch THEN t.raw ELSE t.payload END AS raw, t.manual, t.mistyped
FROM timed t
LEFT JOIN known k ON k.metric = t.metric
LEFT JOIN conv c ON c.metric = t.metric AND c.unit = t.unit
"""


def candidates_sql(messages: str, items: str) -> str:
    """SELECT of the candidate rows (CANDIDATE_COLUMNS) of Items frames or tables named ``messages``, ``items``."""
    return CANDIDATES.replace("{items}", items).replace("{messages}", messages)


def reading_id(device_id: str, metric: str, measured_at: datetime) -> str:
    """Idempotency key: the same device, metric and instant is the same reading, however often it arrives
    (sha256 of ``device|metric|UTC instant``, as CANDIDATES computes it for every staged reading)."""
    import hashlib

    key = f"{device_id}|{metric}|{measured_at.astimezone(UTC).isoformat(timespec='microseconds')}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def candidate_rows(con: Any, items: Items) -> list[dict[str, Any]]:
    """Candidate rows of ``items`` as dicts, in order (one item or a few: replay, tests; the stage inserts
    from ``candidates_sql`` without materialising rows in Python)."""
    if not len(items):
        return []
    messages, frame = items.frames()
    con.register("_items_messages", messages)
    con.register("_items_frame", frame)
    try:
        cur = con.execute(candidates_sql("_items_messages", "_items_frame")
                          + " ORDER BY t.segment, t.record_no, t.item_no")
        out = [dict(zip(CANDIDATE_COLUMNS, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.unregister("_items_frame")
        con.unregister("_items_messages")
    for row in out:  # as Python values: instants in datetime.UTC, whatever the session's time zone
        row["raw"] = bytes(row["raw"])
        for col in ("measured_at", "received_at"):
            if row[col] is not None:
                row[col] = row[col].astimezone(UTC)
    return out


_MEMORY: list[Any] = []  # one in-memory database per process for row views: a cursor per call is cheap


def _connection() -> Any:
    if not _MEMORY:
        import duckdb

        _MEMORY.append(duckdb.connect(":memory:"))
    return _MEMORY[0].cursor()


def candidate(item: dict[str, Any], *, device_id: str, segment: str, record_no: int, item_no: int,
              received_at: datetime, con: Any = None) -> dict[str, Any]:
    """The candidate row of one item (``con``: a DuckDB connection to compute it on, else a new one)."""
    items = Items()
    items.read([item], [items.message(segment, record_no, device_id, to_us(received_at), b"", True)], [item_no],
               [True])
    own = con is None
    con = _connection() if own else con
    try:
        [row] = candidate_rows(con, items)
    finally:
        if own:
            con.close()
    return row


class EventRow(dict):
    """A telehealth event candidate (device status or app event), as opposed to a vitals reading."""


@dataclass
class Normalised:
    """A chunk of landed messages, decoded: vitals items (columns), event rows, structural rejects."""
    items: Items
    events: list[dict[str, Any]]
    rejects: list[StructuralReject]


def decode_records(segment: str, records: Iterable[LandedRecord], max_payload_bytes: int = MAX_PAYLOAD_BYTES,
                   into: Normalised | None = None, lazy_raw: bool = False) -> Normalised:
    """``decode_columns`` of landed records (tests, replay of a few messages)."""
    recs = list(records)
    return decode_columns(segment, LandedColumns([r.n for r in recs], [r.topic for r in recs],
                                                 [to_us(r.received_at) for r in recs], [r.payload for r in recs],
                                                 [r.mark for r in recs]), max_payload_bytes, into, lazy_raw)


def decode_columns(segment: str, cols: LandedColumns, max_payload_bytes: int = MAX_PAYLOAD_BYTES,
                   into: Normalised | None = None, lazy_raw: bool = False) -> Normalised:
    """Every landed message of a segment, decoded: vitals items into columns, events as rows, and a
    structural reject per unreadable message or batch item (appended to ``into`` when given).

    Each message is parsed once (core/payload.py: msgspec, strict JSON) and judged by ``decode_message``;
    the segment's vitals items are then read column by column (``Items.read``). The cyclic
    garbage collector is paused meanwhile: parsing allocates millions of containers, none in a cycle, and
    its passes over them cost more than the parse.

    ``lazy_raw``: leave a batch item's raw null (the stage keeps batch payloads in ``stg_messages`` and
    builds an item's raw with ``item_raw`` only if it is quarantined: most never are)."""
    from transforms.events import event_candidate

    out = into if into is not None else Normalised(Items(), [], [])
    items_out, rejects = out.items, out.rejects
    first = len(items_out.messages["msg"])  # the number of this segment's first vitals message
    record_nos: list[int] = []
    devices: list[str] = []
    receipts: list[int] = []
    payloads: list[bytes] = []
    batches: list[bool] = []
    vitals: list[dict[str, Any]] = []
    msgs: list[int] = []
    item_nos: list[int] = []
    raws: list[bool] = []

    def reject(n: int, device: str | None, received_us: int, reason: str, detail: str, payload: bytes) -> None:
        rejects.append(StructuralReject(f"{segment}:{n}:0", segment, n, 0, device, from_us(received_us), reason,
                                        detail, payload))

    collecting = gc.isenabled()
    gc.disable()
    try:
        for n, topic, received_us, payload in zip(cols.n, cols.topic, cols.received_at_us, cols.payload,
                                                  strict=True):
            msg = decode_message(topic, payload, max_payload_bytes)
            if msg.reason is not None:
                reject(n, msg.device_id, received_us, msg.reason, msg.detail, payload)
                continue
            device, channel, items, batch = msg.device_id, msg.channel, msg.items, msg.batch
            assert device is not None
            if channel == "vitals":
                m = first + len(record_nos)
                record_nos.append(n)
                devices.append(device)
                receipts.append(received_us)
                payloads.append(payload)
                batches.append(batch)
                if not batch:
                    vitals.append(items[0])
                    msgs.append(m)
                    item_nos.append(0)
                    raws.append(False)
                elif all(type(item) is dict for item in items):
                    k = len(items)
                    vitals += items
                    msgs += repeat(m, k)
                    item_nos += range(k)
                    raws += repeat(not lazy_raw, k)
                else:
                    for i, item in enumerate(items):
                        if type(item) is dict:
                            vitals.append(item)
                            msgs.append(m)
                            item_nos.append(i)
                            raws.append(not lazy_raw)
                        else:
                            rejects.append(_not_an_object(segment, n, from_us(received_us), device, i, item,
                                                          "reading"))
                continue
            received_at = from_us(received_us)
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    out.events.append(EventRow(event_candidate(item, channel=channel, device_id=device, item_no=i,
                                                               segment=segment, record_no=n,
                                                               received_at=received_at)))
                else:
                    rejects.append(_not_an_object(segment, n, received_at, device, i, item, "event"))
        items_out.messages_of(segment, record_nos, devices, receipts, payloads, batches)
        items_out.read(vitals, msgs, item_nos, raws)
    finally:
        if collecting:
            gc.enable()
    return out


def item_raw(payload: bytes, item_no: int) -> bytes:
    """The raw of item ``item_no`` of a vitals batch message: exactly what ``Items.add`` builds from it (the
    message read as the decoder reads it, the item serialised as JSON)."""
    doc, _, _ = parse_json_object(payload)
    assert doc is not None  # only a message the decoder read has staged items
    return json.dumps(doc[BATCH_KEYS["vitals"]][item_no], default=str).encode()


def _not_an_object(segment: str, n: int, received_at: datetime, device: str, i: int, item: Any,
                   kind: str) -> StructuralReject:
    return StructuralReject(f"{segment}:{n}:{i}", segment, n, i, device, received_at, f"{kind}_not_an_object",
                            type(item).__name__, json.dumps(item, default=str).encode())  # ASCII: lossless


def normalise_records(segment: str, records: Iterable[LandedRecord], max_payload_bytes: int = MAX_PAYLOAD_BYTES,
                      con: Any = None) -> Iterator[dict[str, Any] | EventRow | StructuralReject]:
    """Every landed message of a segment as candidate rows, event rows or structural rejects, in landing
    order (a row view of ``decode_records`` + ``CANDIDATES``, for replay and tests)."""
    decoded = decode_records(segment, list(records), max_payload_bytes)
    own = con is None
    con = _connection() if own else con
    try:
        rows: list[Any] = [*candidate_rows(con, decoded.items), *decoded.events, *decoded.rejects]
    finally:
        if own:
            con.close()

    def order(o: Any) -> tuple[int, int]:
        return (o.record_no, o.item_no) if isinstance(o, StructuralReject) else (o["record_no"], o["item_no"])

    yield from sorted(rows, key=order)
