"""`rpm metrics` below its integration test: the StatsD receiver's translation, and the pipeline collector over
a real (encrypted) warehouse, its published snapshot and a landing folder — rendered and parsed back with
prometheus_client's own exposition writer and parser."""

from __future__ import annotations

import shutil
import subprocess
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from core.landing import SegmentWriter, read_header
from core.settings import Settings
from pipeline.metrics import AuditWatch, PipelineCollector, segment_created
from pipeline.statsd import (
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    Refused,
    StatsdStore,
    parse_line,
)
from tests.promtext import Family, parse
from warehouse.db import clinical
from warehouse.ops import RunCounts, record_failure, record_run
from warehouse.serving import publish_snapshot

P = "rpm_pipeline_"


def render(*collectors) -> str:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# --- StatsD ----------------------------------------------------------------------------------------------------

def test_airflow_statsd_lines_become_prometheus_samples_with_their_tags_as_labels():
    store = StatsdStore()
    store.feed(b"airflow.scheduler_heartbeat:1|c\nairflow.scheduler_heartbeat:1|c")
    store.feed(b"airflow.ti.finish,dag_id=rpm_pipeline,task_id=load,state=success:1|c|@0.5")
    store.feed(b"airflow.executor.open_slots,executor_class_name=LocalExecutor:2|g")
    store.feed(b"airflow.executor.open_slots,executor_class_name=LocalExecutor:-1|g")   # a signed gauge: a change
    store.feed(b"airflow.dag_processing.total_parse_time:0.75|g")
    for ms in (1500, 12500, 40):
        store.feed(f"airflow.dagrun.duration.success,dag_id=rpm_pipeline:{ms}|ms".encode())
    got = samples(render(store))
    assert got[("airflow_scheduler_heartbeat_total", ())] == 2
    assert got[("airflow_ti_finish_total", (("dag_id", "rpm_pipeline"), ("state", "success"),
                                            ("task_id", "load")))] == 2  # sampled at 1 in 2
    assert got[("airflow_executor_open_slots", (("executor_class_name", "LocalExecutor"),))] == 1
    assert got[("airflow_dag_processing_total_parse_time", ())] == 0.75
    dag = (("dag_id", "rpm_pipeline"),)
    assert got[("airflow_dagrun_duration_success_seconds_count", dag)] == 3
    assert got[("airflow_dagrun_duration_success_seconds_sum", dag)] == pytest.approx(14.04)
    buckets = {dict(k[1])["le"]: v for k, v in got.items() if k[0] == "airflow_dagrun_duration_success_seconds_bucket"}
    assert (buckets["0.05"], buckets["1.0"], buckets["2.5"], buckets["10.0"], buckets["30.0"], buckets["+Inf"]) == \
        (1, 1, 2, 2, 3, 3)
    assert got[(P + "statsd_lines_total", (("outcome", "accepted"),))] == 9


@pytest.mark.parametrize(("line", "outcome"), [
    ("airflow.x", "malformed"), ("airflow.x:abc|c", "malformed"), ("airflow.x:1|c|@0", "malformed"),
    ("airflow.x:nan|g", "malformed"), ("airflow.x,dag_id:1|c", "malformed"),
    ("other.x:1|c", "foreign"), ("airflow.dag_processing.processes:-1|c", "negative_counter"),
    ("airflow.x:1|s", "unsupported"), ("airflow.x,a-b=1,a_b=2:1|c", "malformed"),
    ("airflow.x:1e300|c|@1e-10", "malformed"),
    ("airflow." + "k" * (MAX_NAME - 7) + ":1|c", "too_long"),
    ("airflow.x," + "k" * (MAX_LABEL_KEY + 1) + "=v:1|c", "too_long"),
    ("airflow.x,k=" + "v" * (MAX_LABEL_VALUE + 1) + ":1|c", "too_long"),
    ("airflow.x," + ",".join(f"k{i}=v" for i in range(MAX_LABELS + 1)) + ":1|c", "too_many_labels"),
])
def test_lines_that_are_not_kept_are_refused_with_the_reason(line: str, outcome: str):
    with pytest.raises(Refused) as refused:
        parse_line(line)
    assert refused.value.outcome == outcome


def test_what_anyone_sends_to_the_port_cannot_grow_memory_without_bound():
    store = StatsdStore(max_series=3)
    for i in range(10):
        store.feed(f"airflow.flood,n={i}:1|c".encode())
    store.feed(b"airflow.flood:1|g")  # the same name as another type
    got = samples(render(store))
    assert sum(1 for name, _ in got if name == "airflow_flood_total") == 3
    outcomes = {dict(k[1])["outcome"]: v for k, v in got.items() if k[0] == P + "statsd_lines_total"}
    assert (outcomes["accepted"], outcomes["too_many_series"], outcomes["type_conflict"]) == (3, 7, 1)


def test_the_longest_name_and_labels_allowed_are_kept():
    labels = ",".join(f"{i:0{MAX_LABEL_KEY}d}={'v' * MAX_LABEL_VALUE}" for i in range(MAX_LABELS))
    line = parse_line(f"airflow.{'k' * (MAX_NAME - 8)},{labels}:1|ms")
    assert (len(line.source), len(line.labels)) == (MAX_NAME, MAX_LABELS)


def test_a_flood_of_distinct_long_names_leaves_the_store_and_the_scrape_bounded():
    store = StatsdStore(max_families=10, max_bytes=300_000)
    empty = len(render(StatsdStore()))  # the outcome counters alone
    fed = 0

    def flood(start: int, n: int) -> None:
        nonlocal fed
        for i in range(start, start + n):
            name = f"airflow.{i:06d}{'k' * (MAX_NAME - 14)}"
            store.feed(f"{name}:1|c".encode())                                 # a new family each
            store.feed(f"airflow.t,dag={i}{'v' * 240}:1|ms".encode())         # a new timer series each
            store.feed(f"airflow.k{i}{'c' * 8100}:1|c".encode())               # far over the name limit
            fed += 3

    flood(0, 1_000)
    text = render(store)
    assert len(text.encode()) <= store.size + empty <= store.max_bytes + empty
    families = {f.name for f in text_string_to_metric_families(text)} - {P + "statsd_lines"}
    assert len(families) <= 10 + 1  # and the one timer
    outcomes = {dict(k[1])["outcome"]: v for k, v in samples(text).items() if k[0] == P + "statsd_lines_total"}
    assert outcomes["too_long"] == 1_000
    assert outcomes["too_many_families"] > 0 and outcomes["too_many_series"] > 0
    assert sum(outcomes.values()) == fed

    # Once full, three times as much traffic holds no more memory, and the scrape stays the same.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flood(1_000, 3_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 10_000, grown
    assert len(render(store)) - len(text) < 100  # only the outcome counts changed


def exposition_problems(store: StatsdStore) -> list[str]:
    """What promtool and prometheus_client's strict OpenMetrics parser say against the store's exposition."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    text = generate_latest(registry).decode()
    problems = []
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    if len(helps) != len(set(helps)):
        problems.append(f"a name has two HELP lines: {sorted(helps)}")
    exe = shutil.which("promtool")
    assert exe, "promtool not found: `make system` installs Debian's prometheus package, which provides it"
    proc = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    if proc.returncode not in (0, 3):  # 3: lint advice only (e.g. a gauge Airflow named *_total)
        problems.append(proc.stdout + proc.stderr)
    try:
        list(parse_openmetrics(generate_openmetrics(registry).decode()))
    except ValueError as exc:
        problems.append(f"OpenMetrics: {exc}")
    return problems


@pytest.mark.parametrize("lines", [
    ("airflow.x:1|c", "airflow.x_total:5|g"), ("airflow.x_total:5|g", "airflow.x:1|c"),
    ("airflow.y:1|ms", "airflow.y_seconds_count:5|g"), ("airflow.y_seconds_bucket:5|c", "airflow.y:1|ms"),
    ("airflow.z:1|c", "airflow.z_created:2|g"), ("airflow.w_seconds_sum:1|g", "airflow.w:1|ms"),
])
def test_a_name_another_family_already_exposes_is_refused_so_the_exposition_stays_valid(lines: tuple[str, str]):
    store = StatsdStore()
    for line in lines:
        store.feed(line.encode())
    assert exposition_problems(store) == []
    got = samples(render(store))
    assert (got[(P + "statsd_lines_total", (("outcome", "accepted"),))],
            got[(P + "statsd_lines_total", (("outcome", "name_collision"),))]) == (1, 1)
    store.feed(lines[0].encode())  # the first family goes on counting
    assert samples(render(store))[(P + "statsd_lines_total", (("outcome", "accepted"),))] == 2


def test_odd_names_and_label_values_still_give_a_valid_exposition():
    store = StatsdStore()
    store.feed("airflow.t\u00e4sk-1/x,9 key=a\"b\\c:1|c\n\xff\xfe".encode("latin-1"))
    got = samples(render(store))  # prometheus_client's parser reads it back
    assert got[("airflow_t_sk_1_x_total", (("_9_key", 'a"b\\c'),))] == 1
    assert got[(P + "statsd_lines_total", (("outcome", "malformed"),))] == 1
    store.feed(b"airflow.t,__name__=x,le=1:2|ms")
    assert samples(render(store))[("airflow_t_seconds_count", (("tag__name__", "x"), ("tagle", "1")))] == 1


# --- the pipeline collector ------------------------------------------------------------------------------------

OLD = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def _segment(s: Settings, name: str, n: int, sealed: bool = True) -> Path:
    writer = SegmentWriter(s.landing_dir, name)
    for _ in range(n):
        writer.append("rpm/v1/devices/ox-1/vitals", b"{}", datetime.now(UTC))
    if sealed:
        return writer.seal()
    writer.sync()
    writer.close_unsealed()
    return writer.path


@pytest.fixture
def warehouse(settings: Settings, insert_reading: Callable[..., str]) -> Settings:
    """Three recorded runs (two successful, the newest failed), one absorbed and one pending sealed segment,
    one open segment, a published snapshot."""
    s = settings
    _segment(s, f"rpm-ingest-1-{OLD:%Y%m%dT%H%M%S%f}-000001", 4)                    # absorbed below
    _segment(s, f"rpm-ingest-1-{OLD + timedelta(minutes=1):%Y%m%dT%H%M%S%f}-000002", 3)  # pending
    _segment(s, f"rpm-ingest-1-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-000003", 2, sealed=False)
    started = datetime.now(UTC) - timedelta(seconds=30)
    with clinical(s) as con:
        con.execute("""INSERT INTO segments VALUES (?, 4, 11, 8, 2, 1, now(), 'run-1'),
                                                   ('seg-b', 6, 6, 5, 1, 0, now(), 'run-2')""",
                    [f"rpm-ingest-1-{OLD:%Y%m%dT%H%M%S%f}-000001"])
        for minute in range(20):
            insert_reading(con, "pt-1", "heart_rate", 70, OLD + timedelta(minutes=minute))
        # Measured, received 30 s later, loaded 60 s after that.
        con.execute("UPDATE readings SET run_id = 'run-1', received_at = measured_at + INTERVAL 30 SECOND, "
                    "loaded_at = measured_at + INTERVAL 90 SECOND")
        record_run(con, "run-1", started, RunCounts(loaded=8, quarantined=2, duplicates=1,
                                                    failures_by_rule={"plausible_spo2": 2, "unit_known": 1}),
                   {"claim": 0.5, "load": 2.0, "validate": None})
        record_run(con, "run-2", started, RunCounts(loaded=5, quarantined=1, failures_by_rule={"plausible_spo2": 1}),
                   {"claim": 0.25, "load": 1.0})
        record_failure(con, "run-3", "load", "disk full")
        publish_snapshot(s, con)
    return s


def scrape(s: Settings, now: float | None = None) -> dict[str, Family]:
    collector = PipelineCollector(s, AuditWatch(s), clock=(lambda: now) if now else __import__("time").time)
    return parse(render(collector))


def test_run_records_become_counters_and_the_newest_runs_gauges(warehouse: Settings):
    f = scrape(warehouse)
    assert f[P + "snapshot_readable"].value() == 1
    assert f[P + "runs_total"].samples == {(("dag_id", "rpm_pipeline"), ("state", "success")): 2,
                                           (("dag_id", "rpm_pipeline"), ("state", "failed")): 1}
    assert f[P + "last_run_ok"].value(dag_id="rpm_pipeline") == 0  # run-3 failed
    assert f[P + "last_success_timestamp_seconds"].value(dag_id="rpm_pipeline") == \
        pytest.approx(datetime.now(UTC).timestamp(), abs=60)
    assert [f[P + k + "_total"].value() for k in ("received", "loaded", "quarantined", "duplicates")] == \
        [17, 13, 3, 1]
    assert f[P + "quarantine_rule_failures_total"].samples == {(("rule", "plausible_spo2"),): 3,
                                                               (("rule", "unit_known"),): 1}
    # Freshness of the newest run that loaded readings (run-1); task times of the newest successful run (run-2).
    assert f[P + "freshness_p95_seconds"].samples == {(("span", "measured_to_received"),): 30,
                                                      (("span", "received_to_loaded"),): 60,
                                                      (("span", "measured_to_loaded"),): 90}
    assert f[P + "task_duration_seconds"].samples == {(("task", "claim"),): 0.25, (("task", "load"),): 1.0}
    assert 29 < f[P + "run_duration_seconds"].value() < 120
    assert f["rpm_audit_log_ok"].value() == 1
    assert all(fam.help for fam in f.values())


def test_the_backlog_is_what_no_run_has_loaded_and_its_age_the_oldest_message(warehouse: Settings):
    pending_created = OLD + timedelta(minutes=1)
    f = scrape(warehouse, now=pending_created.timestamp() + 120)
    assert f[P + "backlog_segments"].samples == {(("segment_state", "sealed"),): 1, (("segment_state", "open"),): 1}
    assert f[P + "backlog_messages"].samples == {(("segment_state", "sealed"),): 3, (("segment_state", "open"),): 2}
    assert f[P + "backlog_oldest_age_seconds"].value() == pytest.approx(120)


def test_a_scrape_reads_the_published_snapshot_not_the_writers_file(warehouse: Settings):
    with clinical(warehouse) as con:  # a run recorded but not yet published
        record_run(con, "run-4", None, RunCounts(loaded=100), {})
        assert scrape(warehouse)[P + "loaded_total"].value() == 13
        publish_snapshot(warehouse, con)
    assert scrape(warehouse)[P + "loaded_total"].value() == 113


def test_before_the_first_snapshot_only_landing_is_reported(settings: Settings):
    _segment(settings, f"rpm-ingest-1-{OLD:%Y%m%dT%H%M%S%f}-000001", 5)
    f = scrape(settings, now=OLD.timestamp() + 60)
    assert f[P + "snapshot_readable"].value() == 1
    assert P + "runs_total" not in f and P + "snapshot_age_seconds" not in f
    assert f[P + "backlog_messages"].value(segment_state="sealed") == 5
    assert f[P + "backlog_oldest_age_seconds"].value() == pytest.approx(60)


def test_a_segment_whose_name_carries_no_stamp_is_dated_by_its_header(settings: Settings):
    path = _segment(settings, "hand-made", 1)
    header_time = datetime.fromisoformat(read_header(path)["created_at"])
    assert segment_created(path) == pytest.approx(header_time.timestamp())
