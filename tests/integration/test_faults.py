"""Fault injection with real processes: Mosquitto, the ingest service and `rpm pipeline run` (real DAG runs).

Every experiment ends the same way: the accounting identity holds (`rpm accounting --json`: balanced, nothing
pending) and the clinical store holds exactly the readings the devices were promised — every reading of every
message the broker PUBACKed, loaded once, and nothing that was never sent. Observed numbers are printed
(`pytest -s`) and recorded in RELIABILITY.md. Random choices use FAULT_SEED (printed) so a run can be replayed:
`FAULT_SEED=123 .venv/bin/python -m pytest tests/integration/test_faults.py -k ingest_sigkill -s`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.keyring import Keyring
from core.landing import SEGMENT_SUFFIX, open_dir, read_segment, sealed_dir
from core.settings import Settings
from rpmctl import services
from rpmctl.admin.devices import provision
from rpmctl.services import broker, procs
from rpmctl.tools.publish import DevicePublisher, PublishError, wait_until
from tests.conftest import RPM, free_port, rpm, rpm_json
from tests.steps import run_pipeline_in_process
from warehouse.db import clinical
from warehouse.registry import upsert_patient
from warehouse.serving import serving

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("FAULT_SEED") or random.randrange(1 << 31))
MARKERS = itertools.count()
MARKER_BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
Row = tuple[str, str, int, float]  # device_id, msg_id, measured_at (epoch s), canonical value


# --- devices and what they were promised --------------------------------------------------------------------

class TrackingPublisher(DevicePublisher):
    """A DevicePublisher that remembers which payloads the broker PUBACKed (the device's view of delivery)."""

    def __init__(self, s: Settings, device_id: str, password: str, **kwargs):
        self.device_id = device_id
        self.attempted: list[bytes] = []
        self._by_mid: dict[int, bytes] = {}
        self._acked_mids: set[int] = set()
        super().__init__(s, device_id, password, **kwargs)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        if not reason_code.is_failure:
            self._acked_mids.add(mid)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def publish(self, payload: bytes, topic: str | None = None) -> int:
        self.attempted.append(payload)
        mid = super().publish(payload, topic)
        self._by_mid[mid] = payload
        return mid

    def acked_payloads(self) -> list[bytes]:
        return [p for mid, p in self._by_mid.items() if mid in self._acked_mids]


class Stream(threading.Thread):
    """A device publishing ``payloads`` at a steady pace on its own thread, so faults hit a live stream."""

    def __init__(self, pub: TrackingPublisher, payloads: list[bytes], interval_s: float):
        super().__init__(daemon=True)
        self.pub, self.payloads, self.interval_s = pub, payloads, interval_s
        self.sent = 0
        self.error: PublishError | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        try:
            for i, payload in enumerate(self.payloads):
                if self.stop.is_set():
                    return
                delay = start + i * self.interval_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.pub.publish(payload)
                self.sent = i + 1
        except PublishError as exc:  # the broker went away under us: what was acked is what counts
            self.error = exc

    def finish(self, timeout: float = 60) -> None:
        self.join(timeout)
        assert not self.is_alive(), "device stream did not finish"


def enrol(s: Settings, device_id: str, days: float = 2, kind: str = "ox") -> str:
    """Register a patient and enrol a device for it (back-dated ``days``); returns its broker password. The
    default kind, a pulse oximeter, may send the heart rates these tests publish."""
    since = datetime.now(UTC) - timedelta(days=days)
    with clinical(s) as con:
        upsert_patient(con, f"pt-{device_id}")
    return provision(s, device_id, f"pt-{device_id}", kind=kind, since=since)["password"]


def hr_batches(device_id: str, messages: int, per_message: int, start: datetime, step_s: int = 1,
               tag: str = "") -> list[bytes]:
    """Heart-rate batches with unique msg ids, one reading per ``step_s`` from ``start``."""
    out = []
    for m in range(messages):
        items = []
        for k in range(per_message):
            i = m * per_message + k
            items.append({"msg_id": f"{device_id}{tag}-{i}", "metric": "heart_rate", "unit": "/min",
                          "measured_at": (start + timedelta(seconds=i * step_s)).isoformat(timespec="seconds"),
                          "value": 50 + i % 80})
        out.append(json.dumps({"readings": items}).encode())
    return out


def rows_of(device_id: str, payloads) -> set[Row]:
    """The warehouse rows a set of heart-rate payloads must produce (one per reading)."""
    rows = set()
    for p in payloads:
        body = json.loads(p)
        for r in body.get("readings", [body]):
            at = datetime.fromisoformat(r["measured_at"]).timestamp()
            rows.add((device_id, r["msg_id"], round(at), float(r["value"])))
    return rows


def items_in(payload: bytes) -> int:
    body = json.loads(payload)
    return len(body["readings"]) if "readings" in body else 1


# --- what landed, what loaded -------------------------------------------------------------------------------

def landed_payloads(s: Settings) -> list[bytes]:
    """Payloads of every record in landing (open and sealed segments), redeliveries included."""
    keyring = Keyring.load(s, "landing")
    for _ in range(5):  # a segment may be sealed (renamed) between listing and reading it: list again
        try:
            out: list[bytes] = []
            for path in sorted(open_dir(s.landing_dir).glob(f"*{SEGMENT_SUFFIX}")):  # type: ignore[arg-type]
                try:
                    out += [r.payload for r in read_segment(path, keyring)]
                except ValueError:  # a new open segment whose header is not flushed yet: no records
                    continue
            for path in sorted(sealed_dir(s.landing_dir).glob(f"*{SEGMENT_SUFFIX}")):  # type: ignore[arg-type]
                out += [r.payload for r in read_segment(path, keyring)]
            return out
        except FileNotFoundError:
            continue
    raise AssertionError("landing kept changing under the reader")


def wait_landed(s: Settings, payloads, timeout: float = 60, what: str = "every acked message in landing") -> None:
    want = set(payloads)
    wait_until(lambda: want <= set(landed_payloads(s)), timeout, interval=0.2, what=what)


def warehouse_rows(s: Settings, device_id: str | None = None) -> list[Row]:
    with clinical(s, read_only=True) as con:
        rows = con.execute("""
            SELECT device_id, msg_id, CAST(round(epoch(measured_at)) AS BIGINT), value FROM readings
            WHERE ? IS NULL OR device_id = ?""", [device_id, device_id]).fetchall()
    return [(d, m, int(t), float(v)) for d, m, t, v in rows]


def run_pipeline(s: Settings, airflow: bool = False) -> dict:
    """Load what landed. The faults here are in ingest and the broker, so the DAG's tasks run in this process
    (tests/steps.py) unless the test is about the Airflow run itself (``airflow``: `rpm pipeline run`)."""
    if not airflow:
        return run_pipeline_in_process(s)
    run = rpm_json(s, "pipeline", "run")
    assert run["state"] == "success" and set(run["tasks"].values()) == {"success"}, run
    return run


def balanced_accounting(s: Settings) -> dict:
    """`rpm accounting --json`, asserting the identity holds and nothing landed is left unprocessed."""
    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True, acc
    assert acc["received"] == acc["loaded"] + acc["quarantined"] + acc["duplicates"], acc
    assert acc["pending"] == {"sealed_segments": 0, "sealed_messages": 0, "open_segments": 0,
                              "open_messages": 0}, acc
    return acc


def assert_loaded_exactly_once(s: Settings, expected: set[Row], landed: list[bytes]) -> dict:
    """The warehouse holds ``expected`` once each; every other landed copy is a counted duplicate."""
    acc = balanced_accounting(s)
    rows = warehouse_rows(s)
    assert len(rows) == len(set(rows)), "a reading was loaded twice"
    missing, extra = expected - set(rows), set(rows) - expected
    assert not missing and not extra, f"{len(missing)} missing, {len(extra)} unexpected: {sorted(missing)[:3]}"
    landed_items = sum(items_in(p) for p in landed)
    assert acc["messages_processed"] == len(landed)
    assert acc["received"] == landed_items
    assert (acc["loaded"], acc["quarantined"]) == (len(expected), 0)
    assert acc["duplicates"] == landed_items - len(expected)
    with clinical(s, read_only=True) as con:
        orphans = con.execute("""SELECT count(*) FROM duplicates d
                                 WHERE d.reading_id NOT IN (SELECT reading_id FROM readings)""").fetchone()[0]
    assert orphans == 0, "a duplicate was counted for a reading that was never loaded"
    return acc


def publish_all(s: Settings, device_id: str, password: str, payloads: list[bytes]) -> list[bytes]:
    """Publish on a fresh connection and wait for every PUBACK; returns the acked payloads."""
    with TrackingPublisher(s, device_id, password) as pub:
        for p in payloads:
            pub.publish(p)
        pub.wait_all()
        return pub.acked_payloads()


def barrier(s: Settings, device_id: str, password: str, tag: str, timeout: float = 30) -> list[bytes]:
    """Publish fresh marker readings until one lands; returns every marker sent.

    Ingest's session delivers in order, so once a marker has landed everything queued before it has too.
    More than one marker is needed when ingest has not subscribed yet: `services.up` returns on CONNACK,
    before the SUBACK, and a message published in between has no subscriber.
    """
    sent: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        n = next(MARKERS)  # a distinct measured instant per marker: each is a new reading, never a duplicate
        marker = hr_batches(device_id, 1, 1, MARKER_BASE + timedelta(seconds=n), tag=f"-{tag}{n}")
        sent += publish_all(s, device_id, password, marker)
        try:
            wait_landed(s, marker, timeout=1.0, what="a barrier marker")
            return sent
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def start_stack(s: Settings, airflow_db_template: Path) -> None:
    """What the `stack` fixture does, for tests that must prepare something before ingest starts."""
    Path(s.airflow_home).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    Path(s.airflow_home, "airflow.db").write_bytes(airflow_db_template.read_bytes())  # type: ignore[arg-type]
    services.up(s)


def kill9(s: Settings, name: str) -> None:
    pid = procs.read_pid(s, name)
    assert pid, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: procs.read_pid(s, name) is None, 10, what=f"{name} to die")


def report(title: str, **numbers) -> None:
    print(f"\n[fault] {title}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# --- 1. ingest SIGKILL ---------------------------------------------------------------------------------------

def test_ingest_sigkill_five_times_in_a_50k_reading_stream(stack: Settings):
    """Acceptance: killing ingest at random points of a 50,000-reading stream, five times in a row, loses
    nothing and duplicates nothing in the warehouse (redeliveries are counted as duplicates, not loaded)."""
    s, rng = stack, random.Random(SEED)
    device = "hr-kill"
    password = enrol(s, device)
    payloads = hr_batches(device, 1000, 50, datetime.now(UTC) - timedelta(hours=20))
    # One kill point in each fifth of the stream, early enough in it that the restart (~0.5 s) ends in it.
    kill_at = [200 * k + rng.randrange(10, 140) for k in range(5)]
    pids = []
    with TrackingPublisher(s, device, password) as pub:
        stream = Stream(pub, payloads, interval_s=0.006)
        stream.start()
        for point in kill_at:
            wait_until(lambda p=point: stream.sent >= p or not stream.is_alive(), 30, what="the stream to go on")
            pids.append(procs.read_pid(s, services.INGEST))
            kill9(s, services.INGEST)
            services.up(s)  # recovers its open segments, resumes its session, takes the redeliveries
        stream.finish()
        assert stream.error is None
        assert pub.wait_all() == len(payloads)
        acked = pub.acked_payloads()
    assert len(set(pids)) == 5 and stream.sent == len(payloads)
    wait_landed(s, acked)
    run_pipeline(s)
    landed = landed_payloads(s)
    expected = rows_of(device, acked)
    assert len(expected) == 50_000
    acc = assert_loaded_exactly_once(s, expected, landed)
    report("ingest SIGKILL x5", seed=SEED, kill_points=kill_at, messages_acked=len(acked),
           messages_landed=len(landed), readings_loaded=acc["loaded"], duplicates=acc["duplicates"])


# --- 2. broker graceful restart ------------------------------------------------------------------------------

def test_broker_graceful_restart_while_ingest_down_and_devices_publish(stack: Settings):
    """A broker stopped with SIGTERM saves its sessions: what it acked before the stop is delivered after the
    restart. The promise is *nothing acked is lost* — including what devices publish after the restart while
    ingest is still down or reconnecting. A second restart runs with ingest up (it reconnects by itself).

    FAILS on Mosquitto 2.0.x: its persistence file keeps sessions and their queues but not *shared*
    subscriptions (persist__subs_save walks only the plain subscriptions), so after a restart the ingest
    session subscribes to nothing until ingest connects and subscribes again; every message a device
    publishes in between is PUBACKed to the device and then dropped (no subscriber matches).
    """
    s = stack
    device = "hr-restart"
    password = enrol(s, device)
    payloads = hr_batches(device, 800, 20, datetime.now(UTC) - timedelta(hours=10))
    attempted: set[bytes] = set()

    def stream_through_broker_restart(chunk: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Stream ``chunk``; stop the broker gracefully halfway; restart it; the device reconnects and sends
        the rest. Returns (acked before the stop, acked after the restart)."""
        pub = TrackingPublisher(s, device, password, timeout=5)
        stream = Stream(pub, chunk, interval_s=0.004)
        stream.start()
        wait_until(lambda: stream.sent >= len(chunk) // 2, 30, what="the stream to reach halfway")
        assert broker.stop(s)
        stream.stop.set()
        stream.finish()
        pub.close()  # DevicePublisher does not reconnect: the device comes back with a new connection
        attempted.update(pub.attempted)
        broker.start(s)
        rest = chunk[len(pub.attempted):]
        attempted.update(rest)
        return pub.acked_payloads(), publish_all(s, device, password, rest)

    # Ingest down: the broker holds its persistent session's queue across its own graceful restart.
    procs.stop(s, services.INGEST)
    acked = {}
    acked["before stop 1 (ingest down)"], acked["after restart 1 (ingest down)"] = (
        stream_through_broker_restart(payloads[0:300]))
    acked["later, ingest still down"] = publish_all(s, device, password, payloads[300:400])
    attempted.update(payloads[300:400])
    services.up(s)
    ingest_pid = procs.read_pid(s, services.INGEST)
    # Ingest up: the restart disconnects it and it reconnects by itself (clean_start=False).
    acked["before stop 2 (ingest up)"], acked["after restart 2 (ingest reconnecting)"] = (
        stream_through_broker_restart(payloads[400:700]))
    wait_until(lambda: (services.ingest_status(s) or {}).get("connected"), 30, what="ingest to reconnect")
    assert procs.read_pid(s, services.INGEST) == ingest_pid, "ingest had to be restarted"
    barriers = barrier(s, device, password, "b")  # ingest has subscribed again
    acked["after ingest is back"] = publish_all(s, device, password, payloads[700:800])
    attempted.update(payloads[700:800])
    barriers += barrier(s, device, password, "c")

    kept = [p for k in ("before stop 1 (ingest down)", "before stop 2 (ingest up)", "after ingest is back")
            for p in acked[k]]
    wait_landed(s, kept, what="what the broker acked before each stop, and after ingest was back")
    run_pipeline(s)
    landed = landed_payloads(s)
    assert set(landed) <= attempted | set(barriers), "something landed that no device sent"
    # Whatever landed is loaded exactly once, duplicates counted: the pipeline side holds.
    acc = assert_loaded_exactly_once(s, rows_of(device, set(landed)), landed)
    lost = {phase: len(set(ps) - set(landed)) for phase, ps in acked.items()}
    report("broker graceful restart x2", acked={k: len(v) for k, v in acked.items()}, lost_by_phase=lost,
           unacked_but_delivered=len(set(landed) - {p for ps in acked.values() for p in ps} - set(barriers)),
           barrier_messages=len(barriers), messages_landed=len(landed), readings_loaded=acc["loaded"],
           duplicates=acc["duplicates"])
    assert not any(lost.values()), (
        f"messages PUBACKed by the broker never reached ingest: {lost}. Mosquitto does not persist shared "
        "subscriptions, so after a restart nothing is queued for the ingest session until ingest subscribes "
        "again; what devices publish in between is acked and dropped")


# --- 3. broker SIGKILL ---------------------------------------------------------------------------------------

def test_broker_sigkill_loses_what_it_acked_since_its_last_save(stack: Settings):
    """Mosquitto's PUBACK is not durability. A broker SIGKILL loses every message it acked since its last
    persistence save that ingest had not yet taken, and resends messages ingest took after that save. The
    pipeline still loads everything that was landed exactly once. The loss is measured, not hidden."""
    s = stack
    device = "hr-crash"
    password = enrol(s, device)
    start = datetime.now(UTC) - timedelta(hours=6)
    saved = hr_batches(device, 100, 10, start, tag="-saved")
    unsaved = hr_batches(device, 100, 10, start + timedelta(hours=1), tag="-unsaved")
    db_file = Path(s.broker_dir) / "data" / "mosquitto.db"  # type: ignore[arg-type]

    procs.stop(s, services.INGEST)
    acked_saved = publish_all(s, device, password, saved)
    # Force a persistence snapshot now (SIGUSR1), standing in for an autosave that happened to run here.
    before = db_file.stat().st_mtime_ns if db_file.exists() else 0
    os.kill(procs.read_pid(s, broker.NAME), signal.SIGUSR1)
    wait_until(lambda: db_file.exists() and db_file.stat().st_mtime_ns > before, 10, what="the broker save")
    services.up(s)
    wait_landed(s, acked_saved)  # ingest took and acked them after the snapshot: the snapshot still has them
    procs.stop(s, services.INGEST)
    acked_unsaved = publish_all(s, device, password, unsaved)

    kill9(s, broker.NAME)
    broker.start(s)
    services.up(s)
    barriers = barrier(s, device, password, "k")  # lands after everything the broker restored for ingest
    run_pipeline(s)

    landed = landed_payloads(s)
    counts = Counter(landed)
    lost = set(acked_unsaved) - set(landed)
    resent = sum(counts[p] - 1 for p in acked_saved)
    assert set(acked_saved) <= set(landed), "a message in the broker's saved snapshot was lost"
    assert set(landed) <= set(saved) | set(unsaved) | set(barriers)
    acc = assert_loaded_exactly_once(s, rows_of(device, set(landed)), landed)
    report("broker SIGKILL", acked_before_save=len(acked_saved), acked_after_save=len(acked_unsaved),
           lost_at_broker=len(lost), lost_readings=sum(items_in(p) for p in lost), resent_after_restart=resent,
           readings_loaded=acc["loaded"], duplicates=acc["duplicates"],
           autosave_interval_s=s.broker_autosave_interval)


# --- 4. a DAG run killed mid-load ----------------------------------------------------------------------------

def task_states(s: Settings) -> dict[str, str | None]:
    """Task states of the newest rpm_pipeline run, read from Airflow's metadata DB (SQLite, read-only)."""
    db = Path(s.airflow_home) / "airflow.db"  # type: ignore[arg-type]
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute("""SELECT task_id, state FROM task_instance WHERE run_id =
                                    (SELECT run_id FROM dag_run WHERE dag_id = 'rpm_pipeline'
                                     ORDER BY id DESC LIMIT 1)""").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    return dict(rows)


def test_dag_run_killed_mid_load_then_rerun(stack: Settings):
    """SIGKILL `rpm pipeline run` while its load task runs; the next run completes the work: no loss, no
    duplicate, accounting balanced; one more whole run changes nothing."""
    s, rng = stack, random.Random(SEED + 4)
    device = "hr-dag"
    password = enrol(s, device)
    payloads = hr_batches(device, 400, 50, datetime.now(UTC) - timedelta(hours=8))
    with TrackingPublisher(s, device, password) as pub:
        for p in payloads:
            pub.publish(p)
        pub.wait_all()
        acked = pub.acked_payloads()
    wait_landed(s, acked)

    proc = subprocess.Popen([RPM, "pipeline", "run"], env={**os.environ, **s.as_env()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: task_states(s).get("load") in ("running", "success") or proc.poll() is not None,
                   120, interval=0.02, what="the load task to start")
        delay = rng.uniform(0, 0.8)  # the load task takes ~0.8 s for 20,000 readings, its commit near the end
        time.sleep(delay)
        state_at_kill = task_states(s).get("load")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    with clinical(s, read_only=True) as con:
        committed, ledgered = con.execute("""SELECT (SELECT count(*) FROM readings),
                                                    (SELECT coalesce(sum(loaded), 0) FROM segments)""").fetchone()
    # A load commits whole groups of segments with their ledger rows: never a segment's readings without it.
    assert committed == ledgered, f"{committed} readings committed, {ledgered} in the ledger: a partial load"

    run_pipeline(s, airflow=True)
    landed = landed_payloads(s)
    expected = rows_of(device, acked)
    acc = assert_loaded_exactly_once(s, expected, landed)
    assert acc["loaded"] == 20_000
    with clinical(s, read_only=True) as con:
        staged = con.execute("SELECT count(*) FROM stg_candidates").fetchone()[0]
    assert staged == 0, "staging rows were left behind"

    run_pipeline(s, airflow=True)  # a whole run repeated changes nothing
    assert rpm_json(s, "accounting") == acc
    assert sorted(warehouse_rows(s)) == sorted(expected)
    report("DAG run SIGKILL mid-load", seed=SEED + 4, kill_delay_s=round(delay, 3), load_state_at_kill=state_at_kill,
           committed_before_rerun=committed, readings_loaded=acc["loaded"], duplicates=acc["duplicates"])


# --- 5. landing disk full ------------------------------------------------------------------------------------

def test_landing_disk_full_stops_ingest_acks_and_recovers_without_loss(settings: Settings, airflow_db_template):
    """Landing on a 2 MiB tmpfs that a filler file nearly fills: ingest's writes fail, it counts write_errors,
    disconnects without acking (the broker keeps the messages), and after the filler is deleted it resumes and
    nothing is lost or loaded twice."""
    s = settings
    landing = Path(s.landing_dir)  # type: ignore[arg-type]
    landing.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(landing)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the landing folder: {mounted.stderr.strip()}")
    try:
        filler = landing / "filler.bin"
        st = os.statvfs(landing)
        filler.write_bytes(bytes(st.f_bavail * st.f_frsize - 64 * 1024))  # leave 64 KiB
        start_stack(s, airflow_db_template)
        device = "hr-full"
        password = enrol(s, device)
        payloads = hr_batches(device, 160, 10, datetime.now(UTC) - timedelta(hours=4))  # ~2.3 KiB landed each
        fits, overflows = payloads[:10], payloads[10:]
        acked = publish_all(s, device, password, fits)
        wait_landed(s, acked, what="the first messages, which fit")
        # The broker, not ingest, PUBACKs a device: its PUBACKs do not stall when the landing disk is full.
        acked += publish_all(s, device, password, overflows)
        wait_until(lambda: (services.ingest_status(s) or {}).get("write_errors", 0) >= 1, 30,
                   what="ingest to report a landing write error")
        # While the disk is full, landing never catches up: watch for a while (bounded), polling.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert not set(acked) <= set(landed_payloads(s)), "everything landed on a full disk?"
            time.sleep(0.1)
        full = services.ingest_status(s) or {}
        landed_while_full = len(set(landed_payloads(s)))
        assert full.get("acked", 0) <= landed_while_full < len(acked), "ingest acked what it had not landed"
        filler.unlink()
        wait_landed(s, acked, timeout=60, what="ingest to recover and land everything once space is back")
        run_pipeline(s)
        landed = landed_payloads(s)
        acc = assert_loaded_exactly_once(s, rows_of(device, acked), landed)
        status = services.ingest_status(s) or {}
        report("landing disk full", acked_by_broker=len(acked), landed_while_full=landed_while_full,
               landed_before_full=len(fits),
               write_errors_while_full=full.get("write_errors"), ingest_acked_while_full=full.get("acked"),
               write_errors_total=status.get("write_errors"), messages_landed=len(landed),
               readings_loaded=acc["loaded"], duplicates=acc["duplicates"])
    finally:
        procs.stop(s, services.INGEST, timeout=10)
        subprocess.run(["umount", str(landing)], check=False)
        if landing.is_mount():
            subprocess.run(["umount", "-l", str(landing)], check=False)


# --- 6. duplicates, order, clocks, offline buffers -----------------------------------------------------------

def test_duplicate_storm_out_of_order_skewed_clocks_and_offline_buffer(stack: Settings):
    s, rng = stack, random.Random(SEED + 6)
    now = datetime.now(UTC)
    passwords = {d: enrol(s, d) for d in ("hr-storm", "hr-ooo", "hr-ahead", "hr-behind")}
    since = (now - timedelta(days=4)).isoformat()
    rpm(s, "patients", "add", "pt-hr-offline")
    creds = rpm_json(s, "devices", "add", "hr-offline", "--patient", "pt-hr-offline", "--kind", "ox",
                     "--since", since)
    passwords["hr-offline"] = creds["password"]

    storm = hr_batches("hr-storm", 20, 5, now - timedelta(hours=3), step_s=60)
    ooo = hr_batches("hr-ooo", 60, 1, now - timedelta(hours=2), step_s=60)
    rng.shuffle(ooo)
    # A clock an hour ahead is refused (measured_not_in_future); a minute ahead is within RPM_FUTURE_SKEW_S.
    ahead = hr_batches("hr-ahead", 10, 1, now + timedelta(hours=1), step_s=60, tag="-1h")
    ahead_ok = hr_batches("hr-ahead", 1, 5, now + timedelta(seconds=60), step_s=10, tag="-1m")
    behind = hr_batches("hr-behind", 1, 10, now - timedelta(days=1), step_s=60)
    # Three days offline, one reading every 30 minutes, uploaded in batches when the device is back.
    offline = hr_batches("hr-offline", 3, 48, now - timedelta(days=3), step_s=1800)
    plan = {"hr-storm": [p for _ in range(10) for p in rng.sample(storm, len(storm))], "hr-ooo": ooo,
            "hr-ahead": ahead + ahead_ok, "hr-behind": behind, "hr-offline": offline}
    acked: dict[str, list[bytes]] = {}
    for device, payloads in plan.items():
        with TrackingPublisher(s, device, passwords[device]) as pub:
            for p in payloads:
                pub.publish(p)
            assert pub.wait_all() == len(payloads)
            acked[device] = pub.acked_payloads()
    wait_landed(s, [p for ps in acked.values() for p in ps])
    run_pipeline(s)

    expected = (rows_of("hr-storm", storm) | rows_of("hr-ooo", ooo) | rows_of("hr-ahead", ahead_ok)
                | rows_of("hr-behind", behind) | rows_of("hr-offline", offline))
    acc = balanced_accounting(s)
    assert set(warehouse_rows(s)) == expected and len(warehouse_rows(s)) == len(expected) == 100 + 60 + 5 + 10 + 144
    assert (acc["received"], acc["loaded"], acc["quarantined"], acc["duplicates"]) == (
        1000 + 60 + 15 + 10 + 144, len(expected), 10, 900)
    assert acc["quarantined_by_reason"] == {"measured_not_in_future": 10}
    # Out of order on the wire, in order in the chart: the latest vital is the latest *measured*.
    latest_ooo = max(rows_of("hr-ooo", ooo), key=lambda r: r[2])
    with serving(s) as con:
        latest = con.execute("SELECT value FROM mart_latest_vitals WHERE patient_id = 'pt-hr-ooo'").fetchall()
    assert latest == [(latest_ooo[3],)]
    report("duplicates / order / clocks / offline", seed=SEED + 6, received=acc["received"], loaded=acc["loaded"],
           quarantined=acc["quarantined_by_reason"], duplicates=acc["duplicates"])


# --- 7. two ingest instances in one shared subscription ------------------------------------------------------

def settled(s: Settings, quiet_s: float = 1.0, timeout: float = 20) -> set[bytes]:
    """Landing once it has stopped growing for ``quiet_s`` (bounded): what the live instances will get."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = set(landed_payloads(s))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return last or set()


def test_second_ingest_instance_carries_on_when_the_first_is_killed(stack: Settings):
    """Two ingest processes in one shared-subscription group: SIGKILL instance 1 mid-stream; instance 2 keeps
    landing its share; once instance 1 is back everything is loaded exactly once (both instances' segments).

    Observed with Mosquitto 2.0.x: the broker keeps routing a share of new messages to the dead member's
    persistent session (it is offline, not gone), so that share waits until instance 1 returns — or is dropped
    with the session when ``ingest_session_expiry_s`` runs out.
    """
    # Shared-subscription mode (RPM_INGEST_GROUP): both instances join one group under their own client ids.
    procs.stop(stack, services.INGEST)
    s = stack.replace(ingest_group="ingest", ingest_client_id="rpm-ingest-a")
    services.up(s)
    s2 = s.replace(ingest_client_id="rpm-ingest-b", ingest_metrics_port=free_port())
    name2 = "ingest-2"

    def second_up() -> bool:
        st = services.ingest_status(s2)
        return bool(st and st.get("subscribed") and st.get("pid") == procs.read_pid(s2, name2))

    try:
        procs.start(s2, name2, [sys.executable, "-m", "rpmctl.cli", "ingest"], env=s2.as_env(), ready=second_up)
        device = "hr-pair"
        password = enrol(s, device)
        barrier(s, device, password, "p")  # both instances have subscribed
        payloads = hr_batches(device, 600, 20, datetime.now(UTC) - timedelta(hours=5))
        with TrackingPublisher(s, device, password) as pub:
            stream = Stream(pub, payloads, interval_s=0.005)
            stream.start()
            wait_until(lambda: stream.sent >= 200, 30, what="the stream to get going")
            kill9(s, services.INGEST)
            killed_at = stream.sent
            stream.finish()
            assert pub.wait_all() == len(payloads)
            acked = pub.acked_payloads()
        after_kill = set(payloads[killed_at + 20:])  # published well after instance 1 was gone
        alone = settled(s)
        carried = len(after_kill & alone)
        assert carried > 0, "instance 2 landed nothing after instance 1 died"
        waiting = len(set(acked) - alone)
        services.up(s)  # instance 1 returns to its session and takes what the broker kept for it
        wait_landed(s, acked)
        # `rpm pipeline run` seals only the instance named `ingest`; instance 2 would seal by age.
        os.kill(procs.read_pid(s2, name2), signal.SIGUSR1)
        wait_until(lambda: not any(records_in(p) for p in open_dir(s.landing_dir).glob("*.seg")),  # type: ignore[arg-type]
                   30, what="instance 2 to seal")
        run_pipeline(s)
        landed = landed_payloads(s)
        expected = rows_of(device, acked) | rows_of(device, set(landed) - set(payloads))  # plus markers
        acc = assert_loaded_exactly_once(s, expected, landed)
        by_instance = Counter(p.name.rsplit("-", 2)[0] for p in sealed_dir(s.landing_dir).glob("*.seg"))  # type: ignore[arg-type]
        report("two ingest instances, one killed", killed_after_messages=killed_at,
               published_after_kill=len(after_kill), landed_by_instance_2_alone=carried,
               waiting_in_dead_session=waiting, messages_landed=len(landed),
               segments_by_instance=dict(by_instance), readings_loaded=acc["loaded"], duplicates=acc["duplicates"])
    finally:
        procs.stop(s2, name2, timeout=10)


def records_in(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return max(sum(1 for line in f if line.endswith(b"\n")) - 1, 0)
    except FileNotFoundError:
        return 0


# --- 8. an instance's recovery must not take another instance's open segment --------------------------------

def test_restarted_instance_leaves_a_live_instances_open_segment_alone(stack: Settings):
    """A restarting ingest instance seals the segments *it* left open, and only those.

    FAILS: recovery (core.landing.recover_open_segments) selects segments with the glob
    ``<client id>-*.seg``. Segment names are ``<client id>-<UTC stamp>-<counter>``, so instance ``rpm-ingest-1``
    also matches ``rpm-ingest-1-b-<stamp>-<n>.seg``, the open segment of a live instance whose id extends its own
    (likewise ``ingest`` vs ``ingest-2``). That file is renamed into sealed/ while its writer keeps appending,
    fsyncing and acking records into it; a DAG run that absorbs it in between records it in the ledger, and the
    records acked after that are never loaded — and the owner's own seal later fails (its path is gone).
    """
    s = stack
    s2 = s.replace(ingest_client_id="rpm-ingest-1-b", ingest_metrics_port=free_port(),
                             segment_max_age_s=120.0)
    name2 = "ingest-1-b"

    def second_up() -> bool:
        st = services.ingest_status(s2)
        return bool(st and st.get("connected") and st.get("pid") == procs.read_pid(s2, name2))

    try:
        procs.start(s2, name2, [sys.executable, "-m", "rpmctl.cli", "ingest"], env=s2.as_env(), ready=second_up)
        device = "hr-prefix"
        password = enrol(s, device)
        barrier(s, device, password, "x")
        publish_all(s, device, password, hr_batches(device, 40, 5, datetime.now(UTC) - timedelta(hours=3)))

        def theirs() -> list[Path]:
            return [p for p in open_dir(s.landing_dir).glob("rpm-ingest-1-b-*.seg")  # type: ignore[arg-type]
                    if records_in(p)]

        wait_until(lambda: bool(theirs()), 20, what="instance rpm-ingest-1-b to hold an open segment")
        open_before = theirs()
        procs.stop(s, services.INGEST)
        services.up(s)  # instance rpm-ingest-1 recovers what *it* left open
        taken = [p.name for p in open_before if not p.exists()]
        report("open segment of a live instance", live_instance="rpm-ingest-1-b", open_segments=len(open_before),
               taken_by_restarted_rpm_ingest_1=len(taken))
        assert not taken, (f"restarting rpm-ingest-1 sealed {taken}, open segment(s) of the running instance "
                           "rpm-ingest-1-b: recover_open_segments matches '<client id>-*'")
    finally:
        procs.stop(s2, name2, timeout=10)
