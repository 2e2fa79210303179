"""The broker's door, tested against a real Mosquitto: who may connect, publish and subscribe."""

from __future__ import annotations

import os
import signal
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from core import keys
from core.settings import Settings
from ingest.service import make_client
from rpmctl.services import broker
from rpmctl.tools.publish import DevicePublisher, PublishError

pytestmark = pytest.mark.integration


def connack(s: Settings, username: str | None, password: str | None, *, port: int | None = None,
            ca_file: str | None = None, tls_insecure_ca: bool = False, client_id: str = "probe") -> str:
    """What the broker answers to a CONNECT: 'Success', a refusal reason, or 'no CONNACK: <error>'.

    The probe connects with a clean start: on a session it is allowed to take, that discards the session."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
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
    from rpmctl.admin.devices import wait_for_login

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
    client.connect(s.broker_host, s.broker_ingest_port if username == s.ingest_username else s.broker_port)
    client.loop_start()
    assert subscribed.wait(5), f"{client_id}: no SUBACK"
    return client, received


def test_device_cannot_read_other_devices_readings(device):
    """Mosquitto grants the SUBACK but its ACL withholds every message: a device reads nothing."""
    s, password = device
    other = keys.new_password()
    broker.set_login(s, "bp-999", other)
    from rpmctl.admin.devices import wait_for_login

    wait_for_login(s, "bp-999", other)
    sniffer, sniffed = _subscriber(s, "sniffer", "bp-100", password)
    # The ingest login may read everything: once it has the message, the broker has dispatched it.
    ingest, ingested = _subscriber(s, "ingest-probe", s.ingest_username, keys.service_password(s, "ingest"))
    try:
        with DevicePublisher(s, "bp-999", other) as pub:
            pub.publish(b'{"secret": true}')
            pub.wait_all()
        from rpmctl.tools.publish import wait_until

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


def test_plain_listeners_are_loopback_only_and_anonymous_access_off(running_broker: Settings):
    conf = broker.conf_path(running_broker).read_text().splitlines()
    assert f"listener {running_broker.broker_port} 127.0.0.1" in conf
    assert f"listener {running_broker.broker_ingest_port} 127.0.0.1" in conf
    assert conf.count("allow_anonymous false") == 3  # one per listener: logins are per listener
    assert "persistence true" in conf
    assert any(line.startswith("max_queued_messages ") and int(line.split()[1]) >= 1_000_000 for line in conf)


# --- a device login against the ingest session, other kinds' topics, retained messages ------------------------

def test_device_logins_are_refused_on_the_ingest_listener_and_ingest_on_the_device_listeners(device):
    s, password = device
    ingest_password = keys.service_password(s, "ingest")
    assert connack(s, "bp-100", password, port=s.broker_ingest_port, client_id=s.ingest_client_id) in (
        "Bad user name or password", "Not authorized")
    assert connack(s, s.ingest_username, ingest_password, port=s.broker_port) in (
        "Bad user name or password", "Not authorized")
    assert connack(s, s.ingest_username, ingest_password, port=s.broker_ingest_port) == "Success"


def test_a_device_cannot_write_another_kinds_topics(running_broker: Settings):
    """A device writes only its vitals and status topics; an app only its events topic; nothing else."""
    from rpmctl.admin.devices import wait_for_login

    s = running_broker
    cuff, app = keys.new_password(), keys.new_password()
    broker.set_login(s, "bp-7", cuff, role="device")
    broker.set_login(s, "app-7", app, role="app")
    wait_for_login(s, "bp-7", cuff)
    wait_for_login(s, "app-7", app)
    with DevicePublisher(s, "bp-7", cuff) as pub:
        for topic in ("rpm/v1/devices/bp-7/vitals", "rpm/v1/devices/bp-7/status",   # its own: accepted
                      "rpm/v1/apps/bp-7/events", "rpm/v1/devices/bp-7/vitals/x", "rpm/v1/devices/bp-7"):
            pub.publish(b'{"x": 1}', topic=topic)
        pub.wait_all(check=False)
        assert (pub.acked, len(pub.refused)) == (2, 3)
    with DevicePublisher(s, "app-7", app, topic="rpm/v1/apps/app-7/events") as pub:
        for topic in ("rpm/v1/apps/app-7/events",                                    # its own: accepted
                      "rpm/v1/devices/app-7/vitals", "rpm/v1/devices/app-7/status"):
            pub.publish(b'{"x": 1}', topic=topic)
        pub.wait_all(check=False)
        assert (pub.acked, len(pub.refused)) == (1, 2)
        assert {reason for _, reason in pub.refused} == {"Not authorized"}


def test_retained_publishes_are_refused_and_never_delivered(device):
    s, password = device
    ingest, ingested = _subscriber(s, "ingest-probe", s.ingest_username, keys.service_password(s, "ingest"))
    gone = threading.Event()
    pub = make_client("bp-100", "bp-100", password)
    pub.on_disconnect = lambda c, u, f, rc, p: gone.set()
    try:
        pub.connect(s.broker_host, s.broker_port)
        pub.loop_start()
        info = pub.publish("rpm/v1/devices/bp-100/vitals", b'{"retained": true}', qos=1, retain=True)
        assert gone.wait(5), "the broker kept a client that published a retained message"
        assert not info.is_published()
        # A new subscription (what ingest does on every reconnect) finds nothing retained.
        late, late_received = _subscriber(s, "late-probe", s.ingest_username, keys.service_password(s, "ingest"))
        with DevicePublisher(s, "bp-100", password) as ok:
            ok.publish(b'{"plain": true}')
            ok.wait_all()
        from rpmctl.tools.publish import wait_until

        wait_until(lambda: late_received and ingested, timeout=5, what="the plain message to arrive")
        assert late_received == ["rpm/v1/devices/bp-100/vitals"] and ingested == late_received
        late.disconnect()
        late.loop_stop()
    finally:
        pub.loop_stop()
        ingest.disconnect()
        ingest.loop_stop()


def test_the_broker_keeps_payloads_only_while_ingest_is_away(ingest_up: Settings):
    """Mosquitto's persistence file holds queued payloads in plaintext (hence the encrypted-volume requirement
    in RELIABILITY.md); by design it holds them only until ingest has landed them: devices keep no session and
    subscribe to nothing, retained messages are refused, and ingest drains its queue as soon as it is back."""
    from rpmctl import services
    from rpmctl.services import procs
    from rpmctl.tools.publish import wait_until

    s = ingest_up
    password = keys.new_password()
    broker.set_login(s, "bp-100", password)
    from rpmctl.admin.devices import wait_for_login

    wait_for_login(s, "bp-100", password)
    db = Path(s.broker_dir) / "data" / "mosquitto.db"  # type: ignore[arg-type]

    def saved() -> bytes:
        """Force a persistence save (SIGUSR1) and read the file once it has been rewritten."""
        before = db.stat().st_mtime_ns if db.exists() else 0
        os.kill(procs.read_pid(s, broker.NAME), signal.SIGUSR1)  # type: ignore[arg-type]
        wait_until(lambda: db.exists() and db.stat().st_mtime_ns != before, 10, what="a persistence save")
        return db.read_bytes()

    procs.stop(s, services.INGEST)
    marker = b"queued-while-ingest-was-away-7f3a"
    with DevicePublisher(s, "bp-100", password) as pub:
        for i in range(20):
            pub.publish(b'{"note": "%s-%d"}' % (marker, i))
        pub.wait_all()
    assert marker in saved(), "the queue is not in the persistence file (the requirement would be moot)"
    services.up(s)
    wait_until(lambda: (services.ingest_status(s) or {}).get("acked", 0) >= 20, 20, what="ingest to drain")
    assert marker not in saved()
