"""The ingest service: broker -> landing segments, acking each message only after it is fsynced.

Delivery contract (at-least-once into landing):
- MQTT 5, a stable client id, ``clean_start=False`` on *every* connect and a long session expiry, so the
  broker keeps queueing for us while we are down (paho's default clean start would discard that queue).
- QoS 1 through a plain subscription kept in the persistent session, or a shared subscription
  (``$share/<group>/rpm/v1/#``) when ``ingest_group`` is set so more instances split the stream (Mosquitto
  forgets shared subscriptions on restart: see the setting).
- ``manual_ack``: a PUBACK is sent only after the record is in a landing segment and fsynced. A crash before
  that means the broker redelivers; the warehouse's idempotency key turns that into a counted duplicate.
- Group commit: the records received while one fsync runs (on a helper thread, so the loop keeps reading)
  become the next landing block; when that fsync returns, its group's PUBACKs go out together.
- The un-acked window (MQTT 5 Receive Maximum) bounds redelivery and stays below the broker's limits.
- A failed write (disk full, I/O error) disconnects without acking, forcing redelivery once we are back.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
# A group is committed (written as one landing block, fsynced, acked) once the previous fsync is done and it
# holds this many records — or its oldest record has waited RPM_INGEST_FLUSH_INTERVAL_MS. Fewer, larger
# blocks: cheaper for the disk and for the pipeline, which decrypts one block at a time.
GROUP_MIN_RECORDS = 64
MAX_PACKETS_PER_WAKE = 1000  # then acks, seals and metrics get their turn
READ_AHEAD_BYTES = 256 * 1024
_PUBACK = struct.Struct("!BBH")  # fixed header (PUBACK, remaining length 2) and packet id: reason "success"


class BufferedClient(mqtt.Client):
    """paho's MQTT 5 client, reading the socket ahead and writing a group's PUBACKs as one packet run.

    paho 2.2 reads one packet per ``loop_read()`` (``max_packets`` is ignored) in two or three ``recv()`` calls
    of a few bytes each, and sends each PUBACK on its own. Here ``recv`` fills a buffer of up to
    READ_AHEAD_BYTES that the following packets are cut from, ``drained`` says whether the socket had nothing
    more, and ``ack_many`` queues one write for a whole group. Both hook paho's internals (``_sock_recv``,
    ``_packet_queue``), so paho is pinned; tests/unit/test_ingest_client.py checks them against a socket.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ahead = b""
        self._ahead_at = 0
        self._ahead_sock: object = None
        self.drained = True  # the last read found the socket empty (nothing buffered here either)

    def buffered(self) -> bool:
        """Bytes already read from the socket and not yet handed to paho (select() cannot see them)."""
        return self._ahead_at < len(self._ahead) and self._ahead_sock is self._sock

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._ahead_sock is not self._sock:  # a new connection: nothing read on the old one belongs to it
            self._ahead, self._ahead_at, self._ahead_sock = b"", 0, self._sock
        if self._ahead_at >= len(self._ahead):
            try:
                data = super()._sock_recv(max(bufsize, READ_AHEAD_BYTES))
            except BlockingIOError:
                self.drained = True
                raise
            self.drained = False
            if len(data) <= bufsize:
                return data  # also b"": the broker closed the connection
            self._ahead, self._ahead_at = data, 0
        at = self._ahead_at
        self._ahead_at = at + bufsize
        return self._ahead[at:at + bufsize]

    def ack_many(self, acks: list[tuple[int, int]]) -> None:
        """PUBACK every QoS 1 message of ``acks`` ((mid, qos) pairs) in one queued write, in order."""
        run = b"".join([_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid, qos in acks if qos == 1])
        if run:
            self._packet_queue(mqtt.PUBACK, run, 0, 0)
        for mid, qos in acks:
            if qos == 2:  # the subscription asks for QoS 1, so the broker never sends 2: kept correct anyway
                self.ack(mid, qos)


def make_client(client_id: str, username: str, password: str, *, ca_file: str | None = None,
                manual_ack: bool = False, buffered: bool = False) -> mqtt.Client:
    """The one place MQTT 5 clients are built (ingest, simulator, tests). ``buffered``: ingest's client, for
    a loop that reads until ``drained`` (paho's own loop would not see what it buffered: not for loop())."""
    cls = BufferedClient if buffered else mqtt.Client
    client = cls(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                 protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    client.username_pw_set(username, password)
    if ca_file:
        client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def make_ingest_client(client_id: str, username: str, password: str, *, ca_file: str | None = None,
                       manual_ack: bool = True) -> mqtt.Client:
    return make_client(client_id, username, password, ca_file=ca_file, manual_ack=manual_ack, buffered=True)


def quick_mark(topic: str, payload: bytes, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> str | None:
    """Why a message is already known to be malformed at the door (it is landed anyway), or None.

    Only what is cheap to know: the topic, the size, UTF-8, and whether it is shaped like a JSON object
    (``{`` … ``}``). Such a payload is not parsed here — the pipeline parses every payload once and
    quarantines one that is not JSON after all — and anything else, rare, is classified in full.
    """
    if parse_topic(topic) is None:
        return "unknown_topic"
    if len(payload) > max_payload_bytes:
        return "payload_too_large"
    if not payload.isascii():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return "not_utf8"
    if payload[:1] == b"{" and payload[-1:] == b"}":
        return None
    body = payload.strip(b" \t\r\n")  # JSON's whitespace
    if body[:1] == b"{" and body[-1:] == b"}":
        return None
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
    """Runs the receive -> append -> fsync -> ack loop on one thread (no locks around the client); only the
    fsync itself runs on a helper thread, handed the writer and nothing else."""

    def __init__(self, settings: Settings, password: str,
                 client_factory: Callable[..., mqtt.Client] = make_ingest_client):
        self.s = settings
        self.client = client_factory(settings.ingest_client_id, settings.ingest_username, password,
                                     manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        # Our own select() loop writes what paho queues (so a group's acks go out together, not one by one).
        self.client.on_socket_register_write = _ignore
        self.stats = IngestStats()
        # Landing is encrypted at rest; SIGHUP reloads the keyring after `rpm keys rotate`.
        self.keyring = Keyring.load(settings, "landing")
        self._keyring_seen = _file_identity(self.keyring.path)
        self._keyring_checked = 0.0
        self._reload_keys = False
        self._pending: list[tuple[int, int]] = []  # (mid, qos) appended, not yet in a written block
        self._syncing: list[tuple[int, int]] = []  # (mid, qos) written, their fsync running
        self._fsync: Future[None] | None = None
        self._fsyncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rpm-ingest-fsync")
        self._wake_r, self._wake_w = socket.socketpair()  # the fsync thread wakes our select()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
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
        self._last_message_us: int | None = None
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

    # --- MQTT callbacks (run inside client.loop_read on our thread) ------------------------------------
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
        # Anything received but not acked will be redelivered by the broker: forget it here (an fsync still
        # running acks nothing when it returns: its message ids belonged to that connection).
        self._pending.clear()
        self._syncing = []
        log.warning("disconnected: %s", reason_code)
        self.write_status()
        self.publish_metrics()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage):
        self.stats.received += 1
        now_us = time.time_ns() // 1000
        self._last_message_us = now_us
        if self._write_failed:
            return  # we are about to disconnect; leave it un-acked for redelivery
        payload = bytes(msg.payload)  # paho may hand a bytearray
        topic = msg.topic
        mark = quick_mark(topic, payload, self.s.max_payload_bytes)
        try:
            writer = self._writer or self._new_writer()
            writer.append_us(topic, payload, now_us, mark)
        except OSError as exc:
            self._fail_write(exc)
            return
        self.stats.landed += 1
        if mark is not None:
            self.stats.marked += 1
            self._marked_by_reason[mark] = self._marked_by_reason.get(mark, 0) + 1
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append((msg.mid, msg.qos))

    def publish_metrics(self) -> None:
        """Hand the metrics thread an immutable copy of our state (it never reads this object directly)."""
        if self.metrics is None:
            return
        st, w = self.stats, self._writer
        last = self._last_message_us / 1e6 if self._last_message_us is not None else None
        self.metrics.publish(Snapshot(
            received=st.received, landed=st.landed, acked=st.acked, marked=tuple(self._marked_by_reason.items()),
            write_errors=st.write_errors, segments_sealed=st.segments_sealed,
            inflight=len(self._pending) + len(self._syncing), connected=self.connected,
            open_segment_created=w.created.timestamp() if w is not None else None,
            last_message_at=last, started_at=st.started_at))

    # --- landing -------------------------------------------------------------------------------------
    def _new_writer(self) -> SegmentWriter:
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
        self._syncing = []
        self._settle_fsync()  # the writer's file is closed below: no fsync may still be using it
        if self._writer is not None:
            try:
                self._writer.close_unsealed()
            except OSError:
                pass
            self._writer = None
        self.client.disconnect()

    def _ack(self, acks: list[tuple[int, int]]) -> None:
        """PUBACK what is durable: the only place acks are sent."""
        ack_many = getattr(self.client, "ack_many", None)
        if ack_many is not None:
            ack_many(acks)
        else:  # a client without the batched path (tests' fakes)
            for mid, qos in acks:
                if qos > 0:
                    self.client.ack(mid, qos)
        self.stats.acked += len(acks)

    def _settle_fsync(self) -> OSError | None:
        """Wait for the running fsync, if any; ack its group when it succeeded (the error otherwise)."""
        future, self._fsync = self._fsync, None
        if future is None:
            return None
        try:
            future.result()
        except OSError as exc:
            self._syncing = []
            return exc
        acks, self._syncing = self._syncing, []
        if acks:
            self._ack(acks)
        return None

    def commit(self, now: float) -> None:
        """Group commit, never blocking: ack the group whose fsync returned, then write the records received
        meanwhile as one block and start its fsync on the helper thread (the loop keeps reading)."""
        if self._fsync is not None and not self._fsync.done():
            return
        writer = self._writer_to_flush()
        if writer is None:
            return
        if len(self._pending) < GROUP_MIN_RECORDS and now - self._oldest_pending < self._flush_s:
            return
        try:
            writer.flush_block()
        except OSError as exc:
            self._fail_write(exc)
            return
        self._syncing, self._pending = self._pending, []
        self._fsync = self._fsyncer.submit(writer.fsync)
        self._fsync.add_done_callback(self._wake)

    def _writer_to_flush(self) -> SegmentWriter | None:
        """Settle the group in flight (acked, or the write failed); then the writer whose appended records wait
        for a block, or None when there are none."""
        error = self._settle_fsync()
        if error is not None:
            self._fail_write(error)
            return None
        return self._writer if self._pending else None

    def _wake(self, _: Future[None]) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the pipe is full (the loop will look anyway) or closed at shutdown

    def flush(self) -> None:
        """fsync everything appended, then ack it (waits for the disk: used when sealing and stopping)."""
        writer = self._writer_to_flush()
        if writer is None:
            return
        try:
            writer.sync()
        except OSError as exc:
            self._fail_write(exc)
            return
        acks, self._pending = self._pending, []
        self._ack(acks)

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
            self._fsyncer.shutdown(wait=True)
            self._wake_r.close()
            self._wake_w.close()

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

    @property
    def _flush_s(self) -> float:
        return self.s.ingest_flush_interval_ms / 1000

    def pump(self, timeout: float) -> None:
        """One turn of the network loop: wait for the socket (or the fsync thread) at most ``timeout``
        seconds, read every packet already buffered, write what paho queued (acks, pings, subscribes)."""
        client = self.client
        sock = client.socket()
        if sock is None:
            time.sleep(min(timeout, 0.05))
            return
        buffered = getattr(client, "buffered", None)
        if buffered is not None and buffered():
            timeout = 0.0  # packets already read from the socket: select() cannot see them
        readable, writable, _ = select.select([sock, self._wake_r], [sock] if client.want_write() else [], [],
                                              timeout)
        if self._wake_r in readable:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        if sock in readable or timeout == 0.0:
            self._read_available()
        if client.want_write():
            client.loop_write()

    def _read_available(self) -> None:
        """Every packet the socket holds now (paho's loop_read takes one), bounded per turn — and cut short
        when a group can be committed: reading on while an fsync has returned would hold its acks back and
        let the un-acked window fill, so reading and fsyncing would take turns instead of overlapping."""
        client = self.client
        if not hasattr(client, "drained"):
            client.loop_read()
            return
        client.drained = False
        for i in range(MAX_PACKETS_PER_WAKE):
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or client.drained or client.socket() is None:
                return
            if i % 16 == 15 and self._commit_ready():
                return

    def _commit_ready(self) -> bool:
        if self._fsync is not None:
            return self._fsync.done()
        return len(self._pending) >= GROUP_MIN_RECORDS

    def _serve(self) -> IngestStats:
        recovered = recover_open_segments(self.s.landing_dir, self.s.ingest_client_id, self.keyring)
        if recovered:
            log.info("recovered %d segment(s) left open by a previous run", len(recovered))
        self._connect_with_retry()
        housekeeping_at = 0.0
        while not self._stop:
            self.pump(HOUSEKEEPING_S if self._pending or self._fsync is not None else self._flush_s)
            now = time.monotonic()
            self.commit(now)
            if self.client.want_write():
                self.client.loop_write()  # the group's acks, now
            # Everything else at most every HOUSEKEEPING_S, not once per packet (profiled: the metrics
            # snapshot and the seal check cost as much as landing a small message).
            if now - housekeeping_at < HOUSEKEEPING_S and not (self._stop or self._reload_keys
                                                                or self._seal_requested or not self.connected):
                continue
            housekeeping_at = now
            self.client.loop_misc()  # keepalive
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
        deadline = time.monotonic() + 0.5
        while self.client.socket() is not None and self.client.want_write() and time.monotonic() < deadline:
            self.pump(0.05)
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
                self.pump(0.1)
                if self.client.socket() is None:
                    break  # refused or closed: retry after the delay
            if self.connected:
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _ignore(*_: object) -> None:
    """paho's write-registration callback: our loop asks ``want_write()`` itself."""


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
