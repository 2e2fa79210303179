"""Airflow's StatsD metrics as Prometheus metrics: a small UDP receiver inside `rpm metrics`.

Airflow pushes StatsD lines (``airflow.scheduler_heartbeat:1|c``); Prometheus pulls. The usual bridge is
Prometheus' statsd_exporter, which Debian does not package, so this receiver does the part we need: counters
(``|c``, honouring the sample rate ``|@0.1``), gauges (``|g``, a signed value is a change) and timers
(``|ms``, a histogram in seconds). The local stack turns on Airflow's InfluxDB-style tags and turns off its
legacy names (rpmctl/services/airflow_stack.py), so a DAG or task id arrives as a tag
(``airflow.ti.finish,dag_id=rpm_pipeline,task_id=load,state=success:1|c``) and becomes a label
(``airflow_ti_finish_total{dag_id="rpm_pipeline",...}``) instead of a new metric name per task.

Names: ``airflow.`` + the StatsD name with every character other than a letter, digit or ``_`` made ``_``;
counters end in ``_total``, timers in ``_seconds``. Only names under the ``airflow.`` prefix are kept, and at
most ``max_series`` series: the port takes unauthenticated datagrams, so what anyone on it sends must not grow
memory without bound. What is refused is counted in ``rpm_pipeline_statsd_lines_total{outcome}``.
"""

from __future__ import annotations

import logging
import math
import re
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.utils import floatToGoString

log = logging.getLogger("rpm.metrics.statsd")

PREFIX = "airflow"
# Seconds: task and parse times from milliseconds to an hour-long DAG run.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
           math.inf)
OUTCOMES = ("accepted", "malformed", "unsupported", "foreign", "negative_counter", "type_conflict",
            "too_many_series")
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")

Labels = tuple[tuple[str, str], ...]


class Refused(ValueError):
    """A StatsD line that does not become a sample; ``outcome`` says why (one of OUTCOMES)."""

    def __init__(self, outcome: str):
        super().__init__(outcome)
        self.outcome = outcome


@dataclass
class _Family:
    kind: str                       # counter | gauge | histogram
    source: str                     # the StatsD name, for HELP
    series: dict[Labels, list[float]] = field(default_factory=dict)
    # counter, gauge: [value]; histogram: [count per bucket..., sum, count]


@dataclass(frozen=True)
class Line:
    """One parsed StatsD line."""
    family: str                     # the Prometheus family name
    kind: str
    source: str
    labels: Labels
    value: float
    delta: bool = False             # a gauge's signed value: add it


def _name(text: str) -> str:
    name = _NOT_NAME.sub("_", text)
    return name if name[:1].isalpha() or name[:1] == "_" else f"_{name}"


def parse_line(line: str) -> Line:
    """One StatsD line as a sample; Refused when it is not one we keep."""
    try:
        name_and_tags, rest = line.split(":", 1)
        value_text, kind, *extras = rest.split("|")
        value = float(value_text)
        rate = next((float(e[1:]) for e in extras if e.startswith("@")), 1.0)
    except ValueError:
        raise Refused("malformed") from None
    if not math.isfinite(value) or not 0 < rate <= 1:
        raise Refused("malformed")
    source, *tags = name_and_tags.split(",")
    if not source.startswith(PREFIX + "."):
        raise Refused("foreign")
    labels = []
    for tag in tags:
        key, sep, tag_value = tag.partition("=")
        if not sep or not key:
            raise Refused("malformed")
        label = _name(key)
        # "__…" is reserved to Prometheus, "le" is a histogram's bucket bound.
        labels.append((f"tag{label}" if label.startswith("__") or label == "le" else label, tag_value))
    base, labelled = _name(source), tuple(sorted(labels))
    if kind == "c":
        if value < 0:  # Airflow's decr(): a Prometheus counter never goes down
            raise Refused("negative_counter")
        return Line(base, "counter", source, labelled, value / rate)
    if kind == "g":
        return Line(base, "gauge", source, labelled, value, delta=value_text[:1] in "+-")
    if kind == "ms":
        return Line(f"{base}_seconds", "histogram", source, labelled, value / 1000)
    raise Refused("unsupported")  # sets, DogStatsD distributions and the like: Airflow sends none here


class StatsdStore:
    """The samples received so far; ``feed`` from the UDP thread, ``collect`` from scrape threads."""

    def __init__(self, max_series: int = 10_000):
        self.max_series = max_series
        self._families: dict[str, _Family] = {}
        self._series = 0
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()

    def feed(self, datagram: bytes) -> None:
        """One datagram: one line or several separated by newlines."""
        for raw in datagram.decode("utf-8", "replace").splitlines():
            if raw.strip():
                self._add(raw.strip())

    def _add(self, raw: str) -> None:
        try:
            line = parse_line(raw)
        except Refused as exc:
            self._count(exc.outcome)
            return
        with self._lock:
            family = self._families.get(line.family)
            if family is None:
                family = self._families[line.family] = _Family(line.kind, line.source)
            elif family.kind != line.kind:  # the same name sent as two types: the first one stays
                self._outcomes["type_conflict"] += 1
                return
            state = family.series.get(line.labels)
            if state is None:
                if self._series >= self.max_series:
                    self._outcomes["too_many_series"] += 1
                    return
                self._series += 1
                state = family.series[line.labels] = [0.0] * (len(BUCKETS) + 2 if line.kind == "histogram" else 1)
            _update(state, line)
            self._outcomes["accepted"] += 1

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = {name: (f.kind, f.source, {k: list(v) for k, v in f.series.items()})
                        for name, f in self._families.items()}
            outcomes = dict(self._outcomes)
        lines = CounterMetricFamily("rpm_pipeline_statsd_lines", "StatsD lines received from Airflow by outcome: "
                                    "accepted, or why one was dropped.", labels=["outcome"])
        for outcome, n in outcomes.items():
            lines.add_metric([outcome], n)
        yield lines
        for name, (kind, source, series) in sorted(families.items()):
            yield _family(name, kind, source, series)


def _update(state: list[float], line: Line) -> None:
    if line.kind == "counter":
        state[0] += line.value
    elif line.kind == "gauge":
        state[0] = state[0] + line.value if line.delta else line.value
    else:
        for i, bound in enumerate(BUCKETS):
            if line.value <= bound:
                state[i] += 1
        state[-2] += line.value
        state[-1] += 1


def _family(name: str, kind: str, source: str, series: dict[Labels, list[float]]) -> Metric:
    what = {"counter": "counter", "gauge": "gauge", "histogram": "timer (seconds)"}[kind]
    metric = Metric(name, f"Airflow StatsD {what} {source}, received by rpm metrics.", kind)
    for labels, state in sorted(series.items()):
        tags = dict(labels)
        if kind == "counter":
            metric.add_sample(f"{name}_total", tags, state[0])
        elif kind == "gauge":
            metric.add_sample(name, tags, state[0])
        else:
            for bound, count in zip(BUCKETS, state, strict=False):
                metric.add_sample(f"{name}_bucket", {**tags, "le": floatToGoString(bound)}, count)
            metric.add_sample(f"{name}_sum", tags, state[-2])
            metric.add_sample(f"{name}_count", tags, state[-1])
    return metric


class StatsdReceiver:
    """A UDP listener feeding a StatsdStore from a daemon thread."""

    def __init__(self, store: StatsdStore, port: int, host: str = "127.0.0.1"):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                store.feed(self.request[0])

        self._server = socketserver.UDPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,), name="rpm-statsd",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> StatsdReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
