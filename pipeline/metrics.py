"""`rpm metrics`: the pipeline's figures, the audit log's state and Airflow's metrics, for Prometheus.

The ingest service exports its own counters (ingest/metrics.py); what the pipeline knows lives in DuckDB —
one record per DAG run (warehouse/ops.py), the segment ledger — and DuckDB lets one process write a file while
even a read-only open of it blocks that writer. So every scrape reads the published serving snapshot
(warehouse/serving.py), never the live file: before the first snapshot the run figures are simply absent, and
nothing here waits for, or holds up, a DAG task. Counters are sums over the run records, so they follow the
records (a pruned record lowers them, which Prometheus' rate() reads as a counter reset).

The audit log is checked on each scrape the way the service checks it before every read (``AuditLog.check``:
incremental, only what was appended since), and walked whole (``verify``) in the background every few minutes.
Airflow's StatsD metrics arrive on a UDP port of the same process (pipeline/statsd.py).

Nothing here carries PHI: counts, ages, rule names, task and DAG ids.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from core.landing import SEGMENT_SUFFIX, count_records, list_sealed, open_dir, read_header
from core.settings import Settings
from pipeline.statsd import StatsdReceiver, StatsdStore
from warehouse.audit import AuditLog
from warehouse.ops import PIPELINE_DAG
from warehouse.serving import current_snapshot, serving

log = logging.getLogger("rpm.metrics")

P = "rpm_pipeline_"
AUDIT_VERIFY_EVERY_S = 300.0  # the full walk costs seconds on a large log; the per-scrape check does not
SPANS = ("measured_to_received", "received_to_loaded", "measured_to_loaded")
STATES = ("success", "failed")


class MetricsError(RuntimeError):
    """The exporter cannot run as configured (disabled, or its address is taken); the message says which."""


# --- the run records -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFigures:
    """What the run records in the serving snapshot say."""
    runs: dict[tuple[str, str], int] = field(default_factory=dict)   # (dag id, state) -> runs
    last_success: dict[str, float] = field(default_factory=dict)     # dag id -> finished, Unix seconds
    last_ok: dict[str, bool] = field(default_factory=dict)           # dag id -> its newest run succeeded
    items: dict[str, int] = field(default_factory=dict)              # received/loaded/quarantined/duplicates
    rule_failures: dict[str, int] = field(default_factory=dict)
    freshness_p95: dict[str, float] = field(default_factory=dict)    # span -> seconds
    task_seconds: dict[str, float] = field(default_factory=dict)
    run_seconds: float | None = None
    rejected_waiting: int = 0


DAG = f"coalesce(dag_id, '{PIPELINE_DAG}')"


def read_runs(con) -> RunFigures:
    """The figures of every run record (a few aggregates over one small table)."""
    runs = {(d, st): int(n) for d, st, n in con.execute(
        f"SELECT {DAG}, state, count(*) FROM pipeline_runs GROUP BY ALL").fetchall()}
    last_success = {d: float(t) for d, t in con.execute(
        f"SELECT {DAG}, max(epoch(finished_at)) FROM pipeline_runs WHERE state = 'success' GROUP BY ALL").fetchall()}
    last_ok = {d: st == "success" for d, st in con.execute(
        f"SELECT {DAG}, arg_max(state, finished_at) FROM pipeline_runs GROUP BY ALL").fetchall()}
    # A run that failed after its record was written keeps its counts: what it loaded stays loaded.
    totals = con.execute(f"""SELECT coalesce(sum(received), 0), coalesce(sum(loaded), 0),
                                    coalesce(sum(quarantined), 0), coalesce(sum(duplicates), 0)
                             FROM pipeline_runs WHERE {DAG} = ?""", [PIPELINE_DAG]).fetchone()
    rules = {str(k): int(v) for k, v in con.execute(
        f"""SELECT key, sum(value::BIGINT) FROM pipeline_runs, json_each(quarantined_by_rule)
            WHERE {DAG} = ? GROUP BY key""", [PIPELINE_DAG]).fetchall()}
    fresh = con.execute(f"""SELECT {', '.join(f'{span}_p95_s' for span in SPANS)} FROM pipeline_runs
                            WHERE received_to_loaded_p95_s IS NOT NULL ORDER BY finished_at DESC LIMIT 1""").fetchone()
    last = con.execute(f"""SELECT task_seconds, epoch(finished_at) - epoch(started_at) FROM pipeline_runs
                           WHERE state = 'success' AND {DAG} = ? ORDER BY finished_at DESC LIMIT 1""",
                       [PIPELINE_DAG]).fetchone()
    rejected = con.execute("SELECT count(*) FROM rejected_segments WHERE replayed_at IS NULL").fetchone()[0]
    tasks = json.loads(last[0]) if last and last[0] else {}
    return RunFigures(
        runs, last_success, last_ok,
        dict(zip(("received", "loaded", "quarantined", "duplicates"), map(int, totals), strict=True)), rules,
        {span: float(v) for span, v in zip(SPANS, fresh or (), strict=False) if v is not None},
        {task: float(sec) for task, sec in tasks.items() if sec is not None},
        float(last[1]) if last and last[1] is not None else None, int(rejected))


def absorbed(con, names: list[str]) -> set[str]:
    """Which of these sealed segments the ledger has absorbed (a lookup by key, however long the ledger)."""
    if not names:
        return set()
    return {r[0] for r in con.execute("SELECT segment FROM segments WHERE segment IN (SELECT unnest(?::VARCHAR[]))",
                                      [names]).fetchall()}


# --- the landing backlog -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backlog:
    """Landed messages no run has loaded yet: in sealed segments the ledger does not list, and in open ones."""
    segments: dict[str, int]
    messages: dict[str, int]
    oldest_age_s: float  # of the oldest such segment (its first message); 0 when nothing waits


def segment_created(path: Path) -> float:
    """When a segment was opened (its first message), Unix seconds: from its name
    (``<client id>-<UTC stamp>-<counter>``, no read), else its header, else the file's time."""
    try:
        stamp = path.stem.rsplit("-", 2)[1]
        return datetime.strptime(stamp, "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC).timestamp()
    except (IndexError, ValueError):
        pass
    try:
        return datetime.fromisoformat(read_header(path)["created_at"]).timestamp()
    except (OSError, ValueError, KeyError):
        return path.stat().st_mtime


class BacklogReader:
    """Counts the backlog. A sealed segment never changes, so its message count is read once and remembered;
    open segments (one per ingest instance, at most segment_max_bytes) are counted on every scrape."""

    def __init__(self, landing_dir: Path):
        self.landing_dir = landing_dir
        self._sealed_counts: dict[str, int] = {}

    def read(self, done: Callable[[list[str]], set[str]], now: float) -> Backlog:
        sealed = list_sealed(self.landing_dir)
        absorbed_names = done([p.stem for p in sealed])
        pending = [p for p in sealed if p.stem not in absorbed_names]
        opened = sorted(open_dir(self.landing_dir).glob(f"*{SEGMENT_SUFFIX}"))
        counts = {p.name: self._sealed_counts.get(p.name) or count_records(p) for p in pending}
        self._sealed_counts = counts  # absorbed segments are forgotten
        waiting = [*pending, *opened]
        oldest = min((segment_created(p) for p in waiting), default=now)
        return Backlog({"sealed": len(pending), "open": len(opened)},
                       {"sealed": sum(counts.values()), "open": sum(count_records(p) for p in opened)},
                       max(0.0, now - oldest))


# --- the audit log -------------------------------------------------------------------------------------------

class AuditWatch:
    """The audit log's state: the cheap incremental check per scrape, the full walk every ``every_s``."""

    def __init__(self, s: Settings, every_s: float = AUDIT_VERIFY_EVERY_S):
        self._settings, self.every_s = s, every_s
        self._log: AuditLog | None = None
        self.full: dict | None = None      # the last full verification's answer
        self.full_at: float | None = None  # and when it finished
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._walk_forever, name="rpm-audit-verify", daemon=True)

    def _audit_log(self) -> AuditLog:
        if self._log is None:
            self._log = AuditLog(self._settings)
        return self._log

    def problem(self) -> str | None:
        """None when the log authenticates (incrementally now, and at the last full walk), else what is wrong.
        As in the service, tampering once found stays found until the exporter restarts."""
        found = self._audit_log().check()
        if found is None and self.full is not None and not self.full["ok"]:
            found = self.full["problem"]
        return found

    def _walk_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.full = self._audit_log().verify()
                self.full_at = time.time()
            except Exception:  # noqa: BLE001 - unreadable keys and the like: said by rpm_audit_log_ok and the log
                log.exception("audit log verification failed")
            self._stop.wait(self.every_s)

    def start(self) -> AuditWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


# --- the collector -------------------------------------------------------------------------------------------

def _gauge(name: str, help: str, value: float | None = None, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value, labels=labels)


def _counter(name: str, help: str, value: float | None = None, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, help, value=value, labels=labels)


M = TypeVar("M", GaugeMetricFamily, CounterMetricFamily)


def _samples(family: M, samples: Iterable[tuple[str, float]]) -> M:
    """``family`` with one sample per (label value, value): the families here have a single label."""
    for label, value in samples:
        family.add_metric([label], value)
    return family


def package_version() -> str:
    try:
        return version("rpm-pipeline")
    except PackageNotFoundError:
        return "unknown"


class PipelineCollector:
    """A prometheus_client collector: every scrape reads the newest serving snapshot, landing and the audit
    log once. Scrapes are served one at a time (a second one waits for the first)."""

    def __init__(self, s: Settings, audit: AuditWatch, statsd: StatsdStore | None = None,
                 clock: Callable[[], float] = time.time):
        self.s, self.audit, self.statsd, self._clock = s, audit, statsd, clock
        self.backlog = BacklogReader(s.landing_dir)
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect(self._clock())
        if self.statsd is not None:
            yield from self.statsd.collect()

    def _collect(self, now: float) -> Iterator[Metric]:
        yield InfoMetricFamily("rpm_pipeline_build", "Version of the rpm pipeline this exporter runs (always 1).",
                               value={"version": package_version(), "python": sys.version.split()[0]})
        snapshot = current_snapshot(self.s)
        figures, backlog = None, None
        try:
            if snapshot is None:  # no run has published one yet: the live file is the writer's, never opened here
                backlog = self.backlog.read(lambda names: set(), now)
            else:
                with serving(self.s) as con:
                    figures = read_runs(con)
                    backlog = self.backlog.read(lambda names: absorbed(con, names), now)
                published = snapshot.stat().st_mtime
        except Exception:  # noqa: BLE001 - a scrape must answer: said by rpm_pipeline_snapshot_readable and the log
            log.exception("reading the serving snapshot failed")
            figures, backlog = None, None
        yield _gauge(P + "snapshot_readable", "1 when this scrape read the serving snapshot (or none is published "
                     "yet), 0 when reading it failed (see the exporter's log).",
                     1.0 if backlog is not None else 0.0)
        if figures is not None:
            yield _gauge(P + "snapshot_age_seconds", "Seconds since the newest serving snapshot was published "
                         "(every pipeline run publishes one).", max(0.0, now - published))
            yield from _run_families(figures)
        if backlog is not None:
            yield from _backlog_families(backlog)
        yield from self._audit_families()

    def _audit_families(self) -> Iterator[Metric]:
        try:
            problem = self.audit.problem()
        except Exception as exc:  # noqa: BLE001 - e.g. its keys unreadable: no read of PHI can be audited either
            problem = f"cannot check the audit log: {exc}"
        if problem is not None:
            log.error("audit log: %s", problem)
        yield _gauge("rpm_audit_log_ok", "1 when the PHI access audit log authenticates against its head (checked "
                     "on every scrape, walked whole every few minutes); 0 when it was tampered with or cannot be "
                     "checked: PHI reads are refused. Stays 0 until the exporter restarts, like the service.",
                     0.0 if problem else 1.0)
        if self.audit.full is not None and self.audit.full_at is not None:
            yield _gauge("rpm_audit_last_full_verify_timestamp_seconds",
                         "When the audit log's whole chain was last walked (Unix seconds).", self.audit.full_at)
            yield _gauge("rpm_audit_records", "Records in the audit log at its last full walk.",
                         float(self.audit.full["records"]))


def _run_families(f: RunFigures) -> Iterator[Metric]:
    runs = _counter(P + "runs", "DAG runs recorded, by DAG and final state.", labels=["dag_id", "state"])
    for dag in sorted({d for d, _ in f.runs} | {PIPELINE_DAG}):
        for state in sorted({st for d, st in f.runs if d == dag} | set(STATES)):
            runs.add_metric([dag, state], f.runs.get((dag, state), 0))
    yield runs
    yield _samples(_gauge(P + "last_success_timestamp_seconds", "When the DAG's newest successful run finished "
                          "(Unix seconds).", labels=["dag_id"]), sorted(f.last_success.items()))
    yield _samples(_gauge(P + "last_run_ok", "1 when the DAG's newest recorded run succeeded, 0 when it failed.",
                          labels=["dag_id"]), ((dag, 1.0 if good else 0.0) for dag, good in sorted(f.last_ok.items())))
    for outcome, help in (
            ("received", "Items (readings, telehealth events, unreadable messages) rpm_pipeline runs took in: "
                         "loaded + quarantined + duplicates."),
            ("loaded", "Items rpm_pipeline runs loaded into the warehouse."),
            ("quarantined", "Items rpm_pipeline runs quarantined (each kept with the rules it failed)."),
            ("duplicates", "Redelivered items rpm_pipeline runs recognised as already loaded (normal under "
                           "at-least-once delivery).")):
        yield _counter(P + outcome, help, f.items.get(outcome, 0))
    yield _samples(_counter(P + "quarantine_rule_failures", "Validation (Great Expectations) rule failures in "
                            "rpm_pipeline runs, by rule; an item failing two rules counts twice, and items "
                            "quarantined before validation (unreadable messages) are not among them.",
                            labels=["rule"]), sorted(f.rule_failures.items()))
    yield _samples(_gauge(P + "freshness_p95_seconds", "95th percentile lag of the newest run that loaded readings: "
                          "measured_to_received (device buffering), received_to_loaded (the pipeline), "
                          "measured_to_loaded (end to end).", labels=["span"]), f.freshness_p95.items())
    yield _samples(_gauge(P + "task_duration_seconds", "Seconds each task took in the newest successful "
                          "rpm_pipeline run.", labels=["task"]), sorted(f.task_seconds.items()))
    if f.run_seconds is not None:
        yield _gauge(P + "run_duration_seconds", "Seconds the newest successful rpm_pipeline run took, start to "
                     "record.", f.run_seconds)
    yield _gauge(P + "rejected_segments_waiting", "Unreadable landing segments set aside in landing/rejected/ "
                 "and not replayed: their messages reach nobody until the cause is fixed.", f.rejected_waiting)


def _backlog_families(b: Backlog) -> Iterator[Metric]:
    segments = _gauge(P + "backlog_segments", "Landing segments waiting for a run: sealed (ready for the next "
                      "run) and open (still being written by ingest).", labels=["segment_state"])
    messages = _gauge(P + "backlog_messages", "Landed messages waiting for a run, by the state of their segment.",
                      labels=["segment_state"])
    for state in ("sealed", "open"):
        segments.add_metric([state], b.segments[state])
        messages.add_metric([state], b.messages[state])
    yield segments
    yield messages
    yield _gauge(P + "backlog_oldest_age_seconds", "Age of the oldest landed message no run has loaded yet (0 when "
                 "nothing waits).", b.oldest_age_s)


# --- the process ---------------------------------------------------------------------------------------------

def serve(s: Settings) -> int:
    """`rpm metrics`: serve /metrics (and receive Airflow's StatsD) in the foreground until SIGTERM/SIGINT."""
    if s.metrics_port <= 0:
        raise MetricsError("the metrics exporter is disabled (RPM_METRICS_PORT=0)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = StatsdStore()
    receiver = None
    try:
        if s.metrics_statsd_port:
            receiver = StatsdReceiver(store, s.metrics_statsd_port, s.metrics_bind).start()
        audit = AuditWatch(s)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PipelineCollector(s, audit, store if receiver else None))
        httpd, _ = start_http_server(s.metrics_port, s.metrics_bind, registry)
    except OSError as exc:
        if receiver is not None:
            receiver.stop()
        raise MetricsError(f"cannot listen on {s.metrics_bind} (http {s.metrics_port}, statsd udp "
                           f"{s.metrics_statsd_port}): {exc.strerror or exc}") from None
    audit.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    statsd = f", Airflow StatsD on udp {s.metrics_bind}:{s.metrics_statsd_port}" if receiver else ""
    print(f"rpm metrics on http://{s.metrics_bind}:{s.metrics_port}/metrics{statsd}", flush=True)
    while not stop.wait(1.0):
        pass
    httpd.shutdown()
    httpd.server_close()
    if receiver is not None:
        receiver.stop()
    audit.stop()
    return 0
