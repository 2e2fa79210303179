"""Claim -> stage -> validate -> load, called as the DAG's tasks call them (no Airflow, a tmp RPM_HOME).

What a user relies on: every landed reading ends in exactly one of readings, quarantine (with its reasons)
or duplicates; the accounting identity holds; re-running changes nothing; a reading belongs to the patient
the device was enrolled to when it was measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pytest

from core.settings import Settings
from pipeline import Sizes
from tests.steps import SIZES, claim_segments, load_batch, stage_batch, validate_batch
from warehouse.accounting import accounting
from warehouse.db import clinical
from warehouse.ledger import Batch
from warehouse.load import LoadError
from warehouse.registry import enroll

DEVICE = "dev-1"
TOPIC = f"rpm/v1/devices/{DEVICE}/vitals"
SEG = "ingest-1-000001"


def run_pipeline(s: Settings, run_id: str, sizes: Sizes = SIZES) -> dict[str, Any]:
    """The four DAG tasks in order, each with its own connection as in separate task processes."""
    batch = claim_segments(s)
    batch = Batch.from_xcom(batch.to_xcom())  # through XCom: ids only
    staged = stage_batch(s, batch, sizes)
    failures = validate_batch(s, batch, sizes)["failures_by_rule"]
    loaded = load_batch(s, batch, run_id, sizes)
    return {"batch": batch, "staged": staged, "failures": failures, "loaded": loaded}


def counts(s: Settings) -> dict[str, int]:
    with clinical(s) as con:
        row = con.execute("""SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM quarantine),
                                    (SELECT count(*) FROM duplicates), (SELECT count(*) FROM segments)""").fetchone()
    return dict(zip(("readings", "quarantine", "duplicates", "segments"), row, strict=True))


def quarantine(s: Settings) -> dict[str, list[str]]:
    with clinical(s) as con:
        return dict(con.execute("SELECT row_key, reasons FROM quarantine").fetchall())


def patients_by_msg(s: Settings) -> dict[str, str]:
    with clinical(s) as con:
        return dict(con.execute("SELECT msg_id, patient_id FROM readings").fetchall())


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def enrolled(settings: Settings, now: datetime) -> datetime:
    """dev-1 enrolled to pat-1 since two days ago; returns valid_from."""
    since = now - timedelta(days=2)
    with clinical(settings) as con:
        enroll(con, DEVICE, "pat-1", kind="hub", valid_from=since)
    return since


@pytest.fixture
def first_segment(settings: Settings, enrolled: datetime, now: datetime,
                  make_reading: Callable[..., dict[str, Any]], write_segment) -> dict[str, Any]:
    at = now - timedelta(minutes=10)
    hr = make_reading("heart_rate", measured_at=at, msg_id="hr")
    messages = [
        (TOPIC, hr),                                                                          # 0 load
        (TOPIC, make_reading("blood_pressure", measured_at=at, msg_id="bp")),                 # 1 load
        (TOPIC, make_reading("blood_glucose", measured_at=at, msg_id="glu")),                 # 2 load
        (TOPIC, hr),                                                                          # 3 exact duplicate
        (TOPIC, dict(hr, msg_id="hr-again", value=91)),                                       # 4 conflict
        (TOPIC, make_reading("heart_rate", measured_at=at - timedelta(minutes=1), value=400,
                             msg_id="hr-bad")),                                               # 5 implausible
        (TOPIC, b"\x00garbage{"),                                                             # 6 not JSON
        (TOPIC, {"readings": [make_reading("spo2", measured_at=at, msg_id="spo2"),           # 7 batch of two
                              make_reading("body_weight", measured_at=at, msg_id="wt")]}),
    ]
    write_segment(SEG, messages, received_at=now)
    return {"at": at}


def test_first_run_sorts_every_reading_into_exactly_one_outcome(settings: Settings, first_segment) -> None:
    out = run_pipeline(settings, "t1")

    assert out["batch"].segments == [SEG]
    assert out["staged"] == {"segments": 1, "messages": 8, "candidates": 8, "events": 0, "unreadable": 1,
                             "rejected": 0}
    assert out["failures"] == {"plausible_heart_rate": 1}
    assert out["loaded"] == {"loaded": 5, "quarantined": 3, "duplicates": 1, "segments": 1}
    assert counts(settings) == {"readings": 5, "quarantine": 3, "duplicates": 1, "segments": 1}
    assert quarantine(settings) == {
        f"{SEG}:4:0": ["conflicting_duplicate"],
        f"{SEG}:5:0": ["plausible_heart_rate"],
        f"{SEG}:6:0": ["not_json"],
    }
    with clinical(settings) as con:
        assert con.execute("SELECT row_key FROM duplicates").fetchall() == [(f"{SEG}:3:0",)]
        readings = {r[0]: r[1:] for r in con.execute(
            "SELECT msg_id, patient_id, loinc, value, diastolic, unit, unit_sent, run_id FROM readings").fetchall()}
        raw = con.execute("SELECT raw FROM quarantine WHERE row_key = ?", [f"{SEG}:6:0"]).fetchone()[0]
    assert set(readings) == {"hr", "bp", "glu", "spo2", "wt"}
    assert readings["hr"] == ("pat-1", "8867-4", 72.0, None, "/min", "/min", "t1")  # first copy wins
    assert readings["bp"][:5] == ("pat-1", "85354-9", 128.0, 82.0, "mm[Hg]")
    assert readings["glu"][1:] == ("41653-7", pytest.approx(5.5 * 18.0156), None, "mg/dL", "mmol/L", "t1")
    assert bytes(raw) == b"\x00garbage{"  # unreadable bytes kept for replay


def test_load_marks_the_patients_it_loaded_for_alert_evaluation(settings: Settings, first_segment) -> None:
    """The next alert evaluation looks at exactly the patients with new readings (warehouse/alerts.py)."""
    with clinical(settings) as con:
        con.execute("INSERT INTO patients (patient_id) VALUES ('pat-2')")
    run_pipeline(settings, "t1")
    with clinical(settings) as con:
        assert con.execute("SELECT patient_id FROM alert_dirty").fetchall() == [("pat-1",)]
        latest = con.execute("""SELECT patient_id, measured_at, reading_id FROM readings
                                ORDER BY measured_at DESC, reading_id DESC LIMIT 1""").fetchall()
        assert con.execute("SELECT * FROM patient_last_reading").fetchall() == latest  # the no-data rules' input


def test_accounting_balances(settings: Settings, first_segment) -> None:
    run_pipeline(settings, "t1")
    acc = accounting(settings)
    assert acc["balanced"] is True
    assert acc["received"] == acc["loaded"] + acc["quarantined"] + acc["duplicates"]
    assert (acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"]) == (9, 5, 3, 1)
    assert acc["messages_processed"] == 8
    assert "conflicting_duplicate" in acc["quarantined_by_reason"]
    assert acc["quarantined_by_reason"] == {"conflicting_duplicate": 1, "not_json": 1, "plausible_heart_rate": 1}
    assert acc["pending"] == {"sealed_segments": 0, "sealed_messages": 0, "open_segments": 0, "open_messages": 0}


def test_accounting_reports_landed_but_unprocessed_messages_as_pending(settings: Settings, first_segment) -> None:
    acc = accounting(settings)
    assert acc["pending"]["sealed_segments"] == 1
    assert acc["pending"]["sealed_messages"] == 8
    assert acc["received"] == 0


def test_rerunning_the_whole_sequence_changes_nothing(settings: Settings, first_segment) -> None:
    first = run_pipeline(settings, "t1")
    before, acc_before = counts(settings), accounting(settings)

    again = run_pipeline(settings, "t2")
    assert again["batch"].segments == []
    assert again["loaded"] == {"loaded": 0, "quarantined": 0, "duplicates": 0, "segments": 0}

    # A retried run re-stages the same, already absorbed batch: still nothing changes.
    batch = first["batch"]
    stage_batch(settings, batch)
    validate_batch(settings, batch)
    assert load_batch(settings, batch, "t1") == {"loaded": 0, "quarantined": 0, "duplicates": 0, "segments": 0}
    assert load_batch(settings, batch, "t1") == {"loaded": 0, "quarantined": 0, "duplicates": 0, "segments": 0}

    assert counts(settings) == before
    assert accounting(settings) == acc_before


def test_load_refuses_a_staged_but_unvalidated_batch(settings: Settings, first_segment) -> None:
    batch = claim_segments(settings)
    stage_batch(settings, batch)
    with pytest.raises(LoadError, match="not validated"):
        load_batch(settings, batch, "t1")
    assert counts(settings) == {"readings": 0, "quarantine": 0, "duplicates": 0, "segments": 0}

    validate_batch(settings, batch)
    assert load_batch(settings, batch, "t1")["loaded"] == 5


def test_redelivery_in_a_later_segment_is_a_duplicate_and_a_changed_value_a_conflict(
        settings: Settings, enrolled: datetime, now: datetime, make_reading, write_segment) -> None:
    hr = make_reading("heart_rate", measured_at=now - timedelta(minutes=3), msg_id="hr")
    write_segment("ingest-1-000001", [(TOPIC, hr)], received_at=now)
    run_pipeline(settings, "t1")
    write_segment("ingest-1-000002", [(TOPIC, hr), (TOPIC, dict(hr, value=120))], received_at=now)

    out = run_pipeline(settings, "t2")

    assert out["loaded"] == {"loaded": 0, "quarantined": 1, "duplicates": 1, "segments": 1}
    assert quarantine(settings) == {"ingest-1-000002:1:0": ["conflicting_duplicate"]}
    with clinical(settings) as con:
        assert con.execute("SELECT value FROM readings").fetchall() == [(72.0,)]  # never silently rewritten
    assert accounting(settings)["balanced"] is True


def test_a_quarantined_batch_item_keeps_its_own_json_as_raw(
        settings: Settings, enrolled: datetime, now: datetime, make_reading, write_segment) -> None:
    """A batch item's raw is built only when it is quarantined (rule or conflict): the item, not its batch."""
    hr = make_reading("heart_rate", measured_at=now - timedelta(minutes=3), msg_id="hr")
    write_segment("ingest-1-000001", [(TOPIC, hr)], received_at=now)
    run_pipeline(settings, "t1")
    bad = make_reading("spo2", measured_at=now - timedelta(minutes=2), value=400, msg_id="bad", extra_field=[1])
    conflict = dict(hr, value=120)
    fine = make_reading("spo2", measured_at=now - timedelta(minutes=1), msg_id="ok")
    write_segment("ingest-1-000002", [(TOPIC, {"readings": [fine, bad, conflict]})], received_at=now)

    out = run_pipeline(settings, "t2")

    assert out["loaded"] == {"loaded": 1, "quarantined": 2, "duplicates": 0, "segments": 1}
    with clinical(settings) as con:
        raws = dict(con.execute("SELECT row_key, raw FROM quarantine").fetchall())
    assert {k: json.loads(v) for k, v in raws.items()} == {"ingest-1-000002:0:1": bad,
                                                           "ingest-1-000002:0:2": conflict}
    assert accounting(settings)["balanced"] is True


def test_each_segment_of_a_batch_balances_in_the_ledger(
        settings: Settings, enrolled: datetime, now: datetime, make_reading, write_segment) -> None:
    hr = make_reading("heart_rate", measured_at=now - timedelta(minutes=3), msg_id="hr")
    write_segment("ingest-1-000001", [(TOPIC, hr)], received_at=now)
    write_segment("ingest-1-000002", [(TOPIC, hr), (TOPIC, dict(hr, value=99)), (TOPIC, b"{")], received_at=now)

    out = run_pipeline(settings, "t1")

    assert out["batch"].segments == ["ingest-1-000001", "ingest-1-000002"]
    with clinical(settings) as con:
        ledger = con.execute("SELECT segment, messages, items, loaded, quarantined, duplicates, run_id "
                             "FROM segments ORDER BY segment").fetchall()
    assert ledger == [("ingest-1-000001", 1, 1, 1, 0, 0, "t1"),   # the earlier segment's copy is loaded
                      ("ingest-1-000002", 3, 3, 0, 2, 1, "t1")]
    assert accounting(settings)["balanced"] is True


def test_reading_measured_before_enrollment_is_quarantined(
        settings: Settings, enrolled: datetime, make_reading, write_segment) -> None:
    early = make_reading("heart_rate", measured_at=enrolled - timedelta(seconds=1), msg_id="early")
    on_time = make_reading("heart_rate", measured_at=enrolled, msg_id="on-time")  # valid_from is inclusive
    write_segment(SEG, [(TOPIC, early), (TOPIC, on_time)])

    out = run_pipeline(settings, "t1")

    assert out["failures"] == {"device_enrolled_at_measured_time": 1}
    assert quarantine(settings) == {f"{SEG}:0:0": ["device_enrolled_at_measured_time"]}
    assert patients_by_msg(settings) == {"on-time": "pat-1"}


def test_reading_of_an_unknown_device_is_quarantined(settings: Settings, enrolled: datetime, make_reading,
                                                     write_segment) -> None:
    write_segment(SEG, [("rpm/v1/devices/stranger/vitals", make_reading("heart_rate"))])
    run_pipeline(settings, "t1")
    assert quarantine(settings) == {f"{SEG}:0:0": ["device_enrolled_at_measured_time"]}
    assert counts(settings)["readings"] == 0


def test_enroll_reads_back_the_current_enrollment(settings: Settings, enrolled: datetime) -> None:
    """Regression: enroll() fetches the current enrollment's TIMESTAMPTZ ``valid_from`` into Python, which
    DuckDB can only do with ``pytz`` installed. Without it, enrolling an already-enrolled device (a
    hand-over, or re-issuing its password) raised ``InvalidInputException: Required module 'pytz'``."""
    error = None
    with clinical(settings) as con:
        try:
            same = enroll(con, DEVICE, "pat-1")
        except duckdb.InvalidInputException as exc:
            error = exc
    assert error is None, f"re-enrolling an enrolled device crashed: {error}"
    assert same.changed is False and same.valid_from == enrolled


def test_reenrolled_device_attributes_readings_by_measured_time(
        settings: Settings, enrolled: datetime, now: datetime, make_reading, write_segment) -> None:
    handover = now - timedelta(days=1)
    with clinical(settings) as con:
        change = enroll(con, DEVICE, "pat-2", valid_from=handover)
        same = enroll(con, DEVICE, "pat-2")
    assert change.changed is True
    assert same.changed is False and same.valid_from == handover  # re-enrolling to the same patient: no-op

    write_segment(SEG, [
        (TOPIC, make_reading("heart_rate", measured_at=handover - timedelta(hours=12), msg_id="old-1")),
        (TOPIC, make_reading("heart_rate", measured_at=handover - timedelta(microseconds=1), msg_id="old-2")),
        (TOPIC, make_reading("heart_rate", measured_at=handover, msg_id="new-1")),
        (TOPIC, make_reading("heart_rate", measured_at=now - timedelta(hours=1), msg_id="new-2")),
    ], received_at=now)

    out = run_pipeline(settings, "t1")

    assert out["failures"] == {}
    assert patients_by_msg(settings) == {"old-1": "pat-1", "old-2": "pat-1", "new-1": "pat-2", "new-2": "pat-2"}


def test_empty_claim_is_a_no_op(settings: Settings) -> None:
    out = run_pipeline(settings, "t1")
    assert out["batch"].segments == []
    assert out["loaded"] == {"loaded": 0, "quarantined": 0, "duplicates": 0, "segments": 0}
    assert accounting(settings)["balanced"] is True


def test_claim_names_the_same_batch_when_retried(settings: Settings, write_segment, make_reading) -> None:
    write_segment("ingest-1-000002", [(TOPIC, make_reading())])
    write_segment("ingest-1-000001", [(TOPIC, make_reading())])
    first, second = claim_segments(settings), claim_segments(settings)
    assert first == second
    assert first.segments == ["ingest-1-000001", "ingest-1-000002"]  # oldest first
    capped = claim_segments(Settings(home=settings.home, pipeline_max_segments=1))
    assert capped.segments == ["ingest-1-000001"]


@pytest.mark.parametrize("stage", [Sizes(stage_messages=1), Sizes(stage_items=1)], ids=["messages", "items"])
def test_decoding_validating_and_loading_in_small_chunks_changes_no_outcome(
        settings: Settings, first_segment, write_segment, make_reading, now: datetime, stage: Sizes) -> None:
    """Large batches are decoded a few segments, validated a slice of rows and loaded a group of segments at
    a time (bounded memory): chunk boundaries, even between a reading and its repeats in a later segment, must
    not change what lands where."""
    at = now - timedelta(minutes=5)
    repeat = make_reading("heart_rate", measured_at=first_segment["at"], msg_id="hr")  # first segment's hr
    write_segment("ingest-1-000002", [(TOPIC, make_reading("heart_rate", measured_at=at, msg_id="hr2")),
                                      (TOPIC, make_reading("heart_rate", measured_at=at, msg_id="hr2")),
                                      (TOPIC, make_reading("spo2", measured_at=at, value=20, msg_id="low")),
                                      (TOPIC, repeat), (TOPIC, dict(repeat, value=95))])
    # Every segment its own chunk and its own load transaction; three rows per validation.
    # (Staged by message count or by item count: either way whole segments.)
    out = run_pipeline(settings, "t1", Sizes(stage_messages=stage.stage_messages, stage_items=stage.stage_items,
                                             validate_rows=3, load_items=1))

    assert out["staged"]["segments"] == 2 and out["staged"]["messages"] == 13
    assert out["loaded"] == {"loaded": 6, "quarantined": 5, "duplicates": 3, "segments": 2}
    assert quarantine(settings)["ingest-1-000002:2:0"] == ["plausible_spo2"]
    assert quarantine(settings)["ingest-1-000002:4:0"] == ["conflicting_duplicate"]  # against segment 1's load
    with clinical(settings) as con:
        assert con.execute("SELECT value FROM readings WHERE msg_id = 'hr'").fetchall() == [(72.0,)]
    assert accounting(settings)["balanced"] is True


def two_segment_batch(settings: Settings, make_reading, write_segment, now: datetime) -> None:
    write_segment("ingest-1-000002", [(TOPIC, make_reading("spo2", measured_at=now - timedelta(minutes=4),
                                                           msg_id="spo2-later")),
                                      (TOPIC, make_reading("spo2", measured_at=now - timedelta(minutes=4),
                                                           value=80, msg_id="spo2-changed")),
                                      (TOPIC, b"[")])


def dies_on_second_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, except that its second call dies (a task killed half-way: out of memory, SIGKILL)."""
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("killed half-way")
        return fn(*args, **kwargs)
    return wrapper


def test_a_stage_that_dies_between_chunks_is_redone_whole(
        settings: Settings, first_segment, make_reading, write_segment, now: datetime, monkeypatch) -> None:
    """Staging commits chunk by chunk; a stage killed half-way must neither lose nor double anything when the
    task is retried, and the half-staged batch cannot be loaded in between."""
    import pipeline.stage

    two_segment_batch(settings, make_reading, write_segment, now)
    batch = claim_segments(settings)
    monkeypatch.setattr(pipeline.stage, "stage_chunk", dies_on_second_call(pipeline.stage.stage_chunk))
    with pytest.raises(MemoryError):
        stage_batch(settings, batch, Sizes(stage_messages=1))  # every segment its own chunk
    with pytest.raises(LoadError, match="not validated"):
        load_batch(settings, batch, "t1")

    staged = stage_batch(settings, batch)  # the retry
    validate_batch(settings, batch)
    loaded = load_batch(settings, batch, "t1")

    assert staged["segments"] == 2 and staged["messages"] == 11
    assert loaded == {"loaded": 6, "quarantined": 5, "duplicates": 1, "segments": 2}
    assert accounting(settings)["balanced"] is True


def test_a_load_that_dies_between_groups_resumes_where_it_stopped(
        settings: Settings, first_segment, make_reading, write_segment, now: datetime, monkeypatch) -> None:
    """The first group commits with its ledger rows; the retried load skips it and loads the rest — the
    same outcome as one uninterrupted load, and the accounting balances at every point."""
    import warehouse.load

    two_segment_batch(settings, make_reading, write_segment, now)
    one_segment_per_group = Sizes(load_items=1)
    batch = claim_segments(settings)
    stage_batch(settings, batch)
    validate_batch(settings, batch)
    monkeypatch.setattr(warehouse.load, "_load_group", dies_on_second_call(warehouse.load._load_group))
    with pytest.raises(MemoryError):
        load_batch(settings, batch, "t1", one_segment_per_group)
    assert counts(settings) == {"readings": 5, "quarantine": 3, "duplicates": 1, "segments": 1}
    assert accounting(settings)["balanced"] is True

    resumed = load_batch(settings, batch, "t1", one_segment_per_group)

    assert resumed == {"loaded": 1, "quarantined": 2, "duplicates": 0, "segments": 1}
    assert counts(settings) == {"readings": 6, "quarantine": 5, "duplicates": 1, "segments": 2}
    assert accounting(settings)["balanced"] is True
    with clinical(settings) as con:
        assert con.execute("SELECT count(*) FROM stg_candidates").fetchone() == (0,)  # staging cleared at the end


def test_text_no_enum_can_hold_is_judged_as_text(settings: Settings, enrolled: datetime, now: datetime,
                                                  make_reading: Callable[..., dict[str, Any]], write_segment
                                                  ) -> None:
    """The quality gate hands GX a batch's text as categories built from its own values; a value with a NUL
    byte or a quote (what a hostile device may send) is still judged exactly as its text is."""
    at = now - timedelta(minutes=10)
    write_segment(SEG, [
        (TOPIC, make_reading("heart_rate", measured_at=at, msg_id="ok")),                       # 0 load
        (TOPIC, make_reading("heart_rate", measured_at=at, msg_id="nul", unit="/min\x00")),     # 1 unit refused
        (TOPIC, make_reading("heart_rate", measured_at=at, msg_id="quote", metric="heart'rate")),  # 2 unknown
        (TOPIC, make_reading("spo2", measured_at=at, msg_id="pct", unit="%'")),                # 3 unit refused
    ], received_at=now)
    out = run_pipeline(settings, "t1")

    assert out["loaded"] == {"loaded": 1, "quarantined": 3, "duplicates": 0, "segments": 1}
    assert quarantine(settings) == {
        f"{SEG}:1:0": ["unit_accepted_for_metric"],
        f"{SEG}:2:0": ["metric_known"],
        f"{SEG}:3:0": ["unit_accepted_for_metric"],
    }
