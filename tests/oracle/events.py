"""Telehealth event contract v1: patient-app events and device status -> canonical event rows (pure).

App events (``rpm/v1/apps/{app_id}/events``), one object or ``{"events": [...]}``::

    {"msg_id": "a-1", "event": "education_completed", "occurred_at": "2026-11-27T19:02:00-05:00",
     "module": "salt-and-blood-pressure", "minutes": 12}
    {"msg_id": "a-2", "event": "appointment_attended", "occurred_at": "...", "appointment_id": "apt-77",
     "modality": "video"}
    {"msg_id": "a-3", "event": "survey_completed", "occurred_at": "...", "survey": "phq-2"}

Device status (``rpm/v1/devices/{device_id}/status``), one object or ``{"statuses": [...]}``::

    {"msg_id": "s-1", "reported_at": "2026-11-27T08:00:00Z", "battery_pct": 64, "signal_dbm": -71,
     "firmware": "2.4.1", "uptime_s": 86400}

As with readings, nothing is judged here: missing or mistyped fields become nulls and the telehealth suite
(expectations/telehealth.py) names the rule they break.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from tests.oracle.normalise import (
    _is_number,
    _is_text,
    _text,
    json_text,
    mistyped,
    number,
    parse_time,
    text_field,
)

EDUCATION_EVENTS = ("education_viewed", "education_completed")
APPOINTMENT_EVENTS = ("appointment_scheduled", "appointment_attended", "appointment_no_show",
                      "appointment_cancelled")
APP_EVENTS = (*EDUCATION_EVENTS, *APPOINTMENT_EVENTS, "survey_completed")
STATUS_EVENT = "device_status"
MODALITIES = ("video", "phone", "in_person")
# channel|event pairs the contract allows: status topics carry status, app topics carry app events.
CHANNEL_EVENTS = sorted([f"status|{STATUS_EVENT}", *(f"events|{e}" for e in APP_EVENTS)])

EVENT_FIELDS = {"msg_id", "event", "occurred_at", "reported_at", "module", "minutes", "appointment_id",
                "modality", "scheduled_for", "survey", "battery_pct", "signal_dbm", "firmware", "uptime_s"}

EVENT_COLUMNS = [
    "row_key", "segment", "record_no", "item_no", "device_id", "channel", "channel_event", "msg_id", "event",
    "occurred_at", "utc_offset_min", "has_time", "received_at", "seconds_ahead", "event_id", "module",
    "minutes", "appointment_id", "modality", "scheduled_for", "survey", "battery_pct", "signal_dbm",
    "firmware", "uptime_s", "status_fields", "extra", "raw", "mistyped",
]


def event_id(source_id: str, event: str, occurred_at: datetime, discriminator: str) -> str:
    """Idempotency key of an event: the same source, kind, instant and subject is the same event."""
    key = f"{source_id}|{event}|{occurred_at.astimezone(UTC).isoformat(timespec='microseconds')}|{discriminator}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def event_candidate(item: dict[str, Any], *, channel: str, device_id: str, segment: str, record_no: int,
                    item_no: int, received_at: datetime) -> dict[str, Any]:
    event = STATUS_EVENT if channel == "status" else text_field(item, "event")
    when = parse_time(item.get("reported_at" if channel == "status" else "occurred_at"))
    offset = when.utcoffset() if when else None
    module, appointment, survey = _text(item.get("module")), _text(item.get("appointment_id")), _text(item.get("survey"))
    firmware = _text(item.get("firmware"))
    battery, signal, uptime = number(item.get("battery_pct")), number(item.get("signal_dbm")), number(item.get("uptime_s"))
    scheduled = parse_time(item.get("scheduled_for"))
    extra = {k: v for k, v in item.items() if k not in EVENT_FIELDS}
    return {
        "row_key": f"{segment}:{record_no}:{item_no}", "segment": segment, "record_no": record_no,
        "item_no": item_no, "device_id": device_id, "channel": channel, "channel_event": f"{channel}|{event}",
        "msg_id": _text(item.get("msg_id")), "event": event,
        "occurred_at": when.astimezone(UTC) if when else None,
        "utc_offset_min": int(offset.total_seconds() // 60) if offset is not None else None,
        "has_time": when is not None, "received_at": received_at,
        "seconds_ahead": (when - received_at).total_seconds() if when else None,
        "event_id": event_id(device_id, event, when, appointment or module or survey or "")
        if event and when else None,
        "module": module, "minutes": number(item.get("minutes")), "appointment_id": appointment,
        "modality": _text(item.get("modality")), "scheduled_for": scheduled.astimezone(UTC) if scheduled else None,
        "survey": survey, "battery_pct": battery, "signal_dbm": signal, "firmware": firmware, "uptime_s": uptime,
        "status_fields": sum(v is not None for v in (battery, signal, firmware, uptime)),
        "extra": json_text(extra) if extra else None,
        "raw": json.dumps(item, default=str).encode(),
        "mistyped": mistyped(item, {"minutes": _is_number, "battery_pct": _is_number, "signal_dbm": _is_number,
                                    "uptime_s": _is_number, "firmware": _is_text, "module": _is_text,
                                    "survey": _is_text, "modality": _is_text, "scheduled_for": parse_time}),
    }
