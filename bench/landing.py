"""A documented generator of landed readings: encrypted sealed segments exactly as the ingest service writes
them, for pipeline benchmarks that should not pay for (or be limited by) the broker.

The mix is what a fleet of home devices sends (per 1,000 readings, roughly):
- 55% single-reading messages: blood pressure, heart rate, SpO2, weight, temperature, meter glucose;
- 45% CGM uploads, batches of 12 five-minute readings (``{"readings": [...]}``);
- ~2% invalid items: implausible values, unknown units, times without offset, text instead of numbers,
  and unreadable messages (not JSON);
- ~1% duplicates: messages re-sent whole (a device that missed its PUBACK).
Every patient has a cuff, an oximeter, a scale, a thermometer and a glucose device, enrolled 120 days ago.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

from core.keyring import Keyring
from core.landing import SegmentWriter
from core.settings import Settings

KINDS = ("bp", "ox", "scale", "thermo", "glu")
CGM_BATCH = 12
MESSAGES_PER_SEGMENT = 6_250  # ~2 MB encrypted, what a busy fleet lands in one 10-second segment
# Ingest writes one landing block per fsync group, at most every 25 ms (RPM_INGEST_FLUSH_INTERVAL_MS):
# 625 messages/s (the segment above) make blocks of ~16 messages.
BLOCK_RECORDS = 16


def device_ids(patients: int) -> list[tuple[str, str, str]]:
    """(device id, patient id, kind) of every device of the fleet."""
    return [(f"{k}-{p:05d}", f"pt-{p:05d}", k) for p in range(patients) for k in KINDS]


def register(s: Settings, patients: int, since: datetime | None = None) -> None:
    """Patients and enrolled devices, straight into the registry tables (one bulk insert each), enrolled since
    ``since`` (default: 120 days ago)."""
    import pandas as pd

    from warehouse.db import clinical, transaction

    since = since or datetime.now(UTC) - timedelta(days=120)
    devs = pd.DataFrame(device_ids(patients), columns=["device_id", "patient_id", "kind"])
    with clinical(s) as con, transaction(con):
        con.register("devs", devs)
        con.execute("INSERT INTO patients (patient_id) SELECT DISTINCT patient_id FROM devs ON CONFLICT DO NOTHING")
        con.execute("INSERT INTO devices (device_id, kind) SELECT device_id, kind FROM devs ON CONFLICT DO NOTHING")
        con.execute("INSERT INTO enrollments SELECT device_id, patient_id, ?, NULL FROM devs", [since])
        con.unregister("devs")


EASTERN = timezone(timedelta(hours=-5))


def _iso(ts: datetime) -> str:
    """The instant on a device clock five hours behind UTC (the offset the payload carries)."""
    return ts.astimezone(EASTERN).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "-05:00"


def _single(rng: random.Random, kind: str, ts: datetime, n: int) -> dict:
    m = {"msg_id": f"m{n}", "measured_at": _iso(ts)}
    if kind == "bp":
        if rng.random() < 0.5:
            return {**m, "metric": "blood_pressure", "unit": "mm[Hg]",
                    "values": {"systolic": rng.randint(100, 170), "diastolic": rng.randint(60, 99)}}
        return {**m, "metric": "heart_rate", "unit": "/min", "value": rng.randint(50, 110)}
    if kind == "ox":
        return {**m, "metric": "spo2", "unit": "%", "value": rng.randint(88, 100)}
    if kind == "scale":
        return {**m, "metric": "body_weight", "unit": "kg", "value": round(rng.uniform(50, 140), 1)}
    if kind == "thermo":
        return {**m, "metric": "body_temperature", "unit": "Cel", "value": round(rng.uniform(35.8, 38.4), 1)}
    return {**m, "metric": "blood_glucose", "unit": "mg/dL", "value": rng.randint(70, 260), "source": "meter"}


def _spoil(rng: random.Random, item: dict) -> dict:
    """One of the ways devices get a reading wrong (the suite must quarantine each)."""
    bad = dict(item)
    case = rng.randrange(4)
    if case == 0 and "value" in bad:
        bad["value"] = 10_000
    elif case == 1:
        bad["unit"] = "furlongs"
    elif case == 2:
        bad["measured_at"] = bad["measured_at"][:-6]  # no UTC offset
    else:
        bad["value"] = "high"
    return bad


def write_landing(s: Settings, readings: int, patients: int, seed: int = 7, prefix: str = "bench",
                  days: int = 90) -> dict[str, int]:
    """Sealed, encrypted segments holding ``readings`` reading items (and their messages) from the devices
    of the first ``patients`` patients, measured over the last ``days``; returns counts."""
    rng = random.Random(seed)
    keyring = Keyring.load(s, "landing")
    devices = device_ids(patients)
    end = datetime.now(UTC) - timedelta(hours=1)
    stats = {"messages": 0, "items": 0, "invalid": 0, "resent_items": 0, "segments": 0}
    writer: SegmentWriter | None = None
    n = 0

    def land(topic: str, payload: bytes, items: int) -> None:
        nonlocal writer
        if writer is None or writer.records >= MESSAGES_PER_SEGMENT:
            if writer is not None:
                writer.seal()
            writer = SegmentWriter(s.landing_dir, f"{prefix}-{stats['segments']:06d}", keyring=keyring)  # type: ignore[arg-type]
            stats["segments"] += 1
        writer.append(topic, payload, end)
        if writer.records % BLOCK_RECORDS == 0:
            writer.flush_block()
        stats["messages"] += 1
        stats["items"] += items

    while stats["items"] < readings:
        dev, _pid, kind = devices[rng.randrange(len(devices))]
        topic = f"rpm/v1/devices/{dev}/vitals"
        ts = end - timedelta(seconds=rng.randrange(days * 86400), milliseconds=n % 1000)
        n += 1
        if kind == "glu" and rng.random() < 0.8:  # CGM upload: an hour of five-minute readings
            items = [{"msg_id": f"m{n}-{i}", "metric": "blood_glucose", "unit": "mg/dL", "source": "cgm",
                      "value": rng.randint(60, 280), "measured_at": _iso(ts + timedelta(minutes=5 * i))}
                     for i in range(CGM_BATCH)]
        else:
            items = [_single(rng, kind, ts, n)]
        roll = rng.random()
        if roll < 0.02:
            items[0] = _spoil(rng, items[0])
            stats["invalid"] += 1
        payload = json.dumps(items[0] if len(items) == 1 else {"readings": items}).encode()
        if roll > 0.999:
            payload, stats["invalid"] = b"{not json", stats["invalid"] + len(items)
        land(topic, payload, len(items))
        if 0.02 <= roll < 0.03:  # re-sent whole: every item a duplicate
            land(topic, payload, len(items))
            stats["resent_items"] += len(items)
    if writer is not None:
        writer.seal()
    return stats
