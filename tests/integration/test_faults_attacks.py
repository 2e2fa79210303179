"""Faults and attacks on what the clinical stream promises (issue 11), with real processes: a device login
looping on the ingest service's client id, and key rotation while devices stream — with and without a pid
file, with two instances — or with a writer rotation cannot confirm. Same checks as test_faults.py: the
accounting holds and every acknowledged reading is loaded exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.keyring import Keyring
from core.landing import SEGMENT_SUFFIX, open_dir
from core.settings import Settings
from rpmctl import services
from rpmctl.services import procs
from rpmctl.tools.publish import wait_until
from tests.conftest import RPM, free_port, rpm, rpm_json
from tests.integration.test_faults import (
    Stream,
    TrackingPublisher,
    assert_loaded_exactly_once,
    barrier,
    enrol,
    hr_batches,
    items_in,
    landed_payloads,
    publish_all,
    records_in,
    report,
    rows_of,
    run_pipeline,
    wait_landed,
    warehouse_rows,
)

pytestmark = pytest.mark.integration


# --- a device login looping on the ingest service's client id ---------------------------------------------

def attack_once(s: Settings, username: str, password: str) -> dict[str, str]:
    """Connect with the ingest service's client id and a clean start (which would discard its session) on every
    listener; returns each listener's CONNACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    answers = {}
    for name, port, tls in (("devices", s.broker_port, False), ("devices-tls", s.broker_tls_port, True),
                            ("ingest", s.broker_ingest_port, False)):
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=s.ingest_client_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(username, password)
        if tls:
            client.tls_set(ca_certs=str(s.ca_cert))
        got = threading.Event()
        client.on_connect = lambda c, u, f, rc, p, n=name, e=got: (answers.__setitem__(n, str(rc)), e.set())
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        try:
            client.connect("localhost" if tls else s.broker_host, port, keepalive=5, clean_start=True,
                           properties=props)
            client.loop_start()
            got.wait(5)
        finally:
            client.disconnect()
            client.loop_stop()
    return answers


def test_a_device_login_looping_on_the_ingest_client_id_changes_nothing(stack: Settings):
    """Mosquitto lets any login resume any client id's session unless ids are tied to logins. A device login
    connecting as `rpm-ingest-1` with a clean start used to take the ingest session: readings queued while ingest
    was down were destroyed, and a reconnect loop made acknowledged readings vanish while it ran. Now device
    listeners replace the client id with the login and the ingest listener accepts only the ingest login."""
    s = stack
    victim, mallory = "hr-victim", "hr-mallory"
    victim_pw, mallory_pw = enrol(s, victim), enrol(s, mallory)
    barrier(s, victim, victim_pw, "v")
    # 1. Ingest stopped: three acknowledged readings wait in its session while the attacker connects as it.
    procs.stop(s, services.INGEST)
    queued = publish_all(s, victim, victim_pw, hr_batches(victim, 3, 1, datetime.now(UTC) - timedelta(hours=2),
                                                          tag="-q"))
    answers = attack_once(s, mallory, mallory_pw)
    assert answers["devices"] == answers["devices-tls"] == "Success"  # connected — as itself, not as ingest
    assert answers["ingest"] in ("Bad user name or password", "Not authorized")
    services.up(s)
    # 2. Ingest running: 200 acknowledged readings while the attacker loops.
    stop, attempts = threading.Event(), Counter()

    def loop() -> None:
        while not stop.is_set():
            attempts.update(f"{k}: {v}" for k, v in attack_once(s, mallory, mallory_pw).items())

    attacker = threading.Thread(target=loop, daemon=True)
    attacker.start()
    try:
        # The attacker is in before the stream starts, and keeps at it until it has taken the session over at
        # least three times (on a busy machine the 200 readings can be sent before a third attempt).
        wait_until(lambda: attempts["devices: Success"] >= 1, 60, what="the attacker's first takeover attempt")
        with TrackingPublisher(s, victim, victim_pw) as pub:
            stream = Stream(pub, hr_batches(victim, 200, 1, datetime.now(UTC) - timedelta(hours=1)), 0.01)
            stream.start()
            stream.finish()
            wait_until(lambda: attempts["devices: Success"] >= 3, 60, what="three takeover attempts")
            assert stream.error is None and pub.wait_all() == 200
            acked = pub.acked_payloads()
    finally:
        stop.set()
        attacker.join(30)
    assert attempts["devices: Success"] >= 3, attempts
    wait_landed(s, queued + acked)
    run_pipeline(s)
    landed = landed_payloads(s)
    promised = rows_of(victim, queued + acked)
    assert promised <= set(warehouse_rows(s, victim)) and len(promised) == 203
    assert_loaded_exactly_once(s, set(warehouse_rows(s)) | promised, landed)
    report("device login looping on the ingest client id", attack_rounds=sum(attempts.values()) // 3,
           answers=dict(attempts), readings_promised=len(promised))


# --- key rotation while devices stream, with and without a pid file, with two instances -----------------

def start_unsupervised_ingest(s: Settings) -> subprocess.Popen:
    """`rpm ingest` as compose or systemd runs it: no pid file in run/, nothing to signal."""
    proc = subprocess.Popen([RPM, "ingest"], env={**os.environ, **s.as_env()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: (services.ingest_status(s) or {}).get("pid") == proc.pid
               and services.ingest_status(s)["subscribed"], 30, what=f"{s.ingest_client_id} to subscribe")
    return proc


def stop_unsupervised(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def sealed_key_ids(s: Settings) -> set[str]:
    from core.landing import list_sealed, segment_key_ids

    return set().union(*(segment_key_ids(p) for p in list_sealed(s.landing_dir)))  # type: ignore[arg-type]


AFTER_ROTATION = 100  # messages a device streams once `rpm keys rotate` has returned


def rotate_during(s: Settings, device: str, password: str, tag: str, hours_ago: int) -> tuple[list[bytes], dict]:
    """Stream readings, run `rpm keys rotate` in the middle of the stream, keep streaming AFTER_ROTATION more
    once it has returned, then stop; (acked payloads, result). The stream is sized for the slowest rotation
    (a loaded machine) and cut short once past it, not paced to last 15 s. The readings span up to ~2 h from
    ``hours_ago``: each phase its own instants, so none is another's duplicate."""
    payloads = hr_batches(device, 1500, 5, datetime.now(UTC) - timedelta(hours=hours_ago), tag=tag)
    old_key = Keyring.load(s, "landing").active
    with TrackingPublisher(s, device, password) as pub:
        stream = Stream(pub, payloads, interval_s=0.01)
        stream.start()
        wait_until(lambda: stream.sent >= 100, 30, what="the stream to get going")
        rotation = subprocess.Popen([RPM, "keys", "rotate", "--json"], env={**os.environ, **s.as_env()},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: Keyring.load(s, "landing").active != old_key, 60, what="the new landing key")
        switched_at = stream.sent
        out, err = rotation.communicate(timeout=120)
        assert rotation.returncode == 0, err
        rotated_at = stream.sent
        wait_until(lambda: stream.sent >= rotated_at + AFTER_ROTATION or not stream.is_alive(), 30,
                   what="the stream to go on after the rotation")
        stream.stop.set()
        stream.finish()
        assert stream.error is None and pub.wait_all() == stream.sent
        acked = pub.acked_payloads()
    assert 100 <= switched_at <= rotated_at < stream.sent, "the key did not change while the device was streaming"
    result = json.loads(out)
    wait_landed(s, acked)
    return acked, result


def test_key_rotation_under_load_with_and_without_a_pid_file_and_two_instances(stack: Settings):
    """`rpm keys rotate` while a device streams, three ways: the supervised instance (pid file); the same
    instance run without a pid file (compose, systemd); two instances in a shared subscription, neither with a
    pid file. Every acknowledged reading is loaded once, old keys are retired only when nothing uses them, and
    every pipeline run after the rotations succeeds.

    FAILED before: without a pid file rotation sealed the live open segment and retired the key ingest still
    sealed with (of 479 acknowledged readings 122 stayed readable), and every later run failed on
    `unknown key id`."""
    s = stack
    device = "hr-rotate"
    password = enrol(s, device)
    barrier(s, device, password, "r")
    acked: list[bytes] = []
    results = []
    # 1. The supervised instance: `rpm up` wrote its pid file.
    sent, result = rotate_during(s, device, password, "-pid", 12)
    acked += sent
    results.append(result)
    # 2. The same instance without a pid file.
    procs.stop(s, services.INGEST)
    proc = start_unsupervised_ingest(s)
    procs_started = [proc]
    try:
        barrier(s, device, password, "n")
        sent, result = rotate_during(s, device, password, "-nopid", 9)
        acked += sent
        results.append(result)
        stop_unsupervised(proc)
        # 3. Two instances in one shared subscription, no pid file for either.
        pair = [s.replace(ingest_group="ingest", ingest_client_id=f"rpm-ingest-{x}",
                                    ingest_metrics_port=free_port()) for x in "ab"]
        procs_started = [start_unsupervised_ingest(p) for p in pair]
        barrier(s, device, password, "g")
        sent, result = rotate_during(s, device, password, "-pair", 6)
        acked += sent
        results.append(result)
        assert {k: v for k, v in result["landing"]["instances"].items() if k.startswith("rpm-ingest-")
                and k != s.ingest_client_id} == {"rpm-ingest-a": "live", "rpm-ingest-b": "live"}
        # Without a pid file nothing is signalled to seal: segments seal by age (1 s in these tests).
        wait_until(lambda: not any(records_in(p) for p in open_dir(s.landing_dir).glob("*.seg")),  # type: ignore[arg-type]
                   30, what="the instances to seal by age")
        landed = landed_payloads(s)
        run_pipeline(s)
        expected = rows_of(device, acked) | rows_of(device, set(landed) - set(acked))  # plus barrier markers
        acc = assert_loaded_exactly_once(s, expected, landed)
        run_pipeline(s)  # every run after a rotation is green, and changes nothing
        assert rpm_json(s, "accounting") == acc
    finally:
        for p in procs_started:
            if p.poll() is None:
                stop_unsupervised(p)
    retired = [r["landing"]["retired"] for r in results]
    assert all(retired), f"an old landing key was not retired: {retired}"
    active = Keyring.load(s, "landing").active
    assert sealed_key_ids(s) == {active} and set(Keyring.load(s, "landing").keys) == {active}
    report("key rotation under load", rotations=len(results), readings_acked=sum(items_in(p) for p in acked),
           readings_loaded=acc["loaded"], duplicates=acc["duplicates"], retired=retired)


def test_key_rotation_refuses_when_a_writer_cannot_be_confirmed(settings: Settings):
    """An open segment whose writer reported from another host a minute ago: it may still be appending under the
    current key, so rotation refuses and changes nothing."""
    s = settings
    services.init(s)
    before = Keyring.load(s, "landing")
    far = "rpm-ingest-far"
    Path(s.run_dir, f"ingest-{far}.json").write_text(json.dumps(  # type: ignore[arg-type]
        {"pid": 4242, "host": "another-host", "client_id": far, "updated": time.time() - 60,
         "landing_key": before.active}))
    open_seg = Path(open_dir(s.landing_dir), f"{far}-20261206T000000000000-000001{SEGMENT_SUFFIX}")  # type: ignore[arg-type]
    open_seg.write_bytes(b'{"rpm_landing": 1}\n')
    proc = rpm(s, "keys", "rotate", check=False)
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: key rotation refused")
    assert far in proc.stderr and "another-host" in proc.stderr and "Traceback" not in proc.stderr
    after = Keyring.load(s, "landing")
    assert (after.active, set(after.keys)) == (before.active, set(before.keys))
    assert open_seg.exists()
