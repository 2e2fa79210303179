"""Payload contract v1: landed bytes -> reading items, or a structural reason they cannot be read.

A message is one reading object or a batch ``{"readings": [...]}`` (devices buffer while offline). Only the
structure is judged here; whether an item's fields are complete and plausible is the validation suite's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from transforms.topics import parse_topic

MAX_BATCH = 10_000
MAX_PAYLOAD_BYTES = 256 * 1024  # the default of RPM_MAX_PAYLOAD_BYTES


class _NonFinite(str):
    """JSON's NaN/Infinity literals: kept as a marker so the value fails the 'is a number' rule."""


def _reject_constant(token: str) -> _NonFinite:
    return _NonFinite(token)


@dataclass(frozen=True)
class DecodedMessage:
    device_id: str | None
    items: list[Any]          # each a reading or event candidate (normally a dict)
    reason: str | None        # structural reason the whole message is unreadable
    detail: str = ""
    channel: str = "vitals"

# The batch key of each channel: devices buffer readings, apps buffer events.
BATCH_KEYS = {"vitals": "readings", "status": "statuses", "events": "events"}


def parse_json_object(payload: bytes) -> tuple[dict[str, Any] | None, str | None, str]:
    """(document, reason, detail): the payload as a JSON object, or why it is not one."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "not_utf8", f"invalid UTF-8 at byte {exc.start}"
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return None, "not_json", "nested too deeply"
    except ValueError as exc:
        return None, "not_json", str(exc)[:200]
    if not isinstance(doc, dict):
        return None, "not_a_json_object", f"top level is {type(doc).__name__}"
    return doc, None, ""


def decode_message(topic: str, payload: bytes, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> DecodedMessage:
    parsed = parse_topic(topic)
    if parsed is None:
        return DecodedMessage(None, [], "unknown_topic", topic[:200])
    src, channel = parsed.device_id, parsed.channel
    if len(payload) > max_payload_bytes:
        return DecodedMessage(src, [], "payload_too_large", f"{len(payload)} > {max_payload_bytes} bytes", channel)
    doc, reason, detail = parse_json_object(payload)
    if doc is None:
        return DecodedMessage(src, [], reason, detail, channel)
    key = BATCH_KEYS[channel]
    if key in doc:
        batch = doc[key]
        if not isinstance(batch, list):
            return DecodedMessage(src, [], f"{key}_not_a_list", type(batch).__name__, channel)
        if not batch:
            return DecodedMessage(src, [], "empty_batch", "", channel)
        if len(batch) > MAX_BATCH:
            return DecodedMessage(src, [], "batch_too_large", f"{len(batch)} > {MAX_BATCH}", channel)
        return DecodedMessage(src, batch, None, "", channel)
    return DecodedMessage(src, [doc], None, "", channel)
