"""Ingest's paho client: every packet already on the socket is read in one turn, a packet cut in two waits for
its rest, and a group's PUBACKs leave as one write — the two places it hooks paho's internals (pinned)."""

from __future__ import annotations

import socket
import struct

import paho.mqtt.client as mqtt
import pytest

from ingest.service import BufferedClient, make_ingest_client


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_qos1(topic: str, mid: int, payload: bytes) -> bytes:
    """An MQTT 5 PUBLISH at QoS 1 as a broker sends it: topic, packet id, no properties, payload."""
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", mid) + varint(0) + payload
    return bytes([0x32]) + varint(len(body)) + body


@pytest.fixture
def wired():
    """A real paho client whose socket is one end of a socketpair; the test plays the broker on the other."""
    client = make_ingest_client("ingest-test", "u", "p")
    assert isinstance(client, BufferedClient)
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours  # what connect() would have set, without a broker
    received: list[tuple[str, bytes, int]] = []
    client.on_message = lambda c, u, msg: received.append((msg.topic, bytes(msg.payload), msg.mid))
    client.on_socket_register_write = lambda *_: None  # acks queue; the test writes them
    yield client, broker, received
    ours.close()
    broker.close()


def read_turn(client: BufferedClient) -> int:
    """What ingest does per wake-up: loop_read until the socket is drained; the number of calls."""
    client.drained = False
    calls = 0
    while not client.drained:
        assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
        calls += 1
    return calls


def test_every_buffered_packet_is_read_in_one_turn_and_a_cut_one_waits_for_its_rest(wired) -> None:
    client, broker, received = wired
    packets = [publish_qos1(f"rpm/v1/devices/d-{i % 7}/vitals", i + 1, b'{"v": %d}' % i + bytes(i % 300))
               for i in range(500)]
    tail = publish_qos1("rpm/v1/devices/d-x/vitals", 999, b"x" * 70_000)
    broker.sendall(b"".join(packets) + tail[:100])
    read_turn(client)
    assert [m for _, _, m in received] == list(range(1, 501))
    assert received[3] == ("rpm/v1/devices/d-3/vitals", b'{"v": 3}' + bytes(3), 4)
    broker.sendall(tail[100:])
    read_turn(client)
    assert received[-1] == ("rpm/v1/devices/d-x/vitals", b"x" * 70_000, 999)
    assert not client.buffered()


def test_a_groups_pubacks_leave_as_one_write_in_order(wired) -> None:
    client, broker, _ = wired
    client.ack_many([(7, 1), (8, 0), (65535, 1), (1, 1)])  # QoS 0 needs no ack
    assert client.want_write()
    client.loop_write()
    assert broker.recv(100) == b"\x40\x02\x00\x07" + b"\x40\x02\xff\xff" + b"\x40\x02\x00\x01"
    assert not client.want_write()
