"""Hostile input through the real broker and ingest service, then one real `rpm pipeline run`.

A device (and an app) publish a corpus of malicious or broken payloads: random bytes, truncated and deeply
nested JSON, non-finite and overflowing numbers, wrong types, unknown metrics and units, control characters,
SQL, impossible timestamps, bad batches, vitals a device's kind cannot measure — plus stray topics and one
publish over the broker's size limit. What a user relies on: the stray topics (outside the login's own) and
the oversized publish are refused at the broker; every other message is acked, landed and
accounted for; each item is quarantined with the specific rule it broke; nothing hostile reaches `readings`
or `telehealth_events`; no table was touched by the SQL; the ingest process never restarted and still lands
the next normal reading; and no payload is readable in plaintext anywhere under RPM_HOME.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from core.keyring import Keyring
from core.landing import list_sealed, read_segment
from core.settings import Settings
from ingest.service import make_client
from rpmctl import services
from rpmctl.services import procs
from rpmctl.services.airflow_run import seal_open_segments
from rpmctl.tools.publish import DevicePublisher, wait_until
from tests.conftest import rpm, rpm_json
from tests.steps import claim_segments, load_batch, run_pipeline_in_process, stage_batch, validate_batch
from transforms.decode import MAX_BATCH
from warehouse.db import clinical
from warehouse.serving import publish_snapshot

pytestmark = pytest.mark.integration

SQL = "'; DROP TABLE readings; --"
# In every hostile payload: it must never be readable in plaintext anywhere under RPM_HOME.
CANARY = "hxcanary-5f1c0d"
CONTROL = "\x00\x07\x1b[2J\u202e\u200b\ufeff💉"
# Reasons the ingest service already knows at the door (it marks the landed record).
DOOR_REASONS = {"unknown_topic", "not_utf8", "not_json", "not_a_json_object"}
TABLES = {"readings", "telehealth_events", "quarantine", "duplicates", "segments", "patients", "devices",
          "enrollments"}


@dataclass(frozen=True)
class Hostile:
    name: str
    channel: str                   # "vitals", "status", "events", or a topic level under the device's prefix
    payload: bytes
    reasons: dict[int, list[str]]  # item_no -> every rule it broke, as the quarantine records them


def known_at_the_door(e: Hostile) -> bool:
    """Whether ingest marks it: one reason it can tell without parsing — a payload shaped like a JSON object
    ({ ... }) is left for the pipeline to parse, so a number too long to read inside one is not marked."""
    body = e.payload.strip(b" \t\r\n")
    object_shaped = body[:1] == b"{" and body[-1:] == b"}"
    return len(e.reasons) == 1 and e.reasons[0][0] in DOOR_REASONS and not (
        object_shaped and e.reasons[0][0] == "not_json")


def _json(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()  # NaN/Infinity become JSON's non-standard literals


def hostile_corpus(now: datetime) -> list[Hostile]:
    eastern = timezone(timedelta(hours=-5))
    t = (now - timedelta(hours=1)).astimezone(eastern).isoformat(timespec="seconds")
    day = t[:10]
    counter = iter(range(10_000))

    def reading(**fields: Any) -> dict[str, Any]:
        item = {"msg_id": f"{CANARY}-{next(counter)}", "metric": "heart_rate", "measured_at": t, "value": 72,
                "unit": "/min"}
        item.update(fields)
        return {k: v for k, v in item.items() if v is not ...}

    def event(**fields: Any) -> dict[str, Any]:
        item = {"msg_id": f"{CANARY}-{next(counter)}", "event": "education_completed", "occurred_at": t,
                "module": "salt-and-bp", "minutes": 12}
        item.update(fields)
        return {k: v for k, v in item.items() if v is not ...}

    def status(**fields: Any) -> dict[str, Any]:
        item = {"msg_id": f"{CANARY}-{next(counter)}", "reported_at": t, "battery_pct": 64, "firmware": "2.4.1"}
        item.update(fields)
        return {k: v for k, v in item.items() if v is not ...}

    def one(*reasons: str) -> dict[int, list[str]]:
        return {0: sorted(reasons)}

    rng = random.Random(7)
    v, st, ev = "vitals", "status", "events"
    return [
        # --- structure: the message cannot be read as contract v1 at all ------------------------------------
        Hostile("random_bytes", v, b"\xff\xfe" + bytes(rng.randrange(256) for _ in range(400)), one("not_utf8")),
        Hostile("control_bytes", v, b"\x00\x01\x02\x1b[2J" + CANARY.encode(), one("not_json")),
        Hostile("truncated_json", v, _json(reading())[:-9], one("not_json")),
        Hostile("empty_payload", v, b"", one("not_json")),
        Hostile("utf8_bom", v, b"\xef\xbb\xbf" + _json(reading()), one("not_json")),
        Hostile("nested_100k_arrays", v, b"[" * 100_000, one("not_json")),
        Hostile("nested_100k_in_batch", v, b'{"readings":' + b"[" * 100_000, one("not_json")),
        Hostile("int_of_5000_digits", v, _json(reading(value=0))[:-1] + b',"v":' + b"9" * 5000 + b"}",
                one("not_json")),
        Hostile("top_level_array", v, _json([reading()]), one("not_a_json_object")),
        Hostile("top_level_string", v, _json(CANARY), one("not_a_json_object")),
        Hostile("top_level_nan", v, b"NaN", one("not_json")),  # not JSON (core/payload.py)
        Hostile("top_level_1e999", v, b"1e999", one("not_json")),  # no double holds it
        # --- batches ----------------------------------------------------------------------------------------
        Hostile("empty_batch", v, _json({"readings": [], "id": CANARY}), one("empty_batch")),
        Hostile("readings_an_object", v, _json({"readings": {"0": reading()}}), one("readings_not_a_list")),
        Hostile("readings_a_string", v, _json({"readings": CANARY}), one("readings_not_a_list")),
        Hostile("non_object_items", v, _json({"readings": [1, CANARY, None, [], True]}),
                {i: ["reading_not_an_object"] for i in range(5)}),
        Hostile("over_max_batch", v, _json({"readings": [{}] * (MAX_BATCH + 1), "id": CANARY}),
                one("batch_too_large")),
        Hostile("mixed_batch", v,
                _json({"readings": [reading(value="72"), 7, reading(metric="blood_alcohol")]}),
                {0: ["value_is_number"], 1: ["reading_not_an_object"], 2: ["metric_known"]}),
        # --- numbers: only finite JSON numbers are values; NaN/Infinity literals and numbers no double holds
        # are not JSON, so the whole message is unreadable (core/payload.py) -------------------------------
        Hostile("value_nan", v, _json(reading(value=float("nan"))), one("not_json")),
        Hostile("value_infinity", v, _json(reading(value=float("inf"))), one("not_json")),
        Hostile("value_minus_infinity", v, _json(reading(value=float("-inf"))), one("not_json")),
        Hostile("value_1e999", v, _json(reading(value=0)).replace(b'"value": 0', b'"value": 1e999'),
                one("not_json")),
        Hostile("value_10_pow_400", v, _json(reading(value=10**400)), one("value_is_number")),
        Hostile("glucose_1e307_mmol_overflows_in_conversion", v,
                _json(reading(metric="blood_glucose", unit="mmol/L", source="meter", value=1e307)),
                one("plausible_blood_glucose")),
        Hostile("bp_nan_and_text", v, _json(reading(metric="blood_pressure", unit="mm[Hg]", value=...,
                                                    values={"systolic": float("nan"), "diastolic": "80"})),
                one("not_json")),
        Hostile("bp_null_and_text", v, _json(reading(metric="blood_pressure", unit="mm[Hg]", value=...,
                                                     values={"systolic": None, "diastolic": "80"})),
                one("value_is_number", "diastolic_is_number")),
        # --- wrong types ------------------------------------------------------------------------------------
        Hostile("value_string", v, _json(reading(value="72")), one("value_is_number")),
        Hostile("value_list", v, _json(reading(value=[72])), one("value_is_number")),
        Hostile("value_object", v, _json(reading(value={"v": 72})), one("value_is_number")),
        Hostile("value_boolean", v, _json(reading(value=True)), one("value_is_number")),
        Hostile("value_null", v, _json(reading(value=None)), one("value_is_number")),
        Hostile("bp_values_a_list", v, _json(reading(metric="blood_pressure", unit="mm[Hg]", value=...,
                                                     values=[142, 91])),
                one("value_is_number", "diastolic_is_number")),
        Hostile("metric_a_number", v, _json(reading(metric=42)), one("metric_present")),
        Hostile("unit_a_list", v, _json(reading(unit=["/min"])), one("unit_accepted_for_metric")),
        Hostile("measured_at_epoch_number", v, _json(reading(measured_at=1_764_000_000)),
                one("measured_at_rfc3339_with_offset")),
        Hostile("msg_id_an_object", v, _json(reading(msg_id={"id": CANARY})), one("msg_id_present")),
        Hostile("msg_id_too_long", v, _json(reading(msg_id=CANARY * 20)), one("msg_id_present")),
        # --- unknown metrics and units ----------------------------------------------------------------------
        Hostile("unknown_metric", v, _json(reading(metric="blood_alcohol", unit="%")), one("metric_known")),
        Hostile("unknown_unit", v, _json(reading(unit="bpm")), one("unit_accepted_for_metric")),
        Hostile("unit_of_another_metric", v, _json(reading(unit="%")), one("unit_accepted_for_metric")),
        Hostile("kelvin", v, _json(reading(metric="body_temperature", unit="K", value=310.15)),
                one("unit_accepted_for_metric")),
        Hostile("glucose_source_unknown", v,
                _json(reading(metric="blood_glucose", unit="mg/dL", value=110, source="implant")),
                one("glucose_source_known")),
        # --- unicode and control characters -----------------------------------------------------------------
        Hostile("control_chars_in_every_field", v, _json({
            "msg_id": CANARY + CONTROL, "metric": "heart_rate" + CONTROL, "measured_at": t + CONTROL,
            "value": "72" + CONTROL, "unit": "/min" + CONTROL, "source": CONTROL, CONTROL: CONTROL}),
                one("metric_known", "value_is_number", "measured_at_rfc3339_with_offset")),
        Hostile("nul_in_unit", v, _json(reading(unit="/min\x00")), one("unit_accepted_for_metric")),
        Hostile("metric_trailing_newline", v, _json(reading(metric="heart_rate\n")), one("metric_known")),
        Hostile("arabic_indic_digits_time", v, _json(reading(measured_at="٢٠٢٦-11-27T07:31:00-05:00")),
                one("measured_at_rfc3339_with_offset")),
        Hostile("fullwidth_digits_value", v, _json(reading(value="７２")), one("value_is_number")),
        # --- SQL: values are bound, never spliced -----------------------------------------------------------
        Hostile("sql_in_every_field", v, _json({"msg_id": SQL, "metric": SQL, "measured_at": t, "value": 72,
                                                "unit": SQL, "device_id": SQL, "patient_id": SQL, "x": CANARY}),
                one("metric_known")),
        Hostile("sql_as_time", v, _json(reading(msg_id=SQL + CANARY, measured_at=SQL)),
                one("measured_at_rfc3339_with_offset")),
        # --- time -------------------------------------------------------------------------------------------
        Hostile("measured_1900", v, _json(reading(measured_at="1900-01-01T08:00:00-05:00")),
                one("device_enrolled_at_measured_time")),
        Hostile("measured_2999", v, _json(reading(measured_at="2999-01-01T08:00:00-05:00")),
                one("measured_not_in_future")),
        Hostile("february_30", v, _json(reading(measured_at="2026-02-30T08:00:00-05:00")),
                one("measured_at_rfc3339_with_offset")),
        Hostile("missing_offset", v, _json(reading(measured_at=f"{day}T07:31:00")),
                one("measured_at_rfc3339_with_offset")),
        Hostile("offset_24h", v, _json(reading(measured_at=f"{day}T07:31:00+24:00")),
                one("measured_at_rfc3339_with_offset")),
        Hostile("missing_time", v, _json(reading(measured_at=...)), one("measured_at_rfc3339_with_offset")),
        # --- what a device's kind cannot measure: a scale sending a heart rate or SpO2 ----------------------
        Hostile("scale_heart_rate", "scale", _json(reading()), one("metric_measurable_by_device_kind")),
        Hostile("scale_spo2_batch", "scale", _json({"readings": [reading(metric="spo2", unit="%", value=97),
                                                                 reading(metric="body_weight", unit="kg",
                                                                         value=-1)]}),
                {0: ["metric_measurable_by_device_kind"], 1: ["plausible_body_weight"]}),
        # --- device status ----------------------------------------------------------------------------------
        Hostile("status_not_json", st, b"{battery: 64, " + CANARY.encode(), one("not_json")),
        Hostile("status_empty_batch", st, _json({"statuses": [], "id": CANARY}), one("empty_batch")),
        Hostile("status_batch_not_a_list", st, _json({"statuses": CANARY}), one("statuses_not_a_list")),
        Hostile("status_non_object_items", st, _json({"statuses": [None, 64, CANARY]}),
                {i: ["event_not_an_object"] for i in range(3)}),
        Hostile("status_over_max_batch", st, _json({"statuses": [{}] * (MAX_BATCH + 1), "id": CANARY}),
                one("batch_too_large")),
        Hostile("status_every_field_garbage", st, _json(status(
            msg_id=SQL, reported_at="2026-02-30T08:00:00-05:00", battery_pct="64", signal_dbm=True,
            firmware={"v": CANARY}, uptime_s="NaN")),
                one("optional_fields_typed", "occurred_at_rfc3339_with_offset", "status_has_a_measurement")),
        Hostile("status_out_of_range", st, _json(status(battery_pct=150, signal_dbm=20, uptime_s=-1)),
                one("battery_in_range", "signal_in_range", "uptime_not_negative")),
        Hostile("status_2999", st, _json(status(reported_at="2999-01-01T00:00:00Z")),
                one("occurred_not_in_future")),
        Hostile("status_1900", st, _json(status(reported_at="1900-01-01T00:00:00Z")),
                one("source_enrolled_at_event_time")),
        Hostile("status_control_chars", st, _json(status(msg_id=CONTROL, reported_at=t + CONTROL,
                                                         firmware=CONTROL)),
                one("occurred_at_rfc3339_with_offset")),
        # --- app events -------------------------------------------------------------------------------------
        Hostile("events_not_json", ev, _json(event())[:-3], one("not_json")),
        Hostile("events_not_a_list", ev, _json({"events": {"0": event()}}), one("events_not_a_list")),
        Hostile("events_empty_batch", ev, _json({"events": [], "id": CANARY}), one("empty_batch")),
        Hostile("events_non_object_items", ev, _json({"events": [1, CANARY, None]}),
                {i: ["event_not_an_object"] for i in range(3)}),
        Hostile("events_over_max_batch", ev, _json({"events": [{}] * (MAX_BATCH + 1), "id": CANARY}),
                one("batch_too_large")),
        Hostile("event_sql", ev, _json(event(event=SQL, msg_id=SQL + CANARY)), one("event_known_for_channel")),
        Hostile("event_nan_time", ev, _json(event(occurred_at=float("nan"))), one("not_json")),
        Hostile("event_number_time", ev, _json(event(occurred_at=1764236700)),
                one("occurred_at_rfc3339_with_offset")),
        Hostile("event_status_from_an_app", ev, _json(event(event="device_status", module=...)),
                one("event_known_for_channel", "status_has_a_measurement")),
        Hostile("event_modality_unknown", ev, _json(event(event="appointment_attended", appointment_id="apt-1",
                                                          modality="teleport")),
                one("appointment_modality_known")),
        Hostile("event_modality_a_list", ev, _json(event(event="appointment_attended", appointment_id="apt-2",
                                                         modality=["video"])),
                one("optional_fields_typed", "appointment_modality_present")),
        Hostile("event_minutes_negative", ev, _json(event(minutes=-5)), one("education_minutes_plausible")),
        Hostile("event_minutes_a_million", ev, _json(event(minutes=1e6)), one("education_minutes_plausible")),
        Hostile("event_2999", ev, _json(event(occurred_at="2999-01-01T00:00:00Z")), one("occurred_not_in_future")),
        Hostile("event_1900", ev, _json(event(occurred_at="1900-01-01T00:00:00Z")),
                one("source_enrolled_at_event_time")),
        Hostile("event_control_chars", ev, _json(event(msg_id=CONTROL, event="education_completed" + CONTROL,
                                                       module=CONTROL)),
                one("event_known_for_channel")),
        Hostile("event_empty_object", ev, _json({"events": [{}], "id": CANARY}),
                one("msg_id_present", "event_known_for_channel", "occurred_at_rfc3339_with_offset")),
    ]


# --- helpers ----------------------------------------------------------------------------------------------
def landed(s: Settings) -> int:
    return (services.ingest_status(s) or {}).get("landed", 0)


# A valid reading on a topic outside the contract: the broker's ACL refuses it (each login writes only its own
# vitals/status or events topic), so it never reaches landing.
STRAY_TOPICS = ("telemetry", "vitals/extra", SQL, "💉")


def topic_for(entry_channel: str, cuff: dict, app: dict, scale: dict | None = None) -> str:
    if entry_channel == "vitals":
        return cuff["topic"]
    if entry_channel == "scale":
        return scale["topic"]  # type: ignore[index]
    if entry_channel == "status":
        return cuff["status_topic"]
    if entry_channel == "events":
        return app["topic"]
    return f"rpm/v1/devices/{cuff['username']}/{entry_channel}"


def publish_once(s: Settings, creds: dict, topic: str, payload: bytes, timeout: float = 15.0) -> dict[str, Any]:
    """One QoS 1 publish on a fresh connection, looped by hand (no reconnect, no retry): what the broker said."""
    client = make_client(f"hx-once-{secrets.token_hex(4)}", creds["username"], creds["password"])
    seen: dict[str, Any] = {"connected": None, "puback": None, "disconnect": None}
    client.on_connect = lambda c, u, f, rc, p: seen.update(connected=not rc.is_failure)
    client.on_publish = lambda c, u, mid, rc, p: seen.update(puback=str(rc))
    client.on_disconnect = lambda c, u, f, rc, p: seen.update(disconnect=str(rc))
    client.connect(s.broker_host, s.broker_port, keepalive=30)
    deadline = time.monotonic() + timeout
    while seen["connected"] is None and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    assert seen["connected"], "the device could not log in"
    client.publish(topic, payload, qos=1)
    while seen["puback"] is None and seen["disconnect"] is None and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    if seen["disconnect"] is None:
        client.disconnect()
        client.loop(timeout=0.2)
    return seen


def landed_records(s: Settings) -> dict[tuple[str, int], Any]:
    """Every landed record by (segment, record number), decrypted with the landing keyring."""
    keyring = Keyring.load(s, "landing")
    return {(path.stem, rec.n): rec for path in list_sealed(s.landing_dir)  # type: ignore[arg-type]
            for rec in read_segment(path, keyring)}


def plaintext_hits(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if needle in path.read_bytes():
                    hits.append(str(path.relative_to(root)))
            except OSError:
                continue
    return hits


def enrol(s: Settings) -> tuple[dict, dict]:
    """A hub (it may relay every vital, so each corpus reading meets only the rule it was built to break) and
    an app, for one patient."""
    since = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    rpm(s, "patients", "add", "pt-hx")
    cuff = rpm_json(s, "devices", "add", "hx-cuff", "--patient", "pt-hx", "--kind", "hub", "--since", since)
    app = rpm_json(s, "devices", "add", "hx-app", "--patient", "pt-hx", "--kind", "app", "--since", since)
    return cuff, app


# --- the corpus -------------------------------------------------------------------------------------------
def test_hostile_corpus_is_refused_or_quarantined_and_the_service_keeps_running(stack: Settings):
    s = stack
    cuff, app = enrol(s)
    ingest_pid = procs.read_pid(s, services.INGEST)
    assert ingest_pid is not None
    corpus = hostile_corpus(datetime.now(UTC))
    assert len({e.payload for e in corpus}) == len(corpus), "payloads must be unique to join on them"
    assert all(len(e.payload) <= s.max_payload_bytes for e in corpus)

    # Over the size limit: the broker disconnects the publisher (MQTT 5 'packet too large'), never acks.
    oversized = _json({"msg_id": f"{CANARY}-oversized", "pad": "x" * (2 * s.max_payload_bytes)})
    refused = publish_once(s, cuff, cuff["topic"], oversized)
    assert refused["puback"] is None, refused
    # The broker sends DISCONNECT 'packet too large' and closes; a client still writing the packet may see the
    # reset before it reads that reason (paho: 'Unspecified error'). Either way: cut off, never acked.
    assert refused["disconnect"] is not None, refused
    assert refused["disconnect"].lower() in ("packet too large", "unspecified error"), refused

    since = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    scale = rpm_json(s, "devices", "add", "hx-scale", "--patient", "pt-hx", "--kind", "scale", "--since", since)
    with DevicePublisher(s, "hx-cuff", cuff["password"]) as dev:
        for level in STRAY_TOPICS:
            dev.publish(_json({"msg_id": f"{CANARY}-stray", "metric": "heart_rate", "value": 72}),
                        topic=f"rpm/v1/devices/hx-cuff/{level}")
        dev.wait_all(check=False)
        assert (dev.acked, [r for _, r in dev.refused]) == (0, ["Not authorized"] * len(STRAY_TOPICS))

    with (DevicePublisher(s, "hx-cuff", cuff["password"]) as dev,
          DevicePublisher(s, "hx-app", app["password"]) as ap,
          DevicePublisher(s, "hx-scale", scale["password"]) as sc):
        for e in corpus:
            pub = {"events": ap, "scale": sc}.get(e.channel, dev)
            pub.publish(e.payload, topic=topic_for(e.channel, cuff, app, scale))
        acked = dev.wait_all() + ap.wait_all() + sc.wait_all()  # raises if the broker refused any of them
    assert acked == len(corpus)
    wait_until(lambda: landed(s) >= acked, 30, what="ingest to land the corpus")

    # Every item of the corpus is quarantined: the run loads and publishes what it must (the quarantine, the
    # ledger), then its quality gate fails it — red in Airflow's grid, exit 6 for a script, the rate named.
    done = rpm(s, "pipeline", "run", "--json", check=False)
    assert done.returncode == 6, (done.stdout, done.stderr)
    run = json.loads(done.stdout)
    assert run["state"] == "failed" and run["quality_gate"]["level"] == "fail", run
    assert {t for t, st in run["tasks"].items() if st != "success"} == {"quality_gate"}, run["tasks"]
    assert "100.0%" in run["quality_gate"]["message"] and "RPM_QUARANTINE_FAIL" in run["quality_gate"]["message"]

    # Ingest: same process, every acked message landed once, the oversized one never; door marks as expected.
    assert procs.read_pid(s, services.INGEST) == ingest_pid
    counters = services.ingest_status(s) or {}
    assert (counters["landed"], counters["write_errors"]) == (acked, 0)
    assert counters["marked"] == sum(known_at_the_door(e) for e in corpus)

    # Accounting: one message per ack, one item per reading/event (an unreadable message is one), all quarantined.
    items = sum(len(e.reasons) for e in corpus)
    acc = rpm_json(s, "accounting")
    assert acc["messages_processed"] == acked
    assert (acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"]) == (items, 0, items, 0)
    assert acc["received"] == acc["loaded"] + acc["quarantined"] + acc["duplicates"] and acc["balanced"] is True
    assert acc["quarantined_by_reason"] == dict(Counter(r for e in corpus for rs in e.reasons.values() for r in rs))
    assert acc["pending"] == {"sealed_segments": 0, "sealed_messages": 0, "open_segments": 0, "open_messages": 0}

    # Each corpus entry, found by its exact bytes in landing, is quarantined item by item with its own reasons.
    records = landed_records(s)
    assert not [k for k, rec in records.items() if b"-oversized" in rec.payload]
    where = {rec.payload: key for key, rec in records.items()}
    with clinical(s, read_only=True) as con:
        rows = con.execute("""SELECT segment, record_no, item_no, device_id, reasons, raw, detail
                              FROM quarantine""").fetchall()
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        loaded = con.execute("SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM telehealth_events), "
                             "(SELECT count(*) FROM duplicates)").fetchone()
    quarantined: dict[tuple[str, int], dict[int, list[str]]] = {}
    for seg, rec, item, device, reasons, raw, detail in rows:
        quarantined.setdefault((seg, rec), {})[item] = sorted(reasons)
        entry_topic = records[(seg, rec)].topic
        assert device == entry_topic.split("/")[3], (entry_topic, reasons)
        if reasons[0] in DOOR_REASONS:  # the whole message, byte for byte, for a decoder fixed later
            assert bytes(raw) == records[(seg, rec)].payload and detail
    got = {e.name: quarantined.get(where.get(e.payload, ("not landed", -1))) for e in corpus}
    mismatched = {e.name: {"expected": e.reasons, "quarantined": got[e.name]} for e in corpus
                  if got[e.name] != e.reasons}
    assert not mismatched, mismatched
    assert loaded == (0, 0, 0), "a hostile item was loaded (or counted as a duplicate of a loaded one)"
    assert TABLES <= tables, f"tables gone: {TABLES - tables}"

    # Nothing hostile is readable in plaintext: landing, warehouse, snapshots, reports, logs, Airflow's home.
    assert plaintext_hits(Path(s.home), CANARY.encode()) == []

    # Still serving: a normal reading published afterwards is landed by the same process and loaded.
    after = {"msg_id": "hx-after", "metric": "heart_rate", "value": 64, "unit": "/min",
             "measured_at": (datetime.now(UTC) - timedelta(minutes=2)).isoformat(timespec="seconds")}
    with DevicePublisher(s, "hx-cuff", cuff["password"]) as dev:
        dev.publish(json.dumps(after).encode())
        assert dev.wait_all() == 1
    wait_until(lambda: landed(s) >= acked + 1, 20, what="ingest to land the normal reading")
    run_pipeline_in_process(s)
    assert procs.read_pid(s, services.INGEST) == ingest_pid
    with clinical(s, read_only=True) as con:
        assert con.execute("SELECT msg_id, patient_id, metric, value FROM readings").fetchall() == [
            ("hx-after", "pt-hx", "heart_rate", 64.0)]
    acc = rpm_json(s, "accounting")
    assert (acc["messages_processed"], acc["received"], acc["loaded"], acc["quarantined"]) == (
        acked + 1, items + 1, 1, items)
    assert acc["balanced"] is True


# --- bugs found: each test below fails until it is fixed --------------------------------------------------
def test_a_poison_message_does_not_stop_the_pipeline(stack: Settings):
    """BUG: valid JSON that ingest lands and acks makes decode_normalise raise: a lone surrogate escape
    (UnicodeEncodeError building ``raw``) or a time whose UTC instant falls outside years 1..9999 (OverflowError
    in ``astimezone``). The DAG run fails after its retries, the segment stays pending, every later run claims
    it again and fails the same way, and every reading landed behind it waits forever.

    Runs the decode_normalise task's own function on what ingest landed (a failing `rpm pipeline run` spends
    ~40 s in Airflow retries); tests/unit/test_fuzz_decoder.py pins each case."""
    s = stack
    cuff, _ = enrol(s)
    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="seconds")
    poison = [
        b'{"msg_id":"p1","metric":"heart_rate","value":70,"unit":"/min","measured_at":"' + at.encode()
        + b'","note":"\\ud800"}',
        b'{"msg_id":"p2","metric":"heart_rate","value":71,"unit":"/min","measured_at":"0001-01-01T00:00:00+01:00"}',
    ]
    normal = json.dumps({"msg_id": "ok", "metric": "heart_rate", "value": 64, "unit": "/min", "measured_at": at})
    with DevicePublisher(s, "hx-cuff", cuff["password"]) as dev:
        for payload in [*poison, normal.encode()]:
            dev.publish(payload)
        assert dev.wait_all() == 3  # the broker and ingest accept all three
    wait_until(lambda: landed(s) >= 3, 20, what="ingest to land the messages")
    assert (services.ingest_status(s) or {}).get("marked") == 0  # readable JSON: no mark at the door

    seal_open_segments(s)
    batch = claim_segments(s)
    try:
        stage_batch(s, batch)  # the body of the decode_normalise task
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        pytest.fail(f"one landed message fails decode_normalise for the whole batch: "
                    f"{type(exc).__name__}: {exc}")
    validate_batch(s, batch)
    load_batch(s, batch, "hx-poison")
    publish_snapshot(s)  # as the run's publish task does: readers see the snapshot
    acc = rpm_json(s, "accounting")
    assert (acc["received"], acc["loaded"], acc["quarantined"], acc["balanced"]) == (3, 1, 2, True)


def test_mistyped_optional_fields_are_quarantined_not_silently_dropped(stack: Settings):
    """BUG: a mistyped optional field becomes NULL in normalise/events and no rule names it, so the item LOADS
    with the sender's value silently discarded (events.py promises 'the telehealth suite names the rule they
    break'). ``"manual": "true"`` even loads as device-transmitted, so it counts toward 99454 billing days."""
    s = stack
    cuff, app = enrol(s)
    now = datetime.now(UTC)
    at = [(now - timedelta(minutes=m)).isoformat(timespec="seconds") for m in range(5, 11)]
    sent = {
        "reading manual 'true'": (cuff["topic"], {"msg_id": "o1", "metric": "heart_rate", "value": 70,
                                                  "unit": "/min", "measured_at": at[0], "manual": "true"}),
        "glucose source 42": (cuff["topic"], {"msg_id": "o2", "metric": "blood_glucose", "value": 110,
                                              "unit": "mg/dL", "measured_at": at[1], "source": 42}),
        "education minutes '12'": (app["topic"], {"msg_id": "o3", "event": "education_completed",
                                                  "occurred_at": at[2], "module": "m1", "minutes": "12"}),
        "education minutes Infinity": (app["topic"], {"msg_id": "o4", "event": "education_completed",
                                                      "occurred_at": at[3], "module": "m2",
                                                      "minutes": float("inf")}),
        "status battery NaN": (cuff["status_topic"], {"msg_id": "o5", "reported_at": at[4],
                                                      "battery_pct": float("nan"), "firmware": "2.4.1"}),
        "status signal 'strong'": (cuff["status_topic"], {"msg_id": "o6", "reported_at": at[5],
                                                          "signal_dbm": "strong", "firmware": "2.4.1"}),
    }
    with (DevicePublisher(s, "hx-cuff", cuff["password"]) as dev,
          DevicePublisher(s, "hx-app", app["password"]) as ap):
        for topic, doc in sent.values():
            (ap if topic == app["topic"] else dev).publish(_json(doc), topic=topic)
        assert dev.wait_all() + ap.wait_all() == len(sent)
    wait_until(lambda: landed(s) >= len(sent), 20, what="ingest to land the messages")
    run_pipeline_in_process(s)

    with clinical(s, read_only=True) as con:
        loaded = {r[0] for r in con.execute("SELECT msg_id FROM readings UNION ALL "
                                            "SELECT msg_id FROM telehealth_events").fetchall()}
    by_id = {doc["msg_id"]: name for name, (_, doc) in sent.items()}
    assert not loaded, f"loaded with the mistyped field silently dropped: {sorted(by_id[m] for m in loaded)}"
    acc = rpm_json(s, "accounting")
    assert (acc["quarantined"], acc["balanced"]) == (len(sent), True)


def test_a_payload_just_over_the_limit_is_quarantined_not_loaded(stack: Settings):
    """The broker refuses packets beyond the limit plus a 1 KiB envelope (topic, headers); a payload inside
    that envelope but over RPM_MAX_PAYLOAD_BYTES is landed, then quarantined as payload_too_large."""
    s = stack
    cuff, _ = enrol(s)
    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="seconds")
    head = json.dumps({"msg_id": "big", "metric": "heart_rate", "value": 70, "unit": "/min", "measured_at": at,
                       "pad": ""}).encode()
    payload = head[:-2] + b"x" * (s.max_payload_bytes + 1 - len(head)) + head[-2:]
    assert len(payload) == s.max_payload_bytes + 1
    before = landed(s)
    seen = publish_once(s, cuff, cuff["topic"], payload)
    assert seen["puback"] is not None
    wait_until(lambda: landed(s) >= before + 1, 20, what="ingest to land the oversized message")
    run_pipeline_in_process(s)
    acc = rpm_json(s, "accounting")
    assert acc["quarantined_by_reason"] == {"payload_too_large": 1}
    assert acc["loaded"] == 0 and acc["balanced"]
