"""Topic contract v1 (pure, no broker).

- ``rpm/v1/devices/{device_id}/vitals``: clinical readings (telemedicine stream);
- ``rpm/v1/devices/{device_id}/status``: device telemetry — battery, signal, firmware, uptime;
- ``rpm/v1/apps/{app_id}/events``: patient-app events — education, appointments, surveys.

Devices and apps are both registered sources with their own broker login (the id in the topic); status and
app events feed the telehealth stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from core.ids import is_valid_id

TOPIC_PREFIX = "rpm/v1"
_TOPIC_RE = re.compile(r"rpm/v1/(?:devices/(?P<device>[^/]+)/(?P<channel>vitals|status)"
                       r"|apps/(?P<app>[^/]+)/(?P<app_channel>events))")


@dataclass(frozen=True)
class Topic:
    device_id: str  # the publishing source: a device or a patient app (both are registered sources)
    channel: str    # "vitals" (clinical), "status" (device telemetry) or "events" (patient app)


@lru_cache(maxsize=65536)  # a fleet publishes on a few topics each, millions of times
def parse_topic(topic: str) -> Topic | None:
    """The device and channel a topic names, or None if it is not part of the contract."""
    # fullmatch, not match + "$": "$" also matches before a trailing newline.
    m = _TOPIC_RE.fullmatch(topic)
    if not m:
        return None
    source, channel = (m["device"], m["channel"]) if m["device"] is not None else (m["app"], m["app_channel"])
    if not is_valid_id(source):  # device ids are broker logins and topic segments
        return None
    return Topic(source, channel)


def vitals_topic(device_id: str) -> str:
    return f"{TOPIC_PREFIX}/devices/{device_id}/vitals"


def status_topic(device_id: str) -> str:
    return f"{TOPIC_PREFIX}/devices/{device_id}/status"


def events_topic(app_id: str) -> str:
    return f"{TOPIC_PREFIX}/apps/{app_id}/events"


def valid_device_id(device_id: str) -> bool:
    return is_valid_id(device_id)
