"""The telehealth events suite: which source may report what (app events from apps, status from devices)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from expectations.telehealth import rules, validate
from transforms.events import EVENT_COLUMNS, event_candidate
from transforms.vocab import kind_metric

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


def test_each_condition_judged_apart_decides_what_gx_row_conditions_decide(gx_row_conditions) -> None:
    """Every conditional rule of the suite broken once, among valid rows: the verdicts are GX's own."""
    education = {"event": "education_viewed", "occurred_at": AT, "module": "salt", "minutes": 5}
    appointment = {"event": "appointment_attended", "occurred_at": AT, "appointment_id": "ap-1",
                   "modality": "video"}
    bad = [("events", {**education, "module": None}), ("events", {**education, "minutes": 601}),
           ("events", {**appointment, "appointment_id": None}), ("events", {**appointment, "modality": "fax"}),
           ("events", {**appointment, "modality": None}),
           ("events", {"event": "survey_completed", "occurred_at": AT}),
           ("status", {"reported_at": AT}), ("status", {**STATUS, "battery_pct": 101}),
           ("status", {**STATUS, "signal_dbm": 3}), ("status", {**STATUS, "uptime_s": -1}),
           ("status", {**STATUS, "event": "x", "msg_id": None}), ("events", {**APP_EVENT, "occurred_at": None})]
    rows = [*VALID, ("seg:3:0", "events", {**appointment, "msg_id": "a-2"}, "app"),
            ("seg:4:0", "events", {"msg_id": "a-3", "event": "survey_completed", "occurred_at": AT,
                                   "survey": "phq9"}, "app"),
            *((f"bad:{n}:0", channel, {"msg_id": f"b-{n}", **item}, "app" if channel == "events" else "bp")
              for n, (channel, item) in enumerate(bad)),
            ("bad:90:0", "events", APP_EVENT, "bp")]
    df = frame(rows)
    df.loc[df["row_key"] == "bad:11:0", "patient_id"] = None  # no time, so no enrollment lookup either
    df = df.assign(device_known=df["device_kind"].notna(),
                   kind_channel=[kind_metric(k, c) for k, c in zip(df["device_kind"], df["channel"], strict=True)])

    expected = gx_row_conditions(df, rules(SKEW_S))
    assert {key for key in expected if key.startswith("bad:")} == {f"bad:{n}:0" for n in [*range(len(bad)), 90]}
    assert not [key for key in expected if not key.startswith("bad:")], "a valid event failed under GX"
    assert validate(df, SKEW_S) == expected
