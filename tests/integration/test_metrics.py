"""Ingest metrics against a real Mosquitto and ingest process: scraped over HTTP as Prometheus would."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest

from core.keyring import Keyring
from core.settings import Settings
from ingest.metrics import CONTENT_TYPE
from rpmctl import services
from rpmctl.services import procs
from rpmctl.tools.publish import DevicePublisher, wait_until
from tests.integration.test_ingest import add_device
from tests.promtext import Family, parse

pytestmark = pytest.mark.integration

P = "rpm_ingest_"


def get(s: Settings, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.ingest_metrics_port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(s: Settings) -> dict[str, Family]:
    status, ctype, body = get(s, "/metrics")
    assert (status, ctype) == (200, CONTENT_TYPE)
    return parse(body)


def metric(s: Settings, name: str, **labels: str) -> float:
    try:
        return scrape(s)[P + name].value(**labels)
    except KeyError:  # a labelled series appears when first counted
        return 0.0


def test_counters_follow_a_device_and_expose_no_phi(ingest_up: Settings):
    s = ingest_up
    assert metric(s, "connected") == 1
    assert get(s, "/healthz")[::2] == (200, "ok\n")
    assert math.isnan(metric(s, "last_message_age_seconds"))  # nothing received yet

    n = 40
    password = add_device(s, "oxi-meter-4711")
    payloads = [json.dumps({"msg_id": f"m-{i}", "metric": "spo2", "value": 97, "unit": "%"}).encode()
                for i in range(n)]
    payloads.append(b"secret-payload-marker, not json")
    with DevicePublisher(s, "oxi-meter-4711", password) as pub:
        for p in payloads:
            pub.publish(p)
        assert pub.wait_all() == n + 1
    total = n + 1
    wait_until(lambda: metric(s, "messages_acked_total") >= total, 20, what="acked to reach every message")
    wait_until(lambda: metric(s, "segments_sealed_total") >= 1, 20, what="the segment to be sealed by age")

    f = scrape(s)
    assert f[P + "messages_received_total"].value() == total
    assert f[P + "messages_landed_total"].value() == f[P + "messages_acked_total"].value() == total
    assert f[P + "messages_marked_malformed_total"].value(reason="not_json") == 1
    assert f[P + "inflight_messages"].value() == 0
    assert f[P + "write_errors_total"].value() == 0
    assert f[P + "oldest_unsealed_segment_age_seconds"].value() == 0  # sealed, nothing open since
    assert 0 <= f[P + "last_message_age_seconds"].value() < 60
    assert f[P + "start_time_seconds"].value() <= services.ingest_status(s)["updated"]

    body = get(s, "/metrics")[2]
    assert "oxi-meter-4711" not in body and "secret-payload-marker" not in body and "spo2" not in body
    assert "rpm/v1" not in body and Keyring.load(s, "landing").active not in body


def test_the_port_closes_when_ingest_stops(ingest_up: Settings):
    s = ingest_up
    assert get(s, "/healthz")[0] == 200
    assert procs.stop(s, services.INGEST)
    with pytest.raises(urllib.error.URLError):
        get(s, "/metrics")
