"""The first thing known about a payload: is it a JSON object? Shared by the ingest service's door check and
the decoder (transforms/decode.py), so both judge a message's bytes the same way."""

from __future__ import annotations

import json
from typing import Any

MAX_PAYLOAD_BYTES = 256 * 1024  # the default of RPM_MAX_PAYLOAD_BYTES


class NonFinite(str):
    """JSON's NaN/Infinity literals: kept as a marker so the value fails the 'is a number' rule."""


def reject_constant(token: str) -> NonFinite:
    return NonFinite(token)


def parse_json_object(payload: bytes) -> tuple[dict[str, Any] | None, str | None, str]:
    """(document, reason, detail): the payload as a JSON object, or why it is not one."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "not_utf8", f"invalid UTF-8 at byte {exc.start}"
    try:
        doc = json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        return None, "not_json", "nested too deeply"
    except ValueError as exc:
        return None, "not_json", str(exc)[:200]
    if not isinstance(doc, dict):
        return None, "not_a_json_object", f"top level is {type(doc).__name__}"
    return doc, None, ""
