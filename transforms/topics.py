"""Topic contract v1: ``rpm/v1/devices/{device_id}/vitals`` (pure, no broker)."""

from __future__ import annotations

import re
from dataclasses import dataclass

TOPIC_PREFIX = "rpm/v1"
# Device ids are also broker usernames and appear in topics: keep them to a safe alphabet.
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOPIC_RE = re.compile(r"rpm/v1/devices/(?P<device>[^/]+)/(?P<channel>vitals|status)")


@dataclass(frozen=True)
class Topic:
    device_id: str
    channel: str  # "vitals" (clinical) or "status" (device telemetry)


def parse_topic(topic: str) -> Topic | None:
    """The device and channel a topic names, or None if it is not part of the contract."""
    # fullmatch, not match + "$": "$" also matches before a trailing newline.
    m = _TOPIC_RE.fullmatch(topic)
    if not m or not DEVICE_ID_RE.fullmatch(m["device"]):
        return None
    return Topic(m["device"], m["channel"])


def vitals_topic(device_id: str) -> str:
    return f"{TOPIC_PREFIX}/devices/{device_id}/vitals"


def valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_RE.fullmatch(device_id))
