"""The ingest service: broker -> landing segments, acking each message only after it is fsynced.

Delivery contract (at-least-once into landing):
- MQTT 5, a stable client id, ``clean_start=False`` on *every* connect and a long session expiry, so the
  broker keeps queueing for us while we are down (paho's default clean start would discard that queue).
- QoS 1 through a plain subscription kept in the persistent session, or a shared subscription
  (``$share/<group>/rpm/v1/#``) when ``ingest_group`` is set so more instances split the stream (Mosquitto
  forgets shared subscriptions on restart: see the setting).
- ``manual_ack``: a PUBACK is sent only after the record is in a landing segment and fsynced. A crash before
  that means the broker redelivers; the warehouse's idempotency key turns that into a counted duplicate.
- The un-acked window (MQTT 5 Receive Maximum) bounds redelivery and stays below the broker's limits.
- A failed write (disk full, I/O error) disconnects without acking, forcing redelivery once we are back.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.keyring import Keyring
from core.landing import SegmentWriter, recover_open_segments
from core.payload import MAX_PAYLOAD_BYTES, parse_json_object
from core.settings import Settings
from core.topics import parse_topic
from ingest.metrics import MetricsServer, Snapshot

log = logging.getLogger("rpm.ingest")

SUBSCRIPTION = "rpm/v1/#"
STATUS_INTERVAL_S = 1.0
HOUSEKEEPING_S = 0.02
KEYRING_POLL_S = 0.25  # how often the landing keyring file is checked for a rotation


def make_client(client_id: str, username: str, password: str, *, ca_file: str | None = None,
                manual_ack: bool = False) -> mqtt.Client:
    """The one place MQTT 5 clients are built (ingest, simulator, tests)."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    client.username_pw_set(username, password)
    if ca_file:
        client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def quick_mark(topic: str, payload: bytes, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> str | None:
    """Why a message is already known to be malformed at the door (it is landed anyway), or None."""
    if parse_topic(topic) is None:
        return "unknown_topic"
    if len(payload) > max_payload_bytes:
        return "payload_too_large"
    _, reason, _ = parse_json_object(payload)
    return reason


@dataclass
class IngestStats:
    received: int = 0
    landed: int = 0
    acked: int = 0
    marked: int = 0
    segments_sealed: int = 0
    write_errors: int = 0
    started_at: float = field(default_factory=time.time)


class IngestService:
    """Runs the receive -> append -> fsync -> ack loop on one thread (no locks around the client)."""

    def __init__(self, settings: Settings, password: str,
                 client_factory: Callable[..., mqtt.Client] = make_client):
        self.s = settings
        self.client = client_factory(settings.ingest_client_id, settings.ingest_username, password,
                                     manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.stats = IngestStats()
        # Landing is encrypted at rest; SIGHUP reloads the keyring after `rpm keys rotate`.
        self.keyring = Keyring.load(settings, "landing")
        self._keyring_seen = _file_identity(self.keyring.path)
        self._keyring_checked = 0.0
        self._reload_keys = False
        self._pending: list[tuple[int, int]] = []  # (mid, qos) appended but not yet fsynced/acked
        self._oldest_pending = 0.0
        self._writer: SegmentWriter | None = None
        self._segment_counter = 0
        self._stop = False
        self._seal_requested = False
        self._write_failed = False
        self.connected = False
        self.subscribed = False  # ready = connected and the subscription confirmed (SUBACK)
        self._status_written = 0.0
        self._marked_by_reason: dict[str, int] = {}
        self._last_message_at: float | None = None
        self.metrics: MetricsServer | None = None
        self.status_file = Path(settings.run_dir) / f"ingest-{settings.ingest_client_id}.json"

    def write_status(self) -> None:
        """A small JSON file `rpm status` and the start-up wait read (counters only, no payloads)."""
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_file.with_suffix(".tmp")
        try:
            # landing_key: the key this instance seals with now; `rpm keys rotate` waits for every live
            # instance (fresh `updated`) to report the new one before it retires anything.
            tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "client_id": self.s.ingest_client_id, "connected": self.connected,
                                       "subscribed": self.subscribed, "updated": time.time(),
                                       "landing_key": self.keyring.active, **asdict(self.stats)}))
            os.replace(tmp, self.status_file)
        except OSError as exc:  # status is advisory; never let it stop ingestion
            log.warning("could not write status file: %s", exc)
        self._status_written = time.monotonic()

    # --- MQTT callbacks (run inside client.loop on our thread) ----------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused connection: %s", reason_code)
            return
        self.connected = True
        log.info("connected (session present=%s)", flags.session_present)
        self.write_status()
        self.publish_metrics()
        # Re-subscribing is harmless with a persistent session and needed after session expiry (and after a
        # Mosquitto restart for a shared subscription, which it does not persist).
        topic = f"$share/{self.s.ingest_group}/{SUBSCRIPTION}" if self.s.ingest_group else SUBSCRIPTION
        client.subscribe(topic, options=SubscribeOptions(qos=1))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subscribed = all(not rc.is_failure for rc in reason_codes)
        if not self.subscribed:
            log.error("broker refused the subscription: %s", reason_codes)
        self.write_status()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected = False
        self.subscribed = False
        # Anything received but not acked will be redelivered by the broker: forget it here.
        self._pending.clear()
        log.warning("disconnected: %s", reason_code)
        self.write_status()
        self.publish_metrics()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage):
        self.stats.received += 1
        self._last_message_at = time.time()
        if self._write_failed:
            return  # we are about to disconnect; leave it un-acked for redelivery
        payload = bytes(msg.payload)  # paho may hand a bytearray
        mark = quick_mark(msg.topic, payload, self.s.max_payload_bytes)
        try:
            writer = self._writer_for_append()
            writer.append(msg.topic, payload, datetime.now(UTC), mark)
        except OSError as exc:
            self._fail_write(exc)
            return
        self.stats.landed += 1
        self.stats.marked += mark is not None
        if mark is not None:
            self._marked_by_reason[mark] = self._marked_by_reason.get(mark, 0) + 1
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append((msg.mid, msg.qos))

    def publish_metrics(self) -> None:
        """Hand the metrics thread an immutable copy of our state (it never reads this object directly)."""
        if self.metrics is None:
            return
        st, w = self.stats, self._writer
        self.metrics.publish(Snapshot(
            received=st.received, landed=st.landed, acked=st.acked, marked=tuple(self._marked_by_reason.items()),
            write_errors=st.write_errors, segments_sealed=st.segments_sealed, inflight=len(self._pending),
            connected=self.connected, open_segment_created=w.created.timestamp() if w is not None else None,
            last_message_at=self._last_message_at, started_at=st.started_at))

    # --- landing -------------------------------------------------------------------------------------
    def _writer_for_append(self) -> SegmentWriter:
        if self._writer is None:
            self._segment_counter += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            name = f"{self.s.ingest_client_id}-{stamp}-{self._segment_counter:06d}"
            self._writer = SegmentWriter(self.s.landing_dir, name, keyring=self.keyring)
        return self._writer

    def _fail_write(self, exc: OSError) -> None:
        self.stats.write_errors += 1
        log.error("landing write failed (%s): disconnecting so the broker redelivers", exc)
        self._write_failed = True
        self._pending.clear()
        if self._writer is not None:
            try:
                self._writer.close_unsealed()
            except OSError:
                pass
            self._writer = None
        self.client.disconnect()

    def flush(self) -> None:
        """fsync everything appended, then ack it: the only place PUBACKs are sent."""
        if not self._pending or self._writer is None:
            return
        try:
            self._writer.sync()
        except OSError as exc:
            self._fail_write(exc)
            return
        for mid, qos in self._pending:
            if qos > 0:
                self.client.ack(mid, qos)
        self.stats.acked += len(self._pending)
        self._pending.clear()

    def seal(self) -> None:
        """Flush, ack, and hand the current segment to the pipeline."""
        self.flush()
        if self._writer is not None and self._writer.records and not self._write_failed:
            try:
                path = self._writer.seal()
            except OSError as exc:
                self._fail_write(exc)
                return
            self.stats.segments_sealed += 1
            log.info("sealed %s (%d records)", path.name, self._writer.records)
            self._writer = None
            self.write_status()

    def _seal_due(self) -> bool:
        w = self._writer
        if w is None or not w.records:
            return False
        age = (datetime.now(UTC) - w.created).total_seconds()
        return self._seal_requested or w.bytes >= self.s.segment_max_bytes or age >= self.s.segment_max_age_s

    # --- lifecycle -----------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop = True

    def request_seal(self, *_: object) -> None:
        self._seal_requested = True

    def request_key_reload(self, *_: object) -> None:
        self._reload_keys = True

    def connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.s.ingest_session_expiry_s
        props.ReceiveMaximum = self.s.ingest_receive_maximum
        # Its own listener, where only the ingest login is accepted: device logins cannot take this session.
        self.client.connect(self.s.broker_host, self.s.broker_ingest_port, keepalive=30, clean_start=False,
                            properties=props)

    def run(self, install_signals: bool = True) -> IngestStats:
        """Serve until SIGTERM/SIGINT; SIGUSR1 seals the open segment now (used by `rpm pipeline run`),
        SIGHUP seals and reloads the landing keyring (used by `rpm keys rotate`)."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGUSR1, self.request_seal)
            signal.signal(signal.SIGHUP, self.request_key_reload)
        self.metrics = self._start_metrics()
        try:
            return self._serve()
        finally:
            if self.metrics is not None:
                self.metrics.stop()

    def _start_metrics(self) -> MetricsServer | None:
        if self.s.ingest_metrics_port <= 0:
            return None
        try:
            server = MetricsServer(self.s.ingest_metrics_port, host=self.s.metrics_bind,
                                   snapshot=Snapshot(started_at=self.stats.started_at))
        except OSError as exc:  # metrics are advisory, like the status file: never let them stop ingestion
            log.error("metrics disabled: cannot listen on %s:%d (%s)", self.s.metrics_bind,
                      self.s.ingest_metrics_port, exc)
            return None
        log.info("metrics on http://%s:%d/metrics", self.s.metrics_bind, server.port)
        return server.start()

    def _serve(self) -> IngestStats:
        recovered = recover_open_segments(self.s.landing_dir, self.s.ingest_client_id, self.keyring)
        if recovered:
            log.info("recovered %d segment(s) left open by a previous run", len(recovered))
        self._connect_with_retry()
        flush_s = self.s.ingest_flush_interval_ms / 1000
        housekeeping_at = 0.0
        while not self._stop:
            self.client.loop(timeout=flush_s / 2)  # paho reads one packet per call
            now = time.monotonic()
            if self._pending and (now - self._oldest_pending >= flush_s
                                  or len(self._pending) >= self.s.ingest_receive_maximum // 2):
                self.flush()
            # Everything else at most every HOUSEKEEPING_S, not once per packet (profiled: the metrics
            # snapshot and the seal check cost as much as landing a small message).
            if now - housekeeping_at < HOUSEKEEPING_S and not (self._stop or self._reload_keys
                                                                or self._seal_requested or not self.connected):
                continue
            housekeeping_at = now
            if now - self._keyring_checked >= KEYRING_POLL_S:
                # Rotation writes a new keyring file; every instance notices it here, with or without the
                # SIGHUP a pid file allows (compose, systemd and extra instances have none).
                self._keyring_checked = now
                self._reload_keys |= _file_identity(self.keyring.path) != self._keyring_seen
            if self._reload_keys:
                # Seal first: a segment is written under one key, so rotation can re-encrypt it whole.
                self.seal()
                self.keyring = Keyring.load(self.s, "landing")
                self._keyring_seen = _file_identity(self.keyring.path)
                self._reload_keys = False
                log.info("landing keyring reloaded (active key %s)", self.keyring.active)
                self.write_status()
            if self._seal_due():
                self.seal()
                self._seal_requested = False
            elif self._seal_requested and (self._writer is None or not self._writer.records):
                self._seal_requested = False
            if not self.connected:
                self._connect_with_retry()
            if time.monotonic() - self._status_written >= STATUS_INTERVAL_S:
                self.write_status()
            self.publish_metrics()
        self.seal()
        # Normal DISCONNECT keeps the session (expiry > 0): the broker queues for us until we return.
        self.client.disconnect()
        self.client.loop(timeout=0.5)
        self.connected = False
        self.write_status()
        self.publish_metrics()
        log.info("stopped: %s", self.stats)
        return self.stats

    def _connect_with_retry(self) -> None:
        delay = 0.2
        while not self._stop:
            if self._write_failed:
                self._write_failed = not _landing_writable(self.s)
                if self._write_failed:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                # Space is back: seal what the failed writer had already acked, so the pipeline sees it.
                recover_open_segments(self.s.landing_dir, self.s.ingest_client_id, self.keyring)
                log.info("landing writable again; reconnecting")
            try:
                self.connect()
            except OSError as exc:
                log.warning("broker not reachable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            deadline = time.monotonic() + 10
            while not self.connected and time.monotonic() < deadline and not self._stop:
                self.client.loop(timeout=0.1)
            if self.connected:
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def main(s: Settings) -> int:
    """`rpm ingest`: run the service in the foreground until SIGTERM."""
    from core import keys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = IngestService(s, keys.service_password(s, "ingest"))
    service.run()
    return 0


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file: the keyring is replaced atomically, so a new key means a new inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _landing_writable(s: Settings) -> bool:
    probe = s.landing_dir / ".write-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        return True
    except OSError:
        return False
