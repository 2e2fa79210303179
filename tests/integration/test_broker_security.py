"""The broker's door, tested against a real Mosquitto: who may connect, publish and subscribe."""

from __future__ import annotations

import ssl
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest.service import make_client
from rpmctl import broker, keys
from rpmctl.publish import DevicePublisher, PublishError
from rpmctl.settings import Settings

pytestmark = pytest.mark.integration


def connack(s: Settings, username: str | None, password: str | None, *, port: int | None = None,
            ca_file: str | None = None, tls_insecure_ca: bool = False) -> str:
    """What the broker answers to a CONNECT: 'Success', a refusal reason, or 'no CONNACK: <error>'."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="probe",
                         protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if ca_file or tls_insecure_ca:
        client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
    done = threading.Event()
    answer: list[str] = []
    client.on_connect = lambda c, u, f, rc, p: (answer.append(str(rc)), done.set())
    try:
        client.connect("localhost" if (ca_file or tls_insecure_ca) else s.broker_host,
                       port or s.broker_port, keepalive=5)
        client.loop_start()
        done.wait(5)
    except (OSError, ssl.SSLError) as exc:
        return f"no CONNACK: {exc}"
    finally:
        client.disconnect()
        client.loop_stop()
    return answer[0] if answer else "no CONNACK"


@pytest.fixture
def device(running_broker: Settings) -> tuple[Settings, str]:
    password = keys.new_password()
    broker.set_login(running_broker, "bp-100", password)
    from rpmctl.devices import wait_for_login

    wait_for_login(running_broker, "bp-100", password)
    return running_broker, password


def test_anonymous_connection_refused(running_broker: Settings):
    assert connack(running_broker, None, None) == "Not authorized"


def test_wrong_password_refused(device):
    s, _ = device
    assert connack(s, "bp-100", "not-the-password") in ("Bad user name or password", "Not authorized")


def test_device_login_accepted(device):
    s, password = device
    assert connack(s, "bp-100", password) == "Success"


def test_device_cannot_publish_under_another_devices_topic(device):
    s, password = device
    with DevicePublisher(s, "bp-100", password) as pub:
        pub.publish(b'{"x": 1}')  # own topic: accepted
        pub.publish(b'{"x": 1}', topic="rpm/v1/devices/bp-999/vitals")
        with pytest.raises(PublishError, match="refused 1 message"):
            pub.wait_all()
        assert pub.acked == 1 and pub.refused[0][1] == "Not authorized"


def _subscriber(s: Settings, client_id: str, username: str, password: str) -> tuple[mqtt.Client, list]:
    client = make_client(client_id, username, password)
    received: list = []
    subscribed = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("rpm/v1/#", options=SubscribeOptions(qos=1))
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.on_message = lambda c, u, msg: received.append(msg.topic)
    client.connect(s.broker_host, s.broker_port)
    client.loop_start()
    assert subscribed.wait(5), f"{client_id}: no SUBACK"
    return client, received


def test_device_cannot_read_other_devices_readings(device):
    """Mosquitto grants the SUBACK but its ACL withholds every message: a device reads nothing."""
    s, password = device
    other = keys.new_password()
    broker.set_login(s, "bp-999", other)
    from rpmctl.devices import wait_for_login

    wait_for_login(s, "bp-999", other)
    sniffer, sniffed = _subscriber(s, "sniffer", "bp-100", password)
    # The ingest login may read everything: once it has the message, the broker has dispatched it.
    ingest, ingested = _subscriber(s, "ingest-probe", s.ingest_username, keys.service_password(s, "ingest"))
    try:
        with DevicePublisher(s, "bp-999", other) as pub:
            pub.publish(b'{"secret": true}')
            pub.wait_all()
        from rpmctl.publish import wait_until

        wait_until(lambda: ingested, timeout=5, what="the authorised subscriber to receive the reading")
        assert sniffed == []
    finally:
        for c in (sniffer, ingest):
            c.disconnect()
            c.loop_stop()


def test_tls_listener_verifies_with_local_ca(device):
    s, password = device
    assert connack(s, "bp-100", password, port=s.broker_tls_port, ca_file=str(s.ca_cert)) == "Success"
    with DevicePublisher(s, "bp-100", password, tls=True) as pub:
        pub.publish(b'{"x": 1}')
        assert pub.wait_all() == 1


def test_tls_listener_refuses_plaintext(device):
    s, password = device
    assert connack(s, "bp-100", password, port=s.broker_tls_port).startswith("no CONNACK")


def test_tls_certificate_not_trusted_without_local_ca(device):
    s, password = device
    assert connack(s, "bp-100", password, port=s.broker_tls_port, tls_insecure_ca=True).startswith("no CONNACK")


def test_plain_listener_is_loopback_only_and_anonymous_access_off(running_broker: Settings):
    conf = broker.conf_path(running_broker).read_text().splitlines()
    assert f"listener {running_broker.broker_port} 127.0.0.1" in conf
    assert "allow_anonymous false" in conf
    assert "persistence true" in conf
    assert any(line.startswith("max_queued_messages ") and int(line.split()[1]) >= 1_000_000 for line in conf)
