"""The telehealth events suite: which source may report what (app events from apps, status from devices)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from expectations.telehealth import rules, validate
from transforms.events import EVENT_COLUMNS, event_candidate

RECEIVED = datetime(2026, 11, 27, 13, 5, tzinfo=UTC)
AT = (RECEIVED - timedelta(minutes=5)).isoformat()
SKEW_S = 300
APP_EVENT = {"msg_id": "a-1", "event": "education_completed", "occurred_at": AT, "module": "salt", "minutes": 12}
STATUS = {"msg_id": "s-1", "reported_at": AT, "battery_pct": 64, "signal_dbm": -71}


def frame(rows: list[tuple[str, str, dict, str | None]]) -> pd.DataFrame:
    """(row_key, channel, item, kind of the sending source) -> the frame the gate validates."""
    out = []
    for row_key, channel, item, _ in rows:
        segment, record_no, item_no = row_key.split(":")
        out.append(event_candidate(item, channel=channel, device_id="src-1", segment=segment,
                                   record_no=int(record_no), item_no=int(item_no), received_at=RECEIVED))
    df = pd.DataFrame(out, columns=EVENT_COLUMNS).drop(columns=["raw"])
    df["patient_id"] = "pat-1"
    df["device_kind"] = [kind for *_, kind in rows]
    for col in ("occurred_at", "received_at", "scheduled_for"):
        df[col] = pd.to_datetime(df[col], utc=True)
    return df


VALID = [("seg:0:0", "events", APP_EVENT, "app"), ("seg:1:0", "status", STATUS, "bp"),
         ("seg:2:0", "status", STATUS, "scale")]


def test_apps_report_events_and_devices_their_status() -> None:
    assert "source_kind_matches_channel" in {r.name for r in rules(SKEW_S)}
    assert validate(frame(VALID), SKEW_S) == {}


@pytest.mark.parametrize(("channel", "item", "kind"), [
    ("events", APP_EVENT, "bp"),      # a cuff's login reporting an app event
    ("status", STATUS, "app"),        # an app reporting device status
    ("events", APP_EVENT, ""),        # a source registered without a kind
])
def test_a_source_reporting_outside_its_kind_is_quarantined(channel, item, kind) -> None:
    failures = validate(frame([*VALID, ("seg:9:0", channel, item, kind)]), SKEW_S)
    assert failures == {"seg:9:0": ["source_kind_matches_channel"]}


def test_an_unknown_source_is_left_to_the_enrollment_rule() -> None:
    df = frame([*VALID, ("seg:9:0", "events", APP_EVENT, None)])
    df.loc[df["row_key"] == "seg:9:0", "patient_id"] = None
    assert validate(df, SKEW_S) == {"seg:9:0": ["source_enrolled_at_event_time"]}
