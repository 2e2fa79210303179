"""A small practice whose triage order is known by construction, published through the real broker and loaded
by the pipeline's tasks: one patient per panel category on Dr. Okafor's team, one patient on Dr. Lee's.

Every value is chosen, not random, where it decides a category: "normal" blood pressures stay below stage 2
(140/90), the CGM wearer's lows and highs are all more than six hours old (so the episodes they opened have
resolved), and the gaps are hours the no-data rules look at (24 h, 72 h).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from core.settings import Settings
from pipeline import tasks
from rpmctl import services
from rpmctl.admin.devices import provision
from rpmctl.services.airflow_run import seal_open_segments
from rpmctl.tools.publish import wait_until
from rpmctl.tools.simulator import Device, Fleet, Message, publish_fleet
from warehouse.access import ClinicianSession
from warehouse.db import clinical
from warehouse.registry import add_clinician, assign, upsert_patient

ZONE = ZoneInfo("America/Chicago")
CLINICIAN, OTHER_CLINICIAN = "dr-okafor", "dr-lee"

# The panel's expected order: urgent alert, no data 72 h, no data 24 h, CGM time below range (and a TIR drop),
# billing to do, on track.
TRIAGE_ORDER = ["pt-0101", "pt-0103", "pt-0104", "pt-0102", "pt-0105", "pt-0106"]
BP_PATIENT, CGM_PATIENT, OTHER_TEAM_PATIENT = "pt-0101", "pt-0102", "pt-0201"
LOGGED_MINUTES = {"pt-0106": 25}  # interactive minutes this month: pt-0106 needs nothing for billing

PATIENTS = {  # id: (given, family, birth date, conditions, clinician)
    "pt-0101": ("Maria", "Alvarez", date(1951, 3, 14), ["hypertension"], CLINICIAN),
    "pt-0102": ("James", "Chen", date(1968, 9, 2), ["diabetes"], CLINICIAN),
    "pt-0103": ("Aiko", "Dubois", date(1945, 11, 23), ["hypertension"], CLINICIAN),
    "pt-0104": ("Olu", "Eze", date(1959, 6, 7), ["hypertension", "heart_failure"], CLINICIAN),
    "pt-0105": ("Fatima", "Fischer", date(1972, 1, 30), ["hypertension"], CLINICIAN),
    "pt-0106": ("Liam", "Garcia", date(1963, 4, 18), ["hypertension"], CLINICIAN),
    "pt-0201": ("Grace", "Hughes", date(1955, 8, 9), ["hypertension"], OTHER_CLINICIAN),
}


@dataclass
class Seeded:
    """What the seed put in, for the tests to check the pages against."""
    now: datetime
    readings: dict[str, dict[str, int]] = field(default_factory=dict)  # patient -> metric -> readings in 30 d
    cgm_days: int = 0   # patient-local days with CGM data in the last 30 days (the chart's daily points)
    cgm_hours: int = 0  # patient-local hours of the day with CGM data in the profile's 14 days


def _bp(rng_state: list[int]) -> tuple[int, int, int]:
    """A deterministic "normal" reading (systolic 118-135, diastolic 72-87, pulse 62-81): a small LCG."""
    rng_state[0] = (rng_state[0] * 1103515245 + 12345) % 2**31
    x = rng_state[0]
    return 118 + x % 18, 72 + (x // 18) % 16, 62 + (x // 288) % 20


def build(now: datetime) -> tuple[Fleet, Seeded]:
    """The fleet's devices and messages, and the counts the pages must show."""
    seeded = Seeded(now=now)
    devices: list[Device] = []
    messages: list[Message] = []
    today = now.astimezone(ZONE).date()
    seq = [0]

    def send(d: Device, at: datetime, readings: list[dict]) -> None:
        if at > now - timedelta(minutes=5):
            return
        items = []
        for r in readings:
            seq[0] += 1
            items.append({"msg_id": f"{d.device_id}-{seq[0]}", "measured_at": at.isoformat(), **r})
        body = items[0] if len(items) == 1 else {"readings": items}
        messages.append(Message(d.device_id, json.dumps(body).encode(), len(items), "valid"))
        if at > now - timedelta(days=30):
            counts = seeded.readings.setdefault(d.patient_id, {})
            for r in readings:
                counts[r["metric"]] = counts.get(r["metric"], 0) + 1

    def local(day: date, hour: float) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=ZONE) + timedelta(hours=hour)

    def cuff(pid: str, first_day: int, until: datetime, hours: tuple[float, ...] = (7.5, 20.0),
             special: dict[tuple[int, float], tuple[int, int]] | None = None) -> Device:
        d = Device(f"bp-{pid[3:]}", "bp", pid, ZONE)
        devices.append(d)
        state = [int(pid[3:])]
        for n in range(first_day, 1):
            for h in hours:
                at = local(today + timedelta(days=n), h)
                if at > until:
                    continue
                sys_, dia, pulse = _bp(state)
                sys_, dia = (special or {}).get((n, h), (sys_, dia))
                send(d, at, [{"metric": "blood_pressure", "unit": "mm[Hg]",
                              "values": {"systolic": sys_, "diastolic": dia}},
                             {"metric": "heart_rate", "unit": "/min", "value": pulse}])
        return d

    # pt-0101: stage 2 ten days ago (resolved by the next reading), severe two hours ago (open, urgent).
    maria = cuff("pt-0101", -20, now - timedelta(hours=3), special={(-10, 7.5): (152, 96)})
    send(maria, now - timedelta(hours=2), [{"metric": "blood_pressure", "unit": "mm[Hg]",
                                             "values": {"systolic": 186, "diastolic": 104}}])
    cuff("pt-0103", -20, now - timedelta(hours=80))      # silent for more than 72 h
    cuff("pt-0104", -20, now - timedelta(hours=30))      # silent for more than 24 h
    cuff("pt-0105", -7, now)                             # 8 device days: 99454 at risk
    cuff("pt-0106", -20, now)                            # 21 device days, minutes logged: on track
    cuff("pt-0201", -5, now)                             # Dr. Lee's patient

    # pt-0102: 28 days of CGM every 15 minutes. The earlier 14 days stay in range; the last 14 have nightly
    # lows (a few below 54) and post-meal highs above 250, all at least six hours old.
    cgm = Device("cgm-0102", "cgm", "pt-0102", ZONE)
    devices.append(cgm)
    start = local(today - timedelta(days=28), 0.0).astimezone(UTC)  # stepped in UTC: DST-proof
    batch: list[tuple[datetime, dict]] = []
    hours_seen: set[int] = set()
    days_seen: set[date] = set()
    at = start
    while at < now - timedelta(minutes=5):
        lt = at.astimezone(ZONE)
        h = lt.hour + lt.minute / 60
        recent = now - at < timedelta(days=14)
        old_enough = now - at > timedelta(hours=6)
        meals = sum(45 * math.exp(-((h - m) ** 2) / 1.5) for m in (8, 13, 19))
        value = 125 + meals + 6 * math.sin(at.timestamp() / 3000)
        if recent and old_enough:
            if 2 <= h < 5:
                value = 62 - (8 if lt.day % 4 == 0 else 0) + 3 * math.sin(h * 3)   # nightly lows
            elif abs(h - 19) < 0.6 and lt.day % 2 == 0:
                value = 262                                                       # post-meal highs
        if recent:
            hours_seen.add(lt.hour)
        days_seen.add(lt.date())
        batch.append((at, {"metric": "blood_glucose", "unit": "mg/dL", "value": round(value), "source": "cgm"}))
        if len(batch) == 12:  # CGMs upload in bursts
            _send_burst(send, cgm, batch)
            batch = []
        at += timedelta(minutes=15)
    if batch:
        _send_burst(send, cgm, batch)
    seeded.cgm_hours, seeded.cgm_days = len(hours_seen), len(days_seen)

    patients = {pid: tuple(p[3]) for pid, p in PATIENTS.items()}
    return Fleet(patients, devices, messages), seeded


def _send_burst(send, device: Device, burst: list[tuple[datetime, dict]]) -> None:
    # One message per burst, each reading with its own instant.
    first_at = burst[0][0]
    readings = [{**r, "measured_at": at.isoformat()} for at, r in burst]
    send(device, first_at, readings)


def register(s: Settings) -> None:
    with clinical(s) as con:
        for pid, (given, family, born, conditions, _) in PATIENTS.items():
            upsert_patient(con, pid, mrn=f"MRN{int(pid[3:]) * 7919 % 10_000_000:07d}", given_name=given,
                           family_name=family, birth_date=born, time_zone=ZONE.key, conditions=conditions)
        add_clinician(con, CLINICIAN, "Dr. Ada Okafor", "physician")
        add_clinician(con, OTHER_CLINICIAN, "Dr. Sam Lee", "physician")
        for pid, (*_, clinician) in PATIENTS.items():
            assign(con, clinician, pid)


def run_pipeline(s: Settings) -> None:
    """The DAG's tasks in order, in this process (Airflow's own runs are tested in test_end_to_end)."""
    seal_open_segments(s)
    batch = tasks.claim(s)
    tasks.decode_normalise(batch, s)
    tasks.validate(batch, s)
    tasks.load(batch, f"browser-{time.monotonic_ns()}", s)
    tasks.evaluate_alerts(s)
    tasks.publish_snapshot(s)


def seed(s: Settings) -> Seeded:
    """Broker, ingest and the service up; the practice registered, its devices publishing, the pipeline run."""
    services.up(s)
    fleet, seeded = build(datetime.now(UTC))
    register(s)
    since = seeded.now - timedelta(days=40)
    for d in fleet.devices:
        d.password = provision(s, d.device_id, d.patient_id, kind=d.kind, since=since)["password"]
    sent = publish_fleet(s, fleet)
    assert sent["acked"] == sent["published"] == len(fleet.messages)
    wait_until(lambda: (services.ingest_status(s) or {}).get("landed", 0) >= sent["published"], 60,
               what="ingest to land every message")
    run_pipeline(s)
    clinician = ClinicianSession(s, CLINICIAN, via="cli")
    for pid, minutes in LOGGED_MINUTES.items():
        clinician.log_time(pid, minutes, interactive=True, note="monthly review call")
    return seeded
