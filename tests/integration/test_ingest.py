"""The ingest service against a real Mosquitto: lands every message durably, acks after fsync, survives restarts."""

from __future__ import annotations

import base64
import json
import os
import signal

import pytest

from core import keys
from core.keyring import DecryptError, Keyring
from core.landing import block_sizes, list_sealed, open_dir, read_header, read_segment, segment_key_ids
from core.settings import Settings
from rpmctl import services
from rpmctl.admin.devices import wait_for_login
from rpmctl.services import broker, procs
from rpmctl.services.airflow_run import seal_open_segments
from rpmctl.tools.publish import DevicePublisher, wait_until

pytestmark = pytest.mark.integration


def landed(s: Settings) -> int:
    return (services.ingest_status(s) or {}).get("landed", 0)


def sealed_records(s: Settings) -> list:
    keyring = Keyring.load(s, "landing")
    return [r for p in list_sealed(s.landing_dir) for r in read_segment(p, keyring)]


def add_device(s: Settings, device_id: str) -> str:
    password = keys.new_password()
    broker.set_login(s, device_id, password)
    wait_for_login(s, device_id, password)
    return password


def test_every_message_lands_byte_exact_with_topic_and_receive_time(ingest_up: Settings):
    s = ingest_up
    password = add_device(s, "glu-1")
    payloads = [json.dumps({"msg_id": str(i), "metric": "blood_glucose", "value": 100 + i}).encode()
                for i in range(300)]
    payloads += [b"\xff\xfe not utf8", b"[1, 2, 3]", b"{truncated"]
    with DevicePublisher(s, "glu-1", password) as pub:
        for p in payloads:
            pub.publish(p)
        assert pub.wait_all() == len(payloads)  # every PUBACK came after the ingest fsync
    wait_until(lambda: landed(s) >= len(payloads), 20, what="ingest to land all messages")
    seal_open_segments(s)
    records = sealed_records(s)
    assert sorted(r.payload for r in records) == sorted(payloads)
    assert {r.topic for r in records} == {"rpm/v1/devices/glu-1/vitals"}
    assert all(r.received_at.tzinfo is not None for r in records)
    marks = {r.payload: r.mark for r in records}
    assert marks[b"\xff\xfe not utf8"] == "not_utf8"
    assert marks[b"[1, 2, 3]"] == "not_a_json_object"
    assert marks[b"{truncated"] == "not_json"
    assert marks[payloads[0]] is None


def test_landing_segments_are_encrypted_at_rest(ingest_up: Settings):
    s = ingest_up
    password = add_device(s, "thermo-9")
    secret = b'{"msg_id": "t-1", "metric": "body_temperature", "value": 39.7, "note": "fever-marker-xyz"}'
    with DevicePublisher(s, "thermo-9", password) as pub:
        pub.publish(secret)
        pub.wait_all()
    wait_until(lambda: landed(s) >= 1, 20, what="ingest to land the message")
    seal_open_segments(s)
    [segment] = list_sealed(s.landing_dir)
    on_disk = segment.read_bytes()
    assert b"fever-marker-xyz" not in on_disk and b"thermo-9" not in on_disk
    assert base64.b64encode(secret)[8:40] not in on_disk  # not merely base64 either
    assert read_header(segment)["encoding"] == "aesgcm-hkdf-v2"
    assert [r.payload for r in read_segment(segment, Keyring.load(s, "landing"))] == [secret]
    # A different key (or an altered byte) fails authentication instead of returning garbage.
    [kid] = segment_key_ids(segment)
    wrong = Keyring(s.home / "unused.json", kid, {kid: bytes(32)})
    with pytest.raises(DecryptError):
        list(read_segment(segment, wrong))


def test_sigterm_flushes_seals_and_exits_cleanly(ingest_up: Settings):
    s = ingest_up
    password = add_device(s, "ox-1")
    with DevicePublisher(s, "ox-1", password) as pub:
        for i in range(50):
            pub.publish(json.dumps({"msg_id": str(i)}).encode())
        pub.wait_all()
    wait_until(lambda: landed(s) >= 50, 20, what="ingest to land all messages")
    pid = procs.read_pid(s, services.INGEST)
    assert procs.stop(s, services.INGEST)  # SIGTERM
    assert not any(open_dir(s.landing_dir).glob("*.seg")), "an open segment was left behind"
    assert len(sealed_records(s)) == 50
    assert services.ingest_status(s)["connected"] is False
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_messages_published_while_ingest_is_down_are_delivered_after_restart(ingest_up: Settings):
    """The persistent session (stable client id, clean_start=False, session expiry) queues for us."""
    s = ingest_up
    password = add_device(s, "scale-1")
    procs.stop(s, services.INGEST)
    with DevicePublisher(s, "scale-1", password) as pub:
        for i in range(120):
            pub.publish(json.dumps({"msg_id": f"offline-{i}"}).encode())
        pub.wait_all()
    services.up(s)
    wait_until(lambda: landed(s) >= 120, 20, what="queued messages to reach landing after restart")
    seal_open_segments(s)
    got = sorted(json.loads(r.payload)["msg_id"] for r in sealed_records(s))
    assert got == sorted(f"offline-{i}" for i in range(120))


def test_a_queued_burst_is_landed_in_fsync_groups_and_every_message_acked(ingest_up: Settings):
    """Drained from the session at full speed, messages are fsynced (and acked) in groups — one landing block
    per group, not one fsync per message — and each one is acked only once its block is durable."""
    s = ingest_up
    password = add_device(s, "glu-9")
    procs.stop(s, services.INGEST)
    with DevicePublisher(s, "glu-9", password) as pub:
        for i in range(1500):
            pub.publish(json.dumps({"msg_id": f"burst-{i}", "metric": "blood_glucose", "value": 90}).encode())
        pub.wait_all()
    services.up(s)
    wait_until(lambda: (services.ingest_status(s) or {}).get("acked", 0) >= 1500, 30,
               what="the queued burst to be acked")
    seal_open_segments(s)
    assert sorted(json.loads(r.payload)["msg_id"] for r in sealed_records(s)) == sorted(
        f"burst-{i}" for i in range(1500))
    blocks = [n for p in list_sealed(s.landing_dir) for n in block_sizes(p)]
    assert sum(blocks) == 1500 and len(blocks) < 1500 // 4, blocks


def test_killed_ingest_loses_nothing_it_acked(ingest_up: Settings):
    """SIGKILL mid-stream: whatever the device got a PUBACK for is in landing after the restart."""
    s = ingest_up
    password = add_device(s, "bp-7")
    with DevicePublisher(s, "bp-7", password) as pub:
        for i in range(400):
            pub.publish(json.dumps({"msg_id": str(i)}).encode())
            if i == 200:
                os.kill(procs.read_pid(s, services.INGEST), signal.SIGKILL)
        wait_until(lambda: procs.read_pid(s, services.INGEST) is None, 10, what="ingest to die")
        services.up(s)  # recovers open segments, reconnects to its session, gets redeliveries
        pub.wait_all()
    wait_until(lambda: landed(s) >= 1, 20, what="the restarted ingest to land")
    wait_until(lambda: {json.loads(r.payload)["msg_id"] for r in _all_records(s)} >= {str(i) for i in range(400)},
               30, what="every acked message in landing")


def _all_records(s: Settings) -> list:
    seal_open_segments(s)
    return sealed_records(s)


def test_ingest_starts_beside_an_open_segment_with_a_damaged_header(ingest_up: Settings):
    """A segment ingest left open whose header was damaged since (here: its salt) no longer kills ingest at
    every start: the restarted service leaves it in open/ for an operator and lands the next message."""
    import struct

    s = ingest_up
    password = add_device(s, "bp-9")
    with DevicePublisher(s, "bp-9", password) as pub:
        pub.publish(b'{"msg_id": "before"}')
        pub.wait_all()
    wait_until(lambda: landed(s) >= 1, 20, what="ingest to land the first message")
    os.kill(procs.read_pid(s, services.INGEST), signal.SIGKILL)
    wait_until(lambda: procs.read_pid(s, services.INGEST) is None, 10, what="ingest to die")
    [left] = open_dir(s.landing_dir).glob("*.seg")  # type: ignore[arg-type]
    data = left.read_bytes()
    size = struct.unpack_from("<I", data, 8)[0]
    header = json.loads(data[12:12 + size])
    bad = json.dumps({**header, "salt": "zz" * 16}, separators=(",", ":")).encode()
    left.write_bytes(data[:8] + struct.pack("<I", len(bad)) + bad + data[12 + size:])
    services.up(s)
    with DevicePublisher(s, "bp-9", password) as pub:
        pub.publish(b'{"msg_id": "after"}')
        pub.wait_all()
    wait_until(lambda: landed(s) >= 1, 20, what="the restarted ingest to land")
    assert procs.read_pid(s, services.INGEST) is not None and left.exists()
