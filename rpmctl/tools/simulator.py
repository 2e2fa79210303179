"""A simulated RPM fleet: patients with chronic conditions, their home devices, and days of readings.

Values follow each condition's typical home picture with daily patterns (morning blood-pressure surge,
post-meal glucose peaks, nocturnal CGM lows), units the devices really use (lb scales, degF thermometers,
mmol/L meters outside the US), buffered batch uploads, and known faults: repeated messages, implausible
values and malformed payloads. The manifest says exactly what should be loaded, counted as duplicate, or
quarantined, so a run can be checked against the accounting.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from core.settings import Settings
from rpmctl.admin.devices import provision
from transforms.vocab import SOURCE_KINDS
from warehouse.registry import CONDITIONS

ZONES = ("America/New_York", "America/Chicago", "America/Denver", "America/Los_Angeles",
         "America/Phoenix", "Europe/London")


@dataclass
class Device:
    device_id: str
    kind: str
    patient_id: str
    zone: ZoneInfo
    password: str = ""


@dataclass
class Message:
    device_id: str
    payload: bytes
    readings: int  # items: readings or events
    fate: str  # "valid" | "implausible" | "malformed" | "duplicate"
    topic: str | None = None  # default: the device's vitals topic


@dataclass
class Fleet:
    patients: dict[str, tuple[str, ...]]  # patient -> conditions
    devices: list[Device]
    messages: list[Message] = field(default_factory=list)

    def manifest(self) -> dict:
        count = {f: sum(m.readings for m in self.messages if m.fate == f)
                 for f in ("valid", "implausible", "malformed", "duplicate")}
        return {
            "patients": len(self.patients),
            "devices": len(self.devices),
            "messages": len(self.messages),
            "readings": sum(m.readings for m in self.messages),
            "conditions": {c: sum(c in cs for cs in self.patients.values()) for c in CONDITIONS},
            "expected": {"loaded": count["valid"], "duplicates": count["duplicate"],
                         "quarantined": count["implausible"] + count["malformed"]},
        }


def _iso(ts: datetime, zone: tzinfo) -> str:
    return ts.astimezone(zone).isoformat(timespec="seconds")


def _daily(start_local: datetime, days: int, hours: list[float], rng: random.Random,
           adherence: float) -> Iterator[datetime]:
    """Measurement instants at roughly the given local hours, skipping days the patient forgets."""
    for d in range(days):
        if rng.random() > adherence:
            continue
        day = start_local + timedelta(days=d)
        for h in hours:
            jitter = rng.gauss(0, 0.4)
            yield day + timedelta(hours=h + jitter, seconds=rng.randrange(60))


def build_fleet(patients: int = 24, days: int = 14, seed: int = 7, end: datetime | None = None,
                cgm_every_min: int = 15) -> Fleet:
    """The fleet and every message it will publish (deterministic for a seed and an end hour)."""
    rng = random.Random(seed)
    end = (end or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
    conditions: dict[str, tuple[str, ...]] = {}
    devices: list[Device] = []
    readings: list[tuple[Device, dict]] = []  # (device, reading), valid by construction
    for i in range(patients):
        pid = f"pt-{i + 1:04d}"
        primary = CONDITIONS[i % len(CONDITIONS)]
        extra = (("hypertension",) if primary != "hypertension" and rng.random() < 0.5 else ())
        conds = (primary, *extra)
        conditions[pid] = conds
        zone = ZoneInfo(ZONES[i % len(ZONES)])
        metric_units = zone.key == "Europe/London"
        start_local = (end - timedelta(days=days)).astimezone(zone).replace(hour=0, minute=0, second=0)
        adherence = rng.uniform(0.7, 0.98)

        def dev(kind: str, pid: str = pid, zone: ZoneInfo = zone) -> Device:
            d = Device(f"{kind}-{pid[3:]}", kind, pid, zone)
            devices.append(d)
            return d

        def add(d: Device, ts: datetime, reading: dict) -> None:
            if ts < end - timedelta(minutes=5):
                readings.append((d, {"measured_at": _iso(ts, d.zone), **reading}))

        if "hypertension" in conds or "heart_failure" in conds:
            cuff = dev("bp")
            base_s, base_d = rng.uniform(128, 165), rng.uniform(78, 98)
            for ts in _daily(start_local, days, [7.5, 20.0], rng, adherence):
                surge = 8 if ts.hour < 12 else 0  # morning surge
                sys_ = round(base_s + surge + rng.gauss(0, 8))
                dia = round(base_d + surge / 2 + rng.gauss(0, 5))
                add(cuff, ts, {"metric": "blood_pressure", "unit": "mm[Hg]",
                               "values": {"systolic": sys_, "diastolic": min(dia, sys_ - 20)}})
                add(cuff, ts + timedelta(seconds=1),
                    {"metric": "heart_rate", "unit": "/min", "value": round(rng.gauss(74, 9))})
        if "heart_failure" in conds:
            scale = dev("scale")
            kg = rng.uniform(70, 115)
            gain = rng.choice([0.0, 0.0, 0.25])  # some patients retain fluid: kg per day
            for n, ts in enumerate(_daily(start_local, days, [6.75], rng, adherence)):
                w = kg + gain * n + rng.gauss(0, 0.3)
                reading = ({"unit": "kg", "value": round(w, 1)} if metric_units
                           else {"unit": "[lb_av]", "value": round(w / 0.45359237, 1)})
                add(scale, ts, {"metric": "body_weight", **reading})
        if "copd" in conds:
            ox, thermo = dev("ox"), dev("thermo")
            base_spo2 = rng.uniform(90, 95)
            for ts in _daily(start_local, days, [9.0, 15.0, 21.0], rng, adherence):
                add(ox, ts, {"metric": "spo2", "unit": "%", "value": min(100, round(base_spo2 + rng.gauss(0, 1.2)))})
                add(ox, ts + timedelta(seconds=1),
                    {"metric": "heart_rate", "unit": "/min", "value": round(rng.gauss(86, 8))})
                add(ox, ts + timedelta(seconds=2),
                    {"metric": "respiratory_rate", "unit": "/min", "value": round(rng.gauss(19, 2))})
            for ts in _daily(start_local, days, [8.0], rng, adherence):
                c = rng.gauss(36.8, 0.3)
                reading = ({"unit": "Cel", "value": round(c, 1)} if metric_units
                           else {"unit": "[degF]", "value": round(c * 9 / 5 + 32, 1)})
                add(thermo, ts, {"metric": "body_temperature", **reading})
        if "diabetes" in conds:
            if i % 8 == 1:  # every other diabetic patient wears a CGM
                cgm = dev("cgm")
                mean = rng.uniform(130, 175)
                t = start_local
                while t < end:
                    h = t.astimezone(zone).hour + t.astimezone(zone).minute / 60
                    meals = sum(55 * math.exp(-((h - m) ** 2) / 1.2) for m in (8, 13, 19))
                    night = -25 if 2 <= h < 5 else 0  # nocturnal dip
                    mg = max(45, min(380, mean + meals + night + rng.gauss(0, 12)))
                    add(cgm, t, {"metric": "blood_glucose", "unit": "mg/dL", "value": round(mg),
                                 "source": "cgm"})
                    t += timedelta(minutes=cgm_every_min)
            else:
                meter = dev("glu")
                fasting = rng.uniform(110, 160)
                for ts in _daily(start_local, days, [7.0, 10.0, 14.5, 21.0], rng, adherence):
                    mg = fasting + (0 if ts.hour < 9 else rng.uniform(20, 70)) + rng.gauss(0, 15)
                    reading = ({"unit": "mmol/L", "value": round(mg / 18.0156, 1)} if metric_units
                               else {"unit": "mg/dL", "value": round(mg)})
                    add(meter, ts, {"metric": "blood_glucose", "source": "meter", **reading})

    fleet = Fleet(conditions, devices)
    _package(fleet, readings, rng)
    _telehealth(fleet, end, days, rng)
    rng.shuffle(fleet.messages)
    return fleet


def _package(fleet: Fleet, readings: list[tuple[Device, dict]], rng: random.Random) -> None:
    """Turn readings into messages: singles and buffered batches, then inject duplicates and faults."""
    by_device: dict[str, list[dict]] = {}
    for d, r in readings:
        by_device.setdefault(d.device_id, []).append(r)
    seq = 0
    for d in fleet.devices:
        rs = sorted(by_device.get(d.device_id, []), key=lambda r: r["measured_at"])
        i = 0
        while i < len(rs):
            # CGMs upload in bursts; other devices are sometimes offline and upload a buffered batch.
            n = 12 if d.kind == "cgm" else (rng.randint(2, 8) if rng.random() < 0.15 else 1)
            chunk = []
            for r in rs[i:i + n]:
                seq += 1
                chunk.append({"msg_id": f"{d.device_id}-{seq}", **r})
            i += n
            body = chunk[0] if len(chunk) == 1 else {"readings": chunk}
            fleet.messages.append(Message(d.device_id, json.dumps(body).encode(), len(chunk), "valid"))
    valid = [m for m in fleet.messages if m.fate == "valid"]
    # ~2 % of messages delivered again (device retry after a lost PUBACK).
    for m in rng.sample(valid, max(1, len(valid) // 50)):
        fleet.messages.append(Message(m.device_id, m.payload, m.readings, "duplicate"))
    # Implausible values: a device fault or a reading taken off-body.
    bad_values = [("heart_rate", "/min", 400), ("spo2", "%", 130), ("body_temperature", "Cel", 51.0),
                  ("blood_glucose", "mg/dL", 2400), ("body_weight", "kg", 0.4)]
    for k in range(min(len(fleet.devices), 8)):
        metric, unit, value = bad_values[k % len(bad_values)]
        # sent by a device that measures that metric: implausible, not also the wrong kind of device
        able = [d for d in fleet.devices if metric in SOURCE_KINDS[d.kind].metrics]
        if not able:
            continue
        d = rng.choice(able)
        ts = datetime.now(UTC) - timedelta(hours=rng.uniform(1, 48))
        body = {"msg_id": f"{d.device_id}-bad-{k}", "metric": metric, "unit": unit, "value": value,
                "measured_at": _iso(ts, d.zone)}
        fleet.messages.append(Message(d.device_id, json.dumps(body).encode(), 1, "implausible"))
    # Malformed payloads: each is one unreadable or incomplete item.
    recent = (datetime.now(UTC) - timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    malformed: list[tuple[str | None, bytes]] = [(None, b"\x00\x9f not json at all"),
                 ("heart_rate", b'{"msg_id": "x", "metric": "heart_rate", "value": 72'),  # truncated
                 ("heart_rate", json.dumps({"msg_id": "m1", "metric": "heart_rate", "unit": "/min", "value": 70,
                                            "measured_at": recent[:19]}).encode()),  # no UTC offset
                 ("heart_rate", json.dumps({"msg_id": "m2", "metric": "heart_rate", "unit": "bpm", "value": 70,
                                            "measured_at": recent}).encode()),  # unit not UCUM
                 ("blood_pressure", json.dumps({"msg_id": "m3", "metric": "blood_pressure", "unit": "mm[Hg]",
                                                "values": {"systolic": "high"}, "measured_at": recent}).encode())]
    for k, (sends, payload) in enumerate(malformed):
        # from a device that may send that metric: each is malformed and nothing else
        able = [d for d in fleet.devices if sends is None or sends in SOURCE_KINDS[d.kind].metrics]
        d = (able or fleet.devices)[k % len(able or fleet.devices)]
        fleet.messages.append(Message(d.device_id, payload, 1, "malformed"))


MODULES = {"hypertension": ("bp-basics", "salt-and-blood-pressure"), "diabetes": ("glucose-monitoring",
           "carb-counting"), "copd": ("inhaler-technique", "breathing-exercises"),
           "heart_failure": ("daily-weights", "fluid-and-salt")}
FIRMWARE = {"bp": ("2.4.1", "2.5.0"), "glu": ("1.9.3",), "cgm": ("7.1.0", "7.2.2"), "ox": ("3.0.8",),
            "scale": ("1.2.0", "1.3.1"), "thermo": ("0.9.5",)}


def _telehealth(fleet: Fleet, end: datetime, days: int, rng: random.Random) -> None:
    """The general stream: app events (education, appointments, surveys) and daily device status."""
    from core.topics import events_topic, status_topic

    start = end - timedelta(days=days)
    by_patient: dict[str, list[Device]] = {}
    for d in fleet.devices:
        by_patient.setdefault(d.patient_id, []).append(d)
    n = 0
    for pid, conds in sorted(fleet.patients.items()):
        zone = by_patient[pid][0].zone
        app = Device(f"app-{pid[3:]}", "app", pid, zone)
        fleet.devices.append(app)
        events: list[dict] = []

        def at(day: float, hour: float, zone: ZoneInfo = zone) -> str:
            return _iso(start + timedelta(days=day, hours=hour), zone)

        for day in range(days):
            for module in MODULES[conds[0]]:
                if rng.random() < 0.25:
                    events.append({"event": "education_viewed", "module": module, "occurred_at": at(day, 18 + rng.random()),
                                   "minutes": rng.randint(2, 9)})
                    if rng.random() < 0.6:
                        events.append({"event": "education_completed", "module": module,
                                       "occurred_at": at(day, 19.5 + rng.random()), "minutes": rng.randint(8, 25)})
        for k in range(rng.randint(1, 2)):
            apt, modality = f"apt-{pid[3:]}-{k}", rng.choices(("video", "phone", "in_person"), (5, 3, 2))[0]
            # Its outcome (at 14:30 on apt_day) is in the past however short the history: never a future event.
            apt_day = rng.uniform(min(1.0, days - 0.7), days - 0.7)
            events.append({"event": "appointment_scheduled", "appointment_id": apt, "modality": modality,
                           "occurred_at": at(apt_day - 1, 10), "scheduled_for": at(apt_day, 14)})
            outcome = rng.choices(("appointment_attended", "appointment_no_show", "appointment_cancelled"),
                                  (75, 15, 10))[0]
            events.append({"event": outcome, "appointment_id": apt, "modality": modality, "occurred_at": at(apt_day, 14.5)})
        for week in range(0, days - 2, 7):
            if rng.random() < 0.6:
                events.append({"event": "survey_completed", "survey": "phq-2", "occurred_at": at(week + 2, 20)})
        for e in events:
            n += 1
            e["msg_id"] = f"{app.device_id}-{n}"
        for chunk in (events[i:i + 10] for i in range(0, len(events), 10)):
            fleet.messages.append(Message(app.device_id, json.dumps({"events": chunk}).encode(), len(chunk),
                                          "valid", events_topic(app.device_id)))
        for d in by_patient[pid]:
            battery = rng.uniform(60, 100) if rng.random() > 0.1 else rng.uniform(25, 35)
            firmware = rng.choice(FIRMWARE[d.kind])
            for day in range(days):
                battery = max(3.0, battery - rng.uniform(0.5, 3))
                n += 1
                body = {"msg_id": f"{d.device_id}-st-{n}", "reported_at": at(day, 3 + rng.random()),
                        "battery_pct": round(battery), "signal_dbm": rng.randint(-95, -50), "firmware": firmware,
                        "uptime_s": 86400 * (day + 1)}
                fleet.messages.append(Message(d.device_id, json.dumps(body).encode(), 1, "valid",
                                              status_topic(d.device_id)))
    # Broken app events: an event kind the contract does not know, an appointment without its modality.
    apps = [d for d in fleet.devices if d.kind == "app"]
    for k, bad in enumerate(({"event": "app_opened", "occurred_at": _iso(end - timedelta(hours=3), UTC)},
                             {"event": "appointment_attended", "appointment_id": "apt-x",
                              "occurred_at": _iso(end - timedelta(hours=2), UTC)})):
        bad["msg_id"] = f"bad-event-{k}"
        app = apps[k % len(apps)]
        fleet.messages.append(Message(app.device_id, json.dumps(bad).encode(), 1, "malformed",
                                      events_topic(app.device_id)))


GIVEN = ("Maria", "James", "Aiko", "Olu", "Fatima", "Liam", "Grace", "Mateo", "Priya", "Henry", "Zoe", "Ravi")
FAMILY = ("Alvarez", "Brown", "Chen", "Dubois", "Eze", "Fischer", "Garcia", "Hughes", "Iyer", "Jones", "Khan")
CLINICIANS = (("dr-lee", "Dr. Sam Lee", "physician"), ("dr-okafor", "Dr. Ada Okafor", "physician"),
              ("rn-garcia", "Luz Garcia RN", "nurse"))


def register_fleet(s: Settings, fleet: Fleet, seed: int = 7) -> None:
    """Synthetic demographics (never real people), conditions, home time zones and care teams."""
    from warehouse.admin import operator
    from warehouse.audit import AuditLog
    from warehouse.db import clinical
    from warehouse.registry import add_clinician, assign, upsert_patient

    rng = random.Random(seed)
    zones = {d.patient_id: d.zone.key for d in fleet.devices}
    with clinical(s) as con:
        for n, (pid, conds) in enumerate(sorted(fleet.patients.items())):
            upsert_patient(con, pid, mrn=f"MRN{7000000 + n * 7919 % 1000000:07d}", given_name=rng.choice(GIVEN),
                           family_name=rng.choice(FAMILY),
                           birth_date=datetime(1940 + rng.randrange(45), 1 + rng.randrange(12),
                                               1 + rng.randrange(28)).date(),
                           time_zone=zones.get(pid, "UTC"), conditions=list(conds))
        for cid, name, role in CLINICIANS:
            add_clinician(con, cid, name, role)
        for n, pid in enumerate(sorted(fleet.patients)):
            assign(con, CLINICIANS[n % 2][0], pid)  # physicians split the panel
            assign(con, CLINICIANS[2][0], pid)      # the RPM nurse follows everyone
    # A registry change like any other: audited under the operator who ran the simulator.
    AuditLog(s).append(operator(), "registry:simulated-fleet", sorted(fleet.patients),
                       {"clinicians": [c[0] for c in CLINICIANS], "seed": seed}, len(fleet.patients))


def provision_fleet(s: Settings, fleet: Fleet, days: int) -> None:
    register_fleet(s, fleet)
    since = datetime.now(UTC) - timedelta(days=days + 2)
    for d in fleet.devices:
        d.password = provision(s, d.device_id, d.patient_id, kind=d.kind, since=since)["password"]


def publish_fleet(s: Settings, fleet: Fleet, *, tls: bool = False, max_inflight: int = 100) -> dict:
    """Publish every message through the broker, one MQTT 5 login per device; raise on any refusal."""
    from rpmctl.tools.publish import DevicePublisher

    by_device: dict[str, list[Message]] = {}
    for m in fleet.messages:
        by_device.setdefault(m.device_id, []).append(m)
    acked = 0
    for d in fleet.devices:
        msgs = by_device.get(d.device_id, [])
        if not msgs:
            continue
        with DevicePublisher(s, d.device_id, d.password, tls=tls, max_inflight=max_inflight) as pub:
            for m in msgs:
                pub.publish(m.payload, topic=m.topic)
            acked += pub.wait_all()
    return {"published": len(fleet.messages), "acked": acked}
