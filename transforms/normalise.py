"""Reading items -> canonical candidate rows: UCUM canonical units, LOINC codes, UTC time, reading id.

Nothing is judged here: a field that is missing or of the wrong type becomes a null, and the validation
suite (expectations/) names the rule it breaks. The only output is data; the input is never mutated.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingest.landing import LandedRecord
from transforms.decode import _NonFinite, decode_message
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
    if isinstance(v, bool) or isinstance(v, _NonFinite) or not isinstance(v, int | float):
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
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else None


def _text(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str | int):
        s = str(v)
        return s if 0 < len(s) <= 128 else None
    return None


def candidate(item: dict[str, Any], *, device_id: str, segment: str, record_no: int, item_no: int,
              received_at: datetime) -> dict[str, Any]:
    metric = item.get("metric") if isinstance(item.get("metric"), str) else None
    unit = item.get("unit") if isinstance(item.get("unit"), str) else None
    spec = METRICS.get(metric or "")
    if metric == "blood_pressure":
        values = item.get("values") if isinstance(item.get("values"), dict) else {}
        value_sent, diastolic_sent = number(values.get("systolic")), number(values.get("diastolic"))
    else:
        value_sent, diastolic_sent = number(item.get("value")), None
    convert = spec.units.get(unit or "") if spec else None
    value = convert(value_sent) if convert and value_sent is not None else None
    diastolic = convert(diastolic_sent) if convert and diastolic_sent is not None else None
    source = item.get("source") if isinstance(item.get("source"), str) else None
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
        "extra": json.dumps(extra, default=str, ensure_ascii=False) if extra else None,
        "raw": json.dumps(item, default=str, ensure_ascii=False).encode(),
        "manual": item.get("manual") is True,
    }


class EventRow(dict):
    """A telehealth event candidate (device status or app event), as opposed to a vitals reading."""


def normalise_records(segment: str, records: Iterable[LandedRecord]
                      ) -> Iterator[dict[str, Any] | EventRow | StructuralReject]:
    """Every landed message of a segment as candidate rows, or structural rejects (one per unreadable item)."""
    from transforms.events import event_candidate

    for rec in records:
        msg = decode_message(rec.topic, rec.payload)
        base = dict(segment=segment, record_no=rec.n, received_at=rec.received_at)
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
                                       raw=json.dumps(item, default=str).encode(), **base)
            elif msg.channel == "vitals":
                yield candidate(item, device_id=msg.device_id, item_no=i, **base)
            else:
                yield EventRow(event_candidate(item, channel=msg.channel, device_id=msg.device_id, item_no=i,
                                               **base))
