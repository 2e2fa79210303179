"""Identifiers of the registry: patients, clinicians, devices and apps, user accounts.

One alphabet for every id, because ids travel far: a device id is a broker login and a topic segment, a
patient id names exported files and appears in audit records and terminal output. Letters, digits and
``. _ -``, starting with a letter or digit, at most 64 characters: no ``/`` or ``..`` (paths), no control
characters (forged log lines), nothing MQTT treats specially (``+ # $``).
"""

from __future__ import annotations

import re

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"


class InvalidId(ValueError):
    """An id outside the alphabet; its message names what kind of id and the rule."""


def is_valid_id(value: object) -> bool:
    # fullmatch, not match + "$": "$" also matches before a trailing newline.
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def check_id(what: str, value: object) -> str:
    """``value`` if it is a valid id, else InvalidId naming ``what`` ("patient", "device", ...)."""
    if not is_valid_id(value):
        raise InvalidId(f"invalid {what} id {value!r}: use {ID_RULE}")
    return value  # type: ignore[return-value]
