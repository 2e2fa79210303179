"""Topic contract v1: which MQTT topics carry a device's readings, and which are refused."""

from __future__ import annotations

import pytest

from core.topics import Topic, parse_topic, valid_device_id, vitals_topic


@pytest.mark.parametrize(("topic", "expected"), [
    ("rpm/v1/devices/bp-001/vitals", Topic("bp-001", "vitals")),
    ("rpm/v1/devices/bp-001/status", Topic("bp-001", "status")),
    ("rpm/v1/devices/A.b_c-9/vitals", Topic("A.b_c-9", "vitals")),
    ("rpm/v1/devices/" + "d" * 64 + "/vitals", Topic("d" * 64, "vitals")),
])
def test_contract_topics_name_device_and_channel(topic: str, expected: Topic) -> None:
    assert parse_topic(topic) == expected


@pytest.mark.parametrize("topic", [
    "",
    "rpm/v1/devices/bp-001",                   # no channel
    "rpm/v1/devices/bp-001/",                  # empty channel
    "rpm/v1/devices//vitals",                  # empty device id
    "rpm/v1/devices/bp-001/vitals/extra",      # extra level
    "rpm/v1/devices/bp-001/sub/vitals",        # extra level inside
    "rpm/v1/devices/bp-001/events",            # unknown channel
    "rpm/v1/devices/bp-001/Vitals",            # channels are case-sensitive
    "rpm/v2/devices/bp-001/vitals",            # other contract version
    "rpm/v1/apps/app-1/vitals",                # other producer kind
    "/rpm/v1/devices/bp-001/vitals",           # leading slash is another topic in MQTT
    "rpm/v1/devices/bp-001/vitals/",           # trailing slash too
    "x/rpm/v1/devices/bp-001/vitals",
])
def test_other_topic_shapes_are_rejected(topic: str) -> None:
    assert parse_topic(topic) is None


@pytest.mark.parametrize("device_id", [
    "+",            # single-level wildcard
    "#",            # multi-level wildcard
    "bp+001",
    "bp#001",
    "bp 001",       # space
    "bp:001",       # ':' would break the broker's password file
    "bp$001",
    "bp%u",         # ACL substitution token
    "ÿbp",          # non-ASCII
    "-bp001",       # must start alphanumeric
    ".bp001",
    "_bp001",
    "d" * 65,       # longer than 64
])
def test_device_ids_outside_the_safe_alphabet_are_rejected(device_id: str) -> None:
    assert parse_topic(f"rpm/v1/devices/{device_id}/vitals") is None
    assert valid_device_id(device_id) is False


def test_device_id_is_limited_to_64_characters() -> None:
    assert valid_device_id("d" * 64) is True
    assert valid_device_id("d" * 65) is False
    assert valid_device_id("") is False


def test_trailing_newline_is_not_part_of_a_valid_device_id_or_topic() -> None:
    """Regression: with ``match`` + ``$``, "bp-001\\n" was a valid id ("$" also matches before a trailing
    newline), so it could be provisioned and written into Mosquitto's line-based password file."""
    assert valid_device_id("bp-001\n") is False, "a device id ending in a newline must be refused"
    assert parse_topic("rpm/v1/devices/bp-001\n/vitals") is None, "device id with a newline accepted"
    assert parse_topic("rpm/v1/devices/bp-001/vitals\n") is None, "topic with a trailing newline accepted"


def test_vitals_topic_round_trips_through_the_parser() -> None:
    assert vitals_topic("bp-001") == "rpm/v1/devices/bp-001/vitals"
    assert parse_topic(vitals_topic("bp-001")) == Topic("bp-001", "vitals")
