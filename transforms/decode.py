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


class _NonFinite(str):
    """JSON's NaN/Infinity literals: kept as a marker so the value fails the 'is a number' rule."""


def _reject_constant(token: str) -> _NonFinite:
    return _NonFinite(token)


@dataclass(frozen=True)
class DecodedMessage:
    device_id: str | None
    items: list[Any]          # each a reading candidate (normally a dict)
    reason: str | None        # structural reason the whole message is unreadable
    detail: str = ""


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


def decode_message(topic: str, payload: bytes) -> DecodedMessage:
    parsed = parse_topic(topic)
    if parsed is None:
        return DecodedMessage(None, [], "unknown_topic", topic[:200])
    if parsed.channel != "vitals":
        return DecodedMessage(parsed.device_id, [], "unsupported_channel", parsed.channel)
    doc, reason, detail = parse_json_object(payload)
    if doc is None:
        return DecodedMessage(parsed.device_id, [], reason, detail)
    if "readings" in doc:
        readings = doc["readings"]
        if not isinstance(readings, list):
            return DecodedMessage(parsed.device_id, [], "readings_not_a_list", type(readings).__name__)
        if not readings:
            return DecodedMessage(parsed.device_id, [], "empty_batch")
        if len(readings) > MAX_BATCH:
            return DecodedMessage(parsed.device_id, [], "batch_too_large", f"{len(readings)} > {MAX_BATCH}")
        return DecodedMessage(parsed.device_id, readings, None)
    return DecodedMessage(parsed.device_id, [doc], None)
