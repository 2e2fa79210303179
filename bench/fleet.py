"""A publisher fleet for the benchmarks: provisioned home devices publishing contract-v1 vitals over MQTT 5 at
QoS 1 from several processes, as single readings or as buffered batches.

Why several processes: one paho client tops out far below what the broker and a consumer can take, so a
benchmark driven by one publisher would measure the publisher. Each worker owns a share of the devices, logs
in as each of them (the ACL lets a device write only its own topic) and waits for every PUBACK, so "acked"
means the broker took responsibility for the message.

Every reading is valid and unique: device ``d``'s ``k``-th reading is measured ``k * step_s`` seconds before
a common anchor, so nothing is a duplicate and a later stream continues where the previous one stopped
(``Stream.first_k``). Payloads are built before the clock starts, so the timed part is publishing only.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from core.settings import Settings
from transforms.vocab import GLUCOSE_MG_DL_PER_MMOL_L, LB_AV_IN_KG

BATCH = 50  # readings per buffered upload in the batch scenario
KINDS = ("bp", "ox", "glu", "scale", "thermo")  # one home kit per patient
CONDITIONS = (("hypertension",), ("diabetes", "hypertension"), ("copd",), ("heart_failure", "hypertension"))
# Zones without daylight saving, so a device's UTC offset is the same for every reading of the stream.
ZONES = ("America/Phoenix", "Pacific/Honolulu", "America/Puerto_Rico", "UTC", "Asia/Kolkata")
US_UNITS = {"America/Phoenix", "Pacific/Honolulu", "America/Puerto_Rico"}  # lb, degF, mg/dL at home
HISTORY_DAYS = 3 * 365  # enrollments start this long before the anchor: every generated instant is covered
# Un-acked QoS 1 messages per device connection. paho 2.2 rescans its whole outgoing queue on every PUBACK
# (Client._update_inflight), so a wider window is slower: measured 8-10k msg/s per process at 50-100,
# 4k at 500, 1k at 10,000.
MAX_INFLIGHT = 100


@dataclass(frozen=True)
class Credential:
    """What a worker needs to act as one provisioned device."""

    device_id: str
    password: str
    patient_id: str
    kind: str
    zone: str


@dataclass(frozen=True)
class Stream:
    """Which readings to publish and how: reading ``i`` goes to device ``i % D`` as its ``first_k + i // D``-th.

    rate: readings/s for the whole fleet (None: as fast as the broker acks), paced per worker.
    """

    readings: int
    batch: int = 1
    first_k: int = 0
    step_s: int = 60
    anchor: int = 0  # Unix seconds of the newest possible reading; 0 = ``anchor_now()`` when published
    rate: float | None = None

    def next_first_k(self, devices: int) -> int:
        """``first_k`` of a stream that follows this one without repeating an instant."""
        return self.first_k + math.ceil(self.readings / devices)


@dataclass(frozen=True)
class PublishResult:
    messages: int
    readings: int
    acked: int
    started_at: float  # time.monotonic() when the workers were released (CLOCK_MONOTONIC: same in every process)
    finished_at: float  # last PUBACK of the slowest worker

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at


def anchor_now() -> int:
    """An anchor a few minutes in the past: the newest reading is never 'measured in the future'."""
    return int(time.time()) // 60 * 60 - 600


def step_for(readings_per_device: int, window_days: int = 30) -> int:
    """Seconds between a device's readings so that this many fill about ``window_days`` (at least 1 s)."""
    return max(1, window_days * 86400 // max(1, readings_per_device))


# --- provisioning -----------------------------------------------------------------------------------------
def provision(s: Settings, devices: int) -> list[Credential]:
    """Register patients (one home kit of five devices each) and give every device a broker login, through
    the project's own registry and provisioning functions."""
    from rpmctl.tools.simulator import Device, Fleet, provision_fleet

    plan = [_device(i) for i in range(devices)]
    fleet = Fleet(patients={p: CONDITIONS[int(p[3:]) % len(CONDITIONS)] for _, _, p, _ in plan},
                  devices=[Device(d, kind, p, ZoneInfo(zone)) for d, kind, p, zone in plan])
    provision_fleet(s, fleet, days=HISTORY_DAYS)
    return [Credential(d.device_id, d.password, d.patient_id, d.kind, d.zone.key) for d in fleet.devices]


def _device(i: int) -> tuple[str, str, str, str]:
    kind, n = KINDS[i % len(KINDS)], i // len(KINDS) + 1
    return f"{kind}-{n:05d}", kind, f"pt-{n:05d}", ZONES[n % len(ZONES)]


# --- readings ---------------------------------------------------------------------------------------------
def _reading(c: Credential, k: int, t_utc: int, rng: random.Random) -> dict:
    """One plausible home reading of the device's kind, measured at ``t_utc`` in the patient's zone."""
    local = datetime.fromtimestamp(t_utc, UTC).astimezone(ZoneInfo(c.zone))
    base = {"msg_id": f"{c.device_id}-{k}", "measured_at": local.isoformat(timespec="seconds")}
    us = c.zone in US_UNITS
    if c.kind == "bp" and k % 2 == 0:
        sys_ = round(rng.gauss(138, 14))
        return {**base, "metric": "blood_pressure", "unit": "mm[Hg]",
                "values": {"systolic": sys_, "diastolic": min(round(rng.gauss(84, 8)), sys_ - 20)}}
    if c.kind in ("bp", "ox") and k % 2 == 1:
        return {**base, "metric": "heart_rate", "unit": "/min", "value": round(rng.gauss(76, 10))}
    if c.kind == "ox":
        return {**base, "metric": "spo2", "unit": "%", "value": min(100, round(rng.gauss(94, 2)))}
    if c.kind == "glu":
        mg = max(40.0, rng.gauss(140, 35))
        value = ({"unit": "mg/dL", "value": round(mg)} if us
                 else {"unit": "mmol/L", "value": round(mg / GLUCOSE_MG_DL_PER_MMOL_L, 1)})
        return {**base, "metric": "blood_glucose", "source": "meter", **value}
    if c.kind == "scale":
        kg = rng.gauss(88, 12)
        value = {"unit": "[lb_av]", "value": round(kg / LB_AV_IN_KG, 1)} if us else {"unit": "kg", "value": round(kg, 1)}
        return {**base, "metric": "body_weight", **value}
    cel = rng.gauss(36.8, 0.3)
    value = {"unit": "[degF]", "value": round(cel * 9 / 5 + 32, 1)} if us else {"unit": "Cel", "value": round(cel, 1)}
    return {**base, "metric": "body_temperature", **value}


def device_share(stream: Stream, devices: int, d: int) -> range:
    """The device-local indices ``k`` that device ``d`` publishes in ``stream``."""
    count = stream.readings // devices + (1 if d < stream.readings % devices else 0)
    return range(stream.first_k, stream.first_k + count)


def messages(c: Credential, d: int, devices: int, stream: Stream) -> Iterator[bytes]:
    """The payloads device ``d`` publishes: one reading each, or ``{"readings": [...]}`` of ``stream.batch``."""
    rng = random.Random(f"{c.device_id}:{stream.first_k}")
    # Devices of one home do not measure in the same second: a fixed per-device lag inside the step keeps
    # "latest heart rate" (from the cuff and the oximeter) unambiguous.
    lag = d * 7919 % stream.step_s
    readings = (_reading(c, k, stream.anchor - k * stream.step_s - lag, rng)
                for k in device_share(stream, devices, d))
    if stream.batch <= 1:
        for r in readings:
            yield json.dumps(r, separators=(",", ":")).encode()
        return
    chunk: list[dict] = []
    for r in readings:
        chunk.append(r)
        if len(chunk) == stream.batch:
            yield json.dumps({"readings": chunk}, separators=(",", ":")).encode()
            chunk = []
    if chunk:
        yield json.dumps({"readings": chunk}, separators=(",", ":")).encode()


def count_messages(stream: Stream, devices: int) -> int:
    """Messages ``stream`` produces: per device, its readings in batches."""
    return sum(math.ceil(len(device_share(stream, devices, d)) / max(1, stream.batch)) for d in range(devices))


# --- publishing -------------------------------------------------------------------------------------------
def publish(s: Settings, creds: list[Credential], stream: Stream, workers: int = 2,
            timeout: float = 3600.0) -> PublishResult:
    """Publish ``stream`` from ``workers`` processes and wait for every PUBACK; raise on any refusal.

    Workers build their payloads and connect their devices first; the clock starts when all are ready.
    """
    if stream.anchor == 0:
        stream = replace(stream, anchor=anchor_now())
    oldest = stream.anchor - (stream.first_k + math.ceil(stream.readings / len(creds))) * stream.step_s
    if oldest < time.time() - (HISTORY_DAYS - 1) * 86400:
        raise ValueError("stream reaches back before the devices' enrollment: lower step_s or readings")
    workers = max(1, min(workers, len(creds)))
    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads or open DuckDB handles
    ready, go, results = ctx.Barrier(workers + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(s, creds, w, workers, stream, ready, go, results),
                         name=f"bench-publisher-{w}", daemon=True) for w in range(workers)]
    try:
        for p in procs:
            p.start()
        try:
            ready.wait(timeout=timeout)
        except threading.BrokenBarrierError:
            _result(results, procs, 10.0)  # raises with the worker's error
            raise
        started = time.monotonic()
        go.set()
        out = [_result(results, procs, timeout) for _ in procs]
    finally:
        _stop(procs)
    return PublishResult(messages=sum(o["messages"] for o in out), readings=stream.readings,
                         acked=sum(o["acked"] for o in out), started_at=started,
                         finished_at=max(o["finished_at"] for o in out))


def _result(results: Any, procs: list, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = results.get(timeout=1.0)
        except queue.Empty:  # still working, or dead: look
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"publisher worker failed (exit codes {[p.exitcode for p in procs]})") from None
            continue
        if "error" in out:
            raise RuntimeError(f"publisher worker failed: {out['error']}")
        return out


def _stop(procs: list) -> None:
    for p in procs:
        if p.pid is None:
            continue  # never started
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()  # SIGTERM to this worker's own pid
            p.join(timeout=5)


def _worker(s: Settings, creds: list[Credential], w: int, workers: int, stream: Stream, ready: Any, go: Any,
            results: Any) -> None:
    """One publisher process: its devices' payloads, one connection per device, paced if a rate is set."""
    from rpmctl.tools.publish import DevicePublisher

    pubs: list[DevicePublisher] = []
    try:
        mine = [d for d in range(len(creds)) if d % workers == w]
        payloads = [list(messages(creds[d], d, len(creds), stream)) for d in mine]
        pubs = [DevicePublisher(s, creds[d].device_id, creds[d].password, max_inflight=MAX_INFLIGHT)
                for d in mine]
        ready.wait(timeout=600)
        go.wait(timeout=600)
        sent = _send(pubs, payloads, stream, workers)
        acked = sum(p.wait_all() for p in pubs)
        results.put({"messages": sent, "acked": acked, "finished_at": time.monotonic()})
    except BaseException as exc:  # reported to the parent, which raises
        ready.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        for p in pubs:
            p.close()


def _send(pubs: list, payloads: list[list[bytes]], stream: Stream, workers: int) -> int:
    """Publish device after device (each keeps its own window of un-acked messages), pacing to the rate."""
    per_msg_s = 0.0
    if stream.rate:
        per_msg_s = max(1, stream.batch) / (stream.rate / workers)
    t0, sent = time.monotonic(), 0
    if per_msg_s:
        # A paced stream interleaves devices, as a live fleet does; an unpaced one drains device by device.
        order = _round_robin(payloads)
    else:
        order = ((i, m) for i, msgs in enumerate(payloads) for m in msgs)
    for i, payload in order:
        if per_msg_s:
            due = t0 + sent * per_msg_s
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing a steady publish rate, not waiting for a result
        pubs[i].publish(payload)
        sent += 1
    return sent


def _round_robin(payloads: list[list[bytes]]) -> Iterator[tuple[int, bytes]]:
    longest = max((len(p) for p in payloads), default=0)
    for j in range(longest):
        for i, msgs in enumerate(payloads):
            if j < len(msgs):
                yield i, msgs[j]

