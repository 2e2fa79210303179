"""The first thing known about a payload: is it a JSON object? Shared by the ingest service's door check and
the decoder (transforms/decode.py), so both judge a message's bytes the same way.

The JSON of payload contract v1 is RFC 8259 read strictly, by one parser (msgspec, in C): text that is not
valid UTF-8 is ``not_utf8``; anything else a strict reader refuses is ``not_json``, with where and why. That
includes what Python's ``json`` module would have let through, each ambiguous for clinical data:

- the literals ``NaN``, ``Infinity``, ``-Infinity`` (not JSON; a device that sends them sent no number);
- a number outside a double's range (``1e400``) or an integer of more than 4,300 digits;
- a lone UTF-16 surrogate escape (``"\\ud800"``: no Unicode text holds it, and no store accepts it);
- nesting deeper than ``MAX_DEPTH`` arrays and objects (``nested too deeply``). A fixed limit, well inside
  the interpreter's recursion limit, so what one step read another can write again (``raw``, ``extra``)
  whatever its own stack depth.

A key given twice in one object is read as its last value (as Python's ``json`` and every mainstream parser
do); the message's ``raw`` keeps both. Whatever parses is exact: integers of any size up to that limit, and
floats as the nearest double.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

MAX_PAYLOAD_BYTES = 256 * 1024  # the default of RPM_MAX_PAYLOAD_BYTES
MAX_DEPTH = 512  # arrays and objects inside one another, the top-level object included

_DECODER = msgspec.json.Decoder()
_NON_FINITE = re.compile(rb"-?(NaN|Infinity)")
# Escapes read left to right: an escaped backslash (a backslash and "ud800" after it are text), a surrogate
# pair (one character), a lone UTF-16 surrogate escape (the only match of 6 bytes).
_SURROGATE_ESCAPES = re.compile(rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                                rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_AT_BYTE = re.compile(r"\(byte (\d+)\)")


def loads(payload: bytes) -> Any:
    """The JSON value of ``payload`` (bytes, UTF-8), read strictly; raises ``msgspec.MsgspecError`` (not
    JSON), ``RecursionError`` (nested too deeply)."""
    return _DECODER.decode(payload)


def _lone_surrogate(payload: bytes) -> bool:
    return any(len(m.group()) == 6 for m in _SURROGATE_ESCAPES.finditer(payload))


def _why(payload: bytes, exc: Exception) -> str:
    """A reader's reason for refusing a payload, named in the contract's terms where the parser's is terse."""
    text = str(exc)
    m = _AT_BYTE.search(text)
    if m is not None and _NON_FINITE.match(payload, at := int(m.group(1))):
        at -= payload[at - 1:at] == b"-"  # the parser points past the sign
        return f"NaN/Infinity literal at byte {at}: not a JSON number"
    if "out of range" in text:
        return "number out of range (beyond a double, or an integer of more than 4,300 digits)"
    if ("truncated" in text or "surrogate" in text) and _lone_surrogate(payload):
        return "lone UTF-16 surrogate escape: not Unicode text"
    return text[:200]


def depth(doc: Any) -> int:
    """How many arrays and objects deep ``doc`` goes (a walk, not a recursion: any depth)."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        v, d = todo.pop()
        if type(v) is dict:
            v = v.values()
        elif type(v) is not list:
            continue
        deepest = max(deepest, d)
        todo += [(x, d + 1) for x in v if type(x) is dict or type(x) is list]
    return deepest


def parse_json_object(payload: bytes) -> tuple[dict[str, Any] | None, str | None, str]:
    """(document, reason, detail): the payload as a JSON object, or why it is not one."""
    if not payload.isascii():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, "not_utf8", f"invalid UTF-8 at byte {exc.start}"
    try:
        doc = _DECODER.decode(payload)
    except RecursionError:
        return None, "not_json", "nested too deeply"
    except msgspec.MsgspecError as exc:
        return None, "not_json", _why(payload, exc)
    # no deeper than its brackets (each closed: two bytes a level): only a payload holding many can be too
    # deep (a large batch, or hostile)
    if len(payload) > 2 * MAX_DEPTH and payload.count(b"[") + payload.count(b"{") > MAX_DEPTH \
            and depth(doc) > MAX_DEPTH:
        return None, "not_json", "nested too deeply"
    if type(doc) is not dict:
        return None, "not_a_json_object", f"top level is {type(doc).__name__}"
    return doc, None, ""
