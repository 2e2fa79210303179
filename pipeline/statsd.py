"""Airflow's StatsD metrics as Prometheus metrics: a small UDP receiver inside `rpm metrics`.

Airflow pushes StatsD lines (``airflow.scheduler_heartbeat:1|c``); Prometheus pulls. The usual bridge is
Prometheus' statsd_exporter, which Debian does not package, so this receiver does the part we need: counters
(``|c``, honouring the sample rate ``|@0.1``), gauges (``|g``, a signed value is a change) and timers
(``|ms``, a histogram in seconds). The local stack turns on Airflow's InfluxDB-style tags and turns off its
legacy names (rpmctl/services/airflow_stack.py), so a DAG or task id arrives as a tag
(``airflow.ti.finish,dag_id=rpm_pipeline,task_id=load,state=success:1|c``) and becomes a label
(``airflow_ti_finish_total{dag_id="rpm_pipeline",...}``) instead of a new metric name per task.

Names: ``airflow.`` + the StatsD name with every character other than a letter, digit or ``_`` made ``_``;
counters end in ``_total``, timers in ``_seconds``. A name that would put a second HELP/TYPE (or a sample of
another family) into the exposition is refused: the first family to claim it stays.

The port takes unauthenticated datagrams, so what anyone on it sends must not grow memory or the scrape without
bound: only names under the ``airflow.`` prefix are kept, names, label keys, label values and the number of
labels are bounded, and the store holds at most ``max_families`` families, ``max_series`` series (a timer's
buckets, sum and count each count, as in Prometheus) and ``max_bytes`` of exposition; every cap is checked
before anything is created. What is refused is counted in ``rpm_pipeline_statsd_lines_total{outcome}``.
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
OUTCOMES = ("accepted", "malformed", "unsupported", "foreign", "negative_counter", "too_long", "too_many_labels",
            "type_conflict", "name_collision", "too_many_families", "too_many_series")
# Airflow validates its stat names to at most 250 characters (metrics/validators.py), and DAG and task ids are
# at most 250 (ID_LEN); its tags are a handful (dag_id, task_id, state, ...).
MAX_NAME = 250
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 250
MAX_LABELS = 10
_SAMPLE_OVERHEAD = 32  # a sample line's value, braces, quotes and newline, roughly
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
    if len(source) > MAX_NAME:
        raise Refused("too_long")
    if len(tags) > MAX_LABELS:
        raise Refused("too_many_labels")
    labels = []
    for tag in tags:
        key, sep, tag_value = tag.partition("=")
        if not sep or not key:
            raise Refused("malformed")
        if len(key) > MAX_LABEL_KEY or len(tag_value) > MAX_LABEL_VALUE:
            raise Refused("too_long")
        label = _name(key)
        # "__…" is reserved to Prometheus, "le" is a histogram's bucket bound.
        labels.append((f"tag{label}" if label.startswith("__") or label == "le" else label, tag_value))
    base, labelled = _name(source), tuple(sorted(labels))
    if len(dict(labelled)) < len(labelled):  # the same label twice: one series cannot carry both values
        raise Refused("malformed")
    if kind == "c":
        if value < 0:  # Airflow's decr(): a Prometheus counter never goes down
            raise Refused("negative_counter")
        if not math.isfinite(value / rate):
            raise Refused("malformed")
        return Line(base, "counter", source, labelled, value / rate)
    if kind == "g":
        return Line(base, "gauge", source, labelled, value, delta=value_text[:1] in "+-")
    if kind == "ms":
        return Line(f"{base}_seconds", "histogram", source, labelled, value / 1000)
    raise Refused("unsupported")  # sets, DogStatsD distributions and the like: Airflow sends none here


class StatsdStore:
    """The samples received so far; ``feed`` from the UDP thread, ``collect`` from scrape threads."""

    def __init__(self, max_series: int = 10_000, max_families: int = 1_000, max_bytes: int = 4_000_000):
        self.max_series, self.max_families, self.max_bytes = max_series, max_families, max_bytes
        self._families: dict[str, _Family] = {}
        self._claimed: dict[str, str] = {}  # every name in the exposition -> the family that emits it
        self._series = 0
        self.size = 0                       # bytes of exposition the families and series held would render
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
            if family is not None and family.kind != line.kind:  # the same name sent as two types: the first stays
                self._outcomes["type_conflict"] += 1
                return
            state = family.series.get(line.labels) if family is not None else None
            if state is None:
                refused = self._room_for(line, new_family=family is None)
                if refused:
                    self._outcomes[refused] += 1
                    return
                if family is None:
                    family = self._families[line.family] = _Family(line.kind, line.source)
                    self._claimed.update(dict.fromkeys(exposed_names(line.family, line.kind), line.family))
                    self.size += _family_size(line)
                self._series += _series_per_labels(line.kind)
                self.size += _series_size(line)
                state = family.series[line.labels] = [0.0] * _series_per_labels(line.kind)
            _update(state, line)
            self._outcomes["accepted"] += 1

    def _room_for(self, line: Line, new_family: bool) -> str | None:
        """Why a new series (and maybe family) for ``line`` cannot be held, or None; nothing is created here."""
        size = _series_size(line)
        if new_family:
            if any(name in self._claimed for name in exposed_names(line.family, line.kind)):
                return "name_collision"
            if len(self._families) >= self.max_families:
                return "too_many_families"
            size += _family_size(line)
        if self._series + _series_per_labels(line.kind) > self.max_series or self.size + size > self.max_bytes:
            return "too_many_series"
        return None

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


def exposed_names(family: str, kind: str) -> tuple[str, ...]:
    """Every name a family puts into the exposition, in the Prometheus text format and in OpenMetrics (where a
    counter's HELP/TYPE name has no ``_total``): two families must never share one."""
    if kind == "counter":
        return family, f"{family}_total", f"{family}_created"
    if kind == "histogram":
        return family, f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_created"
    return (family,)


def _series_per_labels(kind: str) -> int:
    return len(BUCKETS) + 2 if kind == "histogram" else 1


def _escaped(text: str) -> int:
    return 2 * len(text.encode())  # UTF-8 bytes, doubled at worst by escaping


def _family_size(line: Line) -> int:
    """An upper bound on the bytes of a family's HELP and TYPE lines (its names are ASCII)."""
    return 2 * (len(line.family) + 24) + 80 + _escaped(line.source)


def _series_size(line: Line) -> int:
    """An upper bound on the bytes of one label set's sample lines (a timer's carry ``_bucket`` and ``le``)."""
    labels = sum(len(k) + _escaped(v) + 4 for k, v in line.labels)
    return _series_per_labels(line.kind) * (len(line.family) + 24 + labels + _SAMPLE_OVERHEAD)


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
