"""Reading items -> canonical candidate rows: UCUM canonical units, LOINC codes, UTC time, reading id.

Nothing is judged here: a field that is missing or of the wrong type becomes a null, and the validation
suite (expectations/) names the rule it breaks. The only output is data; the input is never mutated.

The reference of payload contract v1, item by item, for the differential tests: messages are read as the
contract reads JSON (core/payload.py, through transforms/decode.py), so NaN/Infinity literals, out-of-range
numbers and lone surrogate escapes never reach an item (the whole message is ``not_json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from core.landing import LandedRecord
from core.payload import MAX_PAYLOAD_BYTES
from transforms.decode import decode_message
from transforms.vocab import METRICS, loinc_for, unit_key

# RFC 3339 date-time with a mandatory offset ("Z" or +hh:mm): local time without an offset is ambiguous.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
# "manual": true marks a reading keyed in by the patient rather than transmitted by the device.
CONTRACT_FIELDS = {"msg_id", "metric", "measured_at", "value", "values", "unit", "source", "manual"}

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


def reading_id(device_id: str, metric: str, measured_at: datetime) -> str:
    """Idempotency key: the same device, metric and instant is the same reading, however often it arrives."""
    key = f"{device_id}|{metric}|{measured_at.astimezone(UTC).isoformat(timespec='microseconds')}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def number(v: Any) -> float | None:
    """A finite JSON number as float; strings, booleans, NaN/Infinity and overflowing values are not."""
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


def candidate(item: dict[str, Any], *, device_id: str, segment: str, record_no: int, item_no: int,
              received_at: datetime) -> dict[str, Any]:
    metric, unit = text_field(item, "metric"), text_field(item, "unit")
    spec = METRICS.get(metric or "")
    if metric == "blood_pressure":
        sent = item.get("values")
        values = sent if isinstance(sent, dict) else {}
        value_sent, diastolic_sent = number(values.get("systolic")), number(values.get("diastolic"))
    else:
        value_sent, diastolic_sent = number(item.get("value")), None
    convert = spec.units.get(unit or "") if spec else None
    value = convert(value_sent) if convert and value_sent is not None else None
    diastolic = convert(diastolic_sent) if convert and diastolic_sent is not None else None
    source = text_field(item, "source")
    measured = parse_time(item.get("measured_at"))
    offset = measured.utcoffset() if measured else None
    extra = {k: v for k, v in item.items() if k not in CONTRACT_FIELDS}
    return {
        "row_key": f"{segment}:{record_no}:{item_no}",
        "segment": segment, "record_no": record_no, "item_no": item_no, "device_id": device_id,
        "msg_id": _text(item.get("msg_id")), "metric": metric, "unit": unit,
        "unit_key": unit_key(metric, unit),
        "value_sent": value_sent, "diastolic_sent": diastolic_sent,
        "value": value, "diastolic": diastolic,
        "canonical_unit": spec.canonical_unit if spec else None,
        "loinc": loinc_for(metric, source) if spec and metric else None,
        "source": source,
        "measured_at": measured.astimezone(UTC) if measured else None,
        "utc_offset_min": int(offset.total_seconds() // 60) if offset is not None else None,
        "has_time": measured is not None,
        "received_at": received_at,
        "seconds_ahead": (measured - received_at).total_seconds() if measured else None,
        "reading_id": reading_id(device_id, metric, measured) if metric and measured else None,
        # ASCII escapes: lossless for any JSON string, lone surrogates included.
        "extra": json_text(extra) if extra else None,
        "raw": json.dumps(item, default=str).encode(),
        "manual": item.get("manual") is True,
        "mistyped": mistyped(item, {"manual": lambda v: isinstance(v, bool), "source": _is_text}),
    }


class _Origin(TypedDict):
    """Where a landed message came from: the fields every row built from it carries."""

    segment: str
    record_no: int
    received_at: datetime


class EventRow(dict):
    """A telehealth event candidate (device status or app event), as opposed to a vitals reading."""


def normalise_records(segment: str, records: Iterable[LandedRecord], max_payload_bytes: int = MAX_PAYLOAD_BYTES,
                      ) -> Iterator[dict[str, Any] | EventRow | StructuralReject]:
    """Every landed message of a segment as candidate rows, or structural rejects (one per unreadable item)."""
    from tests.oracle.events import event_candidate

    for rec in records:
        msg = decode_message(rec.topic, rec.payload, max_payload_bytes)
        base: _Origin = {"segment": segment, "record_no": rec.n, "received_at": rec.received_at}
        if msg.reason is not None:
            yield StructuralReject(f"{segment}:{rec.n}:0", device_id=msg.device_id, item_no=0,
                                   reason=msg.reason, detail=msg.detail, raw=rec.payload, **base)
            continue
        assert msg.device_id is not None
        for i, item in enumerate(msg.items):
            if not isinstance(item, dict):
                yield StructuralReject(f"{segment}:{rec.n}:{i}", device_id=msg.device_id, item_no=i,
                                       reason=f"{'reading' if msg.channel == 'vitals' else 'event'}_not_an_object",
                                       detail=type(item).__name__,
                                       raw=json.dumps(item, default=str).encode(), **base)  # ASCII: lossless
            elif msg.channel == "vitals":
                yield candidate(item, device_id=msg.device_id, item_no=i, **base)
            else:
                yield EventRow(event_candidate(item, channel=msg.channel, device_id=msg.device_id, item_no=i,
                                               **base))
