"""Quarantine replay: a reading quarantined because the registry was not ready reaches the chart once it is.

What a user relies on: `rpm quarantine replay --reason R` re-judges the items with today's registry and rules;
those that pass are loaded (or counted as duplicates) exactly as the load would have, those that still fail
keep their row with today's reasons; the accounting stays exact and balanced; alerts and the serving snapshot
see the moved readings; a second replay changes nothing; a structural reason is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.settings import Settings
from pipeline.replay import (
    STRUCTURAL_REASONS,
    NotReplayable,
    QuarantinedItem,
    check_replayable,
    rebuild,
    replay,
    replay_quarantine,
)
from tests.steps import claim_segments, load_batch, stage_batch, validate_batch
from transforms.events import event_candidate
from transforms.normalise import candidate
from warehouse.accounting import accounting
from warehouse.db import clinical
from warehouse.registry import enroll, upsert_patient
from warehouse.serving import current_snapshot, serving

ENROLLED = "device_enrolled_at_measured_time"
DEVICE = "bp-late"  # publishing before anyone entered it in the registry
TOPIC = f"rpm/v1/devices/{DEVICE}/vitals"


def run_pipeline(s: Settings, run_id: str) -> dict:
    batch = claim_segments(s)
    stage_batch(s, batch)
    validate_batch(s, batch)
    return load_batch(s, batch, run_id)


def table(s: Settings, sql: str) -> list[tuple]:
    with clinical(s) as con:
        return con.execute(sql).fetchall()


def state(s: Settings) -> dict:
    """Everything a replay may change, to compare before and after."""
    return {"readings": table(s, "SELECT * FROM readings ORDER BY reading_id"),
            "quarantine": table(s, "SELECT * FROM quarantine ORDER BY row_key"),
            "duplicates": table(s, "SELECT * FROM duplicates ORDER BY row_key"),
            "segments": table(s, "SELECT * FROM segments ORDER BY segment"),
            "events": table(s, "SELECT * FROM telehealth_events ORDER BY event_id"),
            "accounting": accounting(s)}


def hr(msg_id: str, at: datetime, value: float = 72) -> dict:
    return {"msg_id": msg_id, "metric": "heart_rate", "value": value, "unit": "/min", "measured_at": at.isoformat()}


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def enrol_late(s: Settings, since: datetime, device: str = DEVICE, kind: str = "bp") -> None:
    """The registry catches up: the device's enrollment entered with its real start (no history before it)."""
    with clinical(s) as con:
        upsert_patient(con, "pat-late")
        enroll(con, device, "pat-late", kind=kind, valid_from=since)


# --- which reasons can be replayed ----------------------------------------------------------------------------

@pytest.mark.parametrize("reason", sorted(STRUCTURAL_REASONS))
def test_a_structural_reason_is_refused_with_why(reason: str) -> None:
    with pytest.raises(NotReplayable, match="structural"):
        check_replayable(reason)


def test_an_unknown_reason_is_refused_and_item_reasons_are_accepted() -> None:
    with pytest.raises(NotReplayable, match="cannot replay 'no_such_rule': not a quarantine reason"):
        check_replayable("no_such_rule")
    for reason in (ENROLLED, "plausible_heart_rate", "source_enrolled_at_event_time", "conflicting_duplicate"):
        check_replayable(reason)


# --- rebuilding an item from what quarantine kept (pure) -----------------------------------------------------

def _stored(kind: str, item: dict, reasons: tuple[str, ...], at: datetime) -> QuarantinedItem:
    """A quarantine row as the load writes it for an item of ``kind``."""
    where = dict(device_id="dev-9", segment="s1", record_no=4, item_no=2, received_at=at)
    if kind == "reading":
        row, key = candidate(item, **where), "reading_id"
    else:
        row, key = event_candidate(item, channel="status" if kind == "status" else "events", **where), "event_id"
    return QuarantinedItem(row["row_key"], "s1", 4, 2, "dev-9", row[key], reasons, row["raw"], at)


def test_rebuild_recognises_readings_status_and_app_events_by_their_stored_id(now: datetime) -> None:
    status = {"msg_id": "s-1", "reported_at": now.isoformat(), "battery_pct": 50}
    app = {"msg_id": "a-1", "event": "survey_completed", "occurred_at": now.isoformat(), "survey": "phq-2"}
    for kind, item in (("reading", hr("m-1", now)), ("status", status), ("event", app)):
        q = _stored(kind, item, (ENROLLED,), now)
        built = rebuild(q)
        assert built is not None and built.kind == kind
        assert built.row["row_key"] == "s1:4:2" and built.row["received_at"] == now  # where it came from


def test_rebuild_of_an_item_without_an_id_follows_the_suite_that_judged_it(now: datetime) -> None:
    no_time = dict(hr("m-1", now), measured_at="yesterday")
    built = rebuild(_stored("reading", no_time, ("measured_at_rfc3339_with_offset",), now))
    assert built is not None and built.kind == "reading"
    # A status or an app event without a time: which one cannot be told, and no registry change would help.
    assert rebuild(_stored("status", {"msg_id": "s-1", "battery_pct": 5}, ("occurred_at_rfc3339_with_offset",),
                           now)) is None
    for raw in (b"not json", b"[1, 2]", None):
        assert rebuild(QuarantinedItem("s1:0:0", "s1", 0, 0, "dev-9", None, (ENROLLED,), raw, now)) is None


# --- replaying through the warehouse ----------------------------------------------------------------------------

def test_readings_quarantined_before_enrollment_load_after_it_and_a_second_replay_changes_nothing(
        settings: Settings, now: datetime, write_segment) -> None:
    t1, t2, t3 = (now - timedelta(hours=h) for h in (5, 4, 3))
    write_segment("ingest-1-000001", [(TOPIC, {"readings": [hr("a", t1), hr("b", t2), hr("bad", t3, 400)]})],
                  received_at=now)
    write_segment("ingest-1-000002", [(TOPIC, hr("a", t1))], received_at=now)  # a device retry of "a"
    run_pipeline(settings, "r1")
    assert {k: v for k, v in table(settings, "SELECT row_key, list_contains(reasons, 'device_enrolled_at_measured_time')"
                                             " FROM quarantine")} == {
        "ingest-1-000001:0:0": True, "ingest-1-000001:0:1": True, "ingest-1-000001:0:2": True,
        "ingest-1-000002:0:0": True}
    enrol_late(settings, since=now - timedelta(days=1))
    with clinical(settings) as con:
        con.execute("DELETE FROM alert_dirty")  # what an alert evaluation leaves behind

    result = replay_quarantine(settings, ENROLLED)

    assert (result.examined, result.loaded, result.duplicates, result.still_quarantined) == (4, 2, 1, 1)
    assert result.reasons_changed == 1 and result.still_by_reason == {"plausible_heart_rate": 1}
    assert table(settings, "SELECT msg_id, patient_id, value, segment, record_no, item_no FROM readings "
                           "ORDER BY msg_id") == [("a", "pat-late", 72.0, "ingest-1-000001", 0, 0),
                                                  ("b", "pat-late", 72.0, "ingest-1-000001", 0, 1)]
    assert table(settings, "SELECT row_key FROM duplicates") == [("ingest-1-000002:0:0",)]  # the retry
    assert table(settings, "SELECT row_key, reasons, detail FROM quarantine") == [
        ("ingest-1-000001:0:2", ["plausible_heart_rate"], None)]  # still fails: kept, with today's reason
    assert table(settings, "SELECT segment, items, loaded, quarantined, duplicates FROM segments ORDER BY 1") == [
        ("ingest-1-000001", 3, 2, 1, 0), ("ingest-1-000002", 1, 0, 0, 1)]  # the ledger moved with them
    acc = accounting(settings)
    assert acc["balanced"] is True
    assert (acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"]) == (4, 2, 1, 1)
    assert table(settings, "SELECT patient_id FROM alert_dirty") == [("pat-late",)]
    assert table(settings, "SELECT reading_id FROM patient_last_reading") == table(
        settings, "SELECT reading_id FROM readings WHERE msg_id = 'b'")  # the no-data rules see it
    assert current_snapshot(settings) is not None
    with serving(settings) as con:  # clinicians read the snapshot: the readings are there
        assert con.execute("SELECT count(*) FROM readings").fetchone() == (2,)

    before = state(settings)
    again = replay_quarantine(settings, ENROLLED)
    assert (again.examined, again.changed) == (0, False)
    assert replay_quarantine(settings, "plausible_heart_rate").changed is False  # still implausible
    assert state(settings) == before
    assert table(settings, "SELECT reason, examined, loaded FROM quarantine_replays ORDER BY replayed_at") == [
        (ENROLLED, 4, 2), (ENROLLED, 0, 0), ("plausible_heart_rate", 1, 0)]


def test_replay_classifies_against_what_is_loaded_like_the_load(
        settings: Settings, now: datetime, write_segment) -> None:
    """A quarantined copy of a reading loaded since is a duplicate; a copy with another value is a conflict."""
    t1, t2 = now - timedelta(hours=2), now - timedelta(hours=1)
    write_segment("ingest-1-000001", [(TOPIC, hr("same", t1)), (TOPIC, hr("other", t2, 80))], received_at=now)
    run_pipeline(settings, "r1")
    enrol_late(settings, since=now - timedelta(days=1))
    write_segment("ingest-1-000002", [(TOPIC, hr("same", t1)), (TOPIC, hr("other", t2, 81))], received_at=now)
    run_pipeline(settings, "r2")  # the device resends after enrollment: these load
    assert table(settings, "SELECT count(*) FROM readings") == [(2,)]

    result = replay_quarantine(settings, ENROLLED)

    assert (result.loaded, result.duplicates, result.still_quarantined) == (0, 1, 1)
    assert table(settings, "SELECT row_key FROM duplicates") == [("ingest-1-000001:0:0",)]
    assert table(settings, "SELECT row_key, reasons, detail IS NOT NULL FROM quarantine") == [
        ("ingest-1-000001:1:0", ["conflicting_duplicate"], True)]
    assert table(settings, "SELECT value FROM readings WHERE msg_id = 'other'") == [(81.0,)]  # never rewritten
    assert accounting(settings)["balanced"] is True


def test_app_events_quarantined_before_the_app_was_registered_load_after_a_replay(
        settings: Settings, now: datetime, write_segment) -> None:
    topic = "rpm/v1/apps/app-late/events"
    events = [{"msg_id": f"e-{i}", "event": "education_completed", "occurred_at": (now - timedelta(hours=i)).isoformat(),
               "module": "salt", "minutes": 10} for i in (1, 2)]
    write_segment("ingest-1-000001", [(topic, {"events": events})], received_at=now)
    run_pipeline(settings, "r1")
    assert table(settings, "SELECT count(*) FROM quarantine WHERE list_contains(reasons, "
                           "'source_enrolled_at_event_time')") == [(2,)]
    enrol_late(settings, since=now - timedelta(days=1), device="app-late", kind="app")

    result = replay_quarantine(settings, "source_enrolled_at_event_time")

    assert (result.loaded, result.still_quarantined) == (2, 0)
    assert table(settings, "SELECT msg_id, patient_id, channel FROM telehealth_events ORDER BY msg_id") == [
        ("e-1", "pat-late", "events"), ("e-2", "pat-late", "events")]
    assert accounting(settings)["balanced"] is True


def test_a_structural_reason_is_refused_and_nothing_changes(settings: Settings, now: datetime,
                                                            write_segment) -> None:
    write_segment("ingest-1-000001", [(TOPIC, b"not json")], received_at=now)
    run_pipeline(settings, "r1")
    before = state(settings)
    with pytest.raises(NotReplayable, match="cannot replay not_json: a structural reason"):
        replay_quarantine(settings, "not_json")
    with clinical(settings) as con, pytest.raises(NotReplayable):
        replay(con, "not_json", settings.future_skew_s, "x")
    assert state(settings) == before
    assert table(settings, "SELECT raw FROM quarantine") == [(b"not json",)]  # kept for a decoder fix
