"""Payload contract v1: landed bytes -> reading items, or a structural reason they cannot be read.

A message is one reading object or a batch ``{"readings": [...]}`` (devices buffer while offline). Only the
structure is judged here; whether an item's fields are complete and plausible is the validation suite's job.
The bytes are read as JSON strictly (core/payload.py says what that refuses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.payload import MAX_PAYLOAD_BYTES, parse_json_object
from core.topics import parse_topic

MAX_BATCH = 10_000


@dataclass(frozen=True)
class DecodedMessage:
    device_id: str | None
    items: list[Any]          # each a reading or event candidate (normally a dict)
    reason: str | None        # structural reason the whole message is unreadable
    detail: str = ""
    channel: str = "vitals"
    batch: bool = False       # the items came from a batch key ("readings", ...), not the message itself

# The batch key of each channel: devices buffer readings, apps buffer events.
BATCH_KEYS = {"vitals": "readings", "status": "statuses", "events": "events"}


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
    if key not in doc:
        return DecodedMessage(src, [doc], None, "", channel)
    batch = doc[key]
    if type(batch) is not list:
        return DecodedMessage(src, [], f"{key}_not_a_list", type(batch).__name__, channel)
    if not batch:
        return DecodedMessage(src, [], "empty_batch", "", channel)
    if len(batch) > MAX_BATCH:
        return DecodedMessage(src, [], "batch_too_large", f"{len(batch)} > {MAX_BATCH}", channel)
    return DecodedMessage(src, batch, None, "", channel, True)
