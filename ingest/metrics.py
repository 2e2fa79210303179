"""Ingest metrics in the Prometheus text exposition format (prometheus_client), on a loopback HTTP port.

``GET /metrics`` is the exposition, ``GET /healthz`` answers 200 while the service is connected to the broker
and 503 otherwise; any other path is 404.

Threading: the ingest loop is single-threaded and owns every piece of mutable state (including the paho
client). It publishes an immutable :class:`Snapshot` once per iteration; the HTTP thread only ever reads the
latest one (replacing one reference is atomic), so a scrape sees counters from a single instant and never
touches the client. Ages are computed at scrape time from the timestamps in the snapshot.

Nothing here carries PHI: no device ids, topics, payloads or key ids — counts, reasons and ages only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("rpm.ingest.metrics")

PREFIX = "rpm_ingest_"
CONTENT_TYPE = CONTENT_TYPE_LATEST
COUNTER, GAUGE = "counter", "gauge"
# Why ingest.service.quick_mark marks a message (its own checks, then, for a payload not shaped like a JSON
# object, core.payload.parse_json_object's).
# Each is exported at 0 from the first scrape: rate() and the dashboard need a series before the first mark.
MARK_REASONS = ("unknown_topic", "payload_too_large", "not_utf8", "not_json", "not_a_json_object")


@dataclass(frozen=True)
class Snapshot:
    """The ingest loop's state at one instant; times are Unix seconds, None when the event has not happened."""

    received: int = 0
    landed: int = 0
    acked: int = 0
    marked: tuple[tuple[str, int], ...] = ()  # (reason, count), malformed messages landed with a mark
    write_errors: int = 0
    segments_sealed: int = 0
    inflight: int = 0  # landed, waiting for fsync + PUBACK
    connected: bool = False
    open_segment_created: float | None = None
    last_message_at: float | None = None
    started_at: float = 0.0


Value = float | Iterable[tuple[str, float]]  # one sample, or (label value, sample) pairs


@dataclass(frozen=True)
class Spec:
    name: str           # the sample name (counters end in _total)
    kind: str
    help: str
    value: Callable[[Snapshot, float], Value]  # (snapshot, now) -> value
    label: str | None = None
    known: tuple[str, ...] = ()  # label values exported (at 0) before they are first counted


def _age(since: float | None, now: float, never: float) -> float:
    return never if since is None else max(0.0, now - since)


# last_message_age_seconds is NaN until the first message, as client libraries report a summary quantile
# with no observations: it is neither fresh nor stale, so `> threshold` alerts stay quiet, and
# `x != x` (true only for NaN) selects the "nothing received since start" case.
REGISTRY: tuple[Spec, ...] = (
    Spec("messages_received_total", COUNTER, "Messages the broker delivered to this ingest instance.",
         lambda s, now: s.received),
    Spec("messages_landed_total", COUNTER, "Messages appended to a landing segment.",
         lambda s, now: s.landed),
    Spec("messages_acked_total", COUNTER, "Messages acknowledged to the broker, each after its fsync.",
         lambda s, now: s.acked),
    Spec("messages_marked_malformed_total", COUNTER,
         "Messages landed with a malformed mark (they are kept, never dropped), by reason.",
         lambda s, now: s.marked, label="reason", known=MARK_REASONS),
    Spec("write_errors_total", COUNTER, "Landing writes or fsyncs that failed (the broker redelivers).",
         lambda s, now: s.write_errors),
    Spec("segments_sealed_total", COUNTER, "Landing segments sealed and handed to the pipeline.",
         lambda s, now: s.segments_sealed),
    Spec("inflight_messages", GAUGE, "Messages received and landed but not yet fsynced and acked.",
         lambda s, now: s.inflight),
    Spec("connected", GAUGE, "1 while connected to the broker, else 0.",
         lambda s, now: s.connected),
    Spec("oldest_unsealed_segment_age_seconds", GAUGE,
         "Age of the open landing segment (0 when none is open).",
         lambda s, now: _age(s.open_segment_created, now, 0.0)),
    Spec("last_message_age_seconds", GAUGE,
         "Seconds since the last message was received; NaN before the first one.",
         lambda s, now: _age(s.last_message_at, now, math.nan)),
    Spec("start_time_seconds", GAUGE, "Start time of the ingest service since the Unix epoch.",
         lambda s, now: s.started_at),
)


class SnapshotCollector:
    """A prometheus_client collector over the latest published snapshot: every scrape reads one snapshot,
    so its counters come from a single instant; ages are computed at scrape time."""

    def __init__(self, current: Callable[[], Snapshot], clock: Callable[[], float] = time.time):
        self._current, self._clock = current, clock

    def collect(self) -> Iterator[Metric]:
        snapshot, now = self._current(), self._clock()
        for spec in REGISTRY:
            value = spec.value(snapshot, now)
            labels = [spec.label] if spec.label else None
            family: CounterMetricFamily | GaugeMetricFamily = (CounterMetricFamily(PREFIX + spec.name.removesuffix("_total"), spec.help,
                                                  labels=labels)
                              if spec.kind == COUNTER else GaugeMetricFamily(PREFIX + spec.name, spec.help,
                                                                             labels=labels))
            if isinstance(value, int | float):
                family.add_metric([], float(value))
            else:
                for label_value, sample in {**dict.fromkeys(spec.known, 0.0), **dict(value)}.items():
                    family.add_metric([label_value], float(sample))
            yield family


def render(snapshot: Snapshot, now: float | None = None) -> str:
    """The exposition text of ``snapshot`` at ``now`` (default: the current time)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot, (lambda: now) if now is not None else time.time))
    return generate_latest(registry).decode()


class MetricsServer:
    """Serves the latest published snapshot over HTTP from a daemon thread (loopback only by default)."""

    def __init__(self, port: int, host: str = "127.0.0.1", snapshot: Snapshot | None = None):
        self.snapshot = snapshot or Snapshot(started_at=time.time())
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(lambda: self.snapshot))
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        # A short poll keeps stop(), and so the service shutdown, quick; idle polls cost next to nothing.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="rpm-metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def publish(self, snapshot: Snapshot) -> None:
        """Called by the ingest loop; a single reference swap, so readers see the old or the new state."""
        self.snapshot = snapshot

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            path = urlsplit(self.path).path
            if path == "/metrics":
                self._reply(200, generate_latest(server.registry), CONTENT_TYPE)
            elif path == "/healthz" and server.snapshot.connected:
                self._reply(200, b"ok\n")
            elif path == "/healthz":
                self._reply(503, b"not connected\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: keep quiet
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
