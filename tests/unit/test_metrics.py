"""Ingest metrics: valid Prometheus exposition of a snapshot, the loopback HTTP endpoints, the service's snapshot."""

from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from core.settings import Settings
from ingest.metrics import CONTENT_TYPE, MARK_REASONS, REGISTRY, MetricsServer, Snapshot, render
from ingest.service import IngestService, quick_mark
from tests.promtext import parse

P = "rpm_ingest_"
EXPECTED = {
    "messages_received_total": "counter", "messages_landed_total": "counter", "messages_acked_total": "counter",
    "messages_marked_malformed_total": "counter", "write_errors_total": "counter",
    "segments_sealed_total": "counter", "inflight_messages": "gauge", "connected": "gauge",
    "oldest_unsealed_segment_age_seconds": "gauge", "last_message_age_seconds": "gauge",
    "start_time_seconds": "gauge",
}
NOW = 1_800_000_000.0
SNAP = Snapshot(received=12, landed=11, acked=9, marked=(("not_json", 2), ("unknown_topic", 1)), write_errors=1,
                segments_sealed=3, inflight=2, connected=True, open_segment_created=NOW - 4.5,
                last_message_at=NOW - 0.25, started_at=NOW - 3600)


def test_every_metric_has_help_and_type_and_nothing_else_is_exposed() -> None:
    families = parse(render(SNAP, NOW))
    assert {name: f.type for name, f in families.items()} == {P + n: t for n, t in EXPECTED.items()}
    assert all(f.help for f in families.values())
    assert [m.name for m in REGISTRY] == list(EXPECTED)


def test_values_reflect_the_snapshot() -> None:
    f = parse(render(SNAP, NOW))
    assert f[P + "messages_received_total"].value() == 12
    assert f[P + "messages_landed_total"].value() == 11
    assert f[P + "messages_acked_total"].value() == 9
    assert f[P + "messages_marked_malformed_total"].value(reason="not_json") == 2
    assert f[P + "messages_marked_malformed_total"].value(reason="unknown_topic") == 1
    assert {dict(k)["reason"] for k in f[P + "messages_marked_malformed_total"].samples} == set(MARK_REASONS)
    assert f[P + "messages_marked_malformed_total"].value(reason="not_utf8") == 0
    assert f[P + "write_errors_total"].value() == 1
    assert f[P + "segments_sealed_total"].value() == 3
    assert f[P + "inflight_messages"].value() == 2
    assert f[P + "connected"].value() == 1
    assert f[P + "oldest_unsealed_segment_age_seconds"].value() == 4.5
    assert f[P + "last_message_age_seconds"].value() == 0.25
    assert f[P + "start_time_seconds"].value() == NOW - 3600


def test_before_the_first_message_the_age_is_nan_and_no_segment_means_zero() -> None:
    f = parse(render(Snapshot(started_at=NOW), NOW))
    assert math.isnan(f[P + "last_message_age_seconds"].value())
    assert f[P + "oldest_unsealed_segment_age_seconds"].value() == 0
    assert f[P + "connected"].value() == 0
    # Every reason is there at 0 before the first mark, so the dashboard's rate() has a series to read.
    assert f[P + "messages_marked_malformed_total"].samples == {(("reason", r),): 0 for r in MARK_REASONS}


def test_every_reason_ingest_marks_a_message_with_is_known_to_the_metrics() -> None:
    topic = "rpm/v1/devices/ox-1/vitals"
    reasons = {quick_mark("elsewhere/x", b"{}"), quick_mark(topic, b"{}" * 10, max_payload_bytes=4),
               quick_mark(topic, b"\xff"), quick_mark(topic, b"not json"), quick_mark(topic, b"[1]")}
    assert reasons == set(MARK_REASONS)
    assert quick_mark(topic, b"{}") is None


def test_ages_never_go_negative_when_the_clock_steps_back() -> None:
    f = parse(render(SNAP, NOW - 60))
    assert f[P + "oldest_unsealed_segment_age_seconds"].value() == 0
    assert f[P + "last_message_age_seconds"].value() == 0


def test_label_values_are_escaped() -> None:
    odd = 'quote " backslash \\ newline \n end'
    f = parse(render(Snapshot(marked=((odd, 1),)), NOW))
    assert f[P + "messages_marked_malformed_total"].value(reason=odd) == 1


# --- HTTP -----------------------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer(0, snapshot=Snapshot(started_at=NOW)).start()
    yield srv
    srv.stop()


def get(srv: MetricsServer, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_metrics_endpoint_serves_the_latest_published_snapshot(server: MetricsServer) -> None:
    status, ctype, body = get(server, "/metrics")
    assert (status, ctype) == (200, CONTENT_TYPE)
    assert parse(body)[P + "messages_received_total"].value() == 0
    server.publish(SNAP)
    assert parse(get(server, "/metrics")[2])[P + "messages_received_total"].value() == 12


def test_healthz_follows_the_broker_connection(server: MetricsServer) -> None:
    assert get(server, "/healthz")[0] == 503
    server.publish(Snapshot(connected=True))
    assert get(server, "/healthz")[::2] == (200, "ok\n")
    server.publish(Snapshot(connected=False))
    assert get(server, "/healthz")[0] == 503


@pytest.mark.parametrize("path", ["/", "/metrics/x", "/favicon.ico", "/healthz/"])
def test_other_paths_are_not_found(server: MetricsServer, path: str) -> None:
    assert get(server, path)[0] == 404


def test_binds_loopback_and_stop_frees_the_port() -> None:
    srv = MetricsServer(0).start()
    assert srv._httpd.server_address[0] == "127.0.0.1"
    port = srv.port
    srv.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


# --- the service's snapshot (no broker: a fake client records the acks) --------------------------------
class FakeClient:
    def __init__(self, *args: object, **kwargs: object) -> None:
        self.acks: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append(mid)

    def disconnect(self) -> None:
        pass


def message(mid: int, topic: str, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=topic.encode())
    msg.payload, msg.qos = payload, 1
    return msg


def test_the_service_publishes_counts_and_reasons_but_no_ids_or_payloads(settings: Settings) -> None:
    service = IngestService(settings, "pw", client_factory=FakeClient)
    service.metrics = MetricsServer(0)  # never started: we only read what the loop publishes
    good = json.dumps({"msg_id": "m-1", "metric": "heart_rate", "value": 72, "note": "payload-marker"}).encode()
    msgs = [message(1, "rpm/v1/devices/bp-secret-7/vitals", good),
            message(2, "rpm/v1/devices/bp-secret-7/vitals", b"{not json"),
            message(3, "rpm/v1/elsewhere/bp-secret-7", good)]
    for msg in msgs:
        service._on_message(service.client, None, msg)
    service.publish_metrics()
    snap = service.metrics.snapshot
    assert (snap.received, snap.landed, snap.acked, snap.inflight) == (3, 3, 0, 3)
    assert dict(snap.marked) == {"not_json": 1, "unknown_topic": 1}
    assert snap.open_segment_created is not None and snap.last_message_at is not None

    service.flush()  # fsync, then ack: the counters follow
    service.publish_metrics()
    snap = service.metrics.snapshot
    assert service.client.acks == [1, 2, 3]
    assert (snap.acked, snap.inflight) == (3, 0)
    text = render(snap)
    assert "bp-secret-7" not in text and "payload-marker" not in text and "rpm/v1" not in text
    assert service.keyring.active not in text
    service.metrics.stop()
